"""The export stage: trained adapter -> merged model -> target files -> verified export dir.

``export_adapter(adapter_dir, out_dir, target="gguf", quant=...)``:

1. checks everything cheap first (target, quant type, optional dependencies, the output dir, the
   adapter against its manifest and its base) so bad input fails in a second with one line;
2. merges (``edgeqlora.merge``; ``merge_base`` auto/original/dequantized) into a scratch
   directory beside the output; for ``adapter_only`` the base alone is written too;
3. has the target's exporter write its files into a temporary sibling of ``out_dir``;
4. verifies them against the merged model on held-out tokens (the exporter's ``verify_export``):
   below the thresholds it raises ExportError and nothing is shipped, unless ``force``;
5. writes ``manifest.json`` (kind ``export``) and renames the directory into place. An existing
   export is replaced only with ``force``, and only once the new one is complete.

With ``device`` (``edgeqlora export --device pi-zero-2w``) the quant is chosen for that device.
The candidates (``DEVICE_CANDIDATES``, best first, or the one ``quant`` asked for) get a
footprint predicted from the base's shapes before anything is written
(``edgeqlora.devices.fit.predict_facts``); those that cannot fit are not exported. The rest are
tried in order of precision, all from one merge:
each is written, verified, parity-gated and fit-checked on its real files in its own temporary
directory, and the first that passes is renamed into place; the losers are deleted. The
decision, the reason and every rejection are recorded in the manifest's ``device`` section.
"""

from __future__ import annotations

import errno
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .artifacts import atomic_dir, prepare_output, versions, write_manifest
from .errors import (ConfigError, DeviceError, EdgeQloraError, ExportError, InputError,
                     MissingDependencyError, ParityError)

log = logging.getLogger(__name__)

# What ``--device`` chooses from, best first. It starts at 8 bits: decode on a CPU is
# bandwidth-bound, so 16-bit weights halve the speed for a difference the parity gate does not
# see (SmolLM2-135M: Q8_0 KLD 0.006 against fp32). Ask for f16 / fp16 with --quant.
DEVICE_CANDIDATES = {
    "gguf": ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m"),
    "onnx": ("int8", "int4-gptq-q8head", "int4-gptq"),
}

# Text whose tokenization must survive the export byte for byte, besides the held-out prompts:
# digits, whitespace runs, unicode, special tokens in text.
TOKENIZER_PROBES = (
    "Set the thermostat to 21.5 degrees at 07:45, then 1234567 and 3.14159.",
    "  leading spaces\tand\ttabs\n\nnew lines  ",
    "ünïcødé — «quotes» 😀 中文 русский",
    "<|im_start|>user\nturn on the lamp<|im_end|>\n<|im_start|>assistant\n",
)


def thresholds_for(exporter, quant: str, cfg=None, overrides: dict[str, float] | None = None
                   ) -> dict[str, float]:
    """Verification thresholds: the exporter's per-quant defaults, replaced by the config's
    ``parity.min_top1`` / ``parity.max_kld`` when those were set away from their defaults, and by
    explicit ``overrides`` last."""
    th = exporter.default_thresholds(quant)
    if cfg is not None:
        from .config import ParityConfig

        default = ParityConfig()
        if cfg.parity.min_top1 != default.min_top1:
            th["min_top1"] = cfg.parity.min_top1
        if cfg.parity.max_kld != default.max_kld:
            th["max_kld"] = cfg.parity.max_kld
    th.update({k: float(v) for k, v in (overrides or {}).items() if v is not None})
    return th


def export_adapter(adapter_dir: str | Path, out_dir: str | Path, target: str = "gguf",
                   quant: str | None = None, merge_base: str = "auto",
                   adapter_only: bool = False, adapter_quant: str = "q8_0",
                   force: bool = False, eval_tokens: int = 2048,
                   thresholds: dict[str, float] | None = None, cfg=None,
                   progress: bool = False, parity: bool = False,
                   device=None, context: int = 2048,
                   **options: Any) -> dict[str, Any]:
    """Merge, export, verify; returns the manifest written to ``out_dir/manifest.json``.

    ``options`` go to the target's writer (ONNX: block_size, symmetric, accuracy_level,
    context_length). With ``parity`` the export is also run through the parity gate against the
    trained model (``edgeqlora.parity``) before it is shipped; the results go in the manifest.

    ``device`` (a profile name, a .toml path or a ``DeviceProfile``) chooses the quant for that
    device at ``context`` tokens (see the module docstring); with ``quant`` too, that quant is
    exported only if it fits. Under ``device``, ``force`` only allows replacing ``out_dir``: an
    export that fails verification, the gate or the fit is never kept. Nothing fits ->
    DeviceError naming the smallest footprint; every fitting quant fails the gate ->
    ParityError naming each one's failing metrics."""
    from . import merge as M
    from .exporters import get_exporter

    exporter = get_exporter(target)
    profile, explicit = None, quant is not None
    if device is not None:
        profile, candidates, tried = _device_candidates(exporter, target, device, quant,
                                                        adapter_only)
        quant = candidates[0]
    else:
        quant = exporter.check_quant(quant or exporter.DEFAULT_QUANT, adapter_only)
        candidates, tried = [quant], []
    if merge_base not in M.MERGE_BASES:
        raise ConfigError(f"merge_base={merge_base!r} is not one of {', '.join(M.MERGE_BASES)}")
    if profile is None and quant in getattr(exporter, "FROM_ADAPTER_QUANTS", ()):
        # Exported from the trained adapter itself (ONNX nf4-exact): nothing to merge.
        th = thresholds_for(exporter, quant, cfg, thresholds)
        manifest = exporter.export_from_adapter(adapter_dir, out_dir, quant, force=force,
                                                eval_tokens=eval_tokens, thresholds=th,
                                                progress=progress, **options)
        if parity:
            manifest = _gate(adapter_dir, Path(out_dir), manifest, cfg, force, in_place=True,
                             progress=progress)
        return manifest
    out_dir = Path(out_dir)
    try:
        prepare_output(out_dir, force=force, what="export")
    except OSError as exc:  # e.g. a parent path that is a file, or a read-only mount
        raise InputError(f"cannot write export {out_dir}: {exc.strerror or exc}") from None
    adapter = M.read_adapter(adapter_dir)
    M.check_fit(adapter)
    # Options that depend on the adapter (GGUF imatrix=auto: its training data), resolved by
    # the exporter before the slow part.
    if hasattr(exporter, "resolve_options"):
        options = exporter.resolve_options(options, adapter.manifest)
    # Target-specific refusals (architecture, adapter layout) before the slow part.
    exporter.check_model(adapter.base_dir, lora_keys=list(adapter.deltas) if adapter_only
                         else None)
    plan: list[tuple[str, Any]] = [(quant, None)]
    if profile is not None:
        block = options.get("block_size") or getattr(exporter, "DEFAULT_OPTIONS", {}).get(
            "block_size", 32)
        plan = _device_plan(adapter.base_dir, target, candidates, profile, context, block,
                            tried, explicit, out_dir)

    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.work-",
                                        dir=out_dir.resolve().parent))
    except OSError as exc:
        raise InputError(f"cannot write export {out_dir}: {exc.strerror}") from None
    try:
        merged = scratch / "merged"
        merged.mkdir()
        result = M._merge_into(adapter, merged, merge_base, "float32", eval_tokens, progress)
        model_dir, lora = merged, None
        if adapter_only:
            model_dir = scratch / "base"
            model_dir.mkdir()
            M.write_merged(adapter, model_dir, result.merge_base, with_lora=False)
            lora = {k: (d.A.numpy(), d.B.numpy(), d.scale) for k, d in adapter.deltas.items()}
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(merged)
        seqs = M.heldout_sequences(adapter.manifest, tok, eval_tokens)
        texts = [_prompt_text(tok, m) for m in M.heldout_conversations(adapter.manifest, 16)]
        texts += list(TOKENIZER_PROBES)
        base_record = {
            "target": target,
            "adapter_only": adapter_only,
            "merge": {k: v for k, v in result.to_dict().items() if k != "out_dir"},
            "source": {
                "adapter": str(Path(adapter_dir).resolve()),
                "adapter_created": adapter.manifest.get("created"),
                "base": adapter.manifest.get("base"),
                "base_fingerprint": adapter.base_fingerprint.get("weights_sha256"),
                "lora": adapter.manifest.get("lora"),
                "quant": adapter.quant,
            },
        }
        reference = None
        for q, predicted in plan:
            if profile is not None:
                _say(progress, f"trying {target} {q} for {profile.name}"
                     + (f" ({predicted.total_bytes / 2**20:.0f} MiB predicted of "
                        f"{profile.usable_mb} MiB usable)" if predicted else ""))
                if parity and reference is None and len(plan) > 1:
                    # One trained model for every attempt's gate, not a reload per quant.
                    reference = _LazyReference(adapter_dir)
            try:
                with atomic_dir(out_dir, force=force, what="export") as tmp:
                    manifest = _write_one(
                        exporter, tmp, out_dir, q, base_record, model_dir, merged, lora,
                        adapter_quant, seqs, texts, thresholds_for(exporter, q, cfg, thresholds),
                        adapter_dir, cfg, force, parity, progress, options, profile, context,
                        predicted, tried, reference, explicit)
                return manifest
            except _Rejected as rejected:
                tried.append(rejected.record)
                _say(progress, f"rejected {q}: {rejected.record['outcome']} "
                     f"({rejected.record['why']})")
        _none_passed(target, profile, context, tried, out_dir)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"disk full while exporting to {out_dir}; free space and run the "
                              "export again (nothing was kept)") from None
        raise ExportError(f"cannot write export {out_dir}: {exc.strerror or exc}") from None
    except EdgeQloraError:
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    raise AssertionError("unreachable: _none_passed raises")


class _Rejected(Exception):
    """A quant tried under ``--device`` that is not shipped; the next candidate is tried."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(record["why"])
        self.record = record


class _LazyReference:
    """``parity.TorchReference``, loaded when the gate first asks for it (an attempt that
    fails verification never does) and then kept for the next attempts."""

    def __init__(self, adapter_dir):
        self.adapter_dir, self._ref = adapter_dir, None

    def __getattr__(self, name: str):
        if self._ref is None:
            from .parity import TorchReference

            self._ref = TorchReference(self.adapter_dir)
        return getattr(self._ref, name)


def _say(enabled: bool, message: str) -> None:
    log.info(message)
    if enabled:
        print(message, file=sys.stderr)


def _write_one(exporter, tmp: Path, out_dir: Path, quant: str, base_record: dict[str, Any],
               model_dir: Path, merged: Path, lora, adapter_quant: str, seqs, texts,
               th: dict[str, float], adapter_dir, cfg, force: bool, parity: bool,
               progress: bool, options: dict[str, Any], profile, context: int, predicted,
               tried: list[dict[str, Any]], reference, explicit: bool) -> dict[str, Any]:
    """Write, verify, gate (and under a device profile: fit-check) one quant into ``tmp``.
    Under a profile a loss raises ``_Rejected``; otherwise the errors of a plain export."""
    target = base_record["target"]
    info = exporter.write_export(model_dir, tmp, quant, lora=lora, adapter_quant=adapter_quant,
                                 progress=progress, **options)
    check = exporter.verify_export(tmp, info, merged, seqs, texts, th)
    if not check["passed"]:
        if profile is not None:
            raise _Rejected(_attempt(quant, predicted, "failed verification",
                                     "; ".join(check["problems"])))
        if not force:
            raise ExportError(
                f"the {target} {quant} export failed verification against the merged model "
                f"({'; '.join(check['problems'])}); nothing was written to {out_dir}. Pass "
                "--force to keep it anyway, or try a higher-precision quant")
    info.pop("plan", None)
    info.pop("readback", None)
    # mkdtemp made the directory private; an export is meant to be shared and served.
    tmp.chmod(0o755)
    record = dict(base_record)
    record.update({
        "quant": quant,
        "quant_mix": info.get("quant_mix"),
        "verification": check,
        "exporter": info,
        "versions": versions("edgeqlora", "gguf", "llama_cpp_python", "onnx", "onnxruntime",
                             "onnx-ir", "onnxruntime-genai", "torch", "transformers", "peft",
                             "bitsandbytes", "safetensors"),
        "parity": "not run (--no-parity)" if not parity else "pending",
    })
    order = ("target", "quant", "quant_mix", "adapter_only", "merge", "verification",
             "exporter", "source", "versions", "parity")
    manifest = write_manifest(tmp, "export", {k: record[k] for k in order})
    if profile is not None:
        # The fit of the real files first: it is cheap, the gate is not.
        from .devices.fit import MiB, fit, model_facts

        real = fit(model_facts(tmp), profile, context)
        if real.verdict not in ("fits", "tight"):
            raise _Rejected(_attempt(
                quant, predicted, real.verdict, f"{real.total_bytes / MiB:.0f} MiB for the "
                f"written files > {profile.usable_mb} MiB usable", total_bytes=real.total_bytes))
    if parity:
        manifest = _gate(adapter_dir, tmp, manifest, cfg, force or profile is not None,
                         progress=progress, reference_model=reference)
        if profile is not None and not manifest["parity"]["passed"]:
            raise _Rejected(_attempt(quant, predicted, "failed the parity gate",
                                     ", ".join(manifest["parity"]["failures"] or [])))
    if profile is None:
        return manifest
    how = "fits" if real.verdict == "fits" else "fits (without the 15 % margin)"
    gated = "passes the parity gate" if parity else "passes verification (parity gate not run)"
    predicted_mib = f"{predicted.total_bytes / MiB:.0f} MiB" if predicted else "no prediction"
    what = f"{quant} (asked for with --quant)" if explicit else \
        f"{quant} is the highest-precision {target} quant that"
    reason = (f"{what} {how} {profile.name} and {gated}: {real.total_bytes / MiB:.0f} MiB for "
              f"the written files ({predicted_mib} predicted before export) of "
              f"{profile.usable_mb} MiB usable at context {context}")
    if tried:
        reason += "; not chosen: " + "; ".join(f"{t['quant']} {t['outcome']} ({t['why']})"
                                               for t in tried)
    chosen = _attempt(quant, predicted, "chosen", f"{real.verdict}: "
                      f"{real.total_bytes / MiB:.0f} MiB for the written files; {gated}",
                      total_bytes=real.total_bytes)
    device = {"name": profile.name, "title": profile.title, "profile": profile.source,
              "context": context, "usable_bytes": profile.usable_bytes,
              "verdict": real.verdict, "predicted_bytes": predicted.total_bytes
              if predicted else None, "total_bytes": real.total_bytes,
              # the fit of the files as shipped (measured in the temporary directory)
              "fit": {**real.to_dict(), "model": str(out_dir)},
              "reason": reason, "tried": [*tried, chosen]}
    return _rewrite_manifest(tmp, manifest, device=device)


def _attempt(quant: str, predicted, outcome: str, why: str, **extra: Any) -> dict[str, Any]:
    return {"quant": quant, "outcome": outcome, "why": why,
            "predicted_bytes": predicted.total_bytes if predicted else None,
            "predicted_verdict": predicted.verdict if predicted else None, **extra}


def _rewrite_manifest(export_dir: Path, manifest: dict[str, Any], **updates: Any
                      ) -> dict[str, Any]:
    """The manifest again with ``updates``, file hashes recomputed."""
    data = {k: v for k, v in manifest.items()
            if k not in ("format_version", "kind", "created", "files")}
    data.update(updates)
    return write_manifest(export_dir, "export", data)


def _device_candidates(exporter, target: str, device, quant: str | None, adapter_only: bool
                       ) -> tuple[Any, list[str], list[dict[str, Any]]]:
    """The profile, the quants to consider (best first) and those left out (with why)."""
    from .devices.profiles import DeviceProfile, load_profile

    profile = device if isinstance(device, DeviceProfile) else load_profile(device)
    if target not in profile.runtimes:
        raise DeviceError(f"{profile.name} has no {target} runtime (it has: "
                          f"{', '.join(profile.runtimes)}); export with --target "
                          f"{profile.runtimes[0]}")
    if quant is not None:
        q = exporter.check_quant(quant, adapter_only)
        if q in getattr(exporter, "FROM_ADAPTER_QUANTS", ()):
            raise ConfigError(f"--device cannot choose or size quant={q} (it is exported from "
                              "the adapter, not from a merge); export it without --device and "
                              "check it with 'edgeqlora devices fit'")
        return profile, [q], []
    candidates, left_out = [], []
    for q in DEVICE_CANDIDATES[target]:
        try:
            candidates.append(exporter.check_quant(q, adapter_only))
        except (ConfigError, MissingDependencyError) as exc:
            left_out.append(_attempt(q, None, "not available", str(exc)))
    if not candidates:
        raise MissingDependencyError(f"no {target} quant can be exported here: " + "; ".join(
            f"{t['quant']}: {t['why']}" for t in left_out))
    return profile, candidates, left_out


def _device_plan(base_dir: Path, target: str, candidates: list[str], profile, context: int,
                 block_size: int, tried: list[dict[str, Any]], explicit: bool, out_dir: Path
                 ) -> list[tuple[str, Any]]:
    """(quant, predicted FitResult) to try, best first; the quants predicted not to fit go
    into ``tried``. Nothing left -> DeviceError before anything is written.

    Precision decides the order, "fits" and "tight" alike. ``pick_quant`` puts the 15 % margin
    first because it chooses among exports whose quality nobody measured; here the parity gate
    measures it, and the tighter choice is said in the reason and the manifest."""
    from . import merge as M
    from .artifacts import read_json
    from .devices.fit import MiB, fit, predict_facts

    config = read_json(base_dir / "config.json", InputError)
    shapes = {name: shape for _, name, shape, _ in M.tensor_specs(base_dir)}

    def predict(q: str):
        try:
            facts = predict_facts(config, shapes, target, q, block_size, path=f"{target} {q}")
        except DeviceError:
            return None  # a quant the size model does not know: only the real files are checked
        return fit(facts, profile, context)

    predicted = {q: predict(q) for q in candidates}
    fitting = [q for q in candidates if predicted[q] is None
               or predicted[q].verdict in ("fits", "tight")]
    for q in candidates:
        if q not in fitting:
            r = predicted[q]
            tried.append(_attempt(q, r, "not exported", f"predicted {r.total_bytes / MiB:.0f} "
                                  f"MiB > {profile.usable_mb} MiB usable"))
    where = f"{profile.name} ({profile.usable_mb} MiB usable) at context {context}"
    if not fitting and explicit:
        q, r = candidates[0], predicted[candidates[0]]
        others = {o: predict(o) for o in DEVICE_CANDIDATES.get(target, ()) if o != q}
        ok = [o for o, ro in others.items() if ro is not None and ro.verdict in ("fits", "tight")]
        hint = (f"{ok[0]} is predicted to fit ({others[ok[0]].total_bytes / MiB:.0f} MiB); "
                "drop --quant to let --device choose") if ok else \
            "no quant is predicted to fit; try a shorter --context or a smaller base model"
        raise DeviceError(f"--quant {q} does not fit {where}: {r.total_bytes / MiB:.0f} MiB "
                          f"predicted ({_parts(r)}); {hint}; nothing was written to {out_dir}")
    if not fitting:
        q = min(candidates, key=lambda c: predicted[c].total_bytes)
        r = predicted[q]
        raise DeviceError(f"no {target} quant fits {where}: the smallest footprint is {q} at "
                          f"{r.total_bytes / MiB:.0f} MiB predicted ({_parts(r)}); try a shorter "
                          f"--context, a smaller base model or a bigger device; nothing was "
                          f"written to {out_dir}")
    return [(q, predicted[q]) for q in fitting]


def _parts(r) -> str:
    MiB = 2**20
    return (f"weights {r.weights_bytes / MiB:.0f} MiB + repacked {r.repacked_bytes / MiB:.0f} "
            f"+ KV cache {r.kv_bytes / MiB:.0f} + runtime {r.runtime_bytes / MiB:.0f}")


def _none_passed(target: str, profile, context: int, tried: list[dict[str, Any]],
                 out_dir: Path) -> None:
    """Every candidate lost: say why for each one, as a ParityError when quality was the
    reason for any of them, else as a DeviceError naming the smallest footprint found."""
    MiB = 2**20
    listing = "; ".join(f"{t['quant']} {t['outcome']} ({t['why']})" for t in tried)
    if any(t["outcome"] in ("failed the parity gate", "failed verification") for t in tried):
        raise ParityError(f"no {target} quant that fits {profile.name} passes the gate: "
                          f"{listing}; nothing was written to {out_dir} (loosen the parity.* "
                          "thresholds, or train a better adapter)")
    sized = [(t.get("total_bytes") or t["predicted_bytes"], t["quant"]) for t in tried
             if t.get("total_bytes") or t["predicted_bytes"]]
    smallest = (f"; the smallest footprint found is {min(sized)[1]} at "
                f"{min(sized)[0] / MiB:.0f} MiB") if sized else ""
    raise DeviceError(f"no {target} quant fits {profile.name} ({profile.usable_mb} MiB usable) "
                      f"at context {context}{smallest}: {listing}; nothing was written to "
                      f"{out_dir}")


def _gate(adapter_dir, export_dir: Path, manifest: dict[str, Any], cfg, force: bool,
          in_place: bool = False, progress: bool = False, reference_model=None
          ) -> dict[str, Any]:
    """Run the parity gate on a written export and record its results in the manifest.

    Beyond the thresholds: ParityError (exit 1) and, unless ``force``, the export is not
    shipped (the caller's atomic write is rolled back; ``in_place`` exports are removed)."""
    from .parity import run_parity

    report_dir = Path(tempfile.mkdtemp(prefix=".parity-", dir=export_dir.resolve().parent))
    shutil.rmtree(report_dir)
    try:
        try:
            report = run_parity(adapter_dir, [export_dir], report_dir, cfg, force=True,
                                max_new_tokens=cfg.max_new_tokens if cfg else 64,
                                progress=progress, reference_model=reference_model)
        except ParityError:
            import json

            report = json.loads((report_dir / "parity.json").read_text())
        name = next(iter(report.get("candidates", {})), None)
        entry = {"passed": report.get("passed"), "thresholds": report.get("thresholds"),
                 "failures": report.get("failures", {}).get(name),
                 "metrics": report.get("candidates", {}).get(name),
                 "reference": report.get("reference")}
        manifest = _rewrite_manifest(export_dir, manifest, parity=entry)
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)
    if not entry["passed"] and not force:
        if in_place:
            shutil.rmtree(export_dir, ignore_errors=True)
        raise ParityError(f"parity gate failed against the trained model "
                          f"({', '.join(entry['failures'] or [])}); the export was not shipped "
                          "(--force keeps it, --no-parity skips the gate)")
    return manifest


def _prompt_text(tokenizer, messages: list[dict]) -> str:
    """A held-out conversation as the device will see it: the chat template up to the answer."""
    prompt = [m for m in messages if m.get("role") != "assistant"]
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

"""The export stage: trained adapter (or merged checkpoint) -> target files -> verified export.

The only place that orchestrates an export; the exporters (``edgeqlora.exporters.gguf``,
``.onnx``) are leaves that write and check files from plain inputs.

``export_adapter(adapter_dir, out_dir, target="gguf", quant=...)``:

1. checks everything cheap first (target, quant, the exporter's options, the output dir, the
   adapter against its manifest and its base, the architecture, the calibration data spec) so
   bad input fails in a second with one line;
2. merges (``edgeqlora.merge``; ``merge_base`` auto/original/dequantized) into a scratch
   directory beside the output; for ``adapter_only`` the base alone is written too, and for the
   ``FROM_ADAPTER_QUANTS`` (ONNX ``nf4-exact``) the unmerged base and the LoRA deltas go to the
   exporter, verified against the trained model instead of a merge;
3. makes the calibration rows the quant asks for once (``heldout.calibration_sequences``) and
   the reference the export is verified against (``heldout.VerifySet``: held-out sequences,
   the reference model's logits on them, texts whose tokenization must match);
4. has the exporter write its files into a temporary sibling of ``out_dir`` and verify them:
   below the thresholds it raises ExportError and nothing is shipped;
5. with ``parity``, runs the parity gate against the trained model (``edgeqlora.parity``);
6. writes ``manifest.json`` (kind ``export``) and renames the directory into place. An existing
   export is replaced only with ``force``, only once the new one is complete and only by one
   that passed every check.

``keep_failed`` keeps an export that fails verification or the gate (for inspection; its
manifest says so, and run, serve, parity, bundle and devices fit refuse it without
``--allow-failed``) and still raises, so the exit code is 1; it never replaces an export that
passed. The output may not be, contain or lie inside the adapter or its base; the hidden
work siblings a killed export left beside ``out_dir`` are removed first.

With ``device`` the quant is chosen for that device (``edgeqlora.export_device``): every
candidate is predicted, those that fit are tried from one merge and one trace, best first, and
only the first that passes verification, the fit of its real files and the gate is kept.

``export_merged(model_dir, out_dir, target=...)`` exports an already merged checkpoint (the
output of ``edgeqlora merge`` or any supported local checkpoint), verified against itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import device_base as DB
from . import export_device as D
from . import export_inputs as inputs
from .artifacts import (atomic_dir, check_apart, export_failures, prepare_output,
                        read_json, remove_stale_siblings, scratch_dir, versions, write_manifest)
from .errors import (ConfigError, DiskFullError, EdgeQloraError, ExportError, InputError,
                     ParityError)
from .schema import write_schema

log = logging.getLogger(__name__)

VERSIONS = ("edgeqlora", "gguf", "llama_cpp_python", "onnx", "onnxruntime", "onnx-ir",
            "onnxruntime-genai", "torch", "transformers", "peft", "bitsandbytes", "safetensors",
            "tokenizers")
MANIFEST_ORDER = ("target", "quant", "quant_mix", "adapter_only", "device_aware", "merge",
                  "schema", "verification",
                  "exporter", "source", "versions", "parity")


def adapter_quant_record(adapter_dir) -> dict[str, Any]:
    """The adapter manifest's ``quant`` section (read again, and verified, by the merge stage);
    {} when there is none to read, so that stage gives the error."""
    from .artifacts import read_json

    try:
        return (read_json(Path(adapter_dir) / "manifest.json") or {}).get("quant") or {}
    except (EdgeQloraError, OSError, AttributeError):
        return {}


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
    bad = [f"{k}={v!r}" for k, v in th.items() if not math.isfinite(v)]
    if bad:
        # A NaN threshold compares false both ways: it would switch the check off.
        raise ConfigError(f"verification thresholds must be finite numbers, got {', '.join(bad)}")
    return th


def _fail_closed(check: dict[str, Any]) -> dict[str, Any]:
    """A verification whose metrics are NaN or infinite has not passed, whatever the exporter's
    comparisons said (NaN is never beyond a threshold)."""
    bad = [f"{k} {check[k]}" for k in ("top1", "kld")
           if isinstance(check.get(k), float) and not math.isfinite(check[k])]
    if bad:
        check["problems"] = [*check.get("problems", []),
                             f"non-finite metrics ({', '.join(bad)}): the export computes NaN "
                             "or infinite logits"]
        check["passed"] = False
    return check


def export_adapter(adapter_dir: str | Path, out_dir: str | Path, target: str | None = None,
                   quant: str | None = None, merge_base: str = "auto",
                   adapter_only: bool = False, adapter_quant: str | None = None,
                   merge: bool = False,
                   force: bool = False, keep_failed: bool = False, eval_tokens: int = 2048,
                   thresholds: dict[str, float] | None = None, cfg=None,
                   progress: bool = False, parity: bool = False,
                   device=None, context: int = 2048,
                   **options: Any) -> dict[str, Any]:
    """Merge, export, verify; returns the manifest written to ``out_dir/manifest.json``.

    ``target``: gguf unless the adapter is device-aware (then the one it was trained for).
    ``options`` go to the target's writer (GGUF: imatrix, imatrix_rows; ONNX: block_size,
    symmetric, accuracy_level, context_length, calibration_data, calibration_rows). With
    ``parity`` the export is also run through the parity gate against the trained model before
    it is shipped; the results go in the manifest.

    A device-aware adapter (trained on ``quant=gguf-q4_k_m`` etc., ``device_base``) is exported
    unmerged: the base GGUF written with the same function it was trained on (each tensor checked
    against the adapter's sha256) plus the LoRA GGUF at the adapter's own precision
    (``adapter_quant`` overrides), verified against the trained model. Another target or quant
    is refused unless ``merge`` (merge into the trained base's weights and re-quantize).

    ``device`` (a profile name, a .toml path or a ``DeviceProfile``) chooses the quant for that
    device at ``context`` tokens; with ``quant`` too, that quant is exported only if it fits.
    Under ``device`` an export that fails verification, the gate or the fit is never kept
    (``keep_failed`` is refused). Nothing fits -> DeviceError naming the
    smallest footprint; every fitting quant fails the gate -> ParityError naming each one's
    failing metrics."""
    from . import merge as M
    from .exporters import get_exporter

    check_apart(out_dir, {"adapter": adapter_dir}, "export")
    if keep_failed and device is not None:
        raise ConfigError("--keep-failed keeps a failed export for inspection; with --device "
                          "only a quant that fits and passes is ever kept: drop one of them")
    target = target or DB.trained_target(adapter_quant_record(adapter_dir), merge)
    exporter = get_exporter(target)
    trained_quant = DB.export_quant(adapter_quant_record(adapter_dir), adapter_dir, target, quant) \
        if not merge else None
    if trained_quant is not None:  # device-aware: the trained base + the LoRA, unmerged
        quant, adapter_only = trained_quant, True
        adapter_quant = adapter_quant or DB.lora_precision(Path(adapter_dir))
    adapter_quant = adapter_quant or "q8_0"
    if merge:
        DB.check_merge(adapter_quant_record(adapter_dir), adapter_dir, target,
                       quant or exporter.DEFAULT_QUANT, merge_base)
    profile = None
    explicit: bool | str = "the base the device-aware adapter was trained on" \
        if trained_quant is not None else quant is not None
    if device is not None:
        profile, candidates, tried = D.candidates_for(exporter, target, device, quant,
                                                      adapter_only)
    else:
        candidates, tried = [exporter.check_quant(quant or exporter.DEFAULT_QUANT,
                                                  adapter_only)], []
    from_adapter = [q for q in candidates if q in getattr(exporter, "FROM_ADAPTER_QUANTS", ())]
    if from_adapter and len(candidates) > 1:
        raise AssertionError("device candidates never include quants made from the adapter")
    given, options = options, exporter.check_options(options)
    if trained_quant is not None:  # the options that made the trained bytes (ONNX block size)
        options = DB.export_options(adapter_quant_record(adapter_dir), options, given)
    out_dir = Path(out_dir)
    _prepare(out_dir, force)
    adapter = M.read_adapter(adapter_dir)
    if "identity" in options and options["identity"] is None:  # an exporter that writes one
        options["identity"] = inputs.identity(adapter)
    check_apart(out_dir, {"base model": adapter.base_dir}, "export")
    M.check_fit(adapter)
    M.resolve_merge_base(adapter, merge_base)
    if from_adapter:
        lora_keys = inputs.check_from_adapter(adapter, from_adapter[0])
    else:
        lora_keys = list(adapter.deltas) if adapter_only else None
    # Target-specific refusals (architecture, adapter layout) before the slow part.
    exporter.check_model(adapter.base_dir, lora_keys=lora_keys)
    requests = inputs.calibration_requests(exporter, candidates, options, adapter.manifest)
    plan: list[tuple[str, Any]] = [(q, None) for q in candidates]
    if profile is not None:
        plan = D.plan(adapter.base_dir, target, candidates, profile, context, options, tried,
                      explicit, out_dir)
    scratch = _scratch(out_dir)
    try:
        check = None
        if from_adapter:
            model_dir, lora, merge_record = inputs.from_adapter_inputs(adapter, scratch, options)
            reference = inputs.trained_reference(adapter, model_dir, eval_tokens)
        elif trained_quant is not None:
            model_dir = scratch / "base"
            model_dir.mkdir()
            M.write_merged(adapter, model_dir, "original", with_lora=False)
            lora, merge_record = inputs.lora_arrays(adapter), None
            reference = inputs.trained_reference(adapter, model_dir, eval_tokens, n_texts=16)
            recorded = adapter.quant.get("device") or {}

            def check(tmp: Path, info: dict[str, Any]) -> None:
                info["device_base_tensors_checked"] = DB.check_written(
                    tmp / info["model_file"], recorded)
        else:
            merged = scratch / "merged"
            merged.mkdir()
            # ``best`` measures both bases against the trained model; ``auto`` merges into the
            # one the adapter was trained against, with no torch run (the parity gate is the
            # comparison with the trained model).
            result = M._merge_into(adapter, merged, merge_base, "float32",
                                   eval_tokens if merge_base == "best" else 0, progress)
            merge_record = {k: v for k, v in result.to_dict().items() if k != "out_dir"}
            model_dir, lora = merged, None
            if adapter_only:
                model_dir = scratch / "base"
                model_dir.mkdir()
                M.write_merged(adapter, model_dir, result.merge_base, with_lora=False,
                               dequantized=M.dequantized_base(adapter)
                               if result.merge_base == "dequantized" else None)
                lora = inputs.lora_arrays(adapter)
            reference = inputs.merged_reference(merged, adapter.manifest, eval_tokens,
                                                known=getattr(result, "logits", None))
        schema, schema_source = inputs.answer_schema(adapter)
        base_record = {
            "target": target,
            "adapter_only": adapter_only,
            "schema": {"json_schema": schema, "source": schema_source} if schema else None,
            "device_aware": trained_quant is not None,
            "merge": merge_record,
            "source": {
                "adapter": str(Path(adapter_dir).resolve()),
                "adapter_created": adapter.manifest.get("created"),
                "base": adapter.manifest.get("base"),
                "base_fingerprint": adapter.base_fingerprint.get("weights_sha256"),
                "lora": adapter.manifest.get("lora"),
                "quant": adapter.quant,
            },
        }
        calibrations = inputs.Calibrations(requests, model_dir)
        gate = _Gate(adapter_dir, cfg, parity, progress, scratch, shared=len(plan) > 1)
        reuse = getattr(exporter, "reuse_traces", None) if len(plan) > 1 else None
        with reuse() if reuse else contextlib.nullcontext():
            for q, predicted in plan:
                if profile is not None:
                    _say(progress, f"trying {target} {q} for {profile.name}"
                         + (f" ({predicted.total_bytes / 2**20:.0f} MiB predicted of "
                            f"{profile.usable_mb} MiB usable)" if predicted else ""))
                job = _Job(exporter, q, model_dir, lora, adapter_quant, calibrations.get(q),
                           reference, thresholds_for(exporter, q, cfg, thresholds), options,
                           progress, check)
                try:
                    with atomic_dir(out_dir, force=force, what="export") as tmp:
                        manifest = _write_one(job, tmp, out_dir, base_record, keep_failed, gate,
                                              profile, context, predicted, tried, explicit)
                    return _kept(manifest, out_dir, target, quant=q)
                except D.Rejected as rejected:
                    tried.append(rejected.record)
                    _say(progress, f"rejected {q}: {rejected.record['outcome']} "
                         f"({rejected.record['why']})")
        D.none_passed(target, profile, context, tried, out_dir)
    except OSError as exc:
        raise _os_error(exc, out_dir) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    raise AssertionError("unreachable: none_passed raises")


def export_merged(model_dir: str | Path, out_dir: str | Path, target: str = "onnx",
                  quant: str | None = None, *, force: bool = False, keep_failed: bool = False,
                  eval_tokens: int = 1024, thresholds: dict[str, float] | None = None,
                  progress: bool = False, **options: Any) -> dict[str, Any]:
    """Export an already merged Hugging Face checkpoint (``edgeqlora merge`` output, or any
    supported local checkpoint): write, verify against that checkpoint on held-out tokens,
    write ``manifest.json``, rename into place. Calibrated quants need ``calibration_data``
    (there is no adapter whose training data ``auto`` could mean)."""
    from .exporters import get_exporter

    exporter = get_exporter(target)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_apart(out_dir, {"model": model_dir}, "export")
    quant = exporter.check_quant(quant or exporter.DEFAULT_QUANT)
    if quant in getattr(exporter, "FROM_ADAPTER_QUANTS", ()):
        raise ConfigError(f"quant={quant} is exported from a trained adapter (its 4-bit base "
                          "and unmerged LoRA), not from a merged checkpoint; pass the adapter "
                          "directory instead")
    options = exporter.check_options(options)
    requests = inputs.calibration_requests(exporter, [quant], options, {})
    exporter.check_model(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"{model_dir} has no tokenizer.json; an export ships the Hugging Face "
                         "tokenizer beside the model (copy tokenizer.json, tokenizer_config.json "
                         "and the chat template from the base model)")
    _prepare(out_dir, force)
    calibration = inputs.Calibrations(requests, model_dir).get(quant)
    reference = inputs.merged_reference(model_dir, {}, eval_tokens, n_texts=8)
    job = _Job(exporter, quant, model_dir, None, None, calibration, reference,
               thresholds_for(exporter, quant, None, thresholds), options, progress)
    record = {"target": target, "adapter_only": False, "merge": None,
              "source": {"merged": str(model_dir.resolve())}}
    try:
        with atomic_dir(out_dir, force=force, what="export") as tmp:
            manifest = _write_one(job, tmp, out_dir, record, keep_failed,
                                  _Gate(None, None, False, progress, None))
        return _kept(manifest, out_dir, target, quant)
    except OSError as exc:
        raise _os_error(exc, out_dir) from None


class _Job:
    """One quant to write and verify, with everything the exporter needs."""

    def __init__(self, exporter, quant, model_dir, lora, adapter_quant, calibration, reference,
                 thresholds, options, progress, check=None):
        self.exporter, self.quant, self.model_dir, self.lora = exporter, quant, model_dir, lora
        self.adapter_quant, self.calibration = adapter_quant, calibration
        self.reference, self.thresholds = reference, thresholds
        self.options, self.progress = options, progress
        self.check = check  # (tmp, info) -> None: raises if the written files are not right


def _write_one(job: _Job, tmp: Path, out_dir: Path, base_record: dict[str, Any],
               keep_failed: bool, gate: "_Gate", profile=None, context: int = 2048, predicted=None,
               tried: list[dict[str, Any]] | None = None, explicit: bool = False
               ) -> dict[str, Any]:
    """Write, verify, gate (and under a device profile: fit-check) one quant into ``tmp``.
    Under a profile a loss raises ``Rejected``; otherwise the errors of a plain export, or
    with ``keep_failed`` the failed export's manifest (``_kept`` raises once it is in place)."""
    from .exporters import PRIVATE_INFO

    target, quant = base_record["target"], job.quant
    kwargs = {"adapter_quant": job.adapter_quant} if job.adapter_quant else {}
    info = job.exporter.write_export(job.model_dir, tmp, quant, lora=job.lora,
                                     calibration=job.calibration, progress=job.progress,
                                     **kwargs, **job.options)
    schema = base_record.get("schema") or {}
    base_record = {**base_record, "schema": {"file": write_schema(tmp, schema["json_schema"]),
                                             "source": schema["source"]} if schema else None}
    if job.check is not None:
        job.check(tmp, info)
    check = _fail_closed(job.exporter.verify_export(tmp, info, job.reference, job.thresholds))
    check.setdefault("reference", job.reference.label)
    if not check["passed"]:
        if profile is not None:
            raise D.Rejected(D.attempt(quant, predicted, "failed verification",
                                       "; ".join(check["problems"])))
        if not keep_failed:
            raise ExportError(
                f"the {target} {quant} export failed verification against the "
                f"{job.reference.label} ({'; '.join(check['problems'])}); nothing was written "
                f"to {out_dir}{_previous(out_dir)}. Try a higher-precision quant, or pass "
                "--keep-failed to keep it for inspection")
        _refuse_replacing_good(out_dir, f"the {target} {quant} export failed verification")
    for key in PRIVATE_INFO:
        info.pop(key, None)
    # mkdtemp made the directory private; an export is meant to be shared and served.
    tmp.chmod(0o755)
    record = {**base_record, "quant": quant, "quant_mix": info.get("quant_mix"),
              "verification": check, "exporter": info, "versions": versions(*VERSIONS),
              "parity": "not run (verification failed)" if not check["passed"] else
              "pending" if gate.enabled else "not run (--no-parity)"}
    manifest = write_manifest(tmp, "export", {k: record[k] for k in MANIFEST_ORDER
                                              if k in record})
    real = None if profile is None else D.check_real_fit(tmp, quant, profile, context, predicted)
    if gate.enabled and check["passed"]:
        manifest = gate.run(tmp, manifest, keep_failed or profile is not None)
        if not manifest["parity"]["passed"] and profile is None:
            _refuse_replacing_good(out_dir, f"the {target} {quant} export failed the parity "
                                            "gate")
        if profile is not None and not manifest["parity"]["passed"]:
            raise D.Rejected(D.attempt(quant, predicted, "failed the parity gate",
                                       ", ".join(manifest["parity"]["failures"] or [])))
    if profile is None:
        return manifest
    return _rewrite_manifest(tmp, manifest, device=D.record(
        target, quant, profile, context, predicted, real, gate.enabled, explicit, tried or [],
        out_dir))


class _Gate:
    """The parity gate on a written export, against the trained model. Under ``--device``
    the trained model is loaded once for every attempt (and only if one gets that far)."""

    def __init__(self, adapter_dir, cfg, enabled: bool, progress: bool, scratch: Path | None,
                 shared: bool = False):
        self.adapter_dir, self.cfg, self.enabled = adapter_dir, cfg, enabled
        self.progress, self.shared, self._ref, self.scratch = progress, shared, None, scratch

    def run(self, export_dir: Path, manifest: dict[str, Any], keep: bool) -> dict[str, Any]:
        """The gate's results in the manifest. Beyond the thresholds the export is not shipped
        (ParityError, exit 1; the atomic write is rolled back) unless ``keep`` (then the
        caller decides)."""
        from .parity import TorchReference, run_parity

        if self.shared and self._ref is None:
            self._ref = TorchReference(self.adapter_dir)
        report_dir = Path(tempfile.mkdtemp(prefix="parity-", dir=self.scratch))
        shutil.rmtree(report_dir)
        try:
            try:
                report = run_parity(self.adapter_dir, [export_dir], report_dir, self.cfg,
                                    force=True, max_new_tokens=self.cfg.max_new_tokens
                                    if self.cfg else 64, progress=self.progress,
                                    reference_model=self._ref, allow_failed=True)
            except ParityError:
                report = json.loads((report_dir / "parity.json").read_text())
            name = next(iter(report.get("candidates", {})), None)
            metrics = report.get("candidates", {}).get(name)
            runtime = (metrics or {}).get("runtime") or {}
            for key in ("path", "lora"):  # the scratch copy it was gated in: name the file
                runtime[key] = runtime.get(key) and Path(runtime[key]).name
            entry = {"passed": report.get("passed"), "thresholds": report.get("thresholds"),
                     "failures": report.get("failures", {}).get(name), "metrics": metrics,
                     "reference": report.get("reference")}
            manifest = _rewrite_manifest(export_dir, manifest, parity=entry)
        finally:
            shutil.rmtree(report_dir, ignore_errors=True)
        if not entry["passed"] and not keep:
            raise ParityError(f"parity gate failed against the trained model "
                              f"({', '.join(entry['failures'] or [])}); the export was not "
                              "shipped (--keep-failed keeps it for inspection, --no-parity "
                              "skips the gate)")
        return manifest


def _kept(manifest: dict[str, Any], out_dir: Path, target: str, quant: str) -> dict[str, Any]:
    """``manifest`` of an export now in place; one that failed a check (``keep_failed``)
    raises, so the command exits 1 and names where it was kept."""
    problems = export_failures(manifest)
    if not problems:
        return manifest
    error = ParityError if isinstance(manifest.get("parity"), dict) and \
        manifest["parity"].get("passed") is not True else ExportError
    raise error(f"the {target} {quant} export failed: {'; '.join(problems)}; kept for "
                f"inspection at {out_dir} (--keep-failed). run, serve, parity, bundle and "
                "devices fit refuse it without --allow-failed")


def _previous(out_dir: Path) -> str:
    return "; the export already there is untouched" if (out_dir / "manifest.json").is_file() \
        else ""


def _refuse_replacing_good(out_dir: Path, what: str) -> None:
    """``--keep-failed`` never replaces an export that passed its checks."""
    try:
        old = read_json(out_dir / "manifest.json")
    except (EdgeQloraError, OSError):
        return
    if isinstance(old, dict) and old.get("kind") == "export" and not export_failures(old):
        raise ExportError(f"{what}; the export already at {out_dir} passed its checks and is "
                          "kept (--keep-failed never replaces a good export: give the failed "
                          "one another --out)")


def _rewrite_manifest(export_dir: Path, manifest: dict[str, Any], **updates: Any
                      ) -> dict[str, Any]:
    """The manifest again with ``updates``, file hashes recomputed."""
    data = {k: v for k, v in manifest.items()
            if k not in ("format_version", "kind", "created", "files")}
    data.update(updates)
    return write_manifest(export_dir, "export", data)


def _prepare(out_dir: Path, force: bool) -> None:
    try:
        prepare_output(out_dir, force=force, what="export")
        remove_stale_siblings(out_dir)
    except OSError as exc:  # e.g. a parent path that is a file, or a read-only mount
        raise InputError(f"cannot write export {out_dir}: {exc.strerror or exc}") from None


def _scratch(out_dir: Path) -> Path:
    try:
        return scratch_dir(out_dir, "work")
    except OSError as exc:
        raise InputError(f"cannot write export {out_dir}: {exc.strerror}") from None


def _os_error(exc: OSError, out_dir: Path) -> EdgeQloraError:
    if exc.errno == errno.ENOSPC:
        return DiskFullError(f"disk full while exporting to {out_dir}; free space and run the "
                           "export again (nothing was kept)")
    return ExportError(f"cannot write export {out_dir}: {exc.strerror or exc}")


def _say(enabled: bool, message: str) -> None:
    log.info(message)
    if enabled:
        print(message, file=sys.stderr)

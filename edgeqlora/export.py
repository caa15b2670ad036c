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
"""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .artifacts import atomic_dir, prepare_output, versions, write_manifest
from .errors import EdgeQloraError, ExportError, InputError

log = logging.getLogger(__name__)

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
                   **options: Any) -> dict[str, Any]:
    """Merge, export, verify; returns the manifest written to ``out_dir/manifest.json``.

    ``options`` go to the target's writer (ONNX: block_size, symmetric, accuracy_level,
    context_length). With ``parity`` the export is also run through the parity gate against the
    trained model (``edgeqlora.parity``) before it is shipped; the results go in the manifest."""
    from . import merge as M
    from .exporters import get_exporter

    exporter = get_exporter(target)
    quant = exporter.check_quant(quant or exporter.DEFAULT_QUANT, adapter_only)
    if merge_base not in M.MERGE_BASES:
        from .errors import ConfigError

        raise ConfigError(f"merge_base={merge_base!r} is not one of {', '.join(M.MERGE_BASES)}")
    th = thresholds_for(exporter, quant, cfg, thresholds)
    if quant in getattr(exporter, "FROM_ADAPTER_QUANTS", ()):
        # Exported from the trained adapter itself (ONNX nf4-exact): nothing to merge.
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
    # Target-specific refusals (architecture, adapter layout) before the slow part.
    exporter.check_model(adapter.base_dir, lora_keys=list(adapter.deltas) if adapter_only
                         else None)

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

        with atomic_dir(out_dir, force=force, what="export") as tmp:
            info = exporter.write_export(model_dir, tmp, quant, lora=lora,
                                         adapter_quant=adapter_quant, progress=progress,
                                         **options)
            check = exporter.verify_export(tmp, info, merged, seqs, texts, th)
            if not check["passed"] and not force:
                raise ExportError(
                    f"the {target} {quant} export failed verification against the merged model "
                    f"({'; '.join(check['problems'])}); nothing was written to {out_dir}. Pass "
                    "--force to keep it anyway, or try a higher-precision quant")
            info.pop("plan", None)
            info.pop("readback", None)
            # mkdtemp made the directory private; an export is meant to be shared and served.
            tmp.chmod(0o755)
            manifest = write_manifest(tmp, "export", {
                "target": target,
                "quant": quant,
                "quant_mix": info.get("quant_mix"),
                "adapter_only": adapter_only,
                "merge": {k: v for k, v in result.to_dict().items() if k != "out_dir"},
                "verification": check,
                "exporter": info,
                "source": {
                    "adapter": str(Path(adapter_dir).resolve()),
                    "adapter_created": adapter.manifest.get("created"),
                    "base": adapter.manifest.get("base"),
                    "base_fingerprint": adapter.base_fingerprint.get("weights_sha256"),
                    "lora": adapter.manifest.get("lora"),
                    "quant": adapter.quant,
                },
                "versions": versions("edgeqlora", "gguf", "llama_cpp_python", "onnx",
                                     "onnxruntime", "onnx-ir", "onnxruntime-genai", "torch",
                                     "transformers", "peft", "bitsandbytes", "safetensors"),
                "parity": "not run (--no-parity)" if not parity else "pending",
            })
            if parity:
                manifest = _gate(adapter_dir, tmp, manifest, cfg, force, progress=progress)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"disk full while exporting to {out_dir}; free space and run the "
                              "export again (nothing was kept)") from None
        raise ExportError(f"cannot write export {out_dir}: {exc.strerror or exc}") from None
    except EdgeQloraError:
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def _gate(adapter_dir, export_dir: Path, manifest: dict[str, Any], cfg, force: bool,
          in_place: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run the parity gate on a written export and record its results in the manifest.

    Beyond the thresholds: ParityError (exit 1) and, unless ``force``, the export is not
    shipped (the caller's atomic write is rolled back; ``in_place`` exports are removed)."""
    from .artifacts import write_manifest
    from .errors import ParityError
    from .parity import run_parity

    report_dir = Path(tempfile.mkdtemp(prefix=".parity-", dir=export_dir.resolve().parent))
    shutil.rmtree(report_dir)
    try:
        try:
            report = run_parity(adapter_dir, [export_dir], report_dir, cfg, force=True,
                                max_new_tokens=cfg.max_new_tokens if cfg else 64,
                                progress=progress)
        except ParityError:
            import json

            report = json.loads((report_dir / "parity.json").read_text())
        name = next(iter(report.get("candidates", {})), None)
        entry = {"passed": report.get("passed"), "thresholds": report.get("thresholds"),
                 "failures": report.get("failures", {}).get(name),
                 "metrics": report.get("candidates", {}).get(name),
                 "reference": report.get("reference")}
        data = {k: v for k, v in manifest.items()
                if k not in ("format_version", "kind", "created", "files")}
        data["parity"] = entry
        manifest = write_manifest(export_dir, "export", data)
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

"""Exporters: one module per target, looked up by name in ``EXPORTERS``.

Installed as ``edgeqlora.exporters``. Each exporter writes an export directory (model files,
tokenizer, chat template, manifest.json) and validates its own output. The stage that merges the
adapter, picks held-out data, writes atomically and records the manifest is
``edgeqlora.export.export_adapter``; ``export()`` here is its entry by target name.

An exporter module provides:

- ``QUANTS``, ``DEFAULT_QUANT`` and ``check_quant(quant, adapter_only=False) -> str`` (raises a
  ConfigError listing valid types, or MissingDependencyError, before any work starts);
- ``check_model(model_dir, lora_keys=None)``: refuse what it cannot export (architecture...)
  before any slow work;
- ``default_thresholds(quant) -> {"min_top1": ..., "max_kld": ...}`` for its own verification;
- ``write_export(model_dir, out_dir, quant, *, lora=None, progress=False, **options) -> info``:
  write the target files from a merged Hugging Face checkpoint (``model_dir``) into ``out_dir``;
  ``info`` (JSON-able apart from its ``plan`` and ``readback`` keys) goes into the
  manifest;
- ``verify_export(out_dir, info, reference_dir, sequences, texts, thresholds) -> dict`` with
  ``passed`` and ``problems``: the export run through its runtime against the reference.

Modules are imported only when asked for, so ``import edgeqlora.exporters`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from edgeqlora.errors import ConfigError

EXPORTERS = {
    "gguf": "edgeqlora.exporters.gguf",
    "onnx": "edgeqlora.exporters.onnx",
}


def get_exporter(target: str):
    """The exporter module for ``target``; an unknown name lists the valid ones."""
    name = (target or "").strip().lower()
    if name not in EXPORTERS:
        raise ConfigError(f"export target {target!r} is not one of {', '.join(EXPORTERS)}")
    return importlib.import_module(EXPORTERS[name])


def export(target: str, adapter_dir, out_dir, **options: Any) -> dict[str, Any]:
    """Merge ``adapter_dir`` and export it for ``target`` into ``out_dir``; returns the export
    manifest. Options: see ``edgeqlora.export.export_adapter``."""
    get_exporter(target)
    from edgeqlora.export import export_adapter

    return export_adapter(adapter_dir, out_dir, target=target, **options)

"""Exporters: one package per target, looked up by name in ``EXPORTERS``.

Installed as ``edgeqlora.exporters``. Exporters are leaves: they take plain inputs (a Hugging
Face checkpoint directory, LoRA deltas as numpy arrays, calibration sequences, a
``heldout.VerifySet`` with the reference logits), write the target's files into a directory
the caller owns, and check them. They import only the core (``edgeqlora.errors``,
``artifacts``, ``metrics``, ``heldout``, ``rows``, ``config``), ``runtimes`` and their own
siblings; the one export stage that merges, picks held-out data, gates, writes atomically and
records the manifest is ``edgeqlora.export``.

An exporter package provides:

- ``QUANTS``, ``DEFAULT_QUANT``, ``DEFAULT_OPTIONS`` and ``check_quant(quant,
  adapter_only=False) -> str`` (a ConfigError listing the valid types, or a
  MissingDependencyError, before any work starts);
- ``check_options(options) -> dict``: defaults filled in, unknown or bad options named together;
- ``check_model(model_dir, lora_keys=None)``: refuse what it cannot export (architecture, RoPE
  scaling, LoRA on the embedding...) before any slow work;
- ``default_thresholds(quant) -> {"min_top1": ..., "max_kld": ...}`` for its own verification;
- ``calibration_request(quant, options) -> None | {"spec", "rows", "max_len", "what"}``: the
  calibration rows the quant needs (``spec`` may be ``"auto"``: the adapter's training data);
  the stage makes them with ``heldout.calibration_sequences`` and passes them back;
- ``write_export(model_dir, out_dir, quant, *, lora=None, adapter_quant=..., calibration=None,
  progress=False, **options) -> info``: write the target files into ``out_dir`` (an existing,
  empty directory); ``info`` (JSON-able apart from the keys in ``PRIVATE_INFO``) goes into the
  manifest;
- ``verify_export(out_dir, info, reference, thresholds) -> dict`` with ``passed`` and
  ``problems``: the files run through their runtime against ``reference`` (a VerifySet);
- ``predict(config, shapes, quant, *, tokenizer_dir=None, **options) -> {"file_bytes",
  "tensors", "n_params"}``: the size of an export from the base's ``config.json`` and tensor
  shapes (and its tokenizer files, where the target's file holds the vocabulary), before
  anything is written (``devices.fit`` asks it);
- optionally ``reuse_traces()``, a context manager under which writing several quants of one
  checkpoint shares the work they have in common (ONNX: the torch trace); the stage enters it
  when ``--device`` may try more than one quant.

Packages are imported only when asked for, so ``import edgeqlora.exporters`` stays cheap.
"""

from __future__ import annotations

import importlib

from edgeqlora.errors import ConfigError

EXPORTERS = {
    "gguf": "edgeqlora.exporters.gguf",
    "onnx": "edgeqlora.exporters.onnx",
}
# ``info`` keys an exporter passes from write_export to verify_export that are not manifest data.
PRIVATE_INFO = ("plan", "readback")


def get_exporter(target: str):
    """The exporter package for ``target``; an unknown name lists the valid ones."""
    name = (target or "").strip().lower()
    if name not in EXPORTERS:
        raise ConfigError(f"export target {target!r} is not one of {', '.join(EXPORTERS)}")
    return importlib.import_module(EXPORTERS[name])

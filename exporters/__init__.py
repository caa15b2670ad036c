"""Exporters: one module per target, looked up by name in ``EXPORTERS``.

Installed as ``edgeqlora.exporters``. Each exporter writes an export directory (model files,
tokenizer, chat template, manifest.json) and validates its own output.
"""

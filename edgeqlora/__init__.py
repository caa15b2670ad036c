"""edgeqlora: QLoRA fine-tuning to GGUF / ONNX int4 exports with parity proof.

Importing this package must stay cheap and torch-free: a device install has only numpy and its
runtime. Heavy libraries load inside the functions that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

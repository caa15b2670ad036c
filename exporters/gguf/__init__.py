"""GGUF export (llama.cpp): a merged Hugging Face checkpoint or a LoRA adapter -> ``.gguf``,
checked in llama.cpp against the reference. The exporter interface of ``edgeqlora.exporters``.

Built on the ``gguf`` package (``GGUFWriter``, ``Keys``, ``get_tensor_name_map``, ``gguf.quants``)
and llama.cpp's kernels; the layout is never hand-rolled. One module per job:

- ``common``: quant names, the llama-cpp-python check, progress, write errors (a leaf);
- ``metadata``: the architecture table and ``check_model``, hyperparameters, vocabulary;
  ``pretokenizers``: llama.cpp's pre-tokenizer fingerprints;
- ``plan``: every tensor's GGUF name, type and order, llama.cpp's K-quant rules included;
- ``kernels``: RoPE permutation, gguf's numpy quantizers, llama.cpp's ``ggml_quantize_chunk``;
- ``writer``: the streaming writer and llama.cpp's quantizer; ``imatrix``: the importance
  matrix; ``lora``: adapter GGUFs; ``modelfile``: the Ollama Modelfile;
- ``verify``: read-back and the check in llama.cpp; ``predict``: the size before writing;
- ``options`` and ``exporter``: the interface below.

Interface: ``QUANTS``, ``DEFAULT_QUANT``, ``DEFAULT_OPTIONS``, ``check_quant``,
``check_options``, ``check_model``, ``default_thresholds``, ``calibration_request``,
``write_export``, ``verify_export``, ``predict``. The writer's functions (``write_model_gguf``,
``quantize_gguf``, ``write_lora_gguf``, ``plan_tensors``, ``read_config``, ``read_back``) are
exported too, for scripts and benchmarks; ``tensor_bytes`` and ``tensor_digests`` for the
device-aware base (``edgeqlora.device_base``). Importing the package loads neither torch nor gguf.
"""

from __future__ import annotations

from .common import (ADAPTER_QUANTS, DEFAULT_QUANT, DIRECT_QUANTS, K_QUANTS, QUANTS,
                     check_adapter_quant, check_quant)
from .exporter import verify_export, write_export
from .lora import write_lora_gguf
from .metadata import check_model, read_config
from .options import (DEFAULT_OPTIONS, VERIFY_THRESHOLDS, calibration_request, check_options,
                      default_thresholds)
from .plan import plan_tensors
from .predict import predict
from .verify import read_back, tensor_digests
from .writer import quantize_gguf, tensor_bytes, write_model_gguf

__all__ = [
    "ADAPTER_QUANTS", "DEFAULT_OPTIONS", "DEFAULT_QUANT", "DIRECT_QUANTS", "K_QUANTS", "QUANTS",
    "VERIFY_THRESHOLDS", "calibration_request", "check_adapter_quant", "check_model",
    "check_options", "check_quant", "default_thresholds", "plan_tensors", "predict",
    "quantize_gguf", "read_back", "read_config", "tensor_bytes", "tensor_digests", "verify_export",
    "write_export", "write_lora_gguf", "write_model_gguf",
]

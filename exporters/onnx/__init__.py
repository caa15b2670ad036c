"""ONNX exporter: a Hugging Face checkpoint -> ``model.onnx`` with a KV cache, int4/int8
MatMulNBits (or fp16/fp32 weights, or the trained NF4 codes + unmerged LoRA), for onnxruntime
and onnxruntime-genai. The exporter interface of ``edgeqlora.exporters``; one job per module:

- ``recipes``: quant recipes, options, thresholds, calibration requests, checkpoint checks;
- ``graph``: torch -> fp32 ONNX with the KV cache as explicit tensors (``reuse_traces``: one
  trace per checkpoint for several exports of it);
- ``quantize``: MatMulNBits quantization, fp16 weights, the embedding table, operator counts;
- ``gptq``: calibrated int4 (GPTQ on calibration sequences, HQQ);
- ``lora``: adapter-only exports (LoRA graph inputs + onnxruntime adapter files);
- ``nf4``: ``nf4-exact``, the bitsandbytes NF4 codes in MatMulBnb4 + the unmerged LoRA;
- ``genai``: genai_config.json, tokenizer files, the onnxruntime-genai load check;
- ``write``: ``write_export``, the steps above in order;
- ``verify``: ``verify_export`` through ``runtimes.onnx`` against a ``heldout.VerifySet``;
- ``sizes``: ``predict``, the size of an export from ``config.json`` and tensor shapes.

Importing the package is cheap: onnx, onnxruntime and torch load inside the functions.
"""

from __future__ import annotations

from .sizes import predict
from .recipes import (CALIBRATED, DEFAULT_OPTIONS, DEFAULT_QUANT, FROM_ADAPTER_QUANTS, QUANTS,
                      RECIPES, VERIFY_THRESHOLDS, calibration_request, check_model,
                      check_options, check_quant, default_thresholds)
from .graph import reuse_traces
from .verify import verify_export
from .write import write_export

__all__ = ["CALIBRATED", "DEFAULT_OPTIONS", "DEFAULT_QUANT", "FROM_ADAPTER_QUANTS", "QUANTS",
           "RECIPES", "VERIFY_THRESHOLDS", "calibration_request", "check_model",
           "check_options", "check_quant", "default_thresholds", "predict", "reuse_traces",
           "verify_export", "write_export"]

"""Importance-matrix (imatrix) quantization, calibrated on the data the adapter was fine-tuned on.

llama.cpp's K-quants (and Q4_0/Q5_0...) can weight each weight's rounding error by how large the
input it multiplies is: ``llama-imatrix`` measures, for every 2-D weight in the blocks, the mean
over calibration tokens of the squared input activation per input column, and ``llama-quantize
--imatrix`` hands that row to ``ggml_quantize_chunk`` for the tensor. Here:

1. the calibration sequences come from the export stage (``heldout.calibration_sequences``: the
   first rows of a data spec, tokenized exactly as in training); ``calibration_request`` says
   which rows this quant needs;
2. ``compute_imatrix``: forward pre-hooks on the ``nn.Linear`` modules of the decoder blocks of
   the fp32 model accumulate ``sum x_j^2`` and the token count (what llama-imatrix does; like
   its default, the embedding and output head get none: only ``blk.*`` tensors);
3. the one-pass writer applies the rows as it quantizes each tensor; where llama.cpp's own
   quantizer wrote the file, ``apply_imatrix`` quantizes every tensor whose type uses an imatrix
   again from the F32 source GGUF with its row, in place. Types, shapes, order, metadata and
   alignment stay exactly what llama.cpp wrote.

Why not ``llama_model_quantize_params.imatrix``: it is a C++ ``std::unordered_map*``, which ctypes
cannot build. ``ggml_quantize_chunk`` is the function llama.cpp's quantizer calls per tensor with
that row (``kernels.quantize_rows``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from edgeqlora.errors import ExportError, InputError

from . import common
from .kernels import quantize_rows
from .metadata import model_arch, read_config

# Calibration rows by default: ~9k tokens of the embedded task's chat-templated commands; the
# count the quickstart measurements were taken with (one forward per row through the decoder).
DEFAULT_ROWS = 128
MAX_LEN = 512
NONE = "none"
AUTO = "auto"

# ggml types whose quantizer reads an importance matrix (ggml-quants.c: quantize_q4_0 ...
# quantize_q6_K use ``quant_weights`` when given; Q8_0, F16, F32, BF16 ignore it).
IMATRIX_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Export quants for which an imatrix changes anything (the others are exact or Q8_0).
IMATRIX_QUANTS = ("q4_0", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k")


def check_imatrix(value: str | None) -> str:
    """``none`` | ``auto`` | a data spec (path or ``embedded:...``), normalised; a path that does
    not exist is refused here, before any work."""
    if value is None:
        return NONE
    text = str(value).strip()
    if text.lower() in (NONE, "", "false", "off"):
        return NONE
    if text.lower() == AUTO:
        return AUTO
    if not text.startswith("embedded:") and not Path(text).expanduser().exists():
        raise InputError(f"imatrix={text!r}: no such file or directory; give 'auto' (the "
                         "adapter's training data), 'none', or a .jsonl file / save_to_disk "
                         "directory of calibration rows")
    return text


def compute_imatrix(model_dir: str | Path, sequences: list[list[int]],
                    progress: bool = False) -> dict[str, Any]:
    """``{gguf tensor name: float32 [in_features]}``: the mean over the tokens of
    ``sequences`` of each input column's squared activation, for every ``nn.Linear`` in the
    decoder blocks of the fp32 model in ``model_dir``."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    cfg = read_config(Path(model_dir))
    arch, _ = model_arch(cfg)
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def pre(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[name] += (x * x).sum(0)
            counts[name] += x.shape[0]
        return pre

    for hf_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        name = tmap.get_name(hf_name + ".weight", try_suffixes=(".weight",))
        # llama-imatrix's default: block tensors only (token_embd is a lookup, and the output
        # head is left out unless --process-output).
        if name is None or not name.startswith("blk."):
            continue
        sums[name] = torch.zeros(module.in_features, dtype=torch.float64)
        counts[name] = 0
        hooks.append(module.register_forward_pre_hook(hook(name)))
    if not hooks:
        raise InputError(f"{model_dir}: no linear layer in the decoder blocks to calibrate")
    # The decoder alone: the output head gets no imatrix, and on a 135M model with a 49k
    # vocabulary it is a fifth of the forward's cost.
    decoder = model.get_decoder()
    try:
        with torch.no_grad():
            for ids in common.progress(sequences, "imatrix: calibrating", progress):
                decoder(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, s in sums.items():
        values = (s / max(counts[name], 1)).numpy().astype(np.float32)
        if not np.all(np.isfinite(values)):
            raise ExportError(f"imatrix for {name} is not finite (the model's activations "
                              "overflow on the calibration data)")
        out[name] = values
    return out


def imatrix_sha256(imatrix: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(imatrix):
        h.update(name.encode())
        h.update(imatrix[name].tobytes())
    return h.hexdigest()


def apply_imatrix(f32_path: str | Path, quant_path: str | Path, imatrix: dict[str, Any] | None,
                  progress: bool = False) -> dict[str, Any]:
    """Re-quantize, in place in ``quant_path``, every tensor whose type uses an importance matrix
    and that has a row in ``imatrix``, from its F32 source in ``f32_path`` (same tensor names,
    as written by this exporter). ``imatrix=None`` re-quantizes those tensors without one, which
    must reproduce llama.cpp's bytes. Returns what was done, per tensor name.

    Both files are located through ``read_gguf_header`` (the tensor table without parsing the
    vocabulary, which costs ``gguf.GGUFReader`` seconds per file) and memory-mapped."""
    import gguf
    import numpy as np

    from edgeqlora.runtimes.gguf_header import read_gguf_header

    src = {t.name: t for t in read_gguf_header(f32_path, ExportError)[1]}
    tensors = read_gguf_header(quant_path, ExportError)[1]
    done, without = [], []
    source = np.memmap(f32_path, dtype=np.uint8, mode="r")
    target = np.memmap(quant_path, dtype=np.uint8, mode="r+")
    try:
        targets = [t for t in tensors if t.type in IMATRIX_TYPES]
        for t in common.progress(targets, "imatrix: re-quantizing", progress):
            row = None if imatrix is None else imatrix.get(t.name)
            if imatrix is not None and row is None:
                without.append(t.name)  # e.g. token_embd: kept as llama.cpp quantized it
                continue
            s = src.get(t.name)
            if s is None or s.type != "F32":
                raise ExportError(f"{f32_path} has no F32 tensor {t.name} to re-quantize from")
            n_per_row = int(t.dims[0])
            data = np.frombuffer(source, dtype=np.float32, count=s.n_elements,
                                 offset=s.offset).reshape(-1, n_per_row)
            if row is not None and row.shape != (n_per_row,):
                raise ExportError(f"imatrix row for {t.name} has {row.shape[0]} entries, the "
                                  f"tensor's rows {n_per_row}")
            q = quantize_rows(data, gguf.GGMLQuantizationType[t.type], row)
            if q.size != t.n_bytes:
                raise ExportError(f"{t.name}: {q.size} bytes re-quantized, {t.n_bytes} in "
                                  f"{quant_path}")
            target[t.offset:t.offset + t.n_bytes] = q.reshape(-1)
            done.append(t.name)
        target.flush()
    finally:
        del source, target
    return {"requantized": done, "without_imatrix": without}


def build_imatrix(model_dir: str | Path, sequences: list[list[int]], progress: bool = False
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The imatrix of the model in ``model_dir`` on ``sequences``, with what the manifest
    records of it (entries, sha256, seconds)."""
    global _LAST
    # ``export --device`` may write several K-quants from one merge: calibrate once.
    files = sorted(Path(model_dir).glob("*.safetensors"))
    ids = hashlib.sha256(json.dumps(sequences, separators=(",", ":")).encode()).hexdigest()
    key = (str(Path(model_dir).resolve()), ids,
           tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if _LAST is not None and _LAST[0] == key:
        return _LAST[1], dict(_LAST[2])
    t0 = time.perf_counter()
    imatrix = compute_imatrix(model_dir, sequences, progress)
    record = {"entries": len(imatrix), "sha256": imatrix_sha256(imatrix),
              "seconds": round(time.perf_counter() - t0, 2)}
    _LAST = (key, imatrix, dict(record))
    return imatrix, record


_LAST: tuple | None = None

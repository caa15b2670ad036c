"""Importance-matrix (imatrix) quantization for the GGUF exporter, calibrated on the data the
adapter was fine-tuned on.

llama.cpp's K-quants (and Q4_0/Q5_0...) can weight each weight's rounding error by how large the
input it multiplies is: ``llama-imatrix`` measures, for every 2-D weight in the blocks, the mean
over calibration tokens of the squared input activation per input column, and ``llama-quantize
--imatrix`` hands that row to ``ggml_quantize_chunk`` for the tensor. Here:

1. ``calibration_sequences``: the first ``rows`` rows of a data spec (``imatrix=auto``: the
   adapter's training data from its manifest), tokenized exactly as in training
   (``edgeqlora.data.tokenize_dataset``: the chat template, cut at ``max_len``);
2. ``compute_imatrix``: forward pre-hooks on the ``nn.Linear`` modules of the decoder blocks of
   the merged fp32 model accumulate ``sum x_j^2`` and the token count (what llama-imatrix does;
   like its default, the embedding and output head get none: only ``blk.*`` tensors);
3. ``apply_imatrix``: after llama.cpp's own quantizer has written the file (and chosen its per
   tensor type mix), every tensor whose type uses an imatrix is quantized again from the F32
   source GGUF by ``ggml_quantize_chunk`` (llama.cpp's libggml, shipped in llama-cpp-python),
   with the tensor's imatrix row, and its bytes are replaced in place through ``GGUFReader``'s
   writable memory map. Types, shapes, order, metadata and alignment stay exactly what llama.cpp
   wrote.

Why not ``llama_model_quantize_params.imatrix``: it is a C++ ``std::unordered_map*``, which ctypes
cannot build. ``ggml_quantize_chunk`` is the function llama.cpp's quantizer calls per tensor with
that row, so the kernels are llama.cpp's own; called with no imatrix it reproduces llama.cpp's
file byte for byte (tested), which shows the re-quantization path is the quantizer's.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from edgeqlora.errors import ConfigError, DataError, ExportError, InputError

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


def training_data_spec(adapter_manifest: dict[str, Any]) -> str:
    """The data spec the adapter was trained on, as its manifest records it."""
    config = adapter_manifest.get("config") or {}
    spec = str((adapter_manifest.get("data") or {}).get("spec") or config.get("data") or "")
    if not spec:
        raise InputError("imatrix=auto: the adapter's manifest names no training data; pass "
                         "--imatrix PATH (a .jsonl of calibration rows)")
    if not spec.startswith("embedded:") and not Path(spec).expanduser().exists():
        raise InputError(f"imatrix=auto: the adapter was trained on {spec}, which does not "
                         "exist here; pass --imatrix PATH to the same data")
    return spec


def calibration_sequences(tokenizer, spec: str, rows: int = DEFAULT_ROWS,
                          max_len: int = MAX_LEN) -> tuple[list[list[int]], dict[str, Any]]:
    """Token ids of the first ``rows`` usable rows of ``spec``, tokenized as in training, and a
    record for the manifest (spec, dataset sha256, rows, tokens, sha256 of the ids)."""
    from edgeqlora.data import dataset_sha256, load_dataset, tokenize_dataset

    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"imatrix rows={rows!r} must be an integer >= 1")
    try:
        data = load_dataset(spec)
        examples = tokenize_dataset(tokenizer, data.rows[:rows], max_len).examples
    except DataError as exc:
        raise DataError(f"imatrix calibration data {spec}: {exc}") from None
    except InputError as exc:
        raise InputError(f"imatrix calibration data: {exc}") from None
    seqs = [ex["input_ids"] for ex in examples if len(ex["input_ids"]) >= 2]
    if not seqs:
        raise DataError(f"imatrix calibration data {spec}: no row gives 2+ tokens")
    digest = hashlib.sha256(json.dumps(seqs, separators=(",", ":")).encode()).hexdigest()
    return seqs, {"data": str(spec), "data_sha256": dataset_sha256(spec), "rows": len(seqs),
                  "tokens": sum(len(s) for s in seqs), "max_len": max_len,
                  "ids_sha256": digest}


def compute_imatrix(model_dir: str | Path, sequences: list[list[int]],
                    progress: bool = False) -> dict[str, Any]:
    """``{gguf tensor name: float32 [in_features]}``: the mean over the tokens of
    ``sequences`` of each input column's squared activation, for every ``nn.Linear`` in the
    decoder blocks of the fp32 model in ``model_dir``."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from .gguf import _progress, model_arch, read_config

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
            for ids in _progress(sequences, "imatrix: calibrating", progress):
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


class _Ggml:
    """ctypes bindings to the three libggml functions llama-cpp-python's own bindings do not
    expose (its ``_ggml.py`` has none of them)."""

    def __init__(self):
        import llama_cpp
        from llama_cpp._ctypes_extensions import load_shared_library

        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        lib = None
        # Shared builds put the quantizers in ggml-base; static ones fold them into llama.
        for name in ("ggml-base", "ggml", "llama"):
            try:
                candidate = load_shared_library(name, lib_dir)
            except (OSError, RuntimeError, FileNotFoundError):
                continue
            if hasattr(candidate, "ggml_quantize_chunk"):
                lib = candidate
                break
        if lib is None:
            raise ExportError(f"llama-cpp-python's libraries in {lib_dir} do not export "
                              "ggml_quantize_chunk; imatrix quantization needs it (reinstall "
                              "llama-cpp-python, or export with imatrix=none)")
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        self.lib = lib


_GGML: _Ggml | None = None


def _ggml() -> _Ggml:
    global _GGML
    if _GGML is None:
        _GGML = _Ggml()
    return _GGML


def quantize_rows(data, qtype, imatrix=None, nthread: int = 0):
    """``data`` (float32 ``[nrows, n_per_row]``) in the on-disk form of the ggml type ``qtype``
    (a ``gguf.GGMLQuantizationType``), through llama.cpp's ``ggml_quantize_chunk``, weighted by
    ``imatrix`` (float32 ``[n_per_row]``) when given. Returns uint8 ``[nrows, row_size]``."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    g = _ggml().lib
    src = np.ascontiguousarray(data, dtype=np.float32)
    nrows, n_per_row = src.shape
    row_size = int(g.ggml_row_size(int(qtype), n_per_row))
    dst = np.zeros((nrows, row_size), dtype=np.uint8)
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert qw.shape == (n_per_row,), (qw.shape, n_per_row)
    elif g.ggml_quantize_requires_imatrix(int(qtype)):
        raise ExportError(f"{qtype.name} needs an importance matrix")
    qw_ptr = qw.ctypes.data if qw is not None else None
    # Row chunks in threads, as llama.cpp's quantizer does; ctypes releases the GIL per call.
    workers = max(1, min(nthread or (os.cpu_count() or 1), nrows))
    step = max(1, -(-nrows // workers))

    def run(r0: int) -> int:
        n = min(step, nrows - r0)
        return int(g.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data,
                                         r0 * n_per_row, n, n_per_row, qw_ptr))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        written = sum(pool.map(run, range(0, nrows, step)))
    if written != dst.nbytes:
        raise ExportError(f"ggml_quantize_chunk wrote {written} bytes for a {qtype.name} tensor "
                          f"of {dst.nbytes}")
    return dst


def apply_imatrix(f32_path: str | Path, quant_path: str | Path, imatrix: dict[str, Any] | None,
                  progress: bool = False) -> dict[str, Any]:
    """Re-quantize, in place in ``quant_path``, every tensor whose type uses an importance matrix
    and that has a row in ``imatrix``, from its F32 source in ``f32_path`` (same tensor names,
    as written by this exporter). ``imatrix=None`` re-quantizes those tensors without one, which
    must reproduce llama.cpp's bytes. Returns what was done, per tensor name."""
    import gguf
    import numpy as np

    from .gguf import _progress

    src = {t.name: t for t in gguf.GGUFReader(str(f32_path)).tensors}
    reader = gguf.GGUFReader(str(quant_path), "r+")
    done, without = [], []
    try:
        targets = [t for t in reader.tensors if t.tensor_type.name in IMATRIX_TYPES]
        for t in _progress(targets, "imatrix: re-quantizing", progress):
            row = None if imatrix is None else imatrix.get(t.name)
            if imatrix is not None and row is None:
                without.append(t.name)  # e.g. token_embd: kept as llama.cpp quantized it
                continue
            s = src.get(t.name)
            if s is None or s.tensor_type != gguf.GGMLQuantizationType.F32:
                raise ExportError(f"{f32_path} has no F32 tensor {t.name} to re-quantize from")
            n_per_row = int(t.shape[0])
            data = np.asarray(s.data, dtype=np.float32).reshape(-1, n_per_row)
            if row is not None and row.shape != (n_per_row,):
                raise ExportError(f"imatrix row for {t.name} has {row.shape[0]} entries, the "
                                  f"tensor's rows {n_per_row}")
            q = quantize_rows(data, t.tensor_type, row)
            if q.size != t.data.size:
                raise ExportError(f"{t.name}: {q.size} bytes re-quantized, {t.data.size} in "
                                  f"{quant_path}")
            t.data.reshape(-1)[:] = q.reshape(-1)
            done.append(t.name)
        reader.data.flush()
    finally:
        del reader
    return {"requantized": done, "without_imatrix": without}


def build_imatrix(model_dir: str | Path, spec: str, rows: int = DEFAULT_ROWS,
                  max_len: int = MAX_LEN, progress: bool = False
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibration sequences from ``spec`` -> imatrix of the model in ``model_dir``; with the
    manifest record (source, rows, tokens, hashes, seconds)."""
    from transformers import AutoTokenizer

    global _LAST
    # ``export --device`` may write several K-quants from one merge: calibrate once.
    files = sorted(Path(model_dir).glob("*.safetensors"))
    key = (str(Path(model_dir).resolve()), str(spec), rows, max_len,
           tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if _LAST is not None and _LAST[0] == key:
        return _LAST[1], dict(_LAST[2])
    t0 = time.perf_counter()
    seqs, record = calibration_sequences(AutoTokenizer.from_pretrained(model_dir), spec, rows,
                                         max_len)
    imatrix = compute_imatrix(model_dir, seqs, progress)
    record.update(entries=len(imatrix), sha256=imatrix_sha256(imatrix),
                  seconds=round(time.perf_counter() - t0, 2))
    _LAST = (key, imatrix, dict(record))
    return imatrix, record


_LAST: tuple | None = None

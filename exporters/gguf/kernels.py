"""Array functions of the GGUF exporter: the Q/K RoPE permutation, the on-disk bytes of a ggml
type (gguf's numpy quantizers, bit-exact with ggml), and llama.cpp's own quantizer kernels.

``quantize_rows`` calls ``ggml_quantize_chunk`` from the libggml that llama-cpp-python ships
(through ctypes: llama-cpp-python's bindings do not expose it). It is the function llama.cpp's
quantizer calls per tensor, with the tensor's importance-matrix row when it has one, so the
K-quant mixes are written with llama.cpp's kernels; called with no imatrix it reproduces
``llama_model_quantize``'s bytes (tested).
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any

from edgeqlora import threads
from edgeqlora.errors import ExportError


def permute_qk(w, n_head: int, n_head_kv: int | None):
    """llama.cpp's ``LlamaModel.permute``: HF's rotate-half layout -> ggml's interleaved pairs
    (rows of each head reordered; works on weights [out, in] and biases [out])."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w, n_head: int, n_head_kv: int | None):
    """The inverse of ``permute_qk``: ggml's interleaved pairs back to HF's rotate-half rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def encode(data, qtype):
    """numpy array in the on-disk form of ``qtype`` (gguf.quants, bit-exact with ggml)."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    # NaN or out-of-range weights (a diverged adapter) make numpy warn on the casts; the export's
    # verification refuses such a file in one line, and the warning would only add lines to it.
    with np.errstate(invalid="ignore", over="ignore"):
        if qtype == Q.F16:
            return np.ascontiguousarray(data, dtype=np.float16)
        return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def nbytes(shape: list[int], qtype) -> tuple[Any, tuple[int, ...], int]:
    """(numpy dtype, array shape, byte count) of a tensor of HF ``shape`` stored as ``qtype``,
    as ``GGUFWriter.add_tensor_info`` takes them."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.float32, tuple(shape), math.prod(shape) * 4
    if qtype == Q.F16:
        return np.float16, tuple(shape), math.prod(shape) * 2
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return np.uint8, tuple(byte_shape), math.prod(byte_shape)


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
    workers = max(1, min(nthread or threads.free_cores(), nrows))
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

"""Writing a model GGUF: the streaming writer (``write_model_gguf``) and llama.cpp's own
quantizer (``quantize_gguf``).

The writer follows the tensor plan (``plan``) tensor by tensor, each in chunks of rows, so peak
memory is one chunk whatever the model's size. Direct types go through gguf's numpy quantizers;
the K-quant mixes through llama.cpp's kernels (``kernels.quantize_rows``), weighted by an
importance-matrix row where one is given, which writes the bytes ``llama_model_quantize`` would
(tested) without its F32 temporary file (a 1 B model: 4 GB written and read back).
``quantize_gguf`` remains for the models whose mix the plan leaves to llama.cpp.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any

from edgeqlora import threads
from edgeqlora.errors import ConfigError, ExportError, MissingDependencyError

from . import common
from .common import K_QUANTS, LLAMA_CPP_INSTALL, QUANTS, gguf_writer
from .imatrix import IMATRIX_TYPES
from .kernels import encode, nbytes, permute_qk, quantize_rows
from .metadata import add_hparams, add_vocab, file_type, model_arch, read_config
from .plan import plan_tensors

# Rows read, converted and written at a time: peak memory is about this much (plus its converted
# copy), whatever the model's size.
STREAM_CHUNK_BYTES = 32 * 2**20


class _StreamedTensor:
    """One planned tensor as ``GGUFWriter.write_tensor_data`` takes it (it uses only ``nbytes``
    and ``tofile``), read from the safetensors file, converted and written a chunk of rows at a
    time. Hand-written because gguf's writer takes whole arrays (its lazy tensors are evaluated
    whole): a 0.8 B model's 384 MiB embedding then costs its fp32 copy, the mapped file pages and
    the converted copy at once. Every ggml type quantizes row by row, so chunks of rows give the
    same bytes as the whole tensor (tested). Q/K weights are read whole: the RoPE permutation
    moves rows within a head."""

    def __init__(self, t: dict[str, Any], heads: tuple[int, int] | None, chunk_bytes: int,
                 imatrix_row=None):
        self.t, self.heads, self.chunk_bytes = t, heads, chunk_bytes
        self.nbytes = nbytes(t["shape"], t["qtype"])[2]
        self.imatrix_row = imatrix_row

    def _encode(self, data):
        qtype = self.t["qtype"]
        if not self.t.get("ggml") or qtype.name in ("F32", "F16"):
            return encode(data, qtype)
        # llama.cpp's own kernels (K-quant mixes): the bytes its quantizer writes.
        return quantize_rows(data.reshape(-1, data.shape[-1]), qtype, self.imatrix_row)

    def _read(self, start: int | None = None, stop: int | None = None):
        import numpy as np
        from safetensors import safe_open

        if "values" in self.t:  # made by the plan, not in the checkpoint (rope_freqs)
            return np.asarray(self.t["values"], dtype=np.float32)[start:stop]
        if self.t.get("shift"):  # 1-D norms, read whole
            with safe_open(str(self.t["file"]), framework="np") as f:
                return np.asarray(f.get_tensor(self.t["src"]), dtype=np.float32) \
                    + np.float32(self.t["shift"])

        # A fresh safe_open per read: safetensors memory-maps the file, and pages read through a
        # mapping kept open stay resident (RSS would grow to the model size).
        with safe_open(str(self.t["file"]), framework="np") as f:
            if start is None:
                data = f.get_tensor(self.t["src"])
            else:
                data = f.get_slice(self.t["src"])[start:stop]
            # No copy when the checkpoint is already fp32 (the merge writes fp32).
            return np.asarray(data, dtype=np.float32)

    def chunks(self):
        """The tensor's on-disk bytes, as numpy arrays of consecutive row chunks."""
        shape = self.t["shape"]
        if self.heads is not None or len(shape) < 2:
            data = self._read()
            if self.heads is not None:
                data = permute_qk(data, *self.heads)
            yield self._encode(data)
            return
        rows = max(1, self.chunk_bytes // (4 * math.prod(shape[1:])))
        for start in range(0, shape[0], rows):
            stop = min(start + rows, shape[0])  # safetensors slices do not clamp
            yield self._encode(self._read(start, stop))

    def tofile(self, fout) -> None:
        for chunk in self.chunks():
            chunk.tofile(fout)


def rope_heads(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(heads, heads of this kind) for the q and k RoPE permutation, by plan ``permute`` kind."""
    n_head = cfg["num_attention_heads"]
    return {"q": (n_head, n_head), "k": (n_head, cfg.get("num_key_value_heads", n_head))}


def tensor_bytes(model_dir: str | Path, quant: str, plan: list[dict[str, Any]] | None = None):
    """``(plan entry, bytes)`` for every tensor of ``model_dir``'s GGUF at ``quant``, in plan
    order: the bytes ``write_model_gguf`` writes for it (the same ``_StreamedTensor``, into
    memory instead of a file). A device-aware base (``edgeqlora.device_base``) is the
    dequantization of these, so training and export share one quantization."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    plan = plan if plan is not None else plan_tensors(model_dir, cfg, quant)
    if plan is None:
        raise ConfigError(f"{model_dir}: llama.cpp's {quant} mix for this model uses a rule "
                          "the direct writer does not have (80-layer models); a device-aware "
                          "base needs a mix the writer reproduces")
    heads = rope_heads(cfg)
    for t in plan:
        st = _StreamedTensor(t, heads.get(t["permute"]), STREAM_CHUNK_BYTES)
        yield t, b"".join(chunk.tobytes() for chunk in st.chunks())


def model_writer(cfg: dict[str, Any], tokenizer_dir: Path, quant: str, name: str,
                 plan: list[dict[str, Any]], identity: dict[str, Any] | None = None):
    """A ``GGUFWriter`` holding everything but the tensor data: the metadata (hyperparameters,
    the vocabulary of ``tokenizer_dir``) and the tensor table of ``plan``. Returns (writer,
    what ``add_vocab`` records). The size prediction measures the same writer."""
    import gguf
    import numpy as np

    arch, _ = model_arch(cfg)
    w = gguf_writer(None, gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    add_hparams(w, cfg, file_type(quant), name, identity)
    vocab = add_vocab(w, Path(tokenizer_dir), cfg["vocab_size"])
    for t in plan:
        dtype, shape, size = nbytes(t["shape"], t["qtype"])
        w.add_tensor_info(t["name"], shape, np.dtype(dtype), size,
                          raw_dtype=None if dtype is not np.uint8 else t["qtype"])
    return w, vocab


def write_model_gguf(model_dir: str | Path, path: str | Path, quant: str,
                     name: str = "edgeqlora-merged", progress: bool = False,
                     chunk_bytes: int = STREAM_CHUNK_BYTES,
                     imatrix: dict[str, Any] | None = None,
                     plan: list[dict[str, Any]] | None = None,
                     identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model_dir`` (a Hugging Face checkpoint) as one GGUF, streaming: tensor by tensor,
    each in chunks of rows. Direct types (f32/f16/bf16/q8_0/q4_0) through gguf's numpy
    quantizers; the K-quant mixes with llama.cpp's type choice and kernels (needs
    llama-cpp-python), weighted by ``imatrix`` rows where given. ``plan``: this checkpoint's
    ``plan_tensors`` for ``quant`` when the caller has it already."""
    import gguf

    model_dir, path = Path(model_dir), Path(path)
    cfg = read_config(model_dir)
    arch, _ = model_arch(cfg)
    if quant not in QUANTS:
        raise ConfigError(f"write_model_gguf writes {', '.join(QUANTS)}, not {quant!r}")
    if quant in K_QUANTS and not common.has_llama_cpp():
        raise MissingDependencyError(f"quant={quant} needs llama-cpp-python: "
                                     f"{LLAMA_CPP_INSTALL}")
    plan = plan if plan is not None else plan_tensors(model_dir, cfg, quant)
    if plan is None:
        raise ConfigError(f"{model_dir}: llama.cpp's {quant} mix for this model uses a rule "
                          "the direct writer does not have; quantize an F32 GGUF with "
                          "quantize_gguf instead")
    w, vocab = model_writer(cfg, model_dir, quant, name, plan, identity)
    heads = rope_heads(cfg)
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in common.progress(plan, "writing GGUF", progress):
            row = imatrix.get(t["name"]) if imatrix and t["qtype"].name in IMATRIX_TYPES \
                else None
            w.write_tensor_data(_StreamedTensor(t, heads.get(t["permute"]), chunk_bytes, row))
    except OSError as exc:
        raise common.write_error(path, exc) from None
    finally:
        w.close()
    return {"vocab": vocab, "tensors": len(plan), "arch": gguf.MODEL_ARCH_NAMES[arch],
            "plan": plan}


def quantize_gguf(src: str | Path, dst: str | Path, quant: str, nthread: int = 0) -> None:
    """llama.cpp's quantizer (llama-cpp-python) from an F32/F16 GGUF to a K-quant type."""
    if quant not in K_QUANTS:
        raise ConfigError(f"quantize_gguf does {', '.join(K_QUANTS)}, not {quant!r}")
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError(f"quant={quant} needs llama-cpp-python: "
                                     f"{LLAMA_CPP_INSTALL}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    params.nthread = nthread or threads.free_cores()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    # It reports failure through its return value (and a log line), never by raising.
    if rc != 0:
        if common.disk_full(Path(dst)):
            raise ExportError(f"disk full while quantizing into {dst}; free space and run the "
                              "export again (nothing was kept)")
        raise ExportError(f"llama.cpp's quantizer failed (return code {rc}) turning {src} into "
                          f"{quant}; run with --debug and check llama.cpp's log above")


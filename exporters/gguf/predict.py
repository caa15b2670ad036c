"""The size of a GGUF export before it is written (what ``devices.fit`` asks): the writer's own
tensor plan (names, types, K-quant rules and fallbacks) on the base's ``config.json`` and tensor
shapes, plus the metadata.

With the tokenizer files the metadata is exact: the writer's own ``GGUFWriter`` (hyperparameters,
vocabulary, tensor table) is written without its tensor data and measured. Without them it is
estimated per vocabulary entry.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

from edgeqlora.errors import ConfigError

from .common import K_QUANTS, QUANTS
from .kernels import nbytes
from .metadata import text_config
from .options import check_options
from .plan import is_70b, tensor_plan

# GGUF metadata (hyper-parameters, token strings and types, BPE merges) per vocabulary entry:
# 36.3 bytes measured on SmolLM2's 49,152-token vocabulary, the same in every quant (the
# estimate devices/fit.py used: GGUF_METADATA_PER_VOCAB).
METADATA_PER_VOCAB = 37
# GGUF_DEFAULT_ALIGNMENT: the data section and every tensor in it start on this boundary.
ALIGNMENT = 32


def _metadata_bytes(cfg: dict[str, Any], tokenizer_dir: Path, quant: str, name: str,
                    plan: list[dict[str, Any]]) -> int:
    """Bytes before the tensor data of the file ``write_model_gguf`` writes: header, metadata
    and tensor table, from the writer's own GGUFWriter."""
    from .writer import model_writer

    w, _ = model_writer(cfg, tokenizer_dir, quant, name, plan)
    with tempfile.TemporaryDirectory(prefix="edgeqlora-gguf-predict-") as scratch:
        path = Path(scratch) / "header.gguf"
        try:
            w.write_header_to_file(path)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        finally:
            w.close()
        return path.stat().st_size


def predict(config: dict[str, Any], shapes: dict[str, Sequence[int]], quant: str, *,
            tokenizer_dir: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """``{"file_bytes", "tensors", "n_params"}`` of the GGUF ``write_export`` would write for
    ``quant`` from a checkpoint with this ``config.json`` (its contents) and these tensor
    shapes (``{HF name: shape}``, as in the safetensors headers). ``tensors`` are
    ``runtimes.gguf_header.Tensor`` in file order, as ``read_gguf_header`` reads the written
    file; their offsets are exact when ``tokenizer_dir`` is given (metadata measured), else
    follow the per-vocabulary-entry estimate."""
    from edgeqlora.runtimes.gguf_header import Tensor

    q = quant.strip().lower()
    if q not in QUANTS:
        raise ConfigError(f"quant={quant!r} is not a GGUF quant type; valid: {', '.join(QUANTS)}")
    opts = check_options(options)
    cfg = text_config(config)
    specs = [(None, name, list(shape)) for name, shape in shapes.items()]
    # An 80-layer K-quant: the writer leaves the mix to llama.cpp; predict it with llama.cpp's
    # 70B rule (plan.py).
    plan = tensor_plan(cfg, specs, q, model_70b=is_70b(cfg) if q in K_QUANTS else None,
                       where="config.json")
    if tokenizer_dir is not None:
        meta = _metadata_bytes(cfg, Path(tokenizer_dir), q, opts["name"], plan)
    else:
        meta = METADATA_PER_VOCAB * int(cfg["vocab_size"])
    offset = -(-meta // ALIGNMENT) * ALIGNMENT
    tensors = []
    for t in plan:
        size = nbytes(t["shape"], t["qtype"])[2]
        dims = tuple(int(d) for d in reversed(t["shape"]))
        tensors.append(Tensor(t["name"], t["qtype"].name, dims[1] if len(dims) > 1 else 1,
                              math.prod(dims), size, dims, offset))
        offset += -(-size // ALIGNMENT) * ALIGNMENT
    return {"file_bytes": offset, "tensors": tensors,
            "n_params": sum(t.n_elements for t in tensors)}

"""A LoRA adapter as a llama.cpp adapter GGUF, in the layout of llama.cpp's
``convert_lora_to_gguf.py``; the runtime applies it to the base GGUF without a merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeqlora.errors import InputError

from . import common
from .kernels import encode, permute_qk
from .metadata import check_lora_key, model_arch, read_config


def write_lora_gguf(deltas: dict[str, tuple[Any, Any, float]], base_dir: str | Path,
                    path: str | Path, quant: str = "q8_0", alpha: float | None = None
                    ) -> dict[str, Any]:
    """Write LoRA matrices as a llama.cpp adapter GGUF.

    ``deltas`` maps a base weight name (``model.layers.0.self_attn.q_proj.weight``) to
    ``(A [r, in], B [out, r], scale)`` with the merged delta ``scale * B @ A``. The layout is
    llama.cpp's: ``general.type=adapter``, ``adapter.type=lora``, ``adapter.lora.alpha``,
    ``<tensor>.lora_a`` = A and ``<tensor>.lora_b`` = B (ggml shapes [in, r] and [r, out]);
    for q/k the RoPE permutation applies to B's rows (the rows of B @ A). llama.cpp scales by
    ``alpha / r`` with r read from each B; any other scale (rsLoRA, per-module patterns) is folded
    into B so the product is exact.
    """
    import gguf
    import numpy as np

    base_dir, path = Path(base_dir), Path(path)
    quant = common.check_adapter_quant(quant)
    cfg = read_config(base_dir)
    arch, permute = model_arch(cfg)
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    for key in deltas:
        check_lora_key(key)
    ranks = {int(a.shape[0]) for a, _, _ in deltas.values()}
    scales = {s * int(a.shape[0]) for a, _, s in deltas.values()}
    if alpha is None:
        alpha = float(next(iter(scales))) if len(scales) == 1 else float(max(ranks))
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    types: dict[str, str] = {}
    for key, (a, b, scale) in sorted(deltas.items()):
        new = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InputError(f"adapter tensor {key} has no GGUF name for this architecture")
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32) * (scale / (alpha / a.shape[0]))
        if permute and key.endswith("q_proj.weight"):
            b = permute_qk(b, n_head, n_head)
        elif permute and key.endswith("k_proj.weight"):
            b = permute_qk(b, n_head, n_kv)
        for suffix, m in ((".lora_a", a), (".lora_b", b)):
            qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[quant]
            if m.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
                qtype = Q.F16  # e.g. B's rows are r long: r=16 does not fill a Q8_0 block
            data = encode(m, qtype)
            w.add_tensor(new + suffix, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
            types[new + suffix] = qtype.name
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    except OSError as exc:
        raise common.write_error(path, exc) from None
    finally:
        w.close()
    mix: dict[str, int] = {}
    for t in types.values():
        mix[t] = mix.get(t, 0) + 1
    return {"alpha": alpha, "ranks": sorted(ranks), "tensors": len(types), "types": mix}

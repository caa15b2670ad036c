"""The tensor plan: for every tensor of a checkpoint, its GGUF name, shape, ggml type and order.
One function (``tensor_plan``) serves the writer and the size prediction, so a prediction is
the file the writer would write.

Direct types (F32/F16/BF16/Q8_0/Q4_0/Q4_1) follow ``convert_hf_to_gguf.py``: norms and 1-D tensors
F32, rows that do not divide into the type's blocks F16, tied embeddings without
``output.weight`` (llama.cpp reuses ``token_embd``), in the checkpoint's tensor order.

The K-quant mixes (Q3_K_M, Q4_K_M, Q5_K_M, Q6_K) take llama.cpp's per-tensor choice:
``kquant_types`` transcribes ``llama_tensor_get_type`` and ``tensor_type_fallback`` of
``src/llama-quant.cpp`` (the llama.cpp vendored by llama-cpp-python 0.3.36) for what this
exporter writes: Llama-family decoders without experts, no per-tensor overrides, in the order
llama.cpp's quantizer writes (and counts) tensors. Hand-written because llama.cpp does not
expose its choice; tests compare every tensor's type and bytes with ``llama_model_quantize``.

The 80-layer rule: llama.cpp gives an 80-layer model that it classes as 70B (llama with grouped
KV heads, qwen2) ``attn_v`` at Q5_K where the mix says Q3_K/Q4_K. The writer leaves such models
to llama.cpp's own quantizer (``kquant_types`` returns None: the one-pass writer's bytes are
checked against ``llama_model_quantize`` on smaller models only); the size prediction applies
the rule (``model_70b``), checked against that quantizer's files of 80-layer tiny models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeqlora.artifacts import safetensors_files, safetensors_specs
from edgeqlora.errors import InputError

from .common import DIRECT_QUANTS, K_QUANTS
from .metadata import SHIFTED_NORMS, llama3_rope_factors, model_arch, rope_parameters

# Mix -> the type llama.cpp starts every quantizable tensor from (llama_ftype_get_default_type).
DEFAULT_TYPE = {"q3_k_m": "Q3_K", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
# tensor_type_fallback: a row length that is not a multiple of 256 takes the 32-block type here;
# if that does not divide either, F16.
FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (the shards of its index, or every file)."""
    return safetensors_files(model_dir, "model")


def weight_specs(model_dir: Path) -> list[tuple[Path, str, list[int]]]:
    """(file, name, shape) of every tensor of the checkpoint, in file order, from the
    safetensors headers alone."""
    return [(path, name, shape) for path, name, shape, _ in safetensors_specs(model_dir, "model")]


def _direct_qtype(quant: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
            "q4_1": Q.Q4_1}[quant]


def _choose_type(gguf_name: str, shape: list[int], quant: str, tied: bool):
    """Per-tensor direct type, following convert_hf_to_gguf.py: norms and 1-D tensors F32; rows
    that do not divide into the type's blocks fall back to F16 (as the converter's QuantError
    path)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    qtype = _direct_qtype(quant)
    if quant in ("q4_0", "q4_1") and (gguf_name == "output.weight" or
                                      (tied and gguf_name == "token_embd.weight")):
        # The output projection is the most quantization-sensitive tensor; llama.cpp's own Q4_0
        # recipe keeps it at Q6_K. Q6_K has no numpy quantizer in gguf, so Q8_0 here (the
        # embedded SmolLM2 Q4_1 file has its tied embedding at Q8_0 too).
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block != 0:
        return Q.F16
    return qtype


def is_70b(cfg: dict[str, Any]) -> bool:
    """Whether llama.cpp's loader classes the model as LLM_TYPE_70B (llama-model.cpp: llama
    with 80 layers and fewer KV heads than heads; qwen2 with 80 layers)."""
    if cfg["num_hidden_layers"] != 80:
        return False
    arch, _ = model_arch(cfg)
    if arch.name == "QWEN2":
        return True
    n_head = cfg["num_attention_heads"]
    return cfg.get("num_key_value_heads", n_head) != n_head


def tensor_plan(cfg: dict[str, Any], specs: list[tuple[Any, str, list[int]]], quant: str,
                model_70b: bool | None = None, where: str = "the model"
                ) -> list[dict[str, Any]] | None:
    """The plan for ``quant``: ``{"file", "src", "name", "shape", "qtype", "permute"}`` per
    tensor (``shape`` as in the checkpoint, HF order), plus ``"ggml": True`` where llama.cpp's
    kernels must quantize it (the K-quant mixes). ``specs``: (file, HF name, shape) in
    checkpoint order. K-quants: None where llama.cpp's quantizer must choose (see the module
    docstring) unless ``model_70b`` says what llama.cpp will class the model as."""
    import gguf

    arch, permute = model_arch(cfg)
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    direct = quant if quant in DIRECT_QUANTS else "f32"
    if quant not in DIRECT_QUANTS and quant not in K_QUANTS:
        raise ValueError(f"no GGUF quant {quant!r}")
    plan = []
    for path, name, shape in specs:
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd as the output when there is no output.weight
        if name.endswith(".rotary_emb.inv_freq"):
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InputError(f"{where}: tensor {name} has no GGUF name for architecture "
                             f"{gguf.MODEL_ARCH_NAMES[arch]}")
        kind = "q" if name.endswith(("q_proj.weight", "q_proj.bias")) else \
            "k" if name.endswith(("k_proj.weight", "k_proj.bias")) else None
        plan.append({"file": path, "src": name, "name": new, "shape": list(shape),
                     "qtype": _choose_type(new, shape, direct, tied),
                     "permute": kind if permute else None})
        if arch.name in SHIFTED_NORMS and name.endswith("norm.weight"):
            plan[-1]["shift"] = 1.0  # Gemma's RMSNorm scales by 1 + w; llama.cpp's by w
    if (rope_parameters(cfg).get("rope_type") or "default") == "llama3":
        # Llama 3's RoPE divisors as the tensor llama.cpp reads (first, as the converter).
        values = llama3_rope_factors(cfg)
        plan.insert(0, {"file": None, "src": None, "name": "rope_freqs.weight",
                        "shape": [len(values)], "qtype": gguf.GGMLQuantizationType.F32,
                        "permute": None, "values": values.tolist()})
    if quant in DIRECT_QUANTS:
        return plan
    plan.sort(key=llama_cpp_order)
    types = kquant_types(plan, quant, cfg["num_hidden_layers"], model_70b)
    if types is None:
        return None
    for t, name in zip(plan, types):
        t["qtype"], t["ggml"] = gguf.GGMLQuantizationType[name], True
    return plan


def plan_tensors(model_dir: Path, cfg: dict[str, Any], quant: str) -> list[dict[str, Any]] | None:
    """``tensor_plan`` of the checkpoint in ``model_dir``."""
    return tensor_plan(cfg, weight_specs(model_dir), quant, where=str(model_dir))


def _more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one
    between them."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 \
        or (i_layer - n_layers // 8) % 3 == 2


def _quantizable(name: str, shape: list[int]) -> bool:
    """tensor_allows_quantization, for the tensors a Llama-family GGUF has."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def llama_cpp_order(t: dict[str, Any]) -> tuple[int, str]:
    """Sort key of llama.cpp's model loader (``weight_name_comparer``): tensors outside the
    blocks first, then block by block in layer order, by name within a layer. Its quantizer
    writes tensors in this order and counts attn_v / ffn_down tensors in it."""
    name = t["name"]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    return layer, name


def kquant_types(plan: list[dict[str, Any]], quant: str, n_layers: int,
                 model_70b: bool | None = None) -> list[str] | None:
    """The ggml type name llama.cpp's ``quant`` mix gives each tensor of ``plan`` (GGUF names
    and HF shapes, in ``llama_cpp_order``: llama.cpp counts attn_v and ffn_down tensors in that
    order). For 80 layers, None unless ``model_70b`` is given (see the module docstring)."""
    import gguf

    if quant not in DEFAULT_TYPE:
        raise ValueError(f"no K-quant mix {quant!r} (known: {', '.join(DEFAULT_TYPE)})")
    if n_layers == 80 and model_70b is None:
        return None
    default = DEFAULT_TYPE[quant]
    names = [t["name"] for t in plan]
    tied = "output.weight" not in names  # init_quantize_state_counters
    n_attn_v = sum("attn_v.weight" in n or "attn_qkv.weight" in n for n in names)
    i_attn_v = i_ffn_down = 0
    types = []
    for t in plan:
        name, shape = t["name"], t["shape"]
        if not _quantizable(name, shape):
            types.append("F32")  # kept as the F32 source has it
            continue
        new = default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            # The output head (or the table it shares) is the most sensitive tensor.
            block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[new]][0]
            new = "Q8_0" if shape[-1] % block else "Q6_K"
        elif name == "token_embd.weight":
            pass
        elif "attn_v.weight" in name or "attn_qkv.weight" in name:
            # A fused Q/K/V (Phi-3) counts and is typed as attn_v (measured against
            # llama_model_quantize for every mix).
            if quant == "q3_k_m":
                new = "Q5_K" if i_attn_v < 2 else "Q4_K"
            elif quant in ("q4_k_m", "q5_k_m") and _more_bits(i_attn_v, n_attn_v):
                new = "Q6_K"
            if model_70b and n_layers == 80 and new in ("Q3_K", "Q4_K"):
                # 8 heads share each attn_v: more bits there cost little (llama.cpp's comment).
                new = "Q5_K"
            i_attn_v += 1
        elif "ffn_down" in name:
            # Without experts llama.cpp's layer index is its running count of ffn_down tensors.
            if quant == "q3_k_m":
                new = "Q5_K" if i_ffn_down < n_layers // 16 else "Q4_K"
            elif quant in ("q4_k_m", "q5_k_m") and _more_bits(i_ffn_down, n_layers):
                new = "Q6_K"
            i_ffn_down += 1
        elif "attn_output.weight" in name and quant == "q3_k_m":
            new = "Q4_K"
        types.append(_fallback(new, shape[-1]))
    return types


def _fallback(qtype: str, ncols: int) -> str:
    import gguf

    def block(name: str) -> int:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]

    if ncols % block(qtype) == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if ncols % block(qtype) == 0 else "F16"

"""llama.cpp's K-quant mixes (Q3_K_M, Q4_K_M, Q5_K_M, Q6_K), written in one pass.

llama.cpp's quantizer (``llama_model_quantize``) reads an F32/F16 GGUF and writes the K-quant
file; going through it means writing the whole model at 4 bytes a weight first (a 1 B model: a
4 GB temporary file) and reading it back. Here the GGUF writer quantizes each tensor as it
streams it, with llama.cpp's own kernels (``ggml_quantize_chunk`` from the libggml that
llama-cpp-python ships, as ``gguf_imatrix.quantize_rows``), so the only thing to reproduce is
which type each tensor gets: ``kquant_types``, a transcription of ``llama_tensor_get_type`` and
``tensor_type_fallback`` in ``src/llama-quant.cpp`` (the llama.cpp vendored by llama-cpp-python
0.3.36) restricted to what this exporter writes: Llama-family decoders without experts (llama,
mistral, qwen2), the four mixes above, no per-tensor overrides. Hand-written because llama.cpp
does not expose its choice; a test compares every tensor's type and bytes, and the metadata,
with what ``llama_model_quantize`` writes from the same weights.

Where llama.cpp would use a rule not transcribed here (80-layer Llama: its 70B rule for
``attn_v``), ``kquant_types`` returns None and the exporter goes through llama.cpp's quantizer.
"""

from __future__ import annotations

from typing import Any

# Mix -> the type llama.cpp starts every quantizable tensor from (llama_ftype_get_default_type).
DEFAULT_TYPE = {"q3_k_m": "Q3_K", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
# tensor_type_fallback: a row length that is not a multiple of 256 takes the 32-block type here;
# if that does not divide either, F16.
FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


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


def kquant_types(plan: list[dict[str, Any]], quant: str, n_layers: int) -> list[str] | None:
    """The ggml type name llama.cpp's ``quant`` mix gives each tensor of ``plan`` (GGUF names
    and HF shapes, in ``llama_cpp_order``: llama.cpp counts attn_v and ffn_down tensors in that
    order), or None where a rule not transcribed here would apply."""
    import gguf

    if quant not in DEFAULT_TYPE:
        raise ValueError(f"no K-quant mix {quant!r} (known: {', '.join(DEFAULT_TYPE)})")
    if n_layers == 80:
        return None  # LLM_TYPE_70B: attn_v gets Q5_K; left to llama.cpp's quantizer
    default = DEFAULT_TYPE[quant]
    names = [t["name"] for t in plan]
    tied = "output.weight" not in names  # init_quantize_state_counters
    n_attn_v = sum("attn_v.weight" in n for n in names)
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
        elif "attn_v.weight" in name:
            if quant == "q3_k_m":
                new = "Q5_K" if i_attn_v < 2 else "Q4_K"
            elif quant in ("q4_k_m", "q5_k_m") and _more_bits(i_attn_v, n_attn_v):
                new = "Q6_K"
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

"""``predict``: the size of an ONNX export (``model.onnx`` + ``model.onnx.data``) from the base's
``config.json`` and tensor shapes, before anything is written (``devices.fit`` asks it).

Every weight is counted at the storage the recipe table (``recipes.RECIPES``) gives it, as
``quantize.py`` / ``gptq.py`` / ``nf4.py`` write it, so the prediction cannot drift from the
writer:

- MatMulNBits (``bits`` 4 or 8) of a weight ``[K in, N out]`` with ``b``-value blocks:
  ``N * ceil(K/b) * b*bits/8`` code bytes, an fp32 scale per block, and zero points where the
  algorithm writes them: k-quant always (uint8, ``bits`` per block, packed), RTN only when
  asymmetric, HQQ as fp32 (one per block), GPTQ never;
- the token-embedding table: read from the tied output head when the head has no zero points
  (the int4 / q8head recipes: a 16-byte shape, nothing else), else GatherBlockQuantized int4
  (codes, fp32 scales) or an fp16 / fp32 table; the TorchScript exporter writes a tied head as
  its own weight, so it is counted beside the table;
- nf4-exact: NF4 codes (4 bits) and an fp32 absmax per ``base_quant`` block (64) for the 4-bit
  layers, fp32 LoRA (``A.T``, ``s*B.T``) for each adapted one, the rest fp32;
- norms and biases fp32;
- the graph itself (nodes, names, attributes, the small constants and external-data records),
  which depends only on the architecture, the layer count and the recipe: ``GRAPH_BYTES``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from edgeqlora.errors import ConfigError

from .recipes import QUANTS, RECIPES, check_options

# model.onnx without its weights, by recipe: (fixed bytes, bytes per decoder layer). Fitted on
# tiny Llama checkpoints (hidden 256, 1 and 4 layers; torch 2.13, onnx 1.23, onnxruntime 1.32):
# the 2-layer one is then within 100 bytes. Node names and attributes repeat per layer; what
# grows is a few digits of names and offsets: on SmolLM2-135M (30 layers) the graph is ~17 kB
# more than this predicts, 0.02 % of the int4 file (85.6 MB), 0.003 % of fp32.
# tests/test_onnx_predict.py re-measures them against written files.
GRAPH_BYTES: dict[str, tuple[int, int]] = {
    "fp32": (13102, 43154),
    "fp16": (13319, 43852),
    "int8": (13482, 44778),
    "int4": (13536, 44772),
    "int4-q8head": (13550, 44794),
    "int4-kquant": (13672, 45510),
    "int4-kquant-last": (13581, 45510),
    "int4-gptq": (13553, 44800),
    "int4-gptq-q8head": (13550, 44822),
    "int4-hqq": (13658, 45547),
    "int4-hqq-q8head": (13531, 45579),
    "nf4-exact": (13140, 45016),
}
# Qwen2's q/k/v biases: three Add nodes and their initializer records per layer.
BIAS_GRAPH_PER_LAYER = 774
# nf4-exact: each unmerged LoRA pair adds two MatMuls, an Add and two initializers, whose names
# repeat the module path: bytes = fixed + per character of the weight name (fitted on q/v-only
# and all-linear adapters; within ~20 bytes a pair).
LORA_PAIR_GRAPH = (405, 12.5)


def predict(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], quant: str, *,
            block_size: int = 32, lora: Mapping[str, Any] | None = None,
            tokenizer_dir: Any = None, **options: Any) -> dict[str, Any]:
    """``{"file_bytes", "tensors", "n_params"}`` of an ONNX ``quant`` export of the model whose
    ``config.json`` is ``config`` and whose Hugging Face tensors have ``shapes``.

    ``options``: ``symmetric`` (RTN zero points), and for nf4-exact ``base_quant`` (its
    ``block_size``) and ``quantized`` (the 4-bit weight names; default: the decoder layers'
    2-D weights). ``lora``: for nf4-exact, ``{weight name: rank}`` (or the deltas
    ``(A, B, scale)`` themselves) of the adapter kept unmerged in the file. ``tensors`` is
    empty: an ONNX export has no per-tensor table the fit reads. ``tokenizer_dir`` is taken
    for the GGUF exporter's interface and not needed: the graph holds no vocabulary."""
    q = (quant or "").strip().lower()
    if q not in QUANTS:
        raise ConfigError(f"no size prediction for ONNX quant {quant!r} (known: "
                          f"{', '.join(QUANTS)})")
    opts = check_options({**options, "block_size": block_size})
    cfg = {**config, **(config.get("text_config") or {})}
    tied = bool(cfg.get("tie_word_embeddings"))
    n_layers = int(cfg["num_hidden_layers"])
    weights = {n: [int(d) for d in s] for n, s in shapes.items()
               if not n.endswith(".rotary_emb.inv_freq") and not (tied and n == "lm_head.weight")}
    n_params = sum(math.prod(s) for s in weights.values())
    if q == "nf4-exact":
        size, extra = _nf4_bytes(weights, tied, opts, lora or {})
        n_params += extra
    else:
        size = _recipe_bytes(weights, tied, RECIPES[q], opts)
    base, per_layer = GRAPH_BYTES[q]
    per_layer += BIAS_GRAPH_PER_LAYER if any(n.endswith("q_proj.bias") for n in weights) else 0
    return {"file_bytes": int(size + base + per_layer * n_layers), "tensors": [],
            "n_params": int(n_params)}


def _roles(weights: dict[str, list[int]], tied: bool):
    """(name, role, K, N) of each weight: role "vector" (norms, biases), "table" (the token
    embedding, [V, H]), "head" (the output head as a MatMul, K=H, N=V) or "linear"."""
    for name, shape in weights.items():
        if len(shape) < 2:
            yield name, "vector", math.prod(shape), 1
        elif name.endswith("embed_tokens.weight"):
            yield name, "table", shape[1], shape[0]
            if tied:  # the TorchScript export writes the tied head as its own MatMul weight
                yield name, "head", shape[1], shape[0]
        elif name == "lm_head.weight":
            yield name, "head", shape[1], shape[0]
        else:
            yield name, "linear", shape[1], shape[0]


def _nbits_bytes(k: int, n: int, bits: int, zero_points: str | None, block: int) -> int:
    """MatMulNBits B [N, ceil(K/b), b*bits/8], fp32 scales [N, ceil(K/b)], zero points."""
    kb = -(-k // block)
    size = n * kb * block * bits // 8 + n * kb * 4
    if zero_points == "packed":  # uint8, ``bits`` per block (4-bit: two blocks a byte)
        size += n * -(-kb * bits // 8)
    elif zero_points == "float":  # HQQ: one fp32 per block
        size += n * kb * 4
    return size


def _recipe_bytes(weights: dict[str, list[int]], tied: bool, recipe: dict[str, Any],
                  opts: dict[str, Any]) -> int:
    bits, algo, block = recipe["bits"], recipe["algorithm"], opts["block_size"]
    if bits in (16, 32):
        return sum(4 * k * n if role == "vector" else bits // 8 * k * n
                   for _, role, k, n in _roles(weights, tied))

    def zero_points(algorithm: str) -> str | None:
        if algorithm == "k_quant":
            return "packed"  # the k-quant path writes zero points even when symmetric
        if algorithm == "hqq":
            return "float"
        if algorithm == "rtn" and not opts["symmetric"]:
            return "packed"
        return None

    head_bits = recipe.get("head_bits", bits)
    # A separate head width is written by RTN first (k-quant: its own per-node width).
    head_algo = algo if "head_bits" not in recipe or algo == "k_quant" else "rtn"
    head_zp = zero_points(head_algo)
    size = 0
    for _, role, k, n in _roles(weights, tied):
        if role == "vector":
            size += 4 * k
        elif role == "linear":
            size += _nbits_bytes(k, n, bits, zero_points(algo), block)
        elif role == "head":
            size += _nbits_bytes(k, n, head_bits, head_zp, block)
        elif recipe["embedding"] in ("int4", "head") and tied and head_zp is None:
            size += 16  # read from the head's bytes: only the int64 [2] shape of the view
        elif recipe["embedding"] == "int4":
            # GatherBlockQuantized: int4 codes [V, H], fp32 scales [V, ceil(H/b)] (+ uint4
            # zero points when asymmetric).
            kb = -(-k // block)
            size += -(-n * k // 2) + n * kb * 4
            size += 0 if opts["symmetric"] else -(-n * kb // 2)
        else:
            size += (4 if recipe["embedding"] == "fp32" else 2) * k * n
    return size


def _nf4_bytes(weights: dict[str, list[int]], tied: bool, opts: dict[str, Any],
               lora: Mapping[str, Any]) -> tuple[int, int]:
    """Bytes of nf4-exact's tensors (and the LoRA nodes' graph bytes), the LoRA parameter
    count."""
    block = int((opts["base_quant"] or {}).get("block_size") or 64)
    quantized = opts["quantized"]
    four_bit = set(quantized) if quantized is not None else {
        n for n, s in weights.items() if ".layers." in n and len(s) == 2
        and n.endswith(".weight")}
    fixed, per_char = LORA_PAIR_GRAPH
    size = lora_params = 0
    for name, role, k, n in _roles(weights, tied):
        if role == "linear" and name in four_bit:
            size += -(-k * n // 2) + -(-k * n // block) * 4
            if name in lora:
                rank = _rank(lora[name])
                lora_params += rank * (k + n)
                size += 4 * rank * (k + n) + fixed + per_char * len(name)
        else:
            size += 4 * k * n
    return size, lora_params


def _rank(entry: Any) -> int:
    if isinstance(entry, int):
        return entry
    return int(entry[0].shape[0])  # (A [r, in], B [out, r], scale)

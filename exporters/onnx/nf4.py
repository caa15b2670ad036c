"""``--quant nf4-exact``: the trained model as trained, in ONNX.

The QLoRA model computes ``y = x @ dequant_nf4(W).T + s * (x @ A.T) @ B.T``: the base weights are
bitsandbytes NF4 codes (blocks of 64, double-quantized absmax) and the adapter stays a separate
low-rank path. Merging and re-quantizing loses that exactness twice; this export keeps both:

- every linear layer that the trained model ran in 4 bits (``quantized``, the names the export
  stage passes) becomes onnxruntime's ``MatMulBnb4`` contrib op fed with the packed NF4 bytes
  bitsandbytes itself produced (``quantize_4bit`` with the adapter's block size, double
  quantization, quant type and dtype: ``base_quant``) and the absmax of double quantization
  expanded exactly as ``bitsandbytes.functional.dequantize_4bit`` expands it
  (``dequantize_blockwise`` + offset);
- each LoRA pair becomes two plain MatMuls (``x @ A.T`` then ``@ (s * B).T``) added to it;
- embeddings, norms and the output head stay fp32, as they were in training.

The graph is the fp32 export (``graph.export_fp32``) of the unmerged base checkpoint the stage
wrote (original weights, fp32) with those MatMuls replaced, so RoPE, attention and the KV cache
are the same code path as the other ONNX variants. The stage verifies it against the trained
model (its VerifySet): KLD must stay below 0.001.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeqlora.errors import ConfigError, require

from . import recipes
from .genai import copy_tokenizer, write_genai_config
from .graph import add_ms_domain, export_fp32, op_counts, save, step
from .recipes import MODEL_FILE, check_model_dir

QUANT = "nf4-exact"
_NODE = re.compile(r"^/m/(?P<module>.+)/MatMul$")
_QUANT_TYPES = {"nf4": 1, "fp4": 0}  # MatMulBnb4's quant_type attribute


def check_nf4_inputs(lora, base_quant: dict[str, Any] | None,
                     quantized: list[str] | None) -> None:
    """Refuse, in one line each, what nf4-exact cannot write: no adapter inputs, a base that
    was not 4-bit, LoRA outside the 4-bit linear layers."""
    if lora is None or base_quant is None or quantized is None:
        raise ConfigError(f"quant={QUANT} is exported from the trained adapter (NF4 base + "
                          "unmerged LoRA), not from a merged checkpoint: write_export needs "
                          "lora= (its deltas), base_quant= (its 4-bit config) and quantized= "
                          "(the 4-bit weight names); edgeqlora.export.export_adapter(..., "
                          f"quant={QUANT!r}) passes them")
    qtype = base_quant.get("quant", "nf4")
    if qtype not in _QUANT_TYPES:
        raise ConfigError(f"nf4-exact needs an adapter trained on a 4-bit base (nf4/fp4); "
                          f"this one was trained with quant={qtype!r}")
    outside = sorted(set(lora) - set(quantized))
    if outside:
        raise ConfigError(f"nf4-exact keeps LoRA unmerged on the 4-bit linear layers only; "
                          f"the adapter also adapts {', '.join(outside[:3])}: use --quant int8 "
                          "or fp16 (merged) for this adapter")


def nf4_pack(weight, quant: dict[str, Any]):
    """Packed 4-bit codes (uint8 numpy, ``N*K/2``) and fp32 absmax per block of ``weight``
    [N, K] exactly as the trained Linear4bit holds them."""
    import torch

    bnbf = require("bitsandbytes.functional", "train", "nf4-exact export")  # no hub kernels

    dtype = getattr(torch, quant.get("compute_dtype") or "float32", torch.float32)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    q, state = bnbf.quantize_4bit(weight.to(dtype).contiguous(),
                                  blocksize=int(quant.get("block_size") or 64),
                                  compress_statistics=bool(quant.get("double_quant", True)),
                                  quant_type=quant.get("quant", "nf4"))
    absmax = state.absmax
    if state.nested:  # as dequantize_4bit does before using it
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return q.reshape(-1).numpy(), absmax.float().numpy(), int(state.blocksize)


def replace_linears(model, lora: dict[str, tuple[Any, Any, float]], quant: dict[str, Any],
                    quantized: list[str]) -> dict[str, int]:
    """Swap the quantized layers' MatMuls for MatMulBnb4 (+ LoRA MatMuls) in place. ``lora``:
    weight name -> ``(A [r, in], B [out, r], scale)``."""
    import numpy as np
    import torch
    from onnx import helper, numpy_helper

    qtype = quant.get("quant", "nf4")
    four_bit = set(quantized)
    inits = {t.name: t for t in model.graph.initializer}
    counts = {"MatMulBnb4": 0, "lora_pairs": 0}
    used = set()
    new_nodes = []
    for node in model.graph.node:
        m = _NODE.match(node.name) if node.op_type == "MatMul" else None
        # "/m/model/layers.0/self_attn/q_proj/MatMul" -> "model.layers.0.self_attn.q_proj.weight"
        key = m["module"].replace("/", ".") + ".weight" if m is not None else ""
        w_init = inits.get(node.input[1]) if m is not None else None
        if w_init is None or len(w_init.dims) != 2 or key not in four_bit:
            new_nodes.append(node)
            continue
        wt = numpy_helper.to_array(w_init)  # [in, out] = W.T
        weight = torch.from_numpy(np.ascontiguousarray(wt.T))
        codes, absmax, block = nf4_pack(weight, quant)
        k, n = wt.shape
        base = key[:-len(".weight")]
        b_name, a_name = base + ".nf4", base + ".absmax"
        model.graph.initializer.extend([numpy_helper.from_array(codes, b_name),
                                        numpy_helper.from_array(absmax, a_name)])
        used.add(node.input[1])
        out = node.output[0]
        delta = lora.get(key)
        bnb_out = out if delta is None else out + "_nf4"
        new_nodes.append(helper.make_node("MatMulBnb4", [node.input[0], b_name, a_name],
                                          [bnb_out], name=node.name + "_Bnb4",
                                          domain="com.microsoft", K=k, N=n, block_size=block,
                                          quant_type=_QUANT_TYPES[qtype]))
        counts["MatMulBnb4"] += 1
        if delta is not None:
            # PEFT: lora_B(lora_A(x)) * scaling; the scale is folded into B (fp32).
            a, b, scale = delta
            a_t = np.ascontiguousarray(np.asarray(a, dtype=np.float32).T)  # [in, r]
            b_t = np.ascontiguousarray((np.asarray(b, dtype=np.float32)
                                        * np.float32(scale)).T)  # [r, out]
            model.graph.initializer.extend([numpy_helper.from_array(a_t, base + ".lora_A"),
                                            numpy_helper.from_array(b_t, base + ".lora_B")])
            new_nodes += [
                helper.make_node("MatMul", [node.input[0], base + ".lora_A"], [out + "_xa"],
                                 name=node.name + "_lora_A"),
                helper.make_node("MatMul", [out + "_xa", base + ".lora_B"], [out + "_lora"],
                                 name=node.name + "_lora_B"),
                helper.make_node("Add", [bnb_out, out + "_lora"], [out],
                                 name=node.name + "_lora_add"),
            ]
            counts["lora_pairs"] += 1
    model.graph.ClearField("node")
    model.graph.node.extend(new_nodes)
    for name in used:
        model.graph.initializer.remove(inits[name])
    add_ms_domain(model)
    return counts


def write_nf4_exact(model_dir: Path, out_dir: Path, lora: dict[str, tuple[Any, Any, float]],
                    opts: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Write the nf4-exact export of the unmerged base ``model_dir`` + ``lora`` into
    ``out_dir``; ``opts`` are checked options with ``base_quant`` and ``quantized``."""
    import onnx

    quant, quantized = opts["base_quant"], opts["quantized"]
    check_nf4_inputs(lora, quant, quantized)
    recipes.check_quant(QUANT)  # onnx, onnxruntime and bitsandbytes present
    cfg = check_model_dir(model_dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".onnx-fp32-", dir=out_dir.parent) as scratch:
        raw = Path(scratch) / "fp32.onnx"
        step("exporting the base to ONNX (torch.onnx)", progress)
        dims = export_fp32(model_dir, raw)
        model = onnx.load(str(raw))
        step("packing the NF4 codes (bitsandbytes)", progress)
        counts = replace_linears(model, lora, quant, quantized)
        save(model, out_dir)
    gc = write_genai_config(model_dir, out_dir, dims, opts["context_length"])
    return {"quant": QUANT, "model_file": MODEL_FILE, "architecture": cfg["architectures"][0],
            "recipe": {"base": f"{quant.get('quant', 'nf4')} (bitsandbytes codes)",
                       "block_size": int(quant.get("block_size") or 64),
                       "double_quant": bool(quant.get("double_quant", True)),
                       "lora": "unmerged, fp32"},
            "ops": op_counts(model), "expected_ops": {"MatMulBnb4": counts["MatMulBnb4"]},
            "quant_mix": counts, "matmulnbits": 0, "dims": dims,
            "context_length": gc["search"]["max_length"],
            "tokenizer_files": copy_tokenizer(model_dir, out_dir),
            "export_seconds": round(time.perf_counter() - t0, 2),
            "size_bytes": sum(p.stat().st_size for p in out_dir.glob("model.onnx*")),
            "genai": "installed" if recipes.has_genai() else recipes.GENAI_MISSING}

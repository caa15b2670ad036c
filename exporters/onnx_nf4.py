"""``--quant nf4-exact``: the trained model as trained, in ONNX.

The QLoRA model computes ``y = x @ dequant_nf4(W).T + s * (x @ A.T) @ B.T``: the base weights are
bitsandbytes NF4 codes (blocks of 64, double-quantized absmax) and the adapter stays a separate
low-rank path. Merging and re-quantizing loses that exactness twice; this export keeps both:

- every linear layer that the trained model ran in 4 bits (``merge.is_quantized_weight``) becomes
  onnxruntime's ``MatMulBnb4`` contrib op fed with the packed NF4 bytes bitsandbytes itself
  produced (``quantize_4bit`` with the adapter manifest's block size, double quantization, quant
  type and dtype) and the absmax of double quantization expanded exactly as
  ``bitsandbytes.functional.dequantize_4bit`` expands it (``dequantize_blockwise`` + offset);
- each LoRA pair becomes two plain MatMuls (``x @ A.T`` then ``@ (s * B).T``) added to it;
- embeddings, norms and the output head stay fp32, as they were in training.

The graph is the fp32 export of the original base (``onnx.export_fp32``) with those MatMuls
replaced, so RoPE, attention and the KV cache are the same code path as the other ONNX variants.
``export_nf4_exact`` verifies the result against the trained model (``qlora.load_trained``) on
held-out tokens: KLD must stay below 0.001 (kernel accumulation order is the only difference).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeqlora.errors import ConfigError, ExportError, require

from . import onnx as E

QUANT = "nf4-exact"
THRESHOLDS = {"min_top1": 0.99, "max_kld": 1e-3}
_NODE = re.compile(r"^/m/(?P<module>.+)/MatMul$")
_QUANT_TYPES = {"nf4": 1, "fp4": 0}  # MatMulBnb4's quant_type attribute


def nf4_pack(weight, quant: dict[str, Any]):
    """Packed 4-bit codes (uint8 numpy, ``N*K/2``) and fp32 absmax per block of ``weight``
    [N, K] exactly as the trained Linear4bit holds them."""
    import bitsandbytes.functional as bnbf
    import torch

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


def replace_linears(model, adapter, progress: bool = False) -> dict[str, int]:
    """Swap the quantized layers' MatMuls for MatMulBnb4 (+ LoRA MatMuls) in place."""
    import numpy as np
    import torch
    from onnx import helper, numpy_helper

    from edgeqlora.merge import is_quantized_weight

    quant = adapter.quant
    qtype = quant.get("quant", "nf4")
    if qtype not in _QUANT_TYPES:
        raise ConfigError(f"nf4-exact needs an adapter trained on a 4-bit base (nf4/fp4); "
                          f"{adapter.dir} was trained with quant={qtype!r}")
    inits = {t.name: t for t in model.graph.initializer}
    counts = {"MatMulBnb4": 0, "lora_pairs": 0}
    used = set()
    new_nodes = []
    for node in model.graph.node:
        m = _NODE.match(node.name) if node.op_type == "MatMul" else None
        # "/m/model/layers.0/self_attn/q_proj/MatMul" -> "model.layers.0.self_attn.q_proj.weight"
        key = m["module"].replace("/", ".") + ".weight" if m is not None else ""
        w_init = inits.get(node.input[1]) if m is not None else None
        if w_init is None or not is_quantized_weight(key, list(w_init.dims)):
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
        delta = adapter.deltas.get(key)
        bnb_out = out if delta is None else out + "_nf4"
        new_nodes.append(helper.make_node("MatMulBnb4", [node.input[0], b_name, a_name],
                                          [bnb_out], name=node.name + "_Bnb4",
                                          domain="com.microsoft", K=k, N=n, block_size=block,
                                          quant_type=_QUANT_TYPES[qtype]))
        counts["MatMulBnb4"] += 1
        if delta is not None:
            # PEFT: lora_B(lora_A(x)) * scaling; the scale is folded into B (fp32).
            a_t = delta.A.float().T.contiguous().numpy()  # [in, r]
            b_t = (delta.B.float() * delta.scale).T.contiguous().numpy()  # [r, out]
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
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts


def write_nf4_exact(adapter, out_dir: Path, scratch: Path, context_length: int = 2048,
                    progress: bool = False) -> dict[str, Any]:
    """Write the nf4-exact export of ``adapter`` (``merge.Adapter``) into ``out_dir``."""
    import onnx

    from edgeqlora.merge import is_quantized_weight, write_merged

    opts = E.check_options({"context_length": context_length})
    outside = [k for k in adapter.deltas if not is_quantized_weight(
        k, [1, 1]) or adapter.deltas[k].embedding]
    if outside:
        raise ConfigError(f"nf4-exact keeps LoRA unmerged on the 4-bit linear layers only; "
                          f"{adapter.dir} also adapts {', '.join(outside[:3])}: use --quant int8 "
                          "or fp16 (merged) for this adapter")
    base_dir = scratch / "base"
    base_dir.mkdir()
    write_merged(adapter, base_dir, "original", "float32", with_lora=False)
    cfg = E.check_model_dir(base_dir)
    t0 = time.perf_counter()
    raw = scratch / "fp32.onnx"
    dims = E.export_fp32(base_dir, raw)
    model = onnx.load(str(raw))
    counts = replace_linears(model, adapter, progress)
    onnx.save_model(model, str(out_dir / E.MODEL_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=E.DATA_FILE, size_threshold=1024)
    gc = E.genai_config(base_dir, dims, opts["context_length"])
    (out_dir / E.GENAI_CONFIG).write_text(json.dumps(gc, indent=4) + "\n")
    ops = E.op_counts(model)
    return {"quant": QUANT, "model_file": E.MODEL_FILE, "architecture": cfg["architectures"][0],
            "recipe": {"base": f"{adapter.quant.get('quant', 'nf4')} (bitsandbytes codes)",
                       "block_size": int(adapter.quant.get("block_size") or 64),
                       "double_quant": bool(adapter.quant.get("double_quant", True)),
                       "lora": "unmerged, fp32"},
            "ops": ops, "expected_ops": {"MatMulBnb4": counts["MatMulBnb4"]},
            "quant_mix": counts, "matmulnbits": 0, "dims": dims,
            "context_length": gc["search"]["max_length"],
            "tokenizer_files": E.copy_tokenizer(base_dir, out_dir),
            "export_seconds": round(time.perf_counter() - t0, 2),
            "size_bytes": sum(p.stat().st_size for p in out_dir.glob("model.onnx*")),
            "genai": "installed" if E.has_genai() else E.GENAI_MISSING}


def verify_against_trained(out_dir: Path, adapter_dir: Path, sequences: list[list[int]]
                           ) -> dict[str, Any]:
    import numpy as np
    import torch

    from edgeqlora.qlora import load_trained

    cand, rt = E.runtime_logits(out_dir, sequences)
    rt.close()
    trained = load_trained(adapter_dir, device="cpu")
    with torch.no_grad():
        ref = np.concatenate([trained(torch.tensor([s])).logits[0].float().numpy()
                              for s in sequences])
    return E.agreement(ref, cand)


def export_nf4_exact(adapter_dir: str | Path, out_dir: str | Path, *, force: bool = False,
                     eval_tokens: int = 1024, context_length: int = 2048,
                     thresholds: dict[str, float] | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Export a trained adapter + its NF4 base to ONNX bit for bit (see the module docstring),
    verify it against the trained model, write ``manifest.json``; atomic."""
    from transformers import AutoTokenizer

    from edgeqlora.artifacts import atomic_dir, prepare_output, versions, write_manifest
    from edgeqlora.export import TOKENIZER_PROBES
    from edgeqlora.merge import check_fit, heldout_sequences, read_adapter

    require("bitsandbytes", "train", "nf4-exact export (the NF4 codes come from bitsandbytes)")
    E.check_quant("fp32")  # onnx + onnxruntime present
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    prepare_output(out_dir, force=force, what="export")
    adapter = read_adapter(adapter_dir)
    check_fit(adapter)
    th = {**THRESHOLDS, **(thresholds or {})}
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.work-",
                                     dir=out_dir.resolve().parent) as scratch, \
            atomic_dir(out_dir, force=force, what="export") as tmp:
        info = write_nf4_exact(adapter, tmp, Path(scratch), context_length, progress)
        problems = E.check_structure(tmp, info)
        tok = AutoTokenizer.from_pretrained(tmp)
        seqs = heldout_sequences(adapter.manifest, tok, eval_tokens)
        check: dict[str, Any] = {"thresholds": th, "reference": "trained model (NF4 + LoRA)"}
        if not problems:
            check.update(verify_against_trained(tmp, adapter_dir, seqs))
            if check["top1"] < th["min_top1"]:
                problems.append(f"top-1 agreement {check['top1']:.4f} < {th['min_top1']}")
            if check["kld"] > th["max_kld"]:
                problems.append(f"mean KLD {check['kld']:.6f} > {th['max_kld']}")
            from edgeqlora.runtimes.onnx import load_onnx

            rt = load_onnx(tmp / E.MODEL_FILE, export_dir=tmp)
            mismatches = [t[:40] for t in TOKENIZER_PROBES
                          if rt.tokenize(t) != tok(t, add_special_tokens=False)["input_ids"]]
            rt.close()
            if mismatches:
                problems.append(f"tokenization differs from the HF tokenizer on {mismatches}")
        check["problems"], check["passed"] = problems, not problems
        if problems and not force:
            raise ExportError(f"the onnx nf4-exact export failed verification against the "
                              f"trained model ({'; '.join(problems)}); nothing was written to "
                              f"{out_dir}")
        tmp.chmod(0o755)  # mkdtemp made it private; an export is meant to be shared
        return write_manifest(tmp, "export", {
            "target": "onnx", "quant": QUANT, "quant_mix": info["quant_mix"],
            "adapter_only": False, "verification": check, "exporter": info,
            "source": {"adapter": str(adapter_dir.resolve()),
                       "base": adapter.manifest.get("base"),
                       "lora": adapter.manifest.get("lora"), "quant": adapter.quant},
            "versions": versions("edgeqlora", "torch", "transformers", "bitsandbytes", "onnx",
                                 "onnxruntime", "onnxruntime-genai", "tokenizers"),
        })

"""How close each candidate 4-bit base is to the full-precision one, before any training.

A device-aware adapter learns on top of its 4-bit base (``quant=gguf-q4_k_m``, ``onnx-int4``,
``edgeqlora.device_base``), so a base that moves the model less leaves the adapter less to
undo. This measures, for each base, top-1 agreement and mean KLD of its next-token
distributions against the fp32 base on the embedded task's held-out commands (chat template
applied, as in training) and on the shipped English text (``heldout.general_sequences``):

- ``nf4``: bitsandbytes NF4 (the QLoRA default), for scale;
- device bases the trainer offers (``gguf-q4_k_m``, ``onnx-int4``, ...), through
  ``device_base.device_state``: the very bytes the trainer and the export use;
- ONNX recipes that are not device bases yet (``onnx:int4-hqq``, ``onnx:int4-kquant``,
  ``onnx:int4:symmetric=false``), through the exporter's own ``quantized_graph`` and the device
  base's ``dequantize``. Such a graph's tied head and embedding may be two tables (a zero point
  makes ``share_tied_embedding`` decline); the model is then untied so that each reads its own
  bytes, as onnxruntime would.

    python bench/device_bases.py nf4 gguf-q4_k_m onnx-int4 onnx:int4-hqq \\
        --tokens 512 --out bench/results/device_bases.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def _agreement(fp, model, seqs) -> dict[str, float]:
    import torch

    from edgeqlora.qlora import quantization_loss

    rows = [quantization_loss(fp, model, torch.tensor([s])) for s in seqs]
    n = sum(len(s) for s in seqs)
    # Weighted by each sequence's tokens, so a short row counts for what it holds.
    return {k: round(sum(r[k] * len(s) for r, s in zip(rows, seqs)) / n, 4)
            for k in ("top1", "kld")}


def _with_state(base, state):
    """The plain fp32 base with ``state``'s weights; a head whose bytes differ from the
    embedding's gets its own parameter."""
    import torch

    from edgeqlora.device_base import apply_state
    from edgeqlora.qlora import load_base

    model = load_base(base, quant="none", compute_dtype="float32", device=torch.device("cpu"))
    apply_state(model, state)
    head, table = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is not None and table is not None and not torch.equal(head, table) and \
            model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head.weight = torch.nn.Parameter(head.clone())
    return model


def _onnx_recipe(base, spec: str):
    """``int4-hqq`` or ``int4:symmetric=false,block_size=64``: the exporter's quantized graph,
    dequantized; (state, seconds)."""
    import torch

    from edgeqlora.exporters.onnx.device import EMBEDDING, dequantize, quantized_weights
    from edgeqlora.exporters.onnx.recipes import check_options
    from edgeqlora.exporters.onnx.write import quantized_graph

    quant, _, rest = spec.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        key, _, value = kv.partition("=")
        opts[key] = value == "true" if value in ("true", "false") else int(value)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="device-bases-") as scratch:
        graph, *_ = quantized_graph(Path(base), Path(scratch), quant, check_options(opts))
        weights = quantized_weights(graph, EMBEDDING)
    seconds = time.perf_counter() - t0
    state = {w["src"]: torch.from_numpy(dequantize(w["arrays"], w["bits"], w["block_size"],
                                                   w["shape"])) for w in weights}
    return state, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bases", nargs="+", help="nf4, a device quant (gguf-q4_k_m, onnx-int4, ...) "
                    "or onnx:RECIPE[:key=value,...]")
    ap.add_argument("--tokens", type=int, default=512, help="tokens of each set")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from edgeqlora import heldout
    from edgeqlora.base import resolve_base
    from edgeqlora.device_base import device_state, is_device_quant
    from edgeqlora.qlora import load_base

    base = resolve_base("embedded")
    tok = AutoTokenizer.from_pretrained(base)
    sets = {"task": heldout.heldout_sequences({}, tok, args.tokens),
            "text": heldout.general_sequences(tok, args.tokens, 256)}
    fp = load_base(base, quant="none", compute_dtype="float32", device=torch.device("cpu"))
    rows = []
    for spec in args.bases:
        t0, extra = time.perf_counter(), {}
        if spec == "nf4":
            model = load_base(base, quant="nf4", compute_dtype="float32",
                              device=torch.device("cpu"))
        elif is_device_quant(spec):
            model = _with_state(base, device_state(base, spec)[0])
        elif spec.startswith("onnx:"):
            state, seconds = _onnx_recipe(base, spec.removeprefix("onnx:"))
            model = _with_state(base, state)
            extra = {"quantize_s": round(seconds, 1)}
        else:
            raise SystemExit(f"unknown base {spec!r}")
        row = {"base": spec, **{f"{name}_{k}": v for name, seqs in sets.items()
                                for k, v in _agreement(fp, model, seqs).items()}, **extra,
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
    result = {"model": "SmolLM2-135M-Instruct (embedded)", "tokens": {
        k: sum(len(s) for s in v) for k, v in sets.items()}, "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

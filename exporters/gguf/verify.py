"""Checking a written GGUF: its structure against the plan, then, in llama.cpp through the GGUF
runtime, its logits and tokenization against the reference (a ``heldout.VerifySet``).

The structure is read with ``runtimes.gguf_header.read_gguf_header``, which skips the long
vocabulary arrays (``gguf.GGUFReader`` parses every token string in Python: 3-7 s per export of
a 49k vocabulary). The model runs through ``runtimes.gguf.GGUFRuntime``, the runtime the device
uses, LoRA adapter included; nothing here loads torch or transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeqlora import threads
from edgeqlora.errors import ExportError

from . import common


def read_back(path: str | Path) -> dict[str, Any]:
    """Tensor count, per-type counts and per-tensor (type, ggml shape) of a GGUF file; a file
    shorter than its tensor table says is refused (by the header reader)."""
    from edgeqlora.runtimes.gguf_header import read_gguf_header

    path = Path(path)
    _, table = read_gguf_header(path, ExportError)
    tensors = {t.name: {"type": t.type, "shape": [int(x) for x in t.dims]} for t in table}
    mix: dict[str, int] = {}
    for t in tensors.values():
        mix[t["type"]] = mix.get(t["type"], 0) + 1
    return {"tensor_count": len(tensors), "types": mix, "tensors": tensors}


def check_structure(path: Path, plan: list[dict[str, Any]] | None,
                    info: dict[str, Any] | None = None) -> list[str]:
    """Problems between what was planned and what the file holds (names, shapes, types).
    ``info``: the file's ``read_back`` when already done."""
    info = info or read_back(path)
    if plan is None:
        return []
    problems = []
    if info["tensor_count"] != len(plan):
        problems.append(f"{info['tensor_count']} tensors in the file, {len(plan)} planned")
    for t in plan:
        got = info["tensors"].get(t["name"])
        if got is None:
            problems.append(f"{t['name']} missing")
        elif got["shape"] != list(reversed(t["shape"])):
            problems.append(f"{t['name']} has ggml shape {got['shape']}, expected "
                            f"{list(reversed(t['shape']))}")
        elif got["type"] != t["qtype"].name:
            problems.append(f"{t['name']} is {got['type']}, planned {t['qtype'].name}")
    return problems


def tensor_digests(path: str | Path) -> dict[str, str]:
    """sha256 of each tensor's data in a GGUF file, by GGUF tensor name (read from the header's
    offsets, one tensor at a time)."""
    import hashlib

    from edgeqlora.runtimes.gguf_header import read_gguf_header

    _, tensors = read_gguf_header(path)
    out = {}
    with open(path, "rb") as f:
        for t in tensors:
            f.seek(t.offset)
            out[t.name] = hashlib.sha256(f.read(t.n_bytes)).hexdigest()
    return out


def tokenization_parity(runtime, reference) -> dict[str, Any]:
    """Do llama.cpp (the GGUF's vocabulary) and the reference tokenizer give the same ids for
    every text of ``reference``, special tokens added as each adds them?"""
    mismatches = []
    for text in reference.texts:
        ours = runtime.tokenize(text, special=True, add_bos=True)
        if list(ours) != list(reference.text_ids(text, True)):
            mismatches.append(text[:60])
    return {"texts": len(reference.texts), "identical": len(reference.texts) - len(mismatches),
            "mismatches": mismatches[:5]}


def verify(model_path: str | Path, reference, thresholds: dict[str, float],
           plan: list[dict] | None = None, lora_path: str | Path | None = None,
           readback: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a written GGUF: structure, then, with llama-cpp-python, top-1 agreement and mean KL
    against ``reference`` (a ``heldout.VerifySet``) over its distinct positions, and the
    tokenization of its texts.

    Returns ``{"passed": bool, "problems": [...], "top1", "kld", "tokens", ...}``."""
    model_path = Path(model_path)
    result: dict[str, Any] = {"thresholds": dict(thresholds)}
    problems = check_structure(model_path, plan, readback)
    if lora_path is not None:
        read_back(lora_path)
    if not common.has_llama_cpp():
        result.update(runtime="skipped: llama-cpp-python not installed "
                              f"({common.LLAMA_CPP_INSTALL})")
        result["problems"] = problems
        result["passed"] = not problems
        return result
    from edgeqlora.runtimes.gguf import GGUFRuntime

    n_ctx = max(max((len(s) for s in reference.sequences), default=0) + 8, 64)
    # One batch per sequence (n_batch = n_ctx), every free core (a batched prompt is
    # compute-bound, unlike decoding; a core another process holds would stall the rest).
    with GGUFRuntime(model_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads.free_cores(),
                     lora_path=lora_path) as runtime:
        # In order, so consecutive sequences reuse their shared prefix's KV cache.
        stream = runtime.iter_logits(reference.sequences)
        try:
            score = reference.agreement(lambda i: next(stream))
        finally:
            stream.close()
        result.update(score)
        result["runtime"] = "llama-cpp-python"
        result["reference"] = reference.label
        if score["top1"] < thresholds["min_top1"]:
            problems.append(f"top-1 agreement {score['top1']:.3f} < {thresholds['min_top1']}")
        if score["kld"] > thresholds["max_kld"]:
            problems.append(f"mean KLD {score['kld']:.4f} > {thresholds['max_kld']}")
        result["tokenization"] = tokenization_parity(runtime, reference)
    if result["tokenization"]["mismatches"]:
        texts = result["tokenization"]["texts"]
        problems.append(f"tokenization differs from the HF tokenizer on "
                        f"{texts - result['tokenization']['identical']} of {texts} "
                        f"held-out texts, first {result['tokenization']['mismatches'][0]!r}")
    result["problems"] = problems
    result["passed"] = not problems
    return result

"""``verify_export``: the written files checked as a device will run them, against a reference.

``onnx.checker`` and the operator counts the recipe must have produced (MatMulNBits,
MatMulBnb4...); logits through our runtime (``runtimes.onnx``) against the reference's
(``heldout.VerifySet``: the merged model, or for nf4-exact the trained one), scored with
``edgeqlora.metrics`` in float64 over distinct contexts (top-1, mean KL); tokenization of the
reference's texts; and, when onnxruntime-genai is installed, that genai loads the export and
greedily decodes the same tokens. No torch: the reference logits come with the VerifySet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import recipes
from .genai import genai_check
from .graph import op_counts
from .recipes import MODEL_FILE


def check_structure(out_dir: Path, info: dict[str, Any]) -> list[str]:
    """onnx.checker on the written file and the recipe's operator counts."""
    import onnx

    problems = []
    path = Path(out_dir) / info["model_file"]
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx.checker.ValidationError and protobuf decode errors
        problems.append(f"onnx.checker rejects {path.name}: {str(exc).splitlines()[0]}")
        return problems
    model = onnx.load(str(path), load_external_data=False)
    ops = op_counts(model)
    for op, n in info.get("expected_ops", {}).items():
        if ops.get(op, 0) < n:
            problems.append(f"{path.name} has {ops.get(op, 0)} {op} nodes, the recipe needs {n}")
    return problems


def load_runtime(out_dir: Path, sequences: list[list[int]], adapter_file: str | None = None):
    """The export in our runtime, with its adapter file (adapter-only exports) active."""
    from edgeqlora.runtimes.onnx import load_onnx

    out_dir = Path(out_dir)
    return load_onnx(out_dir / MODEL_FILE, export_dir=out_dir,
                     n_ctx=max(len(s) for s in sequences) + 9,
                     lora_path=out_dir / adapter_file if adapter_file else None)


def verify_export(out_dir: str | Path, info: dict[str, Any], reference,
                  thresholds: dict[str, float]) -> dict[str, Any]:
    """Structure, logits and tokenization against ``reference`` (a ``heldout.VerifySet``),
    genai load (if installed).

    Returns ``{"passed", "problems", "top1", "kld", "tokens", "tokenization", "genai", ...}``."""
    import numpy as np

    from edgeqlora.runtimes.base import Completion

    out_dir = Path(out_dir)
    result: dict[str, Any] = {"thresholds": dict(thresholds), "runtime": "onnxruntime",
                              "reference": reference.label}
    problems = check_structure(out_dir, info)
    if problems:
        return {**result, "problems": problems, "passed": False}
    seqs = reference.sequences
    rt = load_runtime(out_dir, seqs, info.get("adapter_file"))
    try:
        first = rt.logits(seqs[0])
        score = reference.agreement(lambda i: first if i == 0 else rt.logits(seqs[i]))
        result.update(score)
        result["max_abs_diff_first_sequence"] = float(np.abs(reference.logits(0)
                                                             - first).max())
        if score["top1"] < thresholds["min_top1"]:
            problems.append(f"top-1 agreement {score['top1']:.3f} < {thresholds['min_top1']}")
        if score["kld"] > thresholds["max_kld"]:
            problems.append(f"mean KLD {score['kld']:.4f} > {thresholds['max_kld']}")
        texts = reference.texts
        mismatches = [t[:60] for t in texts
                      if rt.tokenize(t) != list(reference.text_ids(t, False))]
        result["tokenization"] = {"texts": len(texts), "identical": len(texts) - len(mismatches),
                                  "mismatches": mismatches[:5]}
        if mismatches:
            problems.append(f"tokenization differs from the HF tokenizer on "
                            f"{len(mismatches)} of {len(texts)} texts, first "
                            f"{mismatches[0]!r}")
        prompt = seqs[0][: max(1, min(len(seqs[0]) - 1, 32))]
        done = Completion()
        for _ in rt.complete(prompt, max_new_tokens=8, result=done):
            pass
    finally:
        rt.close()
    if recipes.has_genai():
        result["genai"] = genai_check(out_dir, prompt, done.token_ids, 8,
                                      info.get("adapter_file"))
        if not result["genai"]["loaded"]:
            problems.append(f"onnxruntime-genai cannot load the export: "
                            f"{result['genai']['error']}")
    else:
        result["genai"] = {"loaded": None, "skipped": recipes.GENAI_MISSING}
    result["problems"] = problems
    result["passed"] = not problems
    return result

"""How far a merged checkpoint is from the trained model (the 4-bit base + LoRA, as trained):
top-1 agreement and mean KL divergence on held-out tokens, for ``edgeqlora.merge``'s ``auto`` and
``best`` merge bases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifacts import read_manifest


def measure_against_trained(adapter_dir: Path, candidates: dict[str, Path],
                            eval_tokens: int, keep_logits: bool = False, trained=None
                            ) -> dict[str, dict[str, Any]]:
    """Top-1 agreement and mean KL(trained || candidate) of each merged candidate directory
    (``metrics``: float64), over the distinct contexts of the held-out sequences.

    The trained model's logits are computed once (at the distinct positions only) and kept;
    candidates are loaded one at a time. With ``keep_logits`` each score also holds the
    candidate's full logits per sequence (``"logits"``), which the export stage reuses as the
    merged model's reference instead of running it again. ``trained``: the trained model, if
    already loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    from .heldout import heldout_sequences
    from .hf_tokenizer import load as tokenizer
    from .metrics import Agreement, distinct_positions
    from .logits import forward_logits
    from .qlora import dequantized_weights, load_trained

    if trained is None:
        trained = load_trained(adapter_dir, device="cpu")
    manifest = read_manifest(adapter_dir, kind="adapter")
    tok = tokenizer(next(iter(candidates.values())))
    seqs = heldout_sequences(manifest, tok, eval_tokens)
    keeps = distinct_positions(seqs)  # a shared prompt counts once
    # Dequantized once, not at every forward (bitsandbytes' CPU path; same outputs, tested).
    with dequantized_weights(trained):
        ref = forward_logits(trained, seqs, rows=keeps)
    del trained
    scores: dict[str, dict[str, Any]] = {}
    for name, path in candidates.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        acc = Agreement()
        logits = forward_logits(model, seqs)
        for r, cand, keep in zip(ref, logits, keeps):
            acc.add(r, cand[keep])
        scores[name] = acc.result()
        if keep_logits:
            scores[name]["logits"] = logits
        del model, logits
    return scores

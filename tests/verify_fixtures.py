"""Test references for exporter verification: a ``heldout.VerifySet`` on a checkpoint directory,
built the way the export stage builds it (logits of the fp32 model in torch, ids of its
Hugging Face tokenizer)."""

from __future__ import annotations

from pathlib import Path


def verify_set(model_dir: Path, sequences: list[list[int]], texts=(), label: str = "merged model"):
    """The VerifySet of ``model_dir`` on ``sequences`` and ``texts``; the model is loaded when
    the first logits are asked for (a check that never runs the export costs nothing)."""
    from edgeqlora.heldout import VerifySet
    from edgeqlora.hf_tokenizer import load

    tok = load(model_dir)  # the export stage's loader: one load per tokenizer content
    model = []

    def logits(ids):
        import torch
        from transformers import AutoModelForCausalLM

        if not model:
            model.append(AutoModelForCausalLM.from_pretrained(model_dir,
                                                              dtype=torch.float32).eval())
        with torch.no_grad():
            return model[0](torch.tensor([ids])).logits[0].float().numpy()

    def text_ids(text: str, add_special_tokens: bool) -> list[int]:
        return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    return VerifySet(sequences, logits, list(texts), text_ids, label)

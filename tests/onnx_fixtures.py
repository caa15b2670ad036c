"""Helpers for the ONNX exporter tests: a ``heldout.VerifySet`` from a Hugging Face checkpoint
(fp32 logits from transformers, token ids from its AutoTokenizer), the way the export stage
builds one, and an adapter's LoRA deltas as the plain arrays the exporter takes."""

from __future__ import annotations

from pathlib import Path


def verify_set(model_dir: Path, sequences: list[list[int]], texts: list[str],
               label: str = "merged model"):
    import torch
    from transformers import AutoModelForCausalLM

    from edgeqlora.heldout import VerifySet
    from edgeqlora.hf_tokenizer import load

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = load(model_dir)  # the export stage's loader: one load per tokenizer content

    def logits(ids: list[int]):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    def text_ids(text: str, special: bool) -> list[int]:
        return list(tok(text, add_special_tokens=special)["input_ids"])

    return VerifySet(sequences, logits, texts, text_ids, label=label)


def lora_arrays(adapter_dir: Path) -> dict:
    """``{weight name: (A [r, in], B [out, r], scale)}`` of a trained adapter (numpy, fp32)."""
    from edgeqlora.merge import read_adapter

    adapter = read_adapter(adapter_dir)
    return {k: (d.A.float().numpy(), d.B.float().numpy(), d.scale)
            for k, d in adapter.deltas.items()}

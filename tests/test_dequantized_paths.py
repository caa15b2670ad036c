"""Every torch forward of the 4-bit trained model on CPU (the parity gate's reference, the
merge-base measurement, an export's trained-model reference) goes through the dequantized-weight
cache, never bitsandbytes' CPU 4-bit matmul, which dequantizes every weight at every call."""

from __future__ import annotations

import pytest

from conftest import build_tiny_model, has_module
from lora_fixtures import make_adapter

# Not importorskip: importing bitsandbytes at collection bypasses the quiet import (3 s).
pytestmark = pytest.mark.skipif(not has_module("bitsandbytes"), reason="needs bitsandbytes")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("dq")
    base = build_tiny_model(root / "base", tokenizer_dir)
    return make_adapter(root / "adapter", base)


@pytest.fixture
def no_4bit_matmul(monkeypatch):
    import bitsandbytes as bnb

    def refuse(*args, **kwargs):
        raise AssertionError("bitsandbytes' 4-bit matmul was called on CPU")

    monkeypatch.setattr(bnb, "matmul_4bit", refuse)


def test_the_guard_fires_without_the_cache(adapter, no_4bit_matmul):
    import torch

    from edgeqlora.qlora import load_trained

    model = load_trained(adapter, device="cpu")
    with pytest.raises(AssertionError, match="4-bit matmul"), torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_parity_reference_uses_the_cache(adapter, no_4bit_matmul):
    from edgeqlora.parity import TorchReference

    ref = TorchReference(adapter)
    ids = ref.chat_ids([{"role": "user", "content": "lamp on"}], add_generation_prompt=True)
    assert ref.logits(ids).shape[0] == len(ids)
    assert len(ref.greedy([[{"role": "user", "content": "lamp on"}]], 4)) == 1


def test_merge_measurement_and_export_reference_use_the_cache(adapter, tmp_path,
                                                              no_4bit_matmul):
    from edgeqlora import export_inputs, merge

    a = merge.read_adapter(adapter)
    out = tmp_path / "m"
    out.mkdir()
    merge.write_merged(a, out, "original")
    scores = merge.measure_against_trained(a.dir, {"original": out}, 64)
    assert scores["original"]["tokens"] > 0
    ref = export_inputs.trained_reference(a, out, 64)
    assert ref.logits(0).shape[0] == len(ref.sequences[0])


def test_evaluation_uses_the_cache(adapter, tokenizer_dir, no_4bit_matmul):
    """The trainer's evaluations (held-out loss, greedy answers) on the 4-bit model."""
    import torch
    from transformers import AutoTokenizer

    from edgeqlora.evaluate import eval_loss, greedy_generate
    from edgeqlora.qlora import load_trained

    model = load_trained(adapter, device="cpu")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = greedy_generate(model, tok, [[{"role": "user", "content": "lamp on"}]], 4)
    assert len(out) == 1
    ids = torch.tensor([[1, 2, 3, 4]])
    loss = eval_loss(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                              "labels": ids}])
    assert loss["eval_tokens"] == 3

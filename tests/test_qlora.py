"""Model components of the QLoRA recipe (edgeqlora.qlora) on a tiny random Llama."""

from __future__ import annotations

import warnings

import pytest
import numpy as np
import torch

from edgeqlora import qlora
from edgeqlora.config import LoraConfig
from edgeqlora.errors import ConfigError, InputError

ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def ids(tokenizer):
    text = "Turn on the kitchen lights at seven thirty in the evening, please."
    return torch.tensor([tokenizer(text)["input_ids"]])


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8", "none"])
def test_load_base_quant_kinds(tiny_model_dir, quant, ids):
    import bitsandbytes as bnb

    model = qlora.load_base(tiny_model_dir, quant=quant)
    info = qlora.quant_info(model, quant, True)
    layer = model.model.layers[0].self_attn.q_proj
    expected = {"nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt,
                "none": torch.nn.Linear}[quant]
    assert isinstance(layer, expected)
    assert info["compute_dtype"] == "float32"  # "auto" on CPU
    if quant in ("nf4", "fp4"):
        assert layer.weight.quant_state.quant_type == quant
        assert layer.weight.quant_state.nested  # double quantization
        assert info == {"quant": quant, "double_quant": True, "block_size": 64,
                        "compute_dtype": "float32"}
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.isfinite(model(ids).logits).all()
    # LoRA trains on every kind of base.
    peft_model = qlora.attach_lora(model, LoraConfig(r=2, dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    grads = _lora_grads(peft_model, ids)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_load_base_errors(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        qlora.load_base(tmp_path)
    with pytest.raises(ConfigError, match="compute_dtype"):
        qlora.resolve_compute_dtype("float8", "cpu")


def test_targets(tiny_model_dir):
    model = qlora.load_base(tiny_model_dir)
    assert qlora.resolve_targets(model, "all-linear") == ALL_LINEAR
    assert qlora.resolve_targets(model, "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert qlora.resolve_targets(model, "q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError) as err:
        qlora.resolve_targets(model, "q_proj,query_key_value")
    # The message names the bad module and lists the model's linear layers.
    assert "query_key_value" in str(err.value) and "gate_proj" in str(err.value)
    assert "lm_head" not in str(err.value)


def test_attach_lora_flags(tiny_model_dir):
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, target="attention", rslora=True, dora=True)
    model = qlora.attach_lora(qlora.load_base(tiny_model_dir), cfg)
    peft_cfg = model.peft_config["default"]
    assert peft_cfg.use_rslora and peft_cfg.use_dora and peft_cfg.r == 4
    info = qlora.lora_info(model, cfg)
    assert info["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("mlp" in n for n in trainable)
    with pytest.raises(ConfigError, match="lora.r=0"):
        qlora.attach_lora(qlora.load_base(tiny_model_dir), LoraConfig(r=0))


def _lora_grads(model, ids):
    model.train()
    model.zero_grad()
    loss, n = qlora.token_loss(model, {"input_ids": ids, "labels": ids})
    (loss / n).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _lora_model(tiny_model_dir):
    torch.manual_seed(0)
    model = qlora.attach_lora(qlora.load_base(tiny_model_dir),
                              LoraConfig(r=4, dropout=0.0, target="all-linear"))
    # B starts at zero in PEFT; give it values so every gradient path is non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def test_eval_forward_keeps_backward_correct(tiny_model_dir, ids):
    """The bitsandbytes CPU repack trap: an eval-mode no-grad forward must leave later
    gradients exactly as they were (the repacked layer has no autograd kernel)."""
    model = _lora_model(tiny_model_dir)
    before = _lora_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(ids)
    assert qlora.cpu_repacked_layers(model) == []
    after = _lora_grads(model, ids)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_trap_is_real_and_guard_undoes_it(tiny_model_dir, ids):
    """Negative control: with the repack allowed (what bitsandbytes does by default on an
    AVX512-BF16 CPU) the gradients do go wrong; guard_cpu_4bit undoes the repack."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    model = _lora_model(tiny_model_dir)
    before = _lora_grads(model, ids)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        model(ids)
    assert qlora.cpu_repacked_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "an autograd kernel was not registered"
        broken = _lora_grads(model, ids)
    assert _rel_error(before, broken) > 0.2
    qlora.guard_cpu_4bit(model)
    assert qlora.cpu_repacked_layers(model) == []
    fixed = _lora_grads(model, ids)
    # The inverse re-quantizes the block scales (bitsandbytes stored them in bf16 when
    # repacking), so the weights come back within bf16 precision of the scales, not bit-exact:
    # a gradient error of a few percent at most, against tens of percent while repacked.
    assert _rel_error(before, fixed) < 0.05


def _rel_error(ref, other):
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(ref, other))
    den = sum(float(a.pow(2).sum()) for a in ref)
    return (num / den) ** 0.5


def test_token_loss_matches_transformers(tiny_model_dir, ids):
    model = _lora_model(tiny_model_dir)
    model.eval()
    labels = ids.clone()
    labels[:, :5] = -100  # answer-only: the first tokens carry no label
    with torch.no_grad():
        loss_sum, n = qlora.token_loss(model, {"input_ids": ids, "labels": labels})
        ref = model(input_ids=ids, labels=labels).loss
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-5, atol=1e-6)


def test_logit_agreement_reference():
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 11)
    cand = ref + 0.5 * torch.randn(2, 5, 11)
    out = qlora.logit_agreement(ref, cand)
    p, q = ref.softmax(-1), cand.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert abs(out["kld"] - float(expected)) < 1e-6
    # The share in float64 (edgeqlora.metrics), not torch's float32 mean.
    assert out["top1"] == pytest.approx(float((ref.argmax(-1) == cand.argmax(-1)).double().mean()),
                                        abs=1e-12)
    assert out["tokens"] == 10
    same = qlora.logit_agreement(ref, ref)
    assert same["top1"] == 1.0 and abs(same["kld"]) < 1e-6


def test_quantization_loss(tiny_model_dir, ids):
    fp = qlora.load_base(tiny_model_dir, quant="none")
    q = qlora.load_base(tiny_model_dir, quant="nf4")
    same = qlora.quantization_loss(fp, fp, ids)
    assert same["top1"] == 1.0 and same["kld"] < 1e-6
    lossy = qlora.quantization_loss(fp, q, ids[0].tolist())
    assert lossy["kld"] > 0 and 0 < lossy["top1"] <= 1.0
    assert lossy["tokens"] == ids.shape[1]
    assert qlora.cpu_repacked_layers(q) == []


def test_dequantized_weights_is_bit_identical(tiny_model_dir, ids):
    """The eval-time cache of dequantized 4-bit weights changes speed, not numbers."""
    model = _lora_model(tiny_model_dir).eval()
    with torch.no_grad():
        plain = model(ids).logits
        with qlora.dequantized_weights(model) as cached_layers:
            cached = model(ids).logits
        after = model(ids).logits
    assert cached_layers == 14  # 7 linear layers x 2 blocks
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    assert "forward" not in vars(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer)


def test_dequantized_weights_train_with_the_same_gradients(tiny_model_dir, ids):
    """Training through the cache (the trainer does, on CPU) gives the adapters the gradients
    bitsandbytes' own 4-bit backward gives; an inner use (an eval inside training) leaves the
    outer cache in place. Tolerance: the same products summed by another kernel (measured
    ~1e-9 relative)."""
    model = _lora_model(tiny_model_dir).train()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in lora]

    plain = grads()
    with qlora.dequantized_weights(model) as n_cached:
        cached = grads()
        with qlora.dequantized_weights(model):
            pass
        layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        assert "forward" in vars(layer)  # still cached after the inner use ended
    assert n_cached == 14
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert "forward" not in vars(layer)


def test_forward_logits_in_batches_equals_one_at_a_time(tiny_model_dir, tokenizer):
    from edgeqlora import logits as L
    # Right padding with an attention mask: a real position never attends to a pad, so each
    # sequence's logits are its own up to float32 summation order (tolerance 1e-4 on logits of
    # magnitude ~1 from a random model).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    texts = ["turn on the lamp", "set the kitchen thermostat to 21 degrees please",
             "hello", "dim the bedroom lights to thirty percent at seven"]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    batched = L.forward_logits(model, seqs, max_batch_tokens=24)
    with torch.no_grad():
        single = [model(torch.tensor([s])).logits[0].numpy() for s in seqs]
    for b, s in zip(batched, single):
        assert b.shape == s.shape
        assert abs(b - s).max() < 1e-4
    rows = [np.arange(len(s)) % 2 == 0 for s in seqs]
    picked = L.forward_logits(model, seqs, rows=rows)
    assert all(abs(p - s[r]).max() < 1e-4 for p, s, r in zip(picked, single, rows))
    # Sequences that share a prompt: the prefix runs once, its KV cache serves the batch.
    head = tokenizer("You are a smart-home assistant. Answer with one JSON object.")["input_ids"]
    assert len(head) >= 8
    shared = [head + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert L._shared_prefix(shared) == len(head)
    batched = L.forward_logits(model, shared)
    with torch.no_grad():
        single = [model(torch.tensor([s])).logits[0].numpy() for s in shared]
    for b, s in zip(batched, single):
        assert b.shape == s.shape
        assert abs(b - s).max() < 1e-4

"""FastDropout (edgeqlora.lora_dropout): the same Bernoulli(p) dropout as torch's, from SFC64 bits
seeded by torch's generator."""

from __future__ import annotations

import math

import pytest
import torch

from edgeqlora import qlora
from edgeqlora.config import LoraConfig
from edgeqlora.lora_dropout import (LANES, FastDropout, _Dropout, keep_scale,
                                    use_fast_dropout)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_expectation(p):
    n = 1_000_000
    drop = FastDropout(p).train()
    torch.manual_seed(0)
    out = drop(torch.ones(n))
    p_eff = round(p * LANES) / LANES
    assert abs(p_eff - p) <= 0.5 / LANES
    # Binomial(n, p): 6 standard deviations is a false alarm once in ~10^9 runs.
    dropped = int((out == 0).sum())
    assert abs(dropped - n * p_eff) <= 6 * math.sqrt(n * p_eff * (1 - p_eff))
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(1 / (1 - p_eff)), rtol=1e-6))
    assert abs(out.mean().item() - 1.0) <= 6 * math.sqrt(p_eff / (1 - p_eff) / n)
    # Each 16-bit lane of a 64-bit draw is its own coin: the rate holds per lane.
    for lane in range(4):
        rate = (out[lane::4] == 0).float().mean().item()
        assert abs(rate - p_eff) <= 6 * math.sqrt(p_eff * (1 - p_eff) / (n // 4))


def test_seeded_by_torch_and_fresh_each_call():
    drop = FastDropout(0.3).train()
    x = torch.randn(4, 7, 33)
    torch.manual_seed(123)
    a, b = drop(x), drop(x)
    torch.manual_seed(123)
    assert torch.equal(drop(x), a)  # torch's generator decides the mask: resume stays exact
    assert not torch.equal(a, b)  # a new mask every call
    state = torch.get_rng_state()
    c = drop(x)
    torch.set_rng_state(state)
    assert torch.equal(drop(x), c)


def test_gradient_is_the_same_mask():
    drop = FastDropout(0.25).train()
    x = torch.randn(3, 5, 64, requires_grad=True)
    torch.manual_seed(7)
    out = drop(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    mask = out.detach() / x.detach()
    assert torch.allclose(x.grad, weights * mask, rtol=1e-6, atol=0)
    assert torch.equal(x.grad == 0, out.detach() == 0)
    # gradcheck in float64 (the mask is regenerated from the saved seed in backward)
    x64 = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    seed = 99
    assert torch.autograd.gradcheck(lambda t: _Dropout.apply(t, 0.25, seed), (x64,))
    assert torch.equal(_Dropout.apply(x64, 0.25, seed),
                       x64 * keep_scale((2, 9), 0.25, seed, torch.float64))


def test_identity_in_eval_and_at_zero():
    x = torch.randn(2, 3, 8)
    assert FastDropout(0.5).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        FastDropout(1.0)


def test_swap_in_peft_model_keeps_adapter_files(tiny_model_dir):
    model = qlora.attach_lora(qlora.load_base(tiny_model_dir), LoraConfig(r=2, dropout=0.1))
    keys = set(model.state_dict())
    n_lora = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    assert use_fast_dropout(model) == n_lora
    assert set(model.state_dict()) == keys
    drops = [d for m in model.modules() if hasattr(m, "lora_dropout")
             for d in m.lora_dropout.values()]
    assert drops and all(isinstance(d, FastDropout) and d.p == 0.1 for d in drops)
    assert use_fast_dropout(model) == 0  # nothing left to swap
    plain = qlora.attach_lora(qlora.load_base(tiny_model_dir), LoraConfig(r=2, dropout=0.0))
    assert use_fast_dropout(plain) == 0  # PEFT uses Identity at p=0

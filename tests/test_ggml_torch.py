"""``edgeqlora.ggml_torch``: torch dequantization is bit-identical to the reference,
``gguf.quants.dequantize`` (numpy), on llama.cpp's own quantized bytes and on random bytes; and
``GGMLLinear`` equals an ``nn.Linear`` over that same reference weight, forward and backward,
alone and under PEFT LoRA in a tiny Llama.

Tolerance: none. Every comparison is of float32 bit patterns (int32 views), since the trainer's
frozen weights must be exactly the device's. The one exception is written where it is: F16 NaNs,
whose payload hardware converters quiet (numpy's software converter keeps signalling NaNs
signalling), so those are checked to stay NaN."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import has_module

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from edgeqlora.errors import ConfigError  # noqa: E402
from edgeqlora.ggml_torch import GGMLLinear, dequantize, register_lora  # noqa: E402

Q = gguf.GGMLQuantizationType
HAS_KERNELS = has_module("llama_cpp")
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK32_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Byte offsets of the f16 scale fields of each block (gguf-py's dequantize_blocks splits).
# The 4-bit type the layer tests use: Q4_K needs llama.cpp's quantizer, Q4_0 gguf-py has.
MAIN_4BIT = "Q4_K" if HAS_KERNELS else "Q4_0"
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
              "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _assert_same_bits(ours: torch.Tensor, ref: np.ndarray, what: str) -> None:
    ours = ours.detach().cpu().numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
    a, b = ours.view(np.int32), np.ascontiguousarray(ref, dtype=np.float32).view(np.int32)
    if not np.array_equal(a, b):
        ulps = np.abs(a.astype(np.int64) - b.astype(np.int64))
        raise AssertionError(f"{what}: {np.count_nonzero(ulps)} of {ulps.size} values differ, "
                             f"by up to {ulps.max()} ulps")


def _rows(n_per_row: int, seed: int) -> np.ndarray:
    """Rows a real weight can hold and the edge cases of each quantizer: unit, small, f16-subnormal
    and large magnitudes, an outlier, a constant row (zero range) and an all-zero row."""
    rng = np.random.default_rng(seed)

    def g(scale):
        return rng.standard_normal(n_per_row).astype(np.float32) * np.float32(scale)

    spike = g(1e-3)
    spike[n_per_row // 3] = 50.0
    rows = [g(1.0), g(0.02), g(1e-3), g(1e-6), g(3e3), spike, np.full(n_per_row, 0.25), g(0.0)]
    return np.stack(rows).astype(np.float32)


def _quantize(rows: np.ndarray, name: str) -> np.ndarray:
    """llama.cpp's bytes (``ggml_quantize_chunk``) when llama-cpp-python is there, else gguf-py's
    numpy quantizer where it has one (no K types)."""
    if HAS_KERNELS:
        from edgeqlora.exporters.gguf.kernels import quantize_rows

        return quantize_rows(rows, Q[name])
    if name in K_TYPES:
        pytest.skip("K-type quantization needs llama-cpp-python")
    out = gguf.quants.quantize(rows, Q[name])
    return np.ascontiguousarray(out).view(np.uint8).reshape(rows.shape[0], -1)


def _finite_f16_bits(rng, shape) -> np.ndarray:
    """Random f16 bit patterns, every finite one possible (zeros, subnormals, up to 65504)."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16)
    non_finite = (bits & 0x7C00) == 0x7C00
    return np.where(non_finite, bits ^ 0x4000, bits).astype(np.uint16)


def _random_bytes(name: str, nrows: int, n_per_row: int, seed: int) -> np.ndarray:
    """Random bytes of a ``name`` tensor, every bit pattern of its quants, finite f16 scales."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q[name]]
    blocks = rng.integers(0, 256, size=(nrows * n_per_row // block_size, type_size),
                          dtype=np.uint8)
    if name == "F16":
        blocks = _finite_f16_bits(rng, blocks.shape[0]).view(np.uint8).reshape(blocks.shape)
    for offset in F16_FIELDS.get(name, ()):
        blocks[:, offset:offset + 2] = _finite_f16_bits(rng, blocks.shape[0]).view(np.uint8) \
            .reshape(-1, 2)
    return blocks.reshape(nrows, -1)


def _cases():
    for name in FLOAT_TYPES:
        yield from ((name, n) for n in (256, 576))
    for name in BLOCK32_TYPES:
        yield from ((name, n) for n in (256, 512, 576))
    for name in K_TYPES:
        yield from ((name, n) for n in (256, 512, 768))


@pytest.mark.parametrize("name,n_per_row", list(_cases()))
def test_quantized_rows_bit_exact(name, n_per_row):
    data = _quantize(_rows(n_per_row, seed=n_per_row), name)
    ref = gguf.quants.dequantize(data, Q[name])
    ours = dequantize(torch.from_numpy(data), name, (data.shape[0], n_per_row))
    _assert_same_bits(ours, ref, f"{name} x {n_per_row}")


@pytest.mark.parametrize("name", FLOAT_TYPES + BLOCK32_TYPES + K_TYPES)
def test_random_bytes_bit_exact(name):
    data = _random_bytes(name, 16, 512, seed=len(name) * 7 + sum(map(ord, name)))
    ref = gguf.quants.dequantize(data, Q[name])
    ours = dequantize(torch.from_numpy(data), Q[name], (16, 512))
    _assert_same_bits(ours, ref, f"{name} random bytes")


def test_every_f16_and_bf16_pattern():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    # BF16 widens by integer shift: all 65536 patterns, NaN payloads included.
    ref = gguf.quants.dequantize(every.view(np.uint8), Q.BF16)
    _assert_same_bits(dequantize(torch.from_numpy(every.view(np.uint8)), "BF16", (1 << 16,)),
                      ref, "BF16 every pattern")
    is_nan = ((every & 0x7C00) == 0x7C00) & ((every & 0x03FF) != 0)
    finite = every[~is_nan].view(np.uint8)
    ref = gguf.quants.dequantize(finite, Q.F16)
    _assert_same_bits(dequantize(torch.from_numpy(finite.copy()), "F16", ref.shape), ref,
                      "F16 every non-NaN pattern")
    nans = dequantize(torch.from_numpy(every[is_nan].view(np.uint8).copy()), "F16",
                      (int(is_nan.sum()),))
    assert torch.isnan(nans).all()


def test_qtype_spellings_and_shapes():
    data = _random_bytes("Q4_K", 2, 256, seed=1)
    t = torch.from_numpy(data)
    ref = dequantize(t, Q.Q4_K, (2, 256))
    assert torch.equal(dequantize(t, "q4_k", [2, 256]), ref)
    assert torch.equal(dequantize(t.reshape(-1), int(Q.Q4_K), (2, 256)), ref)
    assert dequantize(t, "Q4_K", (512,)).shape == (512,)


def test_bad_inputs_are_clear_value_errors():
    data = torch.zeros(2 * 144 + 1, dtype=torch.uint8)
    with pytest.raises(ValueError,
                       match=r"Q4_K tensor of shape \[2, 256\] takes 288 bytes, got 289"):
        dequantize(data, "Q4_K", (2, 256))
    with pytest.raises(ValueError, match="Q4_K row holds a whole number of 256-value blocks"):
        dequantize(data[:288], "Q4_K", (4, 128))
    with pytest.raises(ValueError, match="expected uint8"):
        dequantize(torch.zeros(36, dtype=torch.int8), "Q8_0", (2, 32))
    with pytest.raises(ValueError, match="unknown GGML type 'Q9_0'"):
        dequantize(data, "Q9_0", (2, 256))
    with pytest.raises(ValueError, match="IQ4_NL has no torch dequantizer"):
        dequantize(data, "IQ4_NL", (2, 256))


def _layer(name, out_features=24, in_features=512, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.05
    b = rng.standard_normal(out_features).astype(np.float32) if bias else None
    data = _quantize(weight, name)
    layer = GGMLLinear.from_bytes(data, name, (out_features, in_features), bias=b)
    ref = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(gguf.quants.dequantize(data, Q[name])))
        if bias:
            ref.bias.copy_(torch.from_numpy(b))
    return layer, ref.requires_grad_(False)


@pytest.mark.parametrize("name,bits", [("Q4_0", 4.5), ("Q4_K", 4.5), ("Q5_0", 5.5),
                                       ("Q6_K", 6.5625), ("Q8_0", 8.5), ("F16", 16.0)])
def test_bits_per_weight(name, bits):
    data = _random_bytes(name, 4, 256, seed=0)
    layer = GGMLLinear.from_bytes(data, name, (4, 256))
    assert layer.bits_per_weight == bits
    assert f"qtype={name}" in repr(layer) and "in_features=256, out_features=4" in repr(layer)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"])
def test_linear_forward_backward_equal_nn_linear(name):
    layer, ref = _layer(name)
    assert torch.equal(layer.dequantized_weight(), ref.weight)
    x = torch.randn(3, 5, 512, generator=torch.Generator().manual_seed(0))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), ref(x2)
    assert torch.equal(y1, y2)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    assert torch.equal(x1.grad, x2.grad)
    assert not layer.qweight.requires_grad and layer.qweight.grad is None
    assert layer.qweight.dtype == torch.uint8 and layer.bias.grad is None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    assert set(layer.state_dict()) == {"qweight", "bias"}


def test_linear_bf16_input_and_module_cast():
    layer, ref = _layer(MAIN_4BIT, bias=True)
    before = layer.qweight.clone()
    layer.to(dtype=torch.bfloat16)
    assert layer.qweight.dtype == torch.uint8 and torch.equal(layer.qweight, before)
    x = torch.randn(4, 512).to(torch.bfloat16).requires_grad_()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    # Documented compute: float32 weight rounded once to the input's dtype.
    expected = torch.nn.functional.linear(x.detach(), ref.weight.to(torch.bfloat16),
                                          ref.bias.to(torch.bfloat16))
    assert torch.equal(y.detach(), expected)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_linear_rejects_bad_bytes():
    with pytest.raises(ValueError,
                       match=r"Q8_0 tensor of shape \[4, 64\] takes 272 bytes, got 270"):
        GGMLLinear(torch.zeros(270, dtype=torch.uint8), "Q8_0", 64, 4)


# A Q4_K_M-like mix for a 256-wide model; without llama.cpp's kernels, 32-block types gguf-py can
# quantize.
K_MIX = {"q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q6_K", "o_proj": "Q5_0",
         "gate_proj": "Q4_K", "up_proj": "Q8_0", "down_proj": "Q6_K"}
BLOCK32_MIX = {"q_proj": "Q4_0", "k_proj": "Q4_1", "v_proj": "Q8_0", "o_proj": "Q5_0",
               "gate_proj": "Q5_1", "up_proj": "Q4_0", "down_proj": "Q8_0"}


def _tiny_pair():
    """(model with GGMLLinear projections, same model with nn.Linear over gguf.quants' dequantized
    weights): a tiny random Llama, small vocabulary (no tokenizer needed here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    ref = LlamaForCausalLM(config).float()
    model = copy.deepcopy(ref)
    mix = K_MIX if HAS_KERNELS else BLOCK32_MIX
    for name, module in list(ref.named_modules()):
        kind = name.rpartition(".")[2]
        if kind not in mix:
            continue
        data = _quantize(module.weight.detach().numpy(), mix[kind])
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(gguf.quants.dequantize(data, Q[mix[kind]])))
        parent = model.get_submodule(name.rpartition(".")[0])
        setattr(parent, kind, GGMLLinear.from_bytes(data, mix[kind], tuple(module.weight.shape)))
    return model, ref, sorted(mix)


def _lora(model, targets, ggml: bool):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, register_lora(config) if ggml else config)


def _set_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_peft_lora_over_ggml_linear(tmp_path):
    from peft import LoraConfig, PeftModel

    model, ref, targets = _tiny_pair()
    fresh = copy.deepcopy(model)
    model, ref = _lora(model, targets, ggml=True), _lora(ref, targets, ggml=False)
    assert "GGMLLoraLinear" in type(model.get_submodule(
        "base_model.model.model.layers.0.self_attn.q_proj")).__name__
    # B starts at zero, which would make A's gradient zero: same random values in both.
    _set_lora(model, 1)
    _set_lora(ref, 1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable == [n for n, p in ref.named_parameters() if p.requires_grad]

    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    out, out_ref = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, out_ref.logits)
    out.loss.backward()
    out_ref.loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name
            assert torch.equal(grads[name].grad, p.grad), name
    for module in model.modules():
        if isinstance(module, GGMLLinear):
            assert module.qweight.grad is None

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter_config.json").exists()
    config = register_lora(LoraConfig.from_pretrained(tmp_path))
    loaded = PeftModel.from_pretrained(fresh, tmp_path, config=config)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, out.logits)
    with pytest.raises(ConfigError, match="cannot be merged"):
        model.merge_and_unload()


@pytest.mark.gpu
def test_cuda_bit_exact_and_bf16_training_step():
    for name in FLOAT_TYPES + BLOCK32_TYPES + K_TYPES:
        data = torch.from_numpy(_random_bytes(name, 64, 1024, seed=3))
        cpu = dequantize(data, name, (64, 1024))
        cuda = dequantize(data.cuda(), name, (64, 1024))
        assert cuda.is_cuda
        _assert_same_bits(cuda, cpu.numpy(), f"{name} on CUDA")

    layer, ref = _layer(MAIN_4BIT, out_features=256, in_features=512)
    layer, ref = layer.cuda(), ref.cuda().to(torch.bfloat16)
    assert layer.qweight.is_cuda and layer.qweight.dtype == torch.uint8
    x = torch.randn(4, 8, 512, device="cuda", dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), ref(x2)
    assert y1.dtype == torch.bfloat16 and torch.equal(y1, y2)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    assert torch.equal(x1.grad, x2.grad)
    assert layer.qweight.grad is None

"""ONNX size prediction (exporters/onnx/sizes.py): every quant has one, built from the recipe
table, and on a tiny model whose weights dominate the graph the prediction is within 0.1 % of
the files ``write_export`` really writes (model.onnx + model.onnx.data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_model, has_module

pytestmark = pytest.mark.usefixtures("onnx_traces_reused")

# A SmolLM2-135M-shaped config (30 layers, tied embeddings) and its Hugging Face tensor shapes.
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "tie_word_embeddings": True, "max_position_embeddings": 8192}


def llama_shapes(cfg: dict) -> dict[str, list[int]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h]}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": [q, h],
                       p + "self_attn.k_proj.weight": [kv, h],
                       p + "self_attn.v_proj.weight": [kv, h],
                       p + "self_attn.o_proj.weight": [h, q],
                       p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
                       p + "mlp.down_proj.weight": [h, i], p + "input_layernorm.weight": [h],
                       p + "post_attention_layernorm.weight": [h]})
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = [v, h]
    return shapes


def test_every_quant_has_a_prediction():
    from edgeqlora.errors import ConfigError
    from edgeqlora.exporters.onnx import QUANTS, predict
    from edgeqlora.exporters.onnx.sizes import GRAPH_BYTES

    assert set(GRAPH_BYTES) == set(QUANTS)
    shapes = llama_shapes(SMOLLM2)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    sizes = {}
    for quant in QUANTS:
        p = predict(SMOLLM2, shapes, quant)
        assert p["file_bytes"] > 0 and p["tensors"] == [] and p["n_params"] == n_params, quant
        sizes[quant] = p["file_bytes"]
    assert sizes["int4"] < sizes["int4-q8head"] < sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    # Same storage as the RTN recipes; HQQ and k-quant add zero points, so no shared table.
    assert abs(sizes["int4-gptq"] - sizes["int4"]) < 2000
    assert abs(sizes["int4-gptq-q8head"] - sizes["int4-q8head"]) < 2000
    assert sizes["int4-hqq"] > sizes["int4-kquant"] > sizes["int4"]
    # nf4-exact: NF4 codes + absmax per 64 for the 4-bit layers, fp32 LoRA beside them.
    lora = {k: 8 for k in shapes if k.endswith(("q_proj.weight", "v_proj.weight"))}
    with_lora = predict(SMOLLM2, shapes, "nf4-exact", lora=lora)
    assert with_lora["n_params"] == n_params + 8 * 30 * (576 + 576 + 576 + 192)  # q, v
    assert with_lora["file_bytes"] > sizes["nf4-exact"] + 4 * 8 * 30 * 1920
    with pytest.raises(ConfigError, match="no size prediction for ONNX quant 'q4_k_m'"):
        predict(SMOLLM2, shapes, "q4_k_m")
    with pytest.raises(ConfigError, match="block_size=48"):
        predict(SMOLLM2, shapes, "int4", block_size=48)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> Path:
    """Hidden 128: the weights (~4 MB at int4) dominate the graph (~0.1 MB), so 0.1 % is a
    few kB. The norms get distinct values as in any trained checkpoint: random init makes them
    all ones, which the TorchScript exporter folds into one initializer."""
    import torch
    from transformers import AutoModelForCausalLM

    src = build_tiny_model(tmp_path_factory.mktemp("onnx-predict"), tokenizer_dir, seed=4,
                           hidden=128, intermediate=256)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(src, safe_serialization=True)
    return src


def _shapes(model_dir: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def _written(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("model.onnx*"))


needs_onnx = pytest.mark.skipif(not (has_module("onnx") and has_module("onnxruntime")),
                                reason="needs onnx + onnxruntime")


@needs_onnx
@pytest.mark.parametrize("quant", ["int4", "int4-gptq", "int4-hqq", "int8", "fp16"])
def test_prediction_matches_the_written_files(tiny, quant, tmp_path):
    from edgeqlora.exporters.onnx import predict, write_export

    rng = np.random.default_rng(0)
    calibration = ([list(map(int, rng.integers(0, 49152, 48))) for _ in range(4)],
                   {"data": "random ids"})
    out = tmp_path / quant
    out.mkdir()
    write_export(tiny, out, quant, calibration=calibration, context_length=64)
    config = json.loads((tiny / "config.json").read_text())
    predicted = predict(config, _shapes(tiny), quant)["file_bytes"]
    real = _written(out)
    # Tensor bytes are exact; the rest is the graph model (measured: within ~100 bytes here).
    assert abs(predicted - real) <= 1e-3 * real, (quant, predicted, real)


@needs_onnx
@pytest.mark.skipif(not has_module("bitsandbytes"), reason="needs bitsandbytes")
def test_nf4_exact_prediction_matches_the_written_files(tiny, tmp_path):
    from edgeqlora.exporters.onnx import predict, write_export

    shapes = _shapes(tiny)
    quantized = [k for k, s in shapes.items() if ".layers." in k and len(s) == 2]
    rng = np.random.default_rng(1)
    lora = {k: (rng.standard_normal((4, shapes[k][1])).astype(np.float32) * 0.01,
                rng.standard_normal((shapes[k][0], 4)).astype(np.float32) * 0.01, 2.0)
            for k in quantized if "mlp" in k or "q_proj" in k}
    base_quant = {"quant": "nf4", "block_size": 64, "double_quant": True,
                  "compute_dtype": "float32"}
    write_export(tiny, tmp_path, "nf4-exact", lora=lora, base_quant=base_quant,
                 quantized=quantized, context_length=64)
    config = json.loads((tiny / "config.json").read_text())
    predicted = predict(config, shapes, "nf4-exact", lora=lora, base_quant=base_quant,
                        quantized=quantized)
    assert abs(predicted["file_bytes"] - _written(tmp_path)) <= 1e-3 * _written(tmp_path)

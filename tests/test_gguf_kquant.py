"""K-quant mixes written directly (``exporters/gguf/plan.py``, ``kquant_types``): for every mix, tied and untied
heads, GQA, qwen2 and rows that force llama.cpp's fallbacks, the one-pass writer's file holds the
same tensors, types, bytes and metadata as llama.cpp's quantizer (``llama_model_quantize``) writes
from an F32 GGUF of the same weights; with an importance matrix, the same bytes as quantizing
through llama.cpp and re-quantizing with the matrix."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import build_tiny_model, has_module, read_gguf

pytestmark = pytest.mark.skipif(not has_module("llama_cpp"), reason="needs llama-cpp-python")


def _read(path):
    fields, tensors = read_gguf(path)
    return (fields, {t.name: (t.tensor_type.name, t.shape, t.data.tobytes()) for t in tensors},
            [t.name for t in tensors])


def _llama_cpp_reference(model_dir, tmp_path, quant):
    from edgeqlora.exporters import gguf as G

    f32 = tmp_path / "ref.f32.gguf"
    G.write_model_gguf(model_dir, f32, "f32")
    ref = tmp_path / f"ref.{quant}.gguf"
    G.quantize_gguf(f32, ref, quant)
    return f32, ref


def _check_same_file(base, tmp_path, quant, f32=None):
    from edgeqlora.exporters import gguf as G

    if f32 is None:
        _, ref = _llama_cpp_reference(base, tmp_path, quant)
    else:
        ref = tmp_path / f"ref.{quant}.gguf"
        G.quantize_gguf(f32, ref, quant)
    ours = tmp_path / f"ours.{quant}.gguf"
    info = G.write_model_gguf(base, ours, quant, chunk_bytes=2**18)  # in chunks of rows too
    ref_fields, ref_tensors, ref_order = _read(ref)
    fields, tensors, order = _read(ours)
    assert order == ref_order
    for name, (qtype, dims, data) in ref_tensors.items():
        assert tensors[name][:2] == (qtype, dims), name
        assert tensors[name][2] == data, f"{name} ({qtype}): bytes differ"
    assert fields == ref_fields
    return {t["qtype"].name for t in info["plan"]}


@pytest.fixture(scope="module")
def deep(tmp_path_factory, tokenizer_dir):
    """16 layers (use_more_bits and the n/16 rule pick different layers), 256-wide rows (K
    types, no fallback), GQA 4:1; its F32 GGUF written once."""
    from edgeqlora.exporters import gguf as G

    root = tmp_path_factory.mktemp("kquant-deep")
    base = build_tiny_model(root / "base", tokenizer_dir, hidden=256, intermediate=512,
                            layers=16, heads=4, kv_heads=1)
    f32 = root / "ref.f32.gguf"
    G.write_model_gguf(base, f32, "f32")
    return base, f32


@pytest.mark.parametrize("quant,bulk", [("q4_k_m", "Q4_K"), ("q5_k_m", "Q5_K"),
                                        ("q3_k_m", "Q3_K"), ("q6_k", "Q6_K")])
def test_direct_kquant_is_llama_cpps_file(deep, tmp_path, quant, bulk):
    mix = _check_same_file(deep[0], tmp_path, quant, deep[1])
    assert bulk in mix and "Q6_K" in mix


# Gemma 2 has Gemma 3's tensors less the q/k norms; Llama 3's extra rope_freqs is 1-D F32 (its
# bytes are checked by tests/test_families.py's F32 run in llama.cpp).
FAMILY_CASES = ["qwen2", "qwen3", "gemma3", "phi3"]


@pytest.mark.parametrize("case", ["untied", "fallback", *FAMILY_CASES])
def test_direct_q4_k_m_other_shapes(case, tmp_path, tokenizer_dir):
    """The families' own tensors too: Qwen3's and Gemma 3's q/k norms, Gemma's extra norms
    (stored as 1 + w), Phi-3's fused attn_qkv (typed as attn_v)."""
    wide = dict(hidden=256, intermediate=512)
    shape = {"untied": dict(tie=False, **wide),
             # 96-wide rows: K types fall back (Q5_0; Q8_0 for the head), as SmolLM2's 576.
             "fallback": dict(hidden=96, intermediate=256, heads=3, kv_heads=1),
             **{family: dict(arch=family, **wide) for family in FAMILY_CASES}}[case]
    base = build_tiny_model(tmp_path / "base", tokenizer_dir, layers=2, **shape)
    mix = _check_same_file(base, tmp_path, "q4_k_m")
    if case == "fallback":
        assert {"Q5_0", "Q8_0"} <= mix
    else:
        assert "Q4_K" in mix


def test_direct_kquant_with_imatrix_is_quantize_then_requantize(tmp_path, tokenizer_dir):
    """An importance matrix applied while streaming gives the bytes of llama.cpp's quantizer
    followed by the re-quantization with the matrix (the path for models the direct writer
    leaves to llama.cpp)."""
    from edgeqlora.exporters import gguf as G
    from edgeqlora.exporters.gguf.imatrix import apply_imatrix

    base = build_tiny_model(tmp_path / "base", tokenizer_dir, hidden=256, intermediate=512,
                            layers=2)
    rng = np.random.default_rng(0)
    plan = G.plan_tensors(base, G.read_config(base), "f32")
    imatrix = {t["name"]: rng.uniform(0.1, 4.0, t["shape"][-1]).astype(np.float32)
               for t in plan if t["name"].startswith("blk.") and len(t["shape"]) == 2}
    f32, ref = _llama_cpp_reference(base, tmp_path, "q4_k_m")
    apply_imatrix(f32, ref, imatrix)
    ours = tmp_path / "ours.gguf"
    G.write_model_gguf(base, ours, "q4_k_m", imatrix=imatrix)
    plain = tmp_path / "plain.gguf"
    G.write_model_gguf(base, plain, "q4_k_m")
    assert _read(ours)[1] == _read(ref)[1]
    assert _read(ours)[1] != _read(plain)[1]


def test_kquant_types_leave_70b_rule_to_llama_cpp():
    from edgeqlora.exporters.gguf.plan import kquant_types

    plan = [{"name": f"blk.{i}.attn_v.weight", "shape": [1024, 8192]} for i in range(80)]
    assert kquant_types(plan, "q4_k_m", 80) is None
    assert kquant_types(plan[:32], "q4_k_m", 32) is not None
    with pytest.raises(ValueError, match="no K-quant mix"):
        kquant_types(plan, "q2_k", 32)

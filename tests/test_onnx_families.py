"""The ONNX exporter on every model family of ``conftest.FAMILIES`` (tiny random models with the
real tokenizer): the traced fp32 graph equals transformers, token by token through the KV cache
too (Gemma's sliding-window layers included), int8 / int4 MatMulNBits stay close and quantize
every weight MatMul (Phi-3's fused qkv_proj and gate_up_proj included), onnxruntime-genai loads
each family's genai_config.json, and a greedy decode through the runtime's cache equals
transformers' ``generate``. Unsupported checkpoints are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FAMILIES, build_tiny_model, has_module
from onnx_fixtures import verify_set

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("onnx_traces_reused")

# onnxruntime-genai's model type per family (genai 0.18 knows each name).
GENAI_TYPE = {"llama": "llama", "llama3": "llama", "mistral": "mistral", "qwen2": "qwen2",
              "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}
# Weight MatMuls per decoder layer: q k v o gate up down, or Phi-3's qkv o gate_up down.
LINEAR_PER_LAYER = {"phi3": 4}
# Two sequences, both longer than three Gemma sliding windows (8), so the window's mask is used.
SEQUENCES = [[int(t) for t in np.random.default_rng(0).integers(3, 40000, 24)], None]
TEXT = "Turn on the kitchen light and lock the front door, then set the thermostat to 21."

# fp32: the graph transformers itself runs, so only kernel rounding differs. Measured max |diff|
# of the logits (magnitude ~1) 3.0e-7 (llama family, phi3) to 6.6e-7 (gemma3), with or without
# the cache; the bound is 15x that, while a real mistake is far above it: the sliding window
# left out of the mask moves Gemma's logits by 0.73, a model of another seed differs by KL 0.025.
FP32_MAX_ABS = 1e-5
# Quantized vs transformers fp32, over both sequences' distinct positions (metrics.Agreement).
# Measured (top-1 / mean KL), per family:
#   int8:  llama 1.0/1.4e-6, llama3 1.0/1.8e-6, mistral 1.0/1.4e-6, qwen2 1.0/1.5e-6,
#          qwen3 0.98/2.7e-6, gemma2 1.0/5.8e-6, gemma3 0.91/8.7e-6, phi3 0.98/1.5e-6;
#   int4:  llama 1.0/2.9e-4, llama3 0.98/3.3e-4, mistral 1.0/2.9e-4, qwen2 0.98/3.3e-4,
#          qwen3 0.82/6.0e-4, gemma2 0.64/8.3e-4, gemma3 0.39/1.5e-3, phi3 0.73/2.8e-4;
#   int4-gptq: llama 1.0/5.4e-4, llama3 0.98/5.3e-4, mistral 1.0/5.4e-4, qwen2 0.93/4.2e-4,
#          qwen3 0.73/9.2e-4, gemma2 0.55/1.1e-3, gemma3 0.41/2.4e-3, phi3 0.68/3.6e-4.
# A tiny random model's next-token distribution is nearly flat (logit std 0.16 over 49152
# tokens), so a small error flips many argmaxes: top-1 is loose here and KL is the real check
# (bounds 4-6x above the worst family, and 2.5-4x below the KL 0.025 of an unrelated model).
# GPTQ on a random model has no structure to exploit and scores like RTN or a little worse; the
# test checks that it is written and works, not that it wins (test_onnx_export.py tests that).
QUANT_BOUNDS = {"int8": {"min_top1": 0.8, "max_kld": 5e-5},
                "int4": {"min_top1": 0.25, "max_kld": 6e-3},
                "int4-gptq": {"min_top1": 0.25, "max_kld": 1e-2}}
GREEDY_STEPS = 12


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def source(family, tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp(f"fam-{family}"), tokenizer_dir,
                            arch=family)


@pytest.fixture(scope="module")
def reference(source, tokenizer):
    """The transformers fp32 logits the exports are verified against (heldout.VerifySet)."""
    seqs = [SEQUENCES[0], list(tokenizer(TEXT)["input_ids"])]
    return verify_set(source, seqs, [TEXT])


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    from edgeqlora.exporters.onnx import write_export

    root = tmp_path_factory.mktemp(f"{source.name}-onnx")
    done = {}
    for quant in ("fp32", "int8", "int4"):
        out = root / quant
        out.mkdir()
        done[quant] = out, write_export(source, out, quant, context_length=64)
    return done


def load(out: Path):
    from edgeqlora.runtimes.onnx import load_onnx

    return load_onnx(out / "model.onnx", export_dir=out)  # n_ctx: the export's 64


def test_fp32_equals_transformers_with_and_without_cache(family, exports, reference):
    from edgeqlora.exporters.onnx import default_thresholds, verify_export

    out, info = exports["fp32"]
    check = verify_export(out, info, reference, default_thresholds("fp32"))
    assert check["passed"], check["problems"]
    assert check["top1"] == 1.0 and check["kld"] < 1e-9
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["type"] == GENAI_TYPE[family]
    if has_module("onnxruntime_genai"):
        assert check["genai"]["loaded"] and check["genai"]["identical_greedy"], check["genai"]
    rt = load(out)
    try:
        for i, ids in enumerate(reference.sequences):
            full = rt.logits(ids)
            assert np.abs(full - reference.logits(i)).max() < FP32_MAX_ABS
        # One token per step through the cache (past_key_values -> present), past the sliding
        # window: Gemma 3's sliding and global layers keep full caches; the mask does the rest.
        ids = reference.sequences[0]
        past, steps = rt._empty_cache(), []
        for pos, t in enumerate(ids):
            row, past = rt._run([t], past, pos)
            steps.append(row[-1])
        assert np.abs(np.stack(steps) - reference.logits(0)).max() < FP32_MAX_ABS
        assert {v.shape[2] for v in past.values()} == {len(ids)}
    finally:
        rt.close()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_close_to_transformers(family, exports, reference, quant):
    import onnx

    from edgeqlora.exporters.onnx import graph as G
    from edgeqlora.exporters.onnx import verify_export

    n_layers = exports["fp32"][1]["dims"]["num_hidden_layers"]
    fp32 = onnx.load(str(exports["fp32"][0] / "model.onnx"), load_external_data=False)
    n_linear = len(G.weight_matmuls(fp32))
    assert n_linear == LINEAR_PER_LAYER.get(family, 7) * n_layers + 1  # + lm_head
    out, info = exports[quant]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nbits = [n.name for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == n_linear and G.weight_matmuls(model) == []
    if family == "phi3":  # the fused projections are plain MatMuls, quantized like the others
        for fused in ("qkv_proj", "gate_up_proj"):
            assert sum(fused in n for n in nbits) == n_layers, (fused, nbits)
    check = verify_export(out, info, reference, QUANT_BOUNDS[quant])
    assert check["passed"], (check["problems"], check["top1"], check["kld"])
    if has_module("onnxruntime_genai"):
        assert check["genai"]["loaded"], check["genai"]


def test_greedy_decode_through_the_cache_equals_generate(family, source, exports, tokenizer):
    """Prefill of a 5-token prompt, then one token per step with the cache fed back, for 12
    steps (past Gemma's window of 8): the same tokens as transformers' greedy generate."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeqlora.runtimes.base import Completion

    prompt = list(tokenizer("Dim the hallway lights")["input_ids"])[:5]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY_STEPS,
                             do_sample=False, eos_token_id=None,
                             pad_token_id=2)[0, len(prompt):].tolist()
    rt = load(exports["fp32"][0])
    try:
        done = Completion()
        list(rt.complete(prompt, max_new_tokens=GREEDY_STEPS, result=done))
        n = len(done.token_ids)
        assert n >= 1 and done.token_ids == ref[:n]
        assert n == GREEDY_STEPS or rt._is_eog(ref[n])  # or stopped where torch chose an end
    finally:
        rt.close()


@pytest.mark.slow
def test_int4_gptq(family, source, reference, tokenizer, tmp_path):
    from edgeqlora.exporters.onnx import recipes, verify_export, write_export
    from edgeqlora.heldout import calibration_sequences

    calibration = calibration_sequences(tokenizer, "embedded:iot", 8,
                                        recipes.CALIBRATION_MAX_LEN)
    info = write_export(source, tmp_path, "int4-gptq", context_length=64,
                        calibration=calibration)
    assert info["matmulnbits"] == info["expected_ops"]["MatMulNBits"] > 0
    check = verify_export(tmp_path, info, reference, QUANT_BOUNDS["int4-gptq"])
    assert check["passed"], (check["problems"], check["top1"], check["kld"])


# Refused before any work: one line that says what is supported


def _config_only(tmp_path: Path, **cfg) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from edgeqlora.errors import InputError
    from edgeqlora.exporters.onnx import check_model, write_export
    from edgeqlora.exporters.onnx.recipes import ARCHS

    src = _config_only(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(InputError) as err:
        check_model(src)
    msg = str(err.value)
    assert "\n" not in msg and "architecture GPT2LMHeadModel" in msg
    assert msg.endswith("supported: " + ", ".join(ARCHS))
    assert {"Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
            "Phi3ForCausalLM"} <= set(ARCHS)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="not supported by the ONNX exporter"):
        write_export(src, out, "int4")
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == \
        ["out", "src"]


@pytest.mark.parametrize("rope", [{"rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                    "long_factor": [2.0]}},
                                  {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}])
def test_length_dependent_rope_is_refused(tmp_path, rope):
    """A traced graph keeps only the RoPE branch of its short trace (Phi-3.5's longrope, dynamic
    NTK): refused with one line rather than exported with the wrong long-context rotation."""
    from edgeqlora.errors import InputError
    from edgeqlora.exporters.onnx import check_model

    src = _config_only(tmp_path, architectures=["Phi3ForCausalLM"], model_type="phi3", **rope)
    with pytest.raises(InputError, match="changes its frequencies with the sequence length"):
        check_model(src)

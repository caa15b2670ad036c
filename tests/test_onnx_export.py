"""ONNX export (exporters/onnx/) on tiny random models with the real tokenizer: the written
graph runs in onnxruntime with a KV cache and matches the merged model in torch; quant recipes
produce the operators they promise; bad input fails with one clear line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_model, has_module
from onnx_fixtures import lora_arrays, verify_set

pytestmark = pytest.mark.skipif(not (has_module("onnx") and has_module("onnxruntime")),
                                reason="needs onnx + onnxruntime")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("onnx-tiny"), tokenizer_dir, seed=1)


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory, tiny) -> tuple[Path, dict]:
    from edgeqlora.export import export_merged

    out = tmp_path_factory.mktemp("onnx-exports") / "fp32"
    manifest = export_merged(tiny, out, target="onnx", quant="fp32", eval_tokens=128,
                             context_length=256)
    return out, manifest


def test_fp32_export_matches_torch_and_has_manifest(fp32_export):
    from edgeqlora.artifacts import read_manifest, verify_files

    out, manifest = fp32_export
    assert read_manifest(out, kind="export")["target"] == "onnx"
    assert verify_files(out, manifest) == []  # sha256 of every file
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
                 "chat_template.jinja"):
        assert name in manifest["files"], name
    check = manifest["verification"]
    assert check["passed"] and check["tokens"] >= 64
    # fp32: the same graph as torch up to kernel rounding (measured ~3e-7).
    assert check["top1"] == 1.0 and check["kld"] < 1e-6
    assert check["max_abs_diff_first_sequence"] < 1e-4
    assert check["tokenization"]["mismatches"] == []
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == 256  # the context asked for, not the model's 1024
    assert genai["search"]["past_present_share_buffer"] is False
    if has_module("onnxruntime_genai"):
        assert check["genai"]["loaded"] and check["genai"]["identical_greedy"]


def test_a_checkpoint_traced_again_reuses_the_trace_until_it_changes(tmp_path, tokenizer_dir,
                                                                    monkeypatch):
    """Inside ``reuse_traces()`` a checkpoint is traced once: the next export of the same files
    gets the same graph bytes without torch, a changed file is traced again, a nested use
    shares the outer one, and leaving deletes the kept traces; outside, every call traces."""
    from edgeqlora.exporters.onnx import graph as G

    model = build_tiny_model(tmp_path / "m", tokenizer_dir, layers=1)
    real, traced = G._trace, []

    def counting(model_dir, path, opset):
        traced.append(path)
        return real(model_dir, path, opset)

    monkeypatch.setattr(G, "_trace", counting)
    for name in "ab":
        (tmp_path / name).mkdir()
    with G.reuse_traces():
        root = G._reuse[0]
        dims = G.export_fp32(model, tmp_path / "a" / "fp32.onnx")
        with G.reuse_traces():
            assert G.export_fp32(model, tmp_path / "b" / "fp32.onnx") == dims
        assert len(traced) == 1 and G._reuse[0] == root
        assert (tmp_path / "a" / "fp32.onnx").read_bytes() == \
            (tmp_path / "b" / "fp32.onnx").read_bytes()
        (tmp_path / "b" / "fp32.onnx").write_bytes(b"changed by its user")  # a copy, not the kept
        G.export_fp32(model, tmp_path / "b" / "fp32.onnx")
        assert len(traced) == 1 and (tmp_path / "b" / "fp32.onnx").read_bytes() == \
            (tmp_path / "a" / "fp32.onnx").read_bytes()
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
        G.export_fp32(model, tmp_path / "b" / "fp32.onnx")
        assert len(traced) == 2
    assert G._reuse is None and not root.exists()
    G.export_fp32(model, tmp_path / "a" / "fp32.onnx")
    assert len(traced) == 3


def test_kv_cache_decode_equals_full_forward(fp32_export, tiny):
    """Token-by-token with the cache == one pass == torch (the graph was traced with 3 new
    tokens on a 2-token past; both the 1-token and the empty-past regimes must still hold)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeqlora.runtimes.onnx import load_onnx

    out, _ = fp32_export
    rt = load_onnx(out / "model.onnx", export_dir=out)
    ids = rt.tokenize("The kitchen light is on and the door is locked.")
    full = rt.logits(ids)
    past, steps = rt._empty_cache(), []
    for pos, t in enumerate(ids):
        row, past = rt._run([t], past, pos)
        steps.append(row[-1])
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.stack(steps) - full).max() < 1e-4
    assert np.abs(full - ref).max() < 1e-4


@pytest.mark.parametrize("quant", ["int4", "int4-q8head", "int8", "int4-kquant-last", "fp16"])
def test_quant_recipes(fp32_export, quant, tmp_path):
    """Each recipe applied to the exported fp32 graph: the promised operators, a smaller file, and
    logits close to fp32 (random tiny weights are easy to quantize; the bounds are loose)."""
    import onnx
    import onnxruntime as ort

    from edgeqlora.exporters.onnx import graph as G
    from edgeqlora.exporters.onnx import quantize as Q
    from edgeqlora.exporters.onnx import recipes as R

    out, _ = fp32_export
    model = onnx.load(str(out / "model.onnx"))
    n_linear = len(G.weight_matmuls(model))
    assert n_linear == 2 * 7 + 1  # q k v o gate up down per layer + lm_head (tied, own copy)
    recipe = R.RECIPES[quant]
    q = Q.quantize(model, recipe, R.check_options({}))
    ops = G.op_counts(q)
    for op, n in Q.expected_ops(recipe, n_linear).items():
        assert ops.get(op, 0) >= n, (op, ops)  # MatMul also counts the attention's own
    if recipe["bits"] in (4, 8):
        assert ops["MatMulNBits"] == n_linear and len(G.weight_matmuls(q)) == 0
    else:
        assert len(G.weight_matmuls(q)) == 0  # every weight now read through a Cast
    if quant in ("int4", "int4-q8head"):
        # Tied weights: the embedding rows are read from the 4-/8-bit head, no second table.
        bits = 8 if quant == "int4-q8head" else 4
        assert G.embedding_gathers(q) == []
        gbq = [n for n in q.graph.node if n.op_type == "GatherBlockQuantized"]
        assert len(gbq) == 1 and gbq[0].name.endswith(f"_Q{bits}_shared")
        head = [n for n in q.graph.node if n.name.endswith("lm_head/MatMul_Q%d" % bits)]
        assert len(head) == 1 and gbq[0].input[2] == head[0].input[2]  # same scales
    path = tmp_path / "model.onnx"
    onnx.save_model(q, str(path), save_as_external_data=True, location="model.onnx.data")
    onnx.checker.check_model(str(path))
    size = path.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size
    assert size < 0.6 * (out / "model.onnx.data").stat().st_size

    def run(p):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        feed = {"input_ids": np.array([[1, 200, 3000, 42]]),
                "attention_mask": np.ones((1, 4), np.int64),
                "position_ids": np.arange(4)[None]}
        for i in s.get_inputs()[3:]:
            feed[i.name] = np.zeros((1, 2, 0, 16), np.float32)
        return s.run(["logits"], feed)[0]

    ref, got = run(out / "model.onnx"), run(path)
    tol = {"fp16": 1e-2, "int8": 5e-2}.get(quant, 0.5)
    assert np.abs(ref - got).max() < tol


def test_int4_export_manifest_records_recipe(tiny, tmp_path):
    from edgeqlora.export import export_merged

    m = export_merged(tiny, tmp_path / "int4", target="onnx", quant="int4", eval_tokens=64,
                      block_size=64, accuracy_level=4, context_length=128)
    info = m["exporter"]
    assert m["quant"] == "int4" and info["matmulnbits"] == 15
    assert info["recipe"] == {"bits": 4, "algorithm": "rtn", "embedding": "int4",
                              "block_size": 64, "symmetric": True, "accuracy_level": 4}
    assert m["quant_mix"]["MatMulNBits"] == 15 and m["quant_mix"]["GatherBlockQuantized"] == 1
    assert info["embedding_shared_with_head"] is True
    assert m["verification"]["passed"]


def test_qwen2_with_biases(tmp_path, tokenizer_dir):
    from edgeqlora.exporters.onnx import default_thresholds, verify_export, write_export

    src = build_tiny_model(tmp_path / "qwen", tokenizer_dir, arch="qwen2", seed=2)
    out = tmp_path / "out"
    out.mkdir()
    info = write_export(src, out, "fp32", context_length=64)
    seq = [1, 504, 2000, 33, 9000, 12, 7]
    check = verify_export(out, info, verify_set(src, [seq], ["hello"]),
                          default_thresholds("fp32"))
    assert check["passed"], check["problems"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "qwen2"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny) -> Path:
    from lora_fixtures import make_adapter

    return make_adapter(tmp_path_factory.mktemp("onnx-adapter") / "adapter", tiny, r=4)


def test_adapter_export_through_the_export_stage(adapter, tmp_path):
    """The acceptance path: adapter -> merge -> ONNX -> verified export -> runtimes.load."""
    from edgeqlora import runtimes
    from edgeqlora.export import export_adapter

    m = export_adapter(adapter, tmp_path / "export", target="onnx", quant="fp32",
                       merge_base="original", eval_tokens=64)
    assert m["target"] == "onnx" and m["verification"]["passed"]
    assert m["exporter"]["model_file"] == "model.onnx"
    rt = runtimes.load(tmp_path / "export", verify=True)
    assert rt.name == "onnx"
    assert isinstance(rt.chat([{"role": "user", "content": "lamp on"}], max_new_tokens=3), str)


# Bad input: one clear line, nothing written


def test_unknown_quant(tiny, tmp_path):
    from edgeqlora.errors import ConfigError
    from edgeqlora.export import export_merged

    with pytest.raises(ConfigError, match=r"quant='q4_k_m' is not an ONNX quant; valid: int4"):
        export_merged(tiny, tmp_path / "x", target="onnx", quant="q4_k_m")
    assert not (tmp_path / "x").exists()


def test_bad_options(tiny, tmp_path):
    from edgeqlora.errors import ConfigError
    from edgeqlora.export import export_merged

    with pytest.raises(ConfigError) as err:
        export_merged(tiny, tmp_path / "x", target="onnx", quant="int4", block_size=48, bogus=1)
    assert "block_size=48" in str(err.value) and "'bogus'" in str(err.value)


def test_unsupported_architecture(tiny, tmp_path):
    import shutil

    from edgeqlora.errors import InputError
    from edgeqlora.export import export_merged

    src = tmp_path / "gpt2"
    shutil.copytree(tiny, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="architecture GPT2LMHeadModel .* not supported by the "
                                         "ONNX exporter; supported: LlamaForCausalLM"):
        export_merged(src, tmp_path / "x", target="onnx", quant="fp32")
    assert not (tmp_path / "x").exists()


def test_merged_dir_without_tokenizer(tiny, tmp_path):
    import shutil

    from edgeqlora.errors import InputError
    from edgeqlora.export import export_merged

    src = tmp_path / "notok"
    shutil.copytree(tiny, src)
    (src / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="has no tokenizer.json"):
        export_merged(src, tmp_path / "x", target="onnx", quant="fp32")
    assert not (tmp_path / "x").exists()


def test_genai_missing_still_exports(tiny, tmp_path, monkeypatch, caplog):
    """Without onnxruntime-genai the export is written and verified with onnxruntime; the
    manifest and the log say that the genai load was not tested."""
    from edgeqlora.export import export_merged
    from edgeqlora.exporters.onnx import recipes

    monkeypatch.setattr(recipes, "has_genai", lambda: False)
    with caplog.at_level("WARNING"):
        m = export_merged(tiny, tmp_path / "x", target="onnx", quant="fp32", eval_tokens=32,
                          context_length=64)
    assert m["verification"]["passed"]
    assert m["verification"]["genai"]["loaded"] is None
    assert "not test-loaded in onnxruntime-genai" in m["exporter"]["genai"]
    assert "pip install onnxruntime-genai" in caplog.text


def test_failed_verification_ships_nothing(tiny, tmp_path):
    from edgeqlora.errors import ExportError
    from edgeqlora.export import export_merged

    with pytest.raises(ExportError, match="failed verification .* nothing was written"):
        export_merged(tiny, tmp_path / "x", target="onnx", quant="int4", eval_tokens=32,
                      thresholds={"max_kld": 0.0})
    assert not (tmp_path / "x").exists()
    assert not any(p.name.startswith(".x") for p in tmp_path.iterdir())


# nf4-exact: the trained NF4 codes (MatMulBnb4) + unmerged LoRA

needs_bnb = pytest.mark.skipif(not has_module("bitsandbytes"), reason="needs bitsandbytes")


@needs_bnb
def test_matmulbnb4_reproduces_bitsandbytes_dequantization():
    """Reference test for the numerics: one MatMulBnb4 node fed with ``nf4_pack``'s bytes equals
    x @ dequantize_4bit(W).T from bitsandbytes (fp32 accumulation order only: measured 1e-5 on
    outputs of magnitude ~30)."""
    import bitsandbytes.functional as bnbf
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from edgeqlora.exporters.onnx.nf4 import nf4_pack

    torch.manual_seed(0)
    n, k = 96, 128
    w = torch.randn(n, k)
    quant = {"quant": "nf4", "double_quant": True, "block_size": 64,
             "compute_dtype": "float32"}
    codes, absmax, block = nf4_pack(w, quant)
    q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    deq = bnbf.dequantize_4bit(q, state).float()
    node = helper.make_node("MatMulBnb4", ["x", "B", "absmax"], ["y"], domain="com.microsoft",
                            K=k, N=n, block_size=block, quant_type=1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(absmax, "absmax")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, k)
    y = sess.run(None, {"x": x.numpy()})[0]
    assert np.abs(y - (x @ deq.T).numpy()).max() < 1e-4


@needs_bnb
def test_nf4_exact_matches_the_trained_model(adapter, tmp_path):
    import torch

    from edgeqlora import runtimes
    from edgeqlora.export import export_adapter
    from edgeqlora.qlora import load_trained

    m = export_adapter(adapter, tmp_path / "nf4", target="onnx", quant="nf4-exact",
                       eval_tokens=128, context_length=128)
    v = m["verification"]
    assert v["passed"] and v["reference"].startswith("trained model")
    assert v["kld"] <= 1e-3 and v["top1"] >= 0.99  # acceptance bound (measured ~1e-15 here)
    assert m["quant_mix"] == {"MatMulBnb4": 14, "lora_pairs": 14}
    assert m["exporter"]["ops"].get("MatMulNBits", 0) == 0
    rt = runtimes.load(tmp_path / "nf4")
    ids = rt.chat_ids([{"role": "user", "content": "open the garage"}])
    trained = load_trained(adapter, device="cpu")
    with torch.no_grad():
        ref = trained.generate(input_ids=torch.tensor([ids]), max_new_tokens=8,
                               do_sample=False, eos_token_id=None,
                               pad_token_id=2)[0, len(ids):].tolist()
    from edgeqlora.runtimes.base import Completion

    done = Completion()
    list(rt.complete(ids, max_new_tokens=8, result=done))
    assert done.token_ids == ref[:len(done.token_ids)] and done.token_ids


def test_nf4_exact_needs_the_adapter(tiny, tmp_path):
    from edgeqlora.errors import ConfigError
    from edgeqlora.exporters.onnx import write_export

    (tmp_path / "o").mkdir()
    with pytest.raises(ConfigError, match="exported from the trained adapter"):
        write_export(tiny, tmp_path / "o", "nf4-exact")


# Adapter-only: a base with LoRA inputs + onnxruntime adapter files, switched without reloading


def test_two_adapters_on_one_base(adapter, tiny, tmp_path):
    import torch
    from lora_fixtures import make_adapter
    from transformers import AutoModelForCausalLM

    from edgeqlora import runtimes
    from edgeqlora.export import export_adapter
    from edgeqlora.exporters.onnx.lora import write_adapter_file
    from edgeqlora.merge import merge_adapter
    from edgeqlora.runtimes.base import Cancel

    out = tmp_path / "adapter-only"
    m = export_adapter(adapter, out, target="onnx", quant="int4", merge_base="original",
                       adapter_only=True, eval_tokens=64)
    assert m["exporter"]["adapter_file"] == "adapter.onnx_adapter"
    assert m["verification"]["passed"]
    assert m["exporter"]["matmulnbits"] == 15  # base quantized; LoRA MatMuls stay fp32
    assert m["exporter"]["ops"]["MatMul"] >= 4 + 2 * 14
    second = make_adapter(tmp_path / "second", tiny, r=4, seed=5)
    write_adapter_file(lora_arrays(second), tmp_path / "second.onnx_adapter", base_export=out)

    ids = [1, 504, 2000, 33, 9000, 12, 7, 88]

    def torch_logits(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    merged = {}
    for name, src in (("first", adapter), ("second", second)):
        merge_adapter(src, tmp_path / f"merged-{name}", merge_base="original")
        merged[name] = torch_logits(tmp_path / f"merged-{name}")
    base = torch_logits(tiny)

    rt = runtimes.load(out)  # the export's own adapter is active
    first = rt.logits(ids)
    # A cancelled call runs on options of its own: the adapter stays active after it.
    cancel = Cancel()
    cancel.set()
    assert "".join(rt.complete(ids, max_new_tokens=2, cancel=cancel)) == ""
    assert np.array_equal(rt.logits(ids), first)
    rt.set_adapter(tmp_path / "second.onnx_adapter")
    other = rt.logits(ids)
    rt.set_adapter(None)
    alone = rt.logits(ids)

    def err(a, b):
        return float(np.abs(a - b).max())

    # Each run is closest to its own torch model: int4 base error is shared, LoRA is exact.
    assert err(first, merged["first"]) < err(first, merged["second"])
    assert err(other, merged["second"]) < err(other, merged["first"])
    assert err(alone, base) < min(err(alone, merged["first"]), err(alone, merged["second"]))


def test_adapter_file_for_another_base_is_refused(adapter, tmp_path, tokenizer_dir):
    from lora_fixtures import make_adapter

    from edgeqlora.errors import InputError
    from edgeqlora.export import export_adapter
    from edgeqlora.exporters.onnx.lora import write_adapter_file

    out = tmp_path / "base-qv"
    small = make_adapter(tmp_path / "qv", build_tiny_model(tmp_path / "t", tokenizer_dir, seed=1),
                         targets=("q_proj", "v_proj"), r=2)
    export_adapter(small, out, target="onnx", quant="fp32", merge_base="original",
                   adapter_only=True, eval_tokens=32)
    with pytest.raises(InputError, match="does not fit the base export"):
        write_adapter_file(lora_arrays(adapter), tmp_path / "x.onnx_adapter", base_export=out)


# Calibrated int4: GPTQ on the fine-tuning data, HQQ (exporters/onnx/gptq.py)


@pytest.mark.parametrize("k", [160, 80])  # 80: a last, partial quantization block
def test_gptq_blockwise_grid_is_onnxruntimes(k):
    """Where no error is propagated (a diagonal Hessian: uncorrelated inputs) our GPTQ returns
    onnxruntime's fake-quantized weight exactly (same symmetric grid and scales), and the codes
    + block scales it returns (what MatMulNBits stores) dequantize to that same weight."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq

    from edgeqlora.exporters.onnx.gptq import gptq_blockwise

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, 48)) * 0.05).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 2.0, k))
    ref = gptq(w.copy(), h.copy(), num_bits=4, group_size=32, scheme="sym", blocksize=64,
               percdamp=0.01)
    codes, scales, deq = gptq_blockwise(w, h, 4, 32, 64)
    # Identical arithmetic; the only rounding is the float32 storage of the scales (1 ulp).
    assert np.abs(ref - deq).max() < 1e-6
    assert codes.max() <= 15 and scales.shape == ((k + 31) // 32, 48)
    restored = np.repeat(scales, 32, axis=0)[:k] * (codes.astype(np.float32) - 8)
    assert np.abs(restored - deq).max() < 1e-6


def test_gptq_beats_round_to_nearest_on_its_objective():
    """With correlated inputs (as real activations are), GPTQ's output error ||X (W - Q)||^2 is
    well below round-to-nearest's at the same 4-bit blocks (the reason to use it; onnxruntime
    1.32's own gptq does not propagate the error and scores as RTN here). Seeded."""
    from edgeqlora.exporters.onnx.gptq import gptq_blockwise

    rng = np.random.default_rng(1)
    k, n = 128, 64
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((1024, k)) @ mix
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    h = 2 / len(x) * x.T @ x
    _, _, gptq_w = gptq_blockwise(w, h, 4, 32)
    blocks = w.reshape(k // 32, 32, n)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 7.5  # symmetric RTN, zero point 8
    rtn_w = (scale * (np.clip(np.round(blocks / scale) + 8, 0, 15) - 8)).reshape(k, n)
    err = lambda q: float(np.sum((x @ (w - q)) ** 2))  # noqa: E731
    assert err(gptq_w) < 0.7 * err(rtn_w)


def test_calibrated_recipes_on_the_graph(fp32_export, tokenizer):
    """int4-gptq(-q8head) and int4-hqq applied to the exported fp32 graph: every weight MatMul
    becomes MatMulNBits, the file checks and runs, and its logits stay near fp32's."""
    import onnx
    import onnxruntime as ort

    from edgeqlora.exporters.onnx import graph as G
    from edgeqlora.exporters.onnx import quantize as Q
    from edgeqlora.exporters.onnx import recipes as R
    from edgeqlora.heldout import calibration_sequences

    out, _ = fp32_export
    seqs, record = calibration_sequences(tokenizer, "embedded:iot", 8, R.CALIBRATION_MAX_LEN)
    assert record["rows"] == 8 and record["tokens"] == sum(map(len, seqs))

    def run(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {"input_ids": np.array([seqs[0][:12]]), "attention_mask": np.ones((1, 12),
                                                                                  np.int64),
                "position_ids": np.arange(12)[None]}
        for i in s.get_inputs()[3:]:
            feed[i.name] = np.zeros((1, 2, 0, 16), np.float32)
        return s.run(["logits"], feed)[0]

    ref_model = onnx.load(str(out / "model.onnx"))
    ref = run(ref_model)
    n_linear = len(G.weight_matmuls(ref_model))
    for quant in ("int4-gptq", "int4-gptq-q8head", "int4-hqq"):
        model = onnx.load(str(out / "model.onnx"))
        q = Q.quantize(model, R.RECIPES[quant], R.check_options({}), calibration=seqs)
        ops = G.op_counts(q)
        assert ops["MatMulNBits"] == n_linear and G.weight_matmuls(q) == [], (quant, ops)
        assert ops.get("GatherBlockQuantized") == 1 and G.embedding_gathers(q) == []
        shared = [n for n in q.graph.node if n.name.endswith("_shared")]
        # GPTQ writes symmetric blocks: the tied head's bytes serve the embedding too. HQQ has
        # zero points, so its embedding is a table of its own.
        assert len(shared) == (0 if quant == "int4-hqq" else 1), quant
        onnx.checker.check_model(q)
        assert np.abs(run(q) - ref).max() < 0.5, quant


def test_gptq_export_records_calibration(tiny, tmp_path):
    from edgeqlora.export import export_merged
    from edgeqlora.rows import dataset_sha256

    m = export_merged(tiny, tmp_path / "g", target="onnx", quant="int4-gptq", eval_tokens=64,
                      context_length=128, calibration_data="embedded:iot", calibration_rows=4)
    recipe = m["exporter"]["recipe"]
    assert recipe["algorithm"] == "gptq" and recipe["symmetric"] is True
    cal = recipe["calibration"]
    assert cal["data"] == "embedded:iot" and cal["rows"] == 4 and cal["tokens"] > 8
    assert cal["data_sha256"] == dataset_sha256("embedded:iot")  # = the adapter manifest's
    assert len(cal["ids_sha256"]) == 64
    assert m["quant_mix"]["MatMulNBits"] == 15 and m["verification"]["passed"]


def test_gptq_needs_usable_calibration_data(tiny, tmp_path):
    """No data spec (a merged checkpoint has no training data for ``auto``), a missing file, a
    file without one usable row, or asymmetric blocks: one clear error before the export
    starts, nothing written."""
    from edgeqlora.errors import ConfigError, DataError, InputError
    from edgeqlora.export import export_merged

    with pytest.raises(InputError, match="calibration data"):
        export_merged(tiny, tmp_path / "a", target="onnx", quant="int4-gptq", eval_tokens=32)
    with pytest.raises(InputError, match="calibration data: .*missing.jsonl does not exist"):
        export_merged(tiny, tmp_path / "e", target="onnx", quant="int4-gptq", eval_tokens=32,
                      calibration_data=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"note": "no messages here"}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl has no usable rows"):
        export_merged(tiny, tmp_path / "b", target="onnx", quant="int4-gptq", eval_tokens=32,
                      calibration_data=str(bad))
    with pytest.raises(ConfigError, match="symmetric blocks only"):
        export_merged(tiny, tmp_path / "c", target="onnx", quant="int4-gptq-q8head",
                      eval_tokens=32, calibration_data="embedded:iot", symmetric=False)
    with pytest.raises(ConfigError, match="calibration_rows=0"):
        export_merged(tiny, tmp_path / "d", target="onnx", quant="int4-gptq",
                      calibration_data="embedded:iot", calibration_rows=0)
    assert not any((tmp_path / d).exists() for d in "abcde")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_calibration_request_defaults_to_the_adapters_training_data(tmp_path):
    """Only the GPTQ recipes ask for rows; without calibration_data they ask for ``auto`` (the
    stage resolves it to the adapter's training data); a given spec is passed through."""
    from edgeqlora.errors import InputError
    from edgeqlora.exporters.onnx import CALIBRATED, QUANTS, calibration_request

    assert calibration_request("int4-gptq", {}) == {"spec": "auto", "rows": 64, "max_len": 256,
                                                    "general": 0.1, "what": "calibration data"}
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"text": "lamp on"}\n')
    req = calibration_request("INT4-GPTQ-Q8HEAD", {"calibration_data": str(mine),
                                                   "calibration_rows": 8})
    assert (req["spec"], req["rows"]) == (str(mine), 8)
    assert [q for q in QUANTS if calibration_request(q, {})] == list(CALIBRATED)
    with pytest.raises(InputError, match="does not exist"):
        calibration_request("int4-gptq", {"calibration_data": str(tmp_path / "nope.jsonl")})


def test_default_quant_from_an_adapter_calibrates_on_its_training_data(adapter, tmp_path):
    """The default ONNX quant (int4-gptq) through the export stage with no calibration option:
    the rows come from the data the adapter's manifest names, and the manifest says so.
    ``calibration_general=0``: the tiny random model has no language for English text to
    protect, and 4 rows of which 10 % are English leave its verification at top-1 0.64."""
    from edgeqlora.export import export_adapter
    from edgeqlora.exporters.onnx import CALIBRATED, DEFAULT_QUANT
    from edgeqlora.rows import dataset_sha256

    m = export_adapter(adapter, tmp_path / "export", target="onnx", merge_base="original",
                       eval_tokens=64, calibration_rows=4, calibration_general=0)
    assert m["quant"] == DEFAULT_QUANT
    if DEFAULT_QUANT in CALIBRATED:
        cal = m["exporter"]["recipe"]["calibration"]
        assert cal["data"] == "embedded:iot" and cal["rows"] == 4
        assert cal["data_sha256"] == dataset_sha256("embedded:iot")
        assert "general" not in cal or cal["general"]["share"] == 0
    assert m["verification"]["passed"]

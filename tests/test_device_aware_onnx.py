"""Device-aware QLoRA on the ONNX int4 base (``quant=onnx-int4``): the training model's frozen
weights are the dequantization of the exact MatMulNBits / GatherBlockQuantized bytes the ONNX
int4 export ships (equal to onnxruntime's own kernels); the export writes the same bytes
(checked per tensor), ships the LoRA as an onnxruntime adapter file, and matches the trained
model in onnxruntime; and the bad inputs: a changed base, another quant, target or block size."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import (build_tiny_model, cuda_packed_matches_cpu, has_module,
                      packed_layers_match_dense, refused_export, train_tiny_device_aware)

pytestmark = pytest.mark.skipif(not has_module("onnxruntime") or not has_module("onnx"),
                                reason="needs onnx and onnxruntime")


def _session(node, inits, inputs, output, shape):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def onnxruntime_weight(w):
    """The [out, in] weight as onnxruntime's own kernels read ``w``'s bytes: a MatMulNBits
    times the identity (accuracy level 0: fp32, one non-zero product per output), or a
    GatherBlockQuantized of every row (own table, or the head's bytes as a shared table)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    n, k = w["shape"]
    if w["op"] == "Gather":  # an fp16 table, read through Gather + Cast as the graph does
        return np.asarray(w["arrays"][0]).astype(np.float32)
    data, scales = w["arrays"][:2]
    if w["op"] == "MatMulNBits" and "shared_with" not in w:
        zero = [numpy_helper.from_array(z, "Z") for z in w["arrays"][2:]]  # HQQ's float ones
        node = helper.make_node("MatMulNBits", ["A", "B", "S"] + ["Z"] * len(zero), ["Y"],
                                domain="com.microsoft", K=k, N=n, bits=w["bits"],
                                block_size=w["block_size"], accuracy_level=0)
        sess = _session(node, [numpy_helper.from_array(data, "B"),
                               numpy_helper.from_array(scales, "S"), *zero],
                        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
                        "Y", [k, n])
        return sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T
    if "shared_with" in w:  # the tied table: the head's uint8 bytes, one row per token
        data = np.asarray(data).reshape(n, -1)
    attrs = {"bits": w["bits"]} if np.asarray(data).dtype == np.uint8 else {}
    node = helper.make_node("GatherBlockQuantized", ["D", "I", "S"], ["Y"],
                            domain="com.microsoft", gather_axis=0, quantize_axis=1,
                            block_size=w["block_size"], **attrs)
    sess = _session(node, [numpy_helper.from_array(data, "D"),
                           numpy_helper.from_array(np.asarray(scales).reshape(n, -1), "S"),
                           numpy_helper.from_array(np.arange(n, dtype=np.int64), "I")],
                    [], "Y", [n, k])
    return sess.run(None, {})[0]


@pytest.mark.parametrize("tie, quant", [(True, "int4"), (False, "int4"),
                                        (True, "int4-q8head"), (False, "int4-q8head")])
def test_dequantization_is_onnxruntimes(tmp_path, tokenizer_dir, tie, quant):
    """Every weight the trainer gets equals onnxruntime's reading of the exported bytes:
    the linear layers, the output head and the embedding (its own 4-bit table untied, the
    head's bytes tied). Compared as floats: the identity product cannot show the sign of a
    zero weight, which no product or sum can see either."""
    import numpy as np
    from edgeqlora.exporters.onnx.device import dequantize, tensor_bytes

    base = build_tiny_model(tmp_path / "base", tokenizer_dir, hidden=64, tie=tie)
    weights, options = tensor_bytes(base, quant)
    assert options == {"block_size": 32, "symmetric": True}
    by_name = {w["src"]: w for w in weights}
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(by_name)
    assert len(by_name) == 16
    assert by_name["lm_head.weight"]["bits"] == (8 if quant == "int4-q8head" else 4)
    # tied: the head's bytes; untied: a 4-bit table of its own, or fp16 under -q8head
    assert by_name["model.embed_tokens.weight"]["op"] == (
        "MatMulNBits" if tie else "GatherBlockQuantized" if quant == "int4" else "Gather")
    for w in weights:
        ours = dequantize(w["arrays"], w["bits"], w["block_size"], w["shape"])
        theirs = onnxruntime_weight(w)
        assert ours.shape == tuple(w["shape"]) and np.isfinite(ours).all()
        assert np.array_equal(ours, theirs), w["src"]


def test_dequantize_fails_on_a_changed_byte(tmp_path, tokenizer_dir):
    """The comparison above can fail: one flipped nibble moves exactly one weight, and the
    two readings then agree only on the flipped bytes."""
    import numpy as np
    from edgeqlora.exporters.onnx.device import dequantize, tensor_bytes

    base = build_tiny_model(tmp_path / "base", tokenizer_dir, hidden=64)
    w = next(w for w in tensor_bytes(base)[0] if w["src"].endswith("q_proj.weight"))
    flipped = np.array(w["arrays"][0], copy=True)
    flipped.reshape(-1)[0] ^= 0x01
    changed = {**w, "arrays": [flipped, w["arrays"][1]]}
    ours = dequantize(changed["arrays"], w["bits"], w["block_size"], w["shape"])
    assert (ours != dequantize(w["arrays"], w["bits"], w["block_size"], w["shape"])).sum() == 1
    assert not np.array_equal(ours, onnxruntime_weight(w))
    assert np.array_equal(ours, onnxruntime_weight(changed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """A tiny tied Llama trained 3 steps on its onnx-int4 base."""
    return train_tiny_device_aware(tmp_path_factory.mktemp("device-aware-onnx"), tokenizer_dir,
                                   "onnx-int4")


def test_trained_model_runs_on_the_int4_bytes(trained):
    import torch

    from edgeqlora.device_base import device_state
    from edgeqlora.qlora import load_trained

    model = load_trained(trained["adapter"], device="cpu")
    state, record = device_state(trained["base"], "onnx-int4")
    manifest = json.loads((trained["adapter"] / "manifest.json").read_text())
    device = manifest["quant"]["device"]
    assert device["data_sha256"] == record["data_sha256"]
    assert device["target"] == "onnx" and device["options"] == {"block_size": 32,
                                                                "symmetric": True}
    params = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
              for n, p in model.named_parameters()}
    for name, w in state.items():
        key = "model.embed_tokens.weight" if name == "lm_head.weight" else name
        assert params[key].detach().equal(w), name
    # the tied table is the head's int4 grid, not the checkpoint's fp32 values
    assert torch.equal(params["model.embed_tokens.weight"].detach(), state["lm_head.weight"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.fixture(scope="module")
def exported(trained):
    from edgeqlora.export import export_adapter

    out = trained["root"] / "export"
    return out, export_adapter(trained["adapter"], out, eval_tokens=512)


def test_export_ships_the_trained_base_and_matches_the_trained_model(trained, exported):
    from edgeqlora.exporters.onnx.device import tensor_digests

    out, m = exported
    assert m["target"] == "onnx" and m["quant"] == "int4"
    assert m["exporter"]["recipe"]["accuracy_level"] == 0  # float32 from the trained bytes
    assert m["device_aware"] and m["adapter_only"] and m["merge"] is None
    assert m["exporter"]["device_base_tensors_checked"] == 16
    assert m["exporter"]["adapter_file"] == "adapter.onnx_adapter"
    v = m["verification"]
    assert v["passed"] and v["reference"] == "trained model (onnx-int4 + LoRA)"
    # onnxruntime runs the same weights in float32 (accuracy level 0): what is left is the
    # order of its sums. Measured on this random model: KLD ~1e-12, top-1 1.000 (at level 4,
    # int8 activations in the 4-bit dot products: KLD 5.4e-7; on the quickstart's SmolLM2
    # 0.0018 / 0.0035 task / text against 4e-11 at level 0).
    assert v["kld"] < 1e-8 and v["top1"] == 1.0
    recorded = json.loads((trained["adapter"] / "manifest.json").read_text())["quant"]["device"]
    digests = tensor_digests(out / "model.onnx")
    assert {t["onnx"] for t in recorded["tensors"].values()} <= set(digests)


def test_accuracy_level_four_is_the_users_choice(trained, tmp_path):
    """``--accuracy-level 4`` (int8 activations, faster) ships the same bytes; the gate then
    measures what the rounding costs."""
    from edgeqlora.export import export_adapter

    m = export_adapter(trained["adapter"], tmp_path / "e4", eval_tokens=256, accuracy_level=4)
    assert m["exporter"]["recipe"]["accuracy_level"] == 4
    assert m["exporter"]["device_base_tensors_checked"] == 16
    assert 0 < m["verification"]["kld"] < 1e-4


@pytest.mark.parametrize("args, match", [
    (["--quant", "int4-gptq"], "trained on the onnx int4 base.*exporting it to onnx int4-gptq "
                               "would re-quantize a merge.*--merge"),
    (["--target", "gguf"], "trained on the onnx int4 base.*exporting it to gguf"),
    (["--block-size", "64"], "made with block_size=32; block_size=64 would ship another base"),
])
def test_another_quant_target_or_block_size_is_one_line(trained, tmp_path, capsys, args,
                                                        match):
    err = refused_export(trained["adapter"], tmp_path, capsys, args)
    assert re.search(match, err), err


def test_a_changed_base_tensor_is_refused_and_nothing_written(trained, tmp_path, capsys):
    err = refused_export(trained["adapter"], tmp_path, capsys,
                         changed_tensor="model.layers.1.mlp.down_proj.weight")
    assert "/m/model/layers.1/mlp/down_proj/MatMul_Q4" in err and "trained" in err, err
    assert "onnxruntime" in err


def test_merge_into_a_gguf_from_the_int4_base(trained, tmp_path):
    """``--merge`` takes the trained int4 base's weights (not the checkpoint's) and
    re-quantizes the merge for another target."""
    from edgeqlora.export import export_adapter

    m = export_adapter(trained["adapter"], tmp_path / "m", target="gguf", quant="q8_0",
                       merge=True, eval_tokens=128)
    assert not m["device_aware"] and m["merge"]["merge_base"] == "dequantized"
    assert m["verification"]["passed"]


def test_packed_int4_layers_are_the_dense_device_base(trained):
    """The GPU layout (``GGMLLinear`` over ``NBits`` blocks: MatMulNBits' scale + 16 bytes a
    block of 32, dequantized at every call), run on CPU: bit-identical logits and LoRA
    gradients to the dense fp32 device base, at 5 bits a weight; the tied head stays dense
    with the embedding."""
    from edgeqlora.ggml_torch import NBits

    layers = packed_layers_match_dense(trained["base"], "onnx-int4")
    assert len(layers) == 14 and all(m.qtype == NBits(32) for m in layers)
    assert all(m.bits_per_weight == 5.0 for m in layers)


@pytest.mark.gpu
def test_on_cuda_the_int4_base_stays_packed_and_matches_cpu(trained):
    """On a GPU the onnx-int4 base's linear layers hold MatMulNBits' bytes, and the model
    computes what the CPU's dense fp32 device base computes."""
    cuda_packed_matches_cpu(trained["base"], "onnx-int4")


@pytest.mark.parametrize("damage, word", [("random graph", "is not an ONNX model"),
                                          ("short data", "lies beyond its data file"),
                                          (None, None)])
def test_devices_fit_reads_the_onnx_graph(exported, tmp_path, capsys, damage, word):
    """Random bytes named model.onnx, or a data file cut short, with a manifest whose sizes
    and sha256s were made to match: not a model, exit 2 (a size check alone said "fits")."""
    import os

    from edgeqlora.artifacts import write_manifest
    from edgeqlora.cli import main

    src, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    if damage == "random graph":
        size = (bad / "model.onnx").stat().st_size
        (bad / "model.onnx").write_bytes(os.urandom(size))
    elif damage == "short data":
        with open(bad / "model.onnx.data", "r+b") as f:
            f.truncate((bad / "model.onnx.data").stat().st_size // 2)
    manifest = json.loads((bad / "manifest.json").read_text())
    write_manifest(bad, "export", {k: v for k, v in manifest.items()
                                   if k not in ("format_version", "kind", "created", "files")})
    capsys.readouterr()
    rc = main(["devices", "fit", str(bad), "--device", "pi5"])
    out = capsys.readouterr()
    if damage is None:
        assert rc == 0, out.err
        return
    err = out.err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and word in err, err

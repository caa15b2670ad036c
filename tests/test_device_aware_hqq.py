"""Device-aware QLoRA on the ONNX HQQ base (``quant=onnx-int4-hqq``): onnxruntime's HQQ
quantizer (a scale and a float zero point a block of 32, optimised without data) makes the
bytes; the training model's frozen weights are their dequantization, equal to onnxruntime's
MatMulNBits bit for bit; a tied embedding keeps the 4-bit table of its own the export writes
(GatherBlockQuantized cannot read float zero points), so the training model is untied; the
export ships the same bytes + the LoRA and matches the trained model; a merge writes the
head of its own; and the bad inputs."""

from __future__ import annotations

import json
import re

import pytest

from conftest import (build_tiny_model, cuda_packed_matches_cpu, has_module,
                      packed_layers_match_dense, refused_export, train_tiny_device_aware)

pytestmark = pytest.mark.skipif(not has_module("onnxruntime") or not has_module("onnx"),
                                reason="needs onnx and onnxruntime")


@pytest.mark.parametrize("tie", [True, False])
def test_hqq_dequantization_is_onnxruntimes(tmp_path, tokenizer_dir, tie):
    """Every HQQ layer has float zero points; ours equal onnxruntime's reading bit for bit
    (``q * s - z * s``; ``(q - z) * s`` would differ in the last bit for some weights). The
    embedding is a round-to-nearest 4-bit table of its own, tied or not."""
    import numpy as np
    from edgeqlora.exporters.onnx.device import dequantize, tensor_bytes
    from test_device_aware_onnx import onnxruntime_weight

    base = build_tiny_model(tmp_path / "base", tokenizer_dir, hidden=64, tie=tie)
    weights, options = tensor_bytes(base, "int4-hqq")
    by_name = {w["src"]: w for w in weights}
    assert len(by_name) == 16 and options == {"block_size": 32, "symmetric": True}
    assert by_name["model.embed_tokens.weight"]["op"] == "GatherBlockQuantized"
    assert not any("shared_with" in w for w in weights)
    for w in weights:
        if w["op"] == "MatMulNBits":
            assert len(w["arrays"]) == 3 and w["arrays"][2].dtype == np.float32, w["src"]
        ours = dequantize(w["arrays"], w["bits"], w["block_size"], w["shape"])
        assert np.array_equal(ours, onnxruntime_weight(w)), w["src"]
    # the formula matters: one rounding instead of two moves some weights by an ulp
    w = by_name["model.layers.0.mlp.up_proj.weight"]
    n, k = w["shape"]
    data = np.asarray(w["arrays"][0]).reshape(n, -1)
    q = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(n, -1, 32).astype(np.float32)
    s, z = (np.asarray(a, np.float32).reshape(n, -1, 1) for a in w["arrays"][1:])
    assert not np.array_equal(((q - z) * s).reshape(n, k), onnxruntime_weight(w))


def test_the_hqq_bytes_do_not_depend_on_torch_threads(tmp_path, tokenizer_dir):
    """HQQ optimises in torch: the bytes (what the manifest's sha256s pin) must not change
    with the thread count, or a laptop could not export what a server trained."""
    import torch
    from edgeqlora.exporters.onnx.device import tensor_bytes

    base = build_tiny_model(tmp_path / "base", tokenizer_dir, hidden=64, intermediate=256)
    before = torch.get_num_threads()
    try:
        digests = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            digests.append([w["sha256"] for w in tensor_bytes(base, "int4-hqq")[0]])
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """A tiny tied Llama trained 3 steps on its onnx-int4-hqq base."""
    return train_tiny_device_aware(tmp_path_factory.mktemp("device-aware-hqq"), tokenizer_dir,
                                   "onnx-int4-hqq")


def test_trained_model_runs_on_the_hqq_bytes_with_an_untied_head(trained):
    import torch

    from edgeqlora.device_base import device_state
    from edgeqlora.qlora import load_trained

    model = load_trained(trained["adapter"], device="cpu")
    state, record = device_state(trained["base"], "onnx-int4-hqq")
    device = json.loads((trained["adapter"] / "manifest.json").read_text())["quant"]["device"]
    assert device["data_sha256"] == record["data_sha256"] and device["quant"] == "int4-hqq"
    assert device["tensors"]["lm_head.weight"]["type"] == \
        "MatMulNBits 4-bit + zero points, block 32"
    params = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
              for n, p in model.named_parameters()}
    for name, w in state.items():
        assert params[name].detach().equal(w), name
    # the head is HQQ's, the table the 4-bit table the export ships: two tensors now
    assert not torch.equal(params["lm_head.weight"], params["model.embed_tokens.weight"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.fixture(scope="module")
def exported(trained):
    from edgeqlora.export import export_adapter

    out = trained["root"] / "export"
    return out, export_adapter(trained["adapter"], out, eval_tokens=512)


def test_export_ships_the_hqq_base_and_matches_the_trained_model(trained, exported):
    _, m = exported
    assert m["target"] == "onnx" and m["quant"] == "int4-hqq"
    assert m["device_aware"] and m["adapter_only"]
    assert m["exporter"]["recipe"]["accuracy_level"] == 0
    assert m["exporter"]["device_base_tensors_checked"] == 16
    v = m["verification"]
    assert v["passed"] and v["reference"] == "trained model (onnx-int4-hqq + LoRA)"
    # float32 from the trained bytes: only onnxruntime's order of sums is left (measured on
    # this random model ~1e-12, as for onnx-int4)
    assert v["kld"] < 1e-8 and v["top1"] == 1.0


def test_accuracy_level_four_reaches_the_hqq_nodes(trained, tmp_path):
    """onnxruntime's HQQ config takes no accuracy level; every HQQ node must still carry the
    one asked for (the manifest said 4 while the nodes had none, i.e. 0). onnxruntime 1.2x has
    no int8 kernel for float zero points and computes them in float32 at either level
    (measured on the quickstart's adapter: KLD 9e-12 at level 4), so the gate still passes."""
    import onnx
    from onnx import helper

    from edgeqlora.export import export_adapter

    m = export_adapter(trained["adapter"], tmp_path / "e4", eval_tokens=256, accuracy_level=4)
    graph = onnx.load(str(tmp_path / "e4" / "model.onnx"), load_external_data=False).graph
    levels = [{a.name: helper.get_attribute_value(a) for a in n.attribute}.get("accuracy_level")
              for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(levels) == 15 and set(levels) == {4}
    assert m["exporter"]["device_base_tensors_checked"] == 16 and m["verification"]["passed"]


def test_merge_writes_the_hqq_head_of_its_own(trained, tmp_path):
    """A merge from the HQQ base holds the untied head as a tensor of its own (and its config
    says so), so the merge is the trained model, not its embedding table read twice."""
    from safetensors import safe_open

    from edgeqlora.device_base import device_state
    from edgeqlora.merge import merge_adapter

    r = merge_adapter(trained["adapter"], tmp_path / "m", eval_tokens=256)
    assert r.merge_base == "dequantized" and r.kld["dequantized"] < 1e-8
    assert r.top1["dequantized"] == 1.0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    state, _ = device_state(trained["base"], "onnx-int4-hqq")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").equal(state["lm_head.weight"])
        assert f.get_tensor("model.embed_tokens.weight").equal(state["model.embed_tokens.weight"])


def test_packed_hqq_layers_are_the_dense_device_base(trained):
    """The GPU layout (``NBits`` with zero points: scale, zero point and 16 bytes a block of
    32), run on CPU: bit-identical logits and LoRA gradients to the dense fp32 base; the
    untied head is packed too."""
    from edgeqlora.ggml_torch import NBits

    layers = packed_layers_match_dense(trained["base"], "onnx-int4-hqq")
    assert len(layers) == 15 and all(m.qtype == NBits(32, zero_points=True) for m in layers)
    assert all(m.bits_per_weight == 6.0 for m in layers)


@pytest.mark.gpu
def test_on_cuda_the_hqq_base_stays_packed_and_matches_cpu(trained):
    cuda_packed_matches_cpu(trained["base"], "onnx-int4-hqq", layers=15)


@pytest.mark.parametrize("args, match", [
    (["--quant", "int4"], "trained on the onnx int4-hqq base.*exporting it to onnx int4 would "
                          "re-quantize a merge"),
    (["--target", "gguf"], "trained on the onnx int4-hqq base.*exporting it to gguf"),
])
def test_another_quant_or_target_is_one_line(trained, tmp_path, capsys, args, match):
    err = refused_export(trained["adapter"], tmp_path, capsys, args)
    assert re.search(match, err), err


def test_a_changed_hqq_tensor_is_refused_and_nothing_written(trained, tmp_path, capsys):
    err = refused_export(trained["adapter"], tmp_path, capsys,
                         changed_tensor="lm_head.weight")
    assert "lm_head" in err and "MatMulNBits 4-bit + zero points" in err, err

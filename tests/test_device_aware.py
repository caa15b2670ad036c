"""Device-aware QLoRA (``quant=gguf-*``, edgeqlora.device_base): the training model's frozen
weights are the dequantization of the exact GGUF bytes the export ships; the export writes the
same bytes (checked per tensor), ships the LoRA unmerged, and matches the trained model in
llama.cpp; and the bad inputs: a changed base, another quant or target, an architecture the
exporter cannot write."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import (cuda_packed_matches_cpu, has_module, packed_layers_match_dense, read_gguf,
                      refused_export, train_tiny_device_aware)

pytestmark = pytest.mark.skipif(not has_module("llama_cpp"),
                                reason="the K-quant mixes need llama-cpp-python's kernels")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """A hidden-256 tiny Llama (so Q4_K_M uses Q4_K and Q6_K blocks, not only fallbacks),
    trained 3 steps on a gguf-q4_k_m base."""
    return train_tiny_device_aware(tmp_path_factory.mktemp("device-aware"), tokenizer_dir,
                                   "gguf-q4_k_m", hidden=256, intermediate=512)


def test_device_quants_are_the_config_choices():
    from edgeqlora.config import QUANT_CHOICES
    from edgeqlora.device_base import DEVICE_QUANTS

    assert set(DEVICE_QUANTS) == {q for q in QUANT_CHOICES
                                  if q.startswith(("gguf-", "onnx-"))}


@pytest.mark.parametrize("quant", ["gguf-q4_k_m", "gguf-q4_0", "gguf-q4_1", "gguf-q8_0",
                                   "gguf-q6_k"])
def test_training_weights_are_what_llama_cpp_loads(trained, tmp_path, quant):
    """Every weight of the device base equals gguf.quants' dequantization (bit-exact with
    ggml's to-float) of the tensor in the GGUF the exporter writes, un-permuted; the recorded
    sha256s are those tensors' bytes."""
    import gguf
    import numpy as np
    from edgeqlora.exporters.gguf import read_config, tensor_digests, write_model_gguf
    from edgeqlora.exporters.gguf.kernels import unpermute_qk

    from edgeqlora.device_base import DEVICE_QUANTS, device_state

    state, record = device_state(trained["base"], quant)
    path = tmp_path / "base.gguf"
    write_model_gguf(trained["base"], path, DEVICE_QUANTS[quant][1])
    cfg = read_config(trained["base"])
    heads = {"attn_q": (4, 4), "attn_k": (4, 2)}
    by_gguf = {t["gguf"]: name for name, t in record["tensors"].items()}
    digests = tensor_digests(path)
    types = set()
    for t in read_gguf(path)[1]:
        name = by_gguf[t.name]
        assert digests[t.name] == record["tensors"][name]["sha256"]
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(state[name].shape)
        kind = t.name.split(".")[-2]
        if kind in heads:
            w = unpermute_qk(w, *heads[kind])
        assert np.array_equal(w.view(np.int32), state[name].numpy().view(np.int32)), name
        types.add(t.tensor_type.name)
    assert len(by_gguf) == len(digests) == cfg["num_hidden_layers"] * 9 + 2
    if quant == "gguf-q4_k_m":
        assert {"Q4_K", "Q6_K"} <= types


def test_trained_model_runs_on_the_device_bytes(trained):
    from edgeqlora.device_base import device_state
    from edgeqlora.qlora import load_trained

    model = load_trained(trained["adapter"], device="cpu")
    state, record = device_state(trained["base"], "gguf-q4_k_m")
    manifest = json.loads((trained["adapter"] / "manifest.json").read_text())
    assert manifest["quant"]["device"]["data_sha256"] == record["data_sha256"]
    params = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
              for n, p in model.named_parameters()}
    for name, w in state.items():
        key = "model.embed_tokens.weight" if name == "lm_head.weight" else name
        assert params[key].detach().equal(w), name
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_export_ships_the_trained_base_and_matches_the_trained_model(trained, tmp_path):
    from edgeqlora.export import export_adapter

    m = export_adapter(trained["adapter"], tmp_path / "e", eval_tokens=512)
    assert m["device_aware"] and m["adapter_only"] and m["quant"] == "q4_k_m"
    assert m["merge"] is None and m["exporter"]["device_base_tensors_checked"] == 20
    assert m["exporter"]["adapter_file"] == "adapter.f32.gguf"  # the adapter's own precision
    v = m["verification"]
    assert v["passed"] and v["reference"].startswith("trained model (gguf-q4_k_m")
    # llama.cpp runs the same weights; what is left is its 8-bit rounding of the activations in
    # the quantized dot products (and the LoRA applied in f32 beside them). Measured on this
    # random model: KLD 7.5e-6, top-1 0.991 (a random model's near-ties flip under any noise);
    # merging the same adapter and re-quantizing measured KLD 1.9e-3 against its own merge.
    assert v["kld"] < 1e-4 and v["top1"] >= 0.97
    assert (tmp_path / "e" / "base.q4_k_m.gguf").is_file()


def test_merge_re_quantizes_into_another_quant(trained, tmp_path):
    from edgeqlora.errors import ConfigError
    from edgeqlora.export import export_adapter

    m = export_adapter(trained["adapter"], tmp_path / "m", quant="q8_0", merge=True,
                       eval_tokens=128)
    assert not m["device_aware"] and m["merge"]["merge_base"] == "dequantized"
    assert (tmp_path / "m" / "model.q8_0.gguf").is_file()
    # Back into its own quant from its own (already on-grid) base: the LoRA would round away.
    with pytest.raises(ConfigError, match="rounds most of the LoRA away.*--merge-base original"):
        export_adapter(trained["adapter"], tmp_path / "same", quant="q4_k_m", merge=True)
    assert not (tmp_path / "same").exists()
    m = export_adapter(trained["adapter"], tmp_path / "orig", quant="q4_k_m", merge=True,
                       merge_base="original", eval_tokens=128)
    assert m["merge"]["merge_base"] == "original" and not m["device_aware"]


@pytest.mark.parametrize("args, match", [
    (["--quant", "q8_0"], "trained on the gguf q4_k_m base.*exporting it to gguf q8_0 would "
                          "re-quantize a merge.*--merge"),
    (["--target", "onnx"], "trained on the gguf q4_k_m base.*exporting it to onnx"),
])
def test_another_quant_or_target_is_one_line(trained, tmp_path, capsys, args, match):
    err = refused_export(trained["adapter"], tmp_path, capsys, args)
    assert re.search(match, err), err


def test_a_changed_base_tensor_is_refused_and_nothing_written(trained, tmp_path, capsys):
    err = refused_export(trained["adapter"], tmp_path, capsys,
                         changed_tensor="model.layers.1.mlp.down_proj.weight")
    assert "blk.1.ffn_down.weight" in err and "not the" in err and "trained" in err, err


def test_an_architecture_the_exporter_cannot_write_is_refused_before_training(tmp_path,
                                                                             tokenizer_dir,
                                                                             capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgeqlora.cli import main

    cfg = AutoConfig.for_model("gpt2", vocab_size=49152, n_embd=64, n_layer=1, n_head=2,
                               bos_token_id=1, eos_token_id=2)
    base = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, base / name)
    capsys.readouterr()
    rc = main(["train", f"base={base}", "data=embedded:iot", "quant=gguf-q8_0", "max_steps=1",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "quant=gguf-q8_0" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_packed_layers_are_the_dense_device_base(trained):
    """The GPU layout (``GGMLLinear``: the bytes kept packed, dequantized at every call), run on
    CPU: bit-identical logits and LoRA gradients to the dense fp32 device base, at the bits per
    weight of the GGUF's types."""
    layers = packed_layers_match_dense(trained["base"], "gguf-q4_k_m")
    assert len(layers) == 14 and all(4.5 <= m.bits_per_weight <= 8.5 for m in layers)


@pytest.mark.gpu
def test_on_cuda_the_base_stays_packed_and_matches_cpu(trained):
    """On a GPU the device base's linear layers hold the GGML bytes (the point of a 4-bit
    base), and the model computes what the CPU's dense fp32 device base computes."""
    cuda_packed_matches_cpu(trained["base"], "gguf-q4_k_m")


def test_device_choice_is_the_trained_base(trained, tmp_path):
    """``--device`` sizes the adapter's own base (+ LoRA) and ships it; a device it does not fit
    is one line naming the base, not a hint to drop a --quant nobody passed."""
    from edgeqlora.errors import DeviceError
    from edgeqlora.export import export_adapter

    def board(mb: int) -> Path:
        path = tmp_path / f"board-{mb}.toml"
        path.write_text(f'name = "b{mb}"\ntitle = "a test board"\n[memory]\ntotal_mb = 4096\n'
                        f'usable_mb = {mb}\nbandwidth_gbs = 3.6\n[cpu]\narch = "aarch64"\n'
                        'cores = 4\nthreads = 4\nfeatures = ["neon"]\n[runtimes]\n'
                        'available = ["gguf"]\n')
        return path

    m = export_adapter(trained["adapter"], tmp_path / "fits", device=str(board(4000)),
                       eval_tokens=128)
    assert m["device_aware"] and m["quant"] == "q4_k_m"
    assert "the base the device-aware adapter was trained on" in m["device"]["reason"]
    with pytest.raises(DeviceError, match=r"q4_k_m \(the base the device-aware adapter was "
                                          r"trained on\) does not fit.*quant=gguf-q4_0"):
        export_adapter(trained["adapter"], tmp_path / "tiny", device=str(board(8)))
    assert not (tmp_path / "tiny").exists()


@pytest.mark.slow
def test_gguf_q4_1_base_of_the_embedded_model_is_the_distributed_file(embedded_dir):
    """The embedded SmolLM2 ships as a Q4_1 GGUF and is converted to fp32 from it; quantizing
    that checkpoint again for ``quant=gguf-q4_1`` gives back the distributed file's bytes, so
    a device-aware adapter on it trains on exactly the file the package ships."""
    from edgeqlora.exporters.gguf import tensor_digests

    from edgeqlora.base import embedded_gguf_path
    from edgeqlora.device_base import device_state

    _, record = device_state(embedded_dir, "gguf-q4_1")
    shipped = tensor_digests(embedded_gguf_path())
    ours = {t["gguf"]: t["sha256"] for t in record["tensors"].values()}
    assert ours and set(ours) <= set(shipped)
    differ = sorted(n for n in ours if ours[n] != shipped[n])
    assert not differ, f"{len(differ)} of {len(ours)} tensors differ, e.g. {differ[:3]}"

"""Merge: fp32 LoRA merge into the original or the NF4-dequantized base, streaming safetensors,
auto (the base the adapter was trained against, measured), best (both measured, the better
kept), the trained model's own dequantized weights, and the input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import build_tiny_model
from lora_fixtures import make_adapter

IDS = [[1, 500, 600, 700, 42, 9, 12000, 3, 77, 31000]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("merge")
    base = build_tiny_model(root / "base", tokenizer_dir)
    return {"root": root, "base": base, "adapter": make_adapter(root / "adapter", base)}


def _logits(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def _peft_merged_logits(base, adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    with torch.no_grad():
        return merged(torch.tensor(IDS)).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_original_merge_equals_peft_merge_and_unload(tiny, rslora, tmp_path):
    from edgeqlora.merge import merge_adapter

    adapter = tiny["adapter"] if not rslora else \
        make_adapter(tmp_path / "rs", tiny["base"], r=4, alpha=8.0, rslora=True, seed=1)
    res = merge_adapter(adapter, tmp_path / "merged", merge_base="original")
    assert res.merge_base == "original" and res.merged_modules == 14
    ref = _peft_merged_logits(tiny["base"], adapter)
    # Same fp32 ops as PEFT (W + scale * B @ A): equal up to summation order, measured 0.0.
    assert (_logits(tmp_path / "merged") - ref).abs().max().item() < 1e-5
    # The adapter changes the model a lot more than that (random non-zero B).
    assert (_logits(tiny["base"]) - ref).abs().max().item() > 1e-2
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert manifest["kind"] == "merged" and manifest["merge"]["merge_base"] == "original"
    for name in ("tokenizer.json", "chat_template.jinja", "config.json"):
        assert (tmp_path / "merged" / name).is_file()


def test_dequantized_merge_equals_trained_nf4_model(tiny, tmp_path):
    import torch

    from edgeqlora.merge import merge_adapter
    from edgeqlora.qlora import load_trained

    merge_adapter(tiny["adapter"], tmp_path / "merged", merge_base="dequantized")
    trained = load_trained(tiny["adapter"], device="cpu")
    with torch.no_grad():
        ref = trained(torch.tensor(IDS)).logits
    # Same dequantized weights, fp32 matmuls in both: measured 3.6e-7; 1e-4 leaves room for
    # bitsandbytes' CPU kernels computing in another order.
    assert (_logits(tmp_path / "merged") - ref).abs().max().item() < 1e-4
    # ...while the original-weights merge differs from the trained model by much more.
    assert (_peft_merged_logits(tiny["base"], tiny["adapter"]) - ref).abs().max().item() > 1e-3


def test_best_measures_both_and_keeps_the_better(tiny, tmp_path):
    from edgeqlora.merge import merge_adapter

    res = merge_adapter(tiny["adapter"], tmp_path / "merged", merge_base="best", eval_tokens=96)
    assert set(res.kld) == {"original", "dequantized"}
    assert res.merge_base == min(res.kld, key=res.kld.get)
    # The adapter was "trained" against NF4 (the reference model), so dequantized wins.
    assert res.merge_base == "dequantized" and res.eval_tokens >= 96
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert set(manifest["merge"]["kld"]) == {"original", "dequantized"}
    assert manifest["merge"]["requested"] == "best"
    assert not list(tmp_path.glob(".merge-*")) and not list(tmp_path.glob(".merged.tmp-*"))


def test_auto_merges_into_the_trained_base_and_measures_it(tiny, tmp_path):
    from edgeqlora.merge import merge_adapter

    res = merge_adapter(tiny["adapter"], tmp_path / "auto", merge_base="auto", eval_tokens=96)
    # One candidate: the dequantized NF4 base, which is the trained model up to float rounding.
    assert res.merge_base == "dequantized" and res.requested == "auto"
    assert set(res.kld) == {"dequantized"} and res.kld["dequantized"] < 1e-6
    assert res.top1["dequantized"] == 1.0 and res.eval_tokens >= 96
    # Merged from the trained model's own dequantized weights: the same bytes as the explicit
    # dequantized merge, which round-trips every weight through bitsandbytes itself.
    merge_adapter(tiny["adapter"], tmp_path / "deq", merge_base="dequantized")
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == \
        (tmp_path / "deq" / "model.safetensors").read_bytes()


def test_trained_weights_are_the_nf4_round_trip(tiny):
    import torch

    from edgeqlora.merge import (is_quantized_weight, iter_base_tensors, nf4_roundtrip,
                                 read_adapter, trained_weights)
    from edgeqlora.qlora import dequantized_weights, load_trained

    adapter = read_adapter(tiny["adapter"])
    trained = load_trained(tiny["adapter"], device="cpu")
    quantized = {n: t for n, t in iter_base_tensors(adapter.base_dir)
                 if is_quantized_weight(n, t.shape)}
    for cached in (False, True):  # dequantized now, or the cache's own tensors
        with dequantized_weights(trained) if cached else torch.no_grad():
            known = trained_weights(adapter, trained)
            assert set(known) == set(quantized)  # every 4-bit layer found by its tensor name
            for name, w in quantized.items():
                assert torch.equal(known[name].float(), nf4_roundtrip(w.float(), adapter.quant))
    # Quantized with other settings than the adapter records: not used (round-tripped instead).
    adapter.manifest["quant"] = {**adapter.quant, "block_size": 128}
    assert trained_weights(adapter, trained) == {}


def test_round_trips_kept_across_merges_give_the_same_bytes(tiny, tmp_path, monkeypatch):
    """The 4-bit round trip of a base, kept in the cache by the first dequantized merge, gives a
    later merge the same bytes without quantizing again; a damaged cache file is a miss that is
    rewritten, another setting is another file, and with the cache off nothing is kept."""
    import bitsandbytes.functional as bnbf

    from edgeqlora import roundtrip
    from edgeqlora.merge import merge_adapter, read_adapter

    monkeypatch.setenv("EDGEQLORA_NF4_CACHE", str(tmp_path / "cache"))
    calls = []
    real = bnbf.quantize_4bit
    monkeypatch.setattr(bnbf, "quantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    adapter = read_adapter(tiny["adapter"])
    key = roundtrip.cache_key(adapter.base_fingerprint["weights_sha256"], adapter.quant)
    kept = tmp_path / "cache" / f"{key}.safetensors"

    def merged(name):
        calls.clear()
        merge_adapter(tiny["adapter"], tmp_path / name, merge_base="dequantized",
                      eval_tokens=0)
        return (tmp_path / name / "model.safetensors").read_bytes(), len(calls)

    first, quantized = merged("first")
    assert quantized > 0 and kept.is_file()
    again, quantized = merged("again")
    assert quantized == 0 and again == first  # dequantized from the cache: the same bytes
    kept.write_bytes(kept.read_bytes()[:100])  # truncated: ignored, quantized, rewritten
    damaged, quantized = merged("damaged")
    assert quantized > 0 and damaged == first
    assert merged("mended") == (first, 0)
    other = roundtrip.cache_key(adapter.base_fingerprint["weights_sha256"],
                                {**adapter.quant, "block_size": 128})
    assert other != key
    monkeypatch.setenv("EDGEQLORA_NF4_CACHE", "0")
    kept.unlink()
    off, quantized = merged("off")
    assert quantized > 0 and off == first and not kept.exists()


def test_auto_on_a_plain_lora_adapter_is_the_original_base(tiny, tmp_path):
    from edgeqlora.errors import ConfigError
    from edgeqlora.merge import merge_adapter

    ad = make_adapter(tmp_path / "plain", tiny["base"], quant="none")
    res = merge_adapter(ad, tmp_path / "m", merge_base="auto", eval_tokens=96)
    assert res.merge_base == "original" and res.kld["original"] < 1e-6
    for base in ("dequantized", "best"):
        with pytest.raises(ConfigError, match=f"merge_base={base} needs an adapter trained on a "
                                              "4-bit base.*quant=none.*merge_base=original"):
            merge_adapter(ad, tmp_path / base, merge_base=base)
        assert not (tmp_path / base).exists()


def test_streamed_safetensors_reads_back_with_the_library(tiny, tmp_path):
    from safetensors import safe_open

    from edgeqlora.merge import merge_adapter, tensor_specs

    merge_adapter(tiny["adapter"], tmp_path / "m", merge_base="original", dtype="bfloat16")
    src = {name: shape for _, name, shape, _ in tensor_specs(tiny["base"])}
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(src)
        for name in f.keys():
            t = f.get_tensor(name)
            assert list(t.shape) == src[name] and str(t.dtype) == "torch.bfloat16"


# bad input: one clear error, nothing written


def _copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_adapter_weights(tiny, tmp_path):
    from edgeqlora.artifacts import write_manifest
    from edgeqlora.errors import InputError, ManifestError
    from edgeqlora.merge import merge_adapter

    ad = _copy_adapter(tiny["adapter"], tmp_path / "ad")
    weights = ad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ManifestError, match="adapter_model.safetensors: sha256 differs"):
        merge_adapter(ad, tmp_path / "out", merge_base="original")
    # Manifest rewritten to match (a truncated copy hashed after the fact): the reader says so.
    manifest = json.loads((ad / "manifest.json").read_text())
    write_manifest(ad, "adapter", {k: v for k, v in manifest.items()
                                   if k not in ("format_version", "kind", "created", "files")})
    with pytest.raises(InputError, match="truncated or corrupt"):
        merge_adapter(ad, tmp_path / "out", merge_base="original")
    assert not (tmp_path / "out").exists()


def test_truncated_base_weights(tiny, tmp_path):
    from edgeqlora.artifacts import write_manifest
    from edgeqlora.base import base_fingerprint
    from edgeqlora.errors import InputError
    from edgeqlora.merge import merge_adapter

    # A base with a base-model manifest (like the embedded cache): its fingerprint comes from
    # the manifest, so only the merge's own read can notice the truncation.
    base = tmp_path / "base"
    shutil.copytree(tiny["base"], base)
    fp = base_fingerprint(base)
    write_manifest(base, "base-model", {k: fp[k] for k in ("weights", "weights_sha256",
                                                           "model_type", "num_parameters")})
    ad = make_adapter(tmp_path / "ad", base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated"):
        merge_adapter(ad, tmp_path / "out", merge_base="original")
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base(tiny, tmp_path, tokenizer_dir):
    from edgeqlora.artifacts import write_manifest
    from edgeqlora.errors import ManifestError
    from edgeqlora.merge import merge_adapter

    other = build_tiny_model(tmp_path / "other", tokenizer_dir, hidden=32, intermediate=64, seed=1)
    ad = _copy_adapter(tiny["adapter"], tmp_path / "ad")
    manifest = json.loads((ad / "manifest.json").read_text())
    keep = {k: v for k, v in manifest.items()
            if k not in ("format_version", "kind", "created", "files")}
    # Pointed at another base: the weight hash says so, naming both.
    keep["base"] = {**keep["base"], "spec": "tiny-64", "path": str(other)}
    write_manifest(ad, "adapter", keep)
    with pytest.raises(ManifestError, match="trained on base 'tiny-64'.*but .*other"):
        merge_adapter(ad, tmp_path / "out", merge_base="original")
    # Without a recorded hash, the shapes decide, and the message names both sides.
    keep["base"].pop("weights_sha256")
    write_manifest(ad, "adapter", keep)
    with pytest.raises(ManifestError, match=r"'tiny-64'\) does not fit base .*other: "
                                            r"model\.layers\.0\.\S+ is \[\d+, \d+\] in the base, "
                                            r"the adapter's delta is \[\d+, \d+\]"):
        merge_adapter(ad, tmp_path / "out", merge_base="original")
    assert not (tmp_path / "out").exists()


def test_bad_merge_base_and_existing_output(tiny, tmp_path):
    from edgeqlora.errors import ConfigError, InputError
    from edgeqlora.merge import merge_adapter

    with pytest.raises(ConfigError, match="auto, original, dequantized, best"):
        merge_adapter(tiny["adapter"], tmp_path / "out", merge_base="nf4")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous")
    with pytest.raises(InputError, match="--force"):
        merge_adapter(tiny["adapter"], tmp_path / "out", merge_base="original")
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous"

"""Every model family through the training side and the GGUF exporter, on tiny random models
(``conftest.FAMILIES``: Llama, Llama 3 RoPE, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3):
QLoRA 2 steps -> merge -> GGUF F32 (llama.cpp's logits against transformers') -> Q8_0 and
Q4_K_M exports verified through llama.cpp, the chat template rendered by the runtime as by
transformers -> the adapter-only GGUF applied unmerged by llama.cpp. The ONNX side of each family: ``tests/test_onnx_families.py``; the K-quant mix of
each family against llama.cpp's quantizer: ``tests/test_gguf_kquant.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FAMILIES, build_tiny_model, has_module, read_gguf
from edgeqlora import train as train_mod
from edgeqlora.config import build_config
from edgeqlora.errors import InputError
from edgeqlora.tasks import iot

pytestmark = [pytest.mark.skipif(not has_module("llama_cpp"), reason="needs llama-cpp-python"),
              pytest.mark.skipif(not has_module("bitsandbytes"), reason="needs bitsandbytes")]

# llama.cpp's own model-conversion check calls a normalized MSE (mean squared difference over
# mean squared reference logit) below 1e-4 "excellent"; the tiny models measure 2e-8 to 4e-7
# (fp32 sums in another order), so a wrong norm, RoPE or head shows as 1e-2 and more.
MAX_F32_NMSE = 1e-4


@pytest.fixture(scope="module")
def iot_file(tmp_path_factory):
    rows, _ = iot.generate(seed=0, n_train=24, n_eval=4)
    return iot.write_jsonl(rows, tmp_path_factory.mktemp("fam-data") / "train.jsonl")


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tmp_path_factory, tokenizer_dir, iot_file):
    """(family, base dir, adapter dir): two QLoRA steps on the family's tiny model."""
    root = tmp_path_factory.mktemp(f"fam-{request.param}")
    base = build_tiny_model(root / "base", tokenizer_dir, arch=request.param)
    cfg = build_config({"base": str(base), "data": str(iot_file), "max_steps": 2,
                        "batch_size": 4, "lr": 2e-2, "warmup_steps": 0, "max_len": 128,
                        "save_every": 0, "eval_examples": 0, "quant_report_tokens": 0,
                        "lora.r": 4, "lora.dropout": 0.0})
    adapter = train_mod.train(cfg, root / "run")
    return request.param, base, adapter


def _sequences(tokenizer_dir) -> list[list[int]]:
    from edgeqlora.hf_tokenizer import load

    tok = load(tokenizer_dir)
    # Longer than the Gemma fixtures' 8-token sliding window, so sliding and global layers differ.
    return [tok("The quick brown fox jumps over the lazy dog 12 times, then sleeps.")["input_ids"],
            tok("Turn on the kitchen light at seven thirty and dim the hallway lamp")["input_ids"]]


def test_lora_reaches_every_linear_layer(trained):
    """``all-linear`` finds each family's projections, fused ones included, never the head."""
    family, _, adapter = trained
    targets = set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    fused = {"qkv_proj", "gate_up_proj"}
    want = {"o_proj", "down_proj"} | (fused if family == "phi3" else
                                      {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
    assert targets == want


def test_merged_f32_gguf_matches_transformers(trained, tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from edgeqlora.exporters import gguf as G
    from edgeqlora.merge import merge_adapter
    from edgeqlora.runtimes.gguf import GGUFRuntime

    _, _, adapter = trained
    merged = tmp_path / "merged"
    merge_adapter(adapter, merged, eval_tokens=0)
    G.write_model_gguf(merged, tmp_path / "model.f32.gguf", "f32")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with GGUFRuntime(tmp_path / "model.f32.gguf", n_ctx=128, n_batch=128) as runtime:
        for ids in _sequences(tokenizer_dir):
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
            got = runtime.logits(ids)
            nmse = float(((ref - got) ** 2).mean() / (ref ** 2).mean())
            assert nmse <= MAX_F32_NMSE, nmse
            assert (ref.argmax(-1) == got.argmax(-1)).all()


@pytest.fixture
def exported(trained, monkeypatch):
    """``trained``, for the tests that export it. transformers 5 loads any tokenizer of a
    ``qwen2`` checkpoint through its Qwen2 class, which swaps in Qwen2's pre-tokenizer: the
    SmolLM2 files of the tiny Qwen2 model then tokenize differently from llama.cpp, and the
    export rightly refuses (a pairing no real checkpoint has). There the export's reference
    tokenizer is loaded as the files say instead."""
    if trained[0] == "qwen2":
        from transformers import PreTrainedTokenizerFast

        from edgeqlora import export_inputs

        monkeypatch.setattr(export_inputs, "tokenizer", PreTrainedTokenizerFast.from_pretrained)
    return trained


# Mean KL bound per quant on these tiny random models, with margin over the measured 2e-4
# (Q4_K_M) and 2e-5 (Q8_0). Top-1 is not gated here: a random model's next-token distribution is
# nearly flat, so 4-bit rounding flips near-ties (top-1 0.69-0.98 at KLD 1e-4) without meaning
# anything; the real models' tests gate top-1.
# F16 is left out: it takes Q8_0's path (gguf's numpy quantizers), and F32 above is the exact
# check; the suite's time goes to the families instead.
MAX_KLD = {"q8_0": 2e-3, "q4_k_m": 1e-2}


@pytest.mark.parametrize("quant", list(MAX_KLD))
def test_export_passes_verification(exported, tmp_path, quant):
    """The export stage end to end: merge, write, verification through llama.cpp against the
    merged model (every held-out text tokenized identically), manifest."""
    from edgeqlora.export import export_adapter

    _, _, adapter = exported
    gates = {"min_top1": 0.0, "max_kld": MAX_KLD[quant]}
    m = export_adapter(adapter, tmp_path / quant, quant=quant, eval_tokens=128, thresholds=gates)
    check = m["verification"]
    assert check["passed"], check["problems"]
    assert check["tokens"] > 50 and check["tokenization"]["mismatches"] == []
    if quant == "q8_0":
        _check_chat_template(tmp_path / quant)


def _check_chat_template(export_dir) -> None:
    """The export's chat template, rendered by the torch-free runtime, gives the ids
    transformers' ``apply_chat_template`` gives the checkpoint (what training saw)."""
    from transformers import PreTrainedTokenizerFast

    from edgeqlora.runtimes import load

    messages = [{"role": "system", "content": "You control a smart home."},
                {"role": "user", "content": "Dim the hallway lamp to 40 %"},
                {"role": "assistant", "content": '{"device": "lamp", "value": 40}'},
                {"role": "user", "content": "and the kitchen?"}]
    # As the files say (see ``exported``): transformers' Qwen2 class would re-tokenize.
    tok = PreTrainedTokenizerFast.from_pretrained(export_dir)
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    with load(export_dir) as runtime:
        assert runtime.chat_ids(messages) == want


def test_adapter_only_gguf_applied_by_llama_cpp(exported, tmp_path):
    """The base GGUF plus the LoRA GGUF, merged by llama.cpp at load time, against the trained
    model merged in fp32: the LoRA tensors' names and orientation are right for the family."""
    from edgeqlora.export import export_adapter

    _, _, adapter = exported
    m = export_adapter(adapter, tmp_path / "ao", quant="f32", adapter_only=True,
                       adapter_quant="f32", merge_base="original", eval_tokens=128)
    check = m["verification"]
    assert check["passed"], check["problems"]
    assert check["kld"] < 1e-4 and check["top1"] >= 0.99
    assert np.isfinite(check["kld"])


@pytest.mark.parametrize("family,change,refusal", [
    ("gemma3", {"layer_types": ["full_attention"] * 6}, "differ from llama.cpp's pattern"),
    ("gemma3", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar is 64"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 50000.0},
                                    "full_attention": {"rope_type": "default",
                                                       "rope_theta": 1e6}}},
     "sliding layers' RoPE"),
    ("gemma2", {"final_logit_softcapping": None}, "always soft-caps"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                  "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
     "rope scaling type 'longrope'"),
])
def test_configs_llama_cpp_would_run_differently_are_refused(family, change, refusal, tmp_path,
                                                              tokenizer_dir):
    """Settings llama.cpp hard-codes for a family (Gemma 3's layer pattern, its sliding RoPE
    base and attention scale; Gemma 2's soft-capping) or cannot express (Phi-3 longrope) are
    refused by the exporter's pre-merge check, in one line, before anything is written."""
    from edgeqlora.exporters import gguf as G

    base = build_tiny_model(tmp_path / "base", tokenizer_dir, arch=family)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(change)
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=refusal) as err:
        G.check_model(base)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=refusal):
        G.write_model_gguf(base, tmp_path / "model.gguf", "f32")
    assert not (tmp_path / "model.gguf").exists()


def test_vocabulary_of_a_converted_gguf_is_copied_back(tmp_path, tokenizer_dir):
    """A checkpoint converted from a GGUF keeps that GGUF's tokenizer keys beside it
    (``source_metadata.json``, how the embedded Gemma 3 carries its SentencePiece vocabulary):
    the export writes them back verbatim, and llama.cpp tokenizes the export like the source."""
    from llama_cpp import Llama

    from edgeqlora.base import embedded_gguf_path
    from edgeqlora.exporters import gguf as G
    from edgeqlora.exporters.gguf.metadata import (SOURCE_METADATA, read_source_metadata,
                                                   write_source_metadata)

    source = embedded_gguf_path()  # SmolLM2's own GGUF: the tiny model shares its vocabulary
    base = build_tiny_model(tmp_path / "base", tokenizer_dir)
    keys = write_source_metadata(source, base / SOURCE_METADATA)
    assert "tokenizer.ggml.tokens" in keys and "general.license" in keys
    info = G.write_model_gguf(base, tmp_path / "model.gguf", "f32")
    assert info["vocab"]["source"] == SOURCE_METADATA
    kept = read_source_metadata(base / SOURCE_METADATA)
    out = read_gguf(tmp_path / "model.gguf")[0]
    for key in keys:
        if key.startswith("tokenizer."):  # general.* of the export is its own (identity)
            assert out[key] == kept[key]["value"], key
    text = "Turn on the kitchen light at 7:30 <|im_start|> 12345  ok\n\n"
    ids = [Llama(str(p), vocab_only=True, verbose=False).tokenize(text.encode(), special=True)
           for p in (source, tmp_path / "model.gguf")]
    assert ids[0] == ids[1]
    (base / SOURCE_METADATA).write_text("{not json")
    with pytest.raises(InputError, match="is not a readable GGUF vocabulary"):
        G.write_model_gguf(base, tmp_path / "again.gguf", "f32")


def test_a_tokenizer_that_disagrees_with_llama_cpp_is_refused(tmp_path, tokenizer_dir):
    """transformers tokenizes the tiny Qwen2's SmolLM2 files with Qwen2's pre-tokenizer, llama.cpp
    with the files' own: the export refuses in one line naming the first differing text, and
    writes nothing."""
    from lora_fixtures import make_adapter

    from edgeqlora.errors import ExportError
    from edgeqlora.export import export_adapter

    base = build_tiny_model(tmp_path / "base", tokenizer_dir, arch="qwen2")
    adapter = make_adapter(tmp_path / "adapter", base)
    with pytest.raises(ExportError, match=r"tokenization differs from the HF tokenizer on \d+ "
                                          r"of \d+ held-out texts, first '") as err:
        export_adapter(adapter, tmp_path / "out", quant="f16", merge_base="original",
                       eval_tokens=64)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()

"""The ONNX runtime shim (runtimes/onnx.py) on an fp32 export of a tiny random model: greedy
answers and logits equal the torch model's; streaming, sampling, chat template, tokenizer and
errors behave like the other runtimes; no torch on the device side."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_model, has_module

pytestmark = pytest.mark.skipif(not (has_module("onnx") and has_module("onnxruntime")),
                                reason="needs onnx + onnxruntime")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("onnxrt-tiny"), tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny) -> Path:
    from edgeqlora.export import export_merged

    out = tmp_path_factory.mktemp("onnxrt") / "fp32"
    export_merged(tiny, out, target="onnx", quant="fp32", eval_tokens=64, context_length=128)
    return out


@pytest.fixture(scope="module")
def rt(export):
    from edgeqlora import runtimes

    r = runtimes.load(export)
    yield r
    r.close()


@pytest.fixture(scope="module")
def torch_model(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


def test_loaded_through_runtimes_load(rt, export):
    from edgeqlora.runtimes.onnx import ONNXRuntime

    assert isinstance(rt, ONNXRuntime)
    assert rt.n_ctx == 128 and rt.vocab_size == 49152
    assert rt.info()["runtime"] == "onnx"


def test_logits_match_torch(rt, torch_model, tokenizer):
    import torch

    ids = tokenizer("Set the thermostat to 21 degrees, then lock the door.")["input_ids"]
    with torch.no_grad():
        ref = torch_model(torch.tensor([ids])).logits[0].numpy()
    got = rt.logits(ids)
    assert got.shape == (len(ids), 49152) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-4  # fp32 graph: kernel rounding only (measured 3e-7)


def test_greedy_answer_equals_torch(rt, torch_model, tokenizer):
    import torch

    from edgeqlora.runtimes.base import Completion

    messages = [{"role": "user", "content": "Turn on the kitchen light"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        tokenize=True)["input_ids"]
    assert rt.chat_ids(messages) == list(ids)
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                   eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    done = Completion()
    text = "".join(rt.complete(ids, max_new_tokens=16, result=done))
    n = len(done.token_ids)
    assert n >= 1 and done.token_ids == ref[:n]
    if done.finish_reason == "length":
        assert n == 16
    else:  # stopped at an end token: torch picked it too
        assert rt._is_eog(ref[n])
    assert text == rt.chat(messages, max_new_tokens=16)


def test_streaming_equals_non_streaming_and_sampling_is_seeded(rt):
    prompt = "Once upon a time"
    whole = rt.generate(prompt, max_new_tokens=12)
    assert "".join(rt.generate(prompt, max_new_tokens=12, stream=True)) == whole
    a = rt.generate(prompt, max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    b = rt.generate(prompt, max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    assert a == b
    draws = {rt.generate(prompt, max_new_tokens=12, temperature=2.0, seed=s) for s in range(4)}
    assert len(draws) > 1  # a random tiny model at temperature 2: not one fixed answer


def test_sample_filters():
    from edgeqlora.runtimes.base import check_sampling
    from edgeqlora.runtimes.onnx import sample

    logits = np.array([0.0, 5.0, 4.9, -3.0])
    rng = np.random.default_rng(0)
    assert sample(logits, check_sampling(temperature=0.0), rng) == 1
    top1 = check_sampling(temperature=1.0, top_k=1)
    assert {sample(logits, top1, rng) for _ in range(20)} == {1}
    top_p = check_sampling(temperature=1.0, top_p=0.5)  # token 1 alone holds ~52%
    assert {sample(logits, top_p, rng) for _ in range(20)} == {1}
    both = check_sampling(temperature=1.0, top_k=2)
    assert {sample(logits, both, rng) for _ in range(200)} == {1, 2}


def test_tokenizer_and_pieces_match_hf(rt, tokenizer):
    texts = ["hello world", "ünïcødé — «quotes» 😀 中文", "  two  spaces\tand\ttabs\n",
             "<|im_start|>user\nlamp<|im_end|>"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert rt.tokenize(text) == ids
        assert rt.detokenize(ids, special=True) == tokenizer.decode(ids)
        # Byte pieces join into the text even where a character spans two tokens.
        pieces = b"".join(rt._piece(t) for t in ids).decode("utf-8")
        assert pieces == tokenizer.decode(ids, skip_special_tokens=True)
    assert rt.tokenize("<|im_end|>", special=False) != rt.tokenize("<|im_end|>")
    # What the runtime read from the parsed tokenizer is what tokenizer.json says.
    spec = json.loads((rt.export_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert rt._special_ids == {t["id"] for t in spec["added_tokens"] if t["special"]}
    assert rt._byte_level and spec["decoder"]["type"] == "ByteLevel"


def test_chat_template_matches_transformers(rt, tokenizer):
    convs = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "You control a house."},
              {"role": "user", "content": "dim the lights to 30%"},
              {"role": "assistant", "content": "Done."},
              {"role": "user", "content": "und jetzt die Heizung 🔥"}]]
    for m in convs:
        assert rt.render_chat(m) == tokenizer.apply_chat_template(
            m, tokenize=False, add_generation_prompt=True)


def test_context_window_and_bad_ids(rt):
    from edgeqlora.errors import InputError

    with pytest.raises(InputError, match="n_ctx=128"):
        rt.logits([1] * 200)
    with pytest.raises(InputError, match="outside the vocabulary"):
        rt.logits([1, 10**6])


def test_no_torch_on_the_device_side(export):
    code = ("import sys; from edgeqlora import runtimes; rt = runtimes.load(sys.argv[1]); "
            "print(repr(rt.generate('hi', max_new_tokens=3))); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(export)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_broken_exports_give_clear_errors(export, tmp_path):
    from edgeqlora.errors import InputError
    from edgeqlora.runtimes.onnx import load_onnx

    d = tmp_path / "broken"
    shutil.copytree(export, d)
    (d / "genai_config.json").unlink()
    with pytest.raises(InputError, match="has no genai_config.json"):
        load_onnx(d / "model.onnx", export_dir=d)
    shutil.copy(export / "genai_config.json", d / "genai_config.json")
    (d / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(InputError, match="onnxruntime could not load .*model.onnx"):
        load_onnx(d / "model.onnx", export_dir=d)
    cfg = json.loads((export / "genai_config.json").read_text())
    del cfg["model"]["decoder"]["head_size"]
    (d / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="not a usable genai config"):
        load_onnx(export / "model.onnx", export_dir=d)


def test_cancel_stops_inside_the_session_run_and_restores_the_run_options(rt):
    """A ``Cancel`` already set stops onnxruntime inside the prompt's run
    (``RunOptions.terminate``): no token at all, where the check between tokens alone would let
    one through; set mid-answer it keeps what was written. The runtime's own run options are
    back afterwards and the next answer is unchanged."""
    from edgeqlora.runtimes.base import Cancel, Completion

    messages = [{"role": "user", "content": "turn on the kitchen light"}]
    before = rt.chat(messages, max_new_tokens=6)
    kept = rt._run_options
    cancel, result = Cancel(), Completion()
    cancel.set()
    assert "".join(rt.complete(rt.chat_ids(messages), max_new_tokens=6, result=result,
                               cancel=cancel)) == ""
    assert result.finish_reason == "cancelled" and result.completion_tokens == 0
    assert rt._run_options is kept
    cancel, result = Cancel(), Completion()
    for _ in rt.complete(rt.chat_ids(messages), max_new_tokens=6, result=result, cancel=cancel):
        if result.completion_tokens >= 2:
            cancel.set()
    assert result.finish_reason == "cancelled" and result.completion_tokens == 2
    assert rt.chat(messages, max_new_tokens=6) == before

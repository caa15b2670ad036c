"""The torch-free runtime shim over the embedded GGUF: loading, generation, streaming, stop
strings, seeds, logits, and every bad input a user can give it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeqlora.artifacts import write_manifest
from edgeqlora.errors import InputError, ManifestError
from edgeqlora.runtimes.base import Completion, StopStream, check_sampling, default_threads

pytest.importorskip("llama_cpp")

MESSAGES = [{"role": "user", "content": "List three colours of the rainbow."}]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from edgeqlora.base import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="module")
def rt(gguf_path):
    from edgeqlora import runtimes

    with runtimes.load(gguf_path, n_ctx=512) as runtime:
        yield runtime


def make_export(tmp: Path, gguf_path: Path, **extra) -> Path:
    """An export dir as the GGUF exporter writes it, with the model linked, not copied."""
    tmp.mkdir(parents=True, exist_ok=True)
    os.symlink(gguf_path, tmp / "model.gguf")
    write_manifest(tmp, "export", {"target": "gguf", **extra})
    return tmp


def test_runtime_import_and_generate_stay_torch_free(gguf_path):
    code = (
        "import sys\n"
        "from edgeqlora import runtimes\n"
        f"rt = runtimes.load({str(gguf_path)!r}, n_ctx=256)\n"
        "text = rt.chat([{'role': 'user', 'content': 'hi'}], max_new_tokens=4)\n"
        "rt.logits(rt.tokenize('hello world'))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate'))\n"
        "print('HEAVY', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def test_load_export_dir_and_bare_file_agree(tmp_path, gguf_path, rt):
    from edgeqlora import runtimes

    export = make_export(tmp_path / "export", gguf_path)
    with runtimes.load(export, n_ctx=512, verify=True) as from_dir:
        assert from_dir.name == "gguf"
        ids = from_dir.chat_ids(MESSAGES)
        assert ids == rt.chat_ids(MESSAGES)
        assert from_dir.generate(ids, max_new_tokens=8) == rt.generate(ids, max_new_tokens=8)


def test_export_dir_tokenizer_files_win_over_gguf_metadata(tmp_path, gguf_path):
    from edgeqlora import runtimes

    export = tmp_path / "export"
    export.mkdir()
    (export / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}")
    (export / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>"}, "chat_template": "ignored: jinja wins"}))
    make_export(export, gguf_path)
    with runtimes.load(export, n_ctx=128) as rt:
        assert rt.render_chat([{"role": "user", "content": "x"}]) == "<user>x<|endoftext|>"


def test_greedy_generate_is_deterministic_and_streams_the_same_text(rt):
    first = rt.chat(MESSAGES, max_new_tokens=24)
    assert isinstance(first, str) and first
    assert rt.chat(MESSAGES, max_new_tokens=24) == first
    pieces = list(rt.chat(MESSAGES, max_new_tokens=24, stream=True))
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == first


def test_seeded_sampling_is_reproducible(rt):
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=50)
    a = rt.chat(MESSAGES, seed=1234, **kw)
    assert rt.chat(MESSAGES, seed=1234, **kw) == a
    assert "".join(rt.chat(MESSAGES, seed=1234, stream=True, **kw)) == a
    others = {rt.chat(MESSAGES, seed=s, **kw) for s in (1, 2, 3)}
    assert others - {a}, "different seeds should not all give the seed-1234 text"


def test_stop_strings_cut_the_text_in_both_modes(rt):
    full = rt.chat(MESSAGES, max_new_tokens=32)
    # A stop string from the middle of the greedy answer, spanning a token boundary or not.
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop and stop in full
    expected = full[:full.index(stop)]
    result = Completion()
    text = "".join(rt.complete(rt.chat_ids(MESSAGES), max_new_tokens=32, stop=[stop, "@@@"],
                               result=result))
    assert text == expected == rt.chat(MESSAGES, max_new_tokens=32, stop=stop)
    assert result.finish_reason == "stop" and result.text == expected
    assert "".join(rt.chat(MESSAGES, max_new_tokens=32, stop=stop, stream=True)) == expected


def test_finish_reason_and_token_counts(rt):
    ids = rt.chat_ids(MESSAGES)
    result = Completion()
    "".join(rt.complete(ids, max_new_tokens=3, result=result))
    assert result.finish_reason == "length"
    assert (result.prompt_tokens, result.completion_tokens) == (len(ids), 3)
    # With room to finish, the model ends its turn with <|im_end|> (an end-of-generation id).
    long = Completion()
    "".join(rt.complete(ids, max_new_tokens=200, result=long))
    assert long.finish_reason == "stop" and long.completion_tokens < 200


def test_logits_match_greedy_generation_position_by_position(rt):
    prompt = rt.chat_ids(MESSAGES)
    n_new = 8
    result = Completion()
    text = "".join(rt.complete(prompt, max_new_tokens=n_new, result=result))
    generated = result.token_ids
    assert len(generated) == n_new and rt.detokenize(generated) == text
    logits = rt.logits(prompt + generated)
    assert logits.shape == (len(prompt) + n_new, rt.vocab_size)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    # The first token comes from the same batched prompt decode in both: exactly the argmax.
    assert int(logits[len(prompt) - 1].argmax()) == generated[0]
    # Later tokens were decoded one at a time, and ggml's single-token kernels round differently
    # from its batched ones (measured: up to ~0.15 logits on this Q4_1 model), so a near tie may
    # flip; teacher forcing must still rank each greedy token at or within 0.5 of the top.
    rows = logits[len(prompt) - 1:-1]
    chosen = rows[np.arange(n_new), generated]
    assert (rows.max(axis=1) - chosen <= 0.5).all()
    assert (rows.argmax(axis=1) == np.array(generated)).sum() >= n_new - 2
    # The prefix's logits do not depend on what follows (causal), and calls don't interfere.
    assert np.allclose(rt.logits(prompt)[-1], logits[len(prompt) - 1], atol=1e-3)
    assert rt.chat(MESSAGES, max_new_tokens=n_new) == text


def test_logits_longer_than_one_batch(gguf_path):
    from edgeqlora import runtimes

    with runtimes.load(gguf_path, n_ctx=160, n_batch=64) as small:
        ids = small.tokenize("The quick brown fox jumps over the lazy dog. " * 20)[:150]
        logits = small.logits(ids)
        assert logits.shape == (150, small.vocab_size)
        assert np.allclose(small.logits(ids[:70])[-1], logits[69], atol=1e-3)


def test_tokenize_detokenize_roundtrip(rt, tokenizer):
    text = "Set the thermostat to 21.5 °C — 日本語 🌡️ now"
    ids = rt.tokenize(text)
    assert rt.detokenize(ids) == text
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    chat = rt.chat_ids(MESSAGES)
    assert rt.detokenize(chat, special=True) == rt.render_chat(MESSAGES)
    assert "<|im_start|>" not in rt.detokenize(chat)
    assert rt.tokenize("<|im_start|>", special=True) == [1]
    assert rt.tokenize("<|im_start|>", special=False) != [1]
    assert rt.tokenize("") == [] and rt.detokenize([]) == ""


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
])
def test_bad_generation_arguments(rt, kwargs, match):
    with pytest.raises(InputError, match=match):
        rt.generate("Hello", **kwargs)


def test_bad_prompts_and_ids(rt):
    with pytest.raises(InputError, match="empty"):
        rt.generate("")
    with pytest.raises(InputError, match="outside the vocabulary"):
        rt.generate([1, 2, rt.vocab_size])
    with pytest.raises(InputError, match="not an integer"):
        rt.logits([1, "2"])
    with pytest.raises(InputError, match="non-empty"):
        rt.logits([])
    with pytest.raises(InputError, match="context window"):
        rt.logits(list(range(10, 10 + rt.n_ctx + 1)))
    with pytest.raises(InputError, match="context window"):
        rt.generate([5] * rt.n_ctx)
    with pytest.raises(InputError, match="messages"):
        rt.chat([])
    # The runtime still works after every refusal.
    assert rt.generate("Hello", max_new_tokens=2)


def test_bad_paths_and_files(tmp_path, gguf_path):
    from edgeqlora import runtimes

    with pytest.raises(InputError, match="does not exist"):
        runtimes.load(tmp_path / "nope")
    with pytest.raises(ManifestError, match="manifest.json"):
        runtimes.load(tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(InputError, match="not 'GGUF'"):
        runtimes.load(junk)
    truncated = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(InputError, match="truncated, corrupt"):
        runtimes.load(truncated)
    with pytest.raises(InputError, match="trained for \\(8192 tokens\\)"):
        runtimes.load(gguf_path, n_ctx=8200)
    # A typo'd context is the flag's fault, not the file's.
    with pytest.raises(InputError, match="larger than any model's context"):
        runtimes.load(gguf_path, n_ctx=99999999999)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="could not load"):
        runtimes.load(header_only)


def test_default_context_is_the_trained_one_in_one_load(tmp_path, tiny_model_dir,
                                                        monkeypatch):
    """A model trained on fewer tokens than the default context (the tiny model: 1,024) opens
    once at its trained context, read from the header; where the header does not say, the
    runtime still shrinks to llama.cpp's reading, with a second load."""
    import llama_cpp

    from edgeqlora import runtimes
    from edgeqlora.exporters.gguf import write_model_gguf
    from edgeqlora.runtimes import gguf as runtime_gguf

    path = tmp_path / "tiny.gguf"
    write_model_gguf(tiny_model_dir, path, "f32")
    real, opened = llama_cpp.Llama, []

    def counting(*args, **kwargs):
        opened.append(kwargs["n_ctx"])
        return real(*args, **kwargs)

    monkeypatch.setattr(llama_cpp, "Llama", counting)
    for hint, loads in ((runtime_gguf.trained_context, [1024]),
                        (lambda path: None, [runtime_gguf.DEFAULT_N_CTX, 1024])):
        monkeypatch.setattr(runtime_gguf, "trained_context", hint)
        opened.clear()
        rt = runtimes.load(path)
        try:
            assert rt.n_ctx == 1024 and opened == loads
        finally:
            rt.close()


def test_bad_export_dirs(tmp_path, gguf_path):
    from edgeqlora import runtimes

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_manifest(adapter, "adapter", {})
    with pytest.raises(ManifestError, match="not an export"):
        runtimes.load(adapter)

    other = make_export(tmp_path / "other", gguf_path)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["target"] = "tflite"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="unknown runtime target 'tflite'.*gguf"):
        runtimes.load(other)

    changed = tmp_path / "changed"
    changed.mkdir()
    shutil.copy(gguf_path, changed / "model.gguf")
    write_manifest(changed, "export", {"target": "gguf"})
    with open(changed / "model.gguf", "r+b") as f:
        f.truncate(1 << 20)
    with pytest.raises(InputError, match="truncated or replaced.*Re-run the export"):
        runtimes.load(changed)

    two = tmp_path / "two"
    two.mkdir()
    os.symlink(gguf_path, two / "a.gguf")
    os.symlink(gguf_path, two / "b.gguf")
    write_manifest(two, "export", {"target": "gguf"})
    with pytest.raises(ManifestError, match="expected one"):
        runtimes.load(two)


def test_stop_stream_holds_back_partial_stops_and_joins_utf8():
    s = StopStream(["</end>"])
    euro = "€".encode()
    out = [s.feed(b"price: 5"), s.feed(euro[:1]), s.feed(euro[1:]), s.feed(b" </e")]
    assert out == ["price: 5", "", "€", " "]  # "</e" could start the stop string
    assert s.feed(b"nd> ignored") == "" and s.stopped
    assert s.flush() == ""
    t = StopStream(["</end>"])
    assert t.feed(b"a </e") == "a " and t.feed(b"x") == "</ex" and t.flush() == ""
    u = StopStream([])
    assert u.feed(b"ab\xe2\x82") == "ab" and u.flush() == "\ufffd"


def test_check_sampling_collects_every_problem():
    with pytest.raises(InputError) as err:
        check_sampling(max_new_tokens=0, temperature=-1, top_p=2)
    assert all(k in str(err.value) for k in ("max_new_tokens", "temperature", "top_p"))
    ok = check_sampling(max_new_tokens=5, temperature=0.7, stop="###", seed=3)
    assert ok.stop == ("###",) and ok.seed == 3


def test_default_threads(monkeypatch):
    """The runtimes' default is the thread policy's (tests/test_busy.py has the policy)."""
    from edgeqlora import threads

    monkeypatch.delenv("EDGEQLORA_THREADS", raising=False)
    threads.reset()
    assert 1 <= default_threads() <= max(1, len(os.sched_getaffinity(0)) - 1)
    monkeypatch.setenv("EDGEQLORA_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("EDGEQLORA_THREADS", "zero")
    with pytest.raises(InputError, match="EDGEQLORA_THREADS"):
        default_threads()


def test_cli_run_streams_the_runtime_answer(gguf_path, rt, capsys, monkeypatch):
    from edgeqlora.cli import main

    expected = rt.chat(MESSAGES, max_new_tokens=8)
    args = ["run", str(gguf_path), "--chat", "--prompt", MESSAGES[0]["content"],
            "--max-new-tokens", "8", "--threads", "1", "--n-ctx", "256"]
    assert main(args + ["--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert "generated tokens" in captured.err
    system = [{"role": "system", "content": "Answer in French."}] + MESSAGES
    assert main(args + ["--system", "Answer in French."]) == 0
    assert capsys.readouterr().out == rt.chat(system, max_new_tokens=8) + "\n"
    # Plain completion of text from stdin.
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time"))
    assert main(["run", str(gguf_path), "--max-new-tokens", "6", "--n-ctx", "256"]) == 0
    assert capsys.readouterr().out == rt.generate("Once upon a time", max_new_tokens=6) + "\n"


def test_cli_run_errors_are_one_line_exit_2(gguf_path, tmp_path, capsys):
    from edgeqlora.cli import main

    assert main(["run", str(gguf_path), "--prompt", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", str(gguf_path), "--prompt", "  "]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["run", str(gguf_path), "--prompt", "hi", "--n-ctx", "4"]) == 2
    assert "n_ctx" in capsys.readouterr().err


def test_iter_logits_reuses_a_shared_prefix_without_changing_the_logits(rt):
    # Held-out sequences share their system prompt; iter_logits decodes it once and copies its
    # rows. The suffix rows are decoded in a smaller batch than from scratch, and ggml's
    # kernels round batched sums differently (see above), so the comparison is close, not exact.
    head = rt.chat_ids(MESSAGES)
    seqs = [head + rt.tokenize(" lamp on"), head + rt.tokenize(" heating to 20"),
            rt.tokenize("unrelated text"), head]
    fresh = [rt.logits(s) for s in seqs]
    streamed = list(rt.iter_logits(seqs))
    assert [s.shape for s in streamed] == [f.shape for f in fresh]
    for f, s in zip(fresh, streamed):
        assert np.array_equal(f.argmax(-1), s.argmax(-1))
        assert np.abs(f - s).max() < 0.2
    # The prefix rows of the second sequence are the first sequence's, copied.
    assert np.array_equal(streamed[1][:len(head)], streamed[0][:len(head)])
    # The context is left empty: generation afterwards is as from scratch.
    assert rt.logits(seqs[0]).shape == fresh[0].shape


@pytest.mark.parametrize("constrained", [False, True])
def test_cancel_stops_a_long_prompt_inside_the_decode(gguf_path, constrained):
    """A ``Cancel`` set from another thread stops llama.cpp inside the prompt's batch (its
    abort callback), not after it: a 1,500-token prompt of the real model (~10-20 s on 2 cores)
    ends within a second, "cancelled", no token written; the runtime then answers as a fresh
    one would (nothing of the aborted batch stays in its KV cache)."""
    import threading
    import time

    from edgeqlora import runtimes
    from edgeqlora.runtimes.base import Cancel
    from edgeqlora.tasks import iot

    schema = iot.json_schema() if constrained else None
    with runtimes.load(gguf_path, n_ctx=2048, n_batch=2048) as rt:
        assert rt._abort.installed
        prompt = rt.tokenize("The quick brown fox jumps over the lazy dog. " * 150)[:1500]
        cancel, result = Cancel(), Completion()
        threading.Timer(0.3, cancel.set).start()
        start = time.monotonic()
        text = "".join(rt.complete(prompt, max_new_tokens=8, result=result, cancel=cancel,
                                   json_schema=schema))
        took = time.monotonic() - start
        assert result.finish_reason == "cancelled" and text == "" and took < 1.5, took
        after = rt.chat(MESSAGES, max_new_tokens=8, json_schema=schema)
        # Set before the call: nothing is decoded at all.
        early = Completion()
        assert "".join(rt.complete(prompt, max_new_tokens=8, result=early,
                                   cancel=_set(Cancel()))) == ""
        assert early.finish_reason == "cancelled"
    with runtimes.load(gguf_path, n_ctx=2048, n_batch=2048) as fresh:
        assert fresh.chat(MESSAGES, max_new_tokens=8, json_schema=schema) == after


def _set(cancel):
    cancel.set()
    return cancel


def test_cancel_between_tokens_keeps_what_was_written(rt):
    from edgeqlora.runtimes.base import Cancel

    cancel, result, pieces = Cancel(), Completion(), []
    for piece in rt.complete(rt.chat_ids(MESSAGES), max_new_tokens=40, result=result,
                             cancel=cancel):
        pieces.append(piece)
        if len(result.token_ids) >= 3:
            cancel.set()
    assert result.finish_reason == "cancelled" and result.completion_tokens == 3
    assert "".join(pieces) == rt.chat(MESSAGES, max_new_tokens=3)

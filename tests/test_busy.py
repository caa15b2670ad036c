"""A busy machine (issue #17): the thread policy (edgeqlora.threads), plain progress lines off a
terminal (edgeqlora.progress), the untrained base's evaluation kept across runs
(edgeqlora.eval_cache), the evaluation's stop rule, the quickstart's stage-time rows."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from edgeqlora import threads
from edgeqlora.errors import InputError
from edgeqlora.progress import Ticker, clock


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch):
    monkeypatch.delenv("EDGEQLORA_THREADS", raising=False)
    threads.reset()
    yield
    threads.reset()


def _fake_machine(monkeypatch, cores: int):
    monkeypatch.setattr(threads, "_allowed", lambda: set(range(cores)))
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)


def _sampler(others_per_s: float, own_per_s: float = 0.0):
    """Snapshots of a machine where other processes use ``others_per_s`` cores."""
    t0 = time.monotonic()

    def sample():
        span = time.monotonic() - t0
        return threads._Snapshot(time.monotonic(), span * (others_per_s + own_per_s),
                                 span * own_per_s)
    return sample


@pytest.mark.parametrize("cores,others,own,free", [
    (2, 0.0, 0.0, 2), (2, 1.0, 0.0, 1), (2, 1.0, 1.0, 1), (2, 2.0, 0.0, 1), (2, 0.2, 1.8, 2),
    (8, 3.0, 2.0, 5), (8, 0.5, 0.0, 8), (1, 1.0, 0.0, 1),
])
def test_free_cores_count_what_other_processes_use(monkeypatch, cores, others, own, free):
    """A core counts as taken when others use more than 70 % of one; this process's own CPU
    time (its threads spinning on both cores) is not "others"."""
    _fake_machine(monkeypatch, cores)
    sample = _sampler(others, own)
    threads._state["last"] = sample()
    time.sleep(threads.WINDOW_S)
    assert threads.free_cores(sample) == free


def test_others_busy_subtracts_this_process():
    a = threads._Snapshot(0.0, 100.0, 10.0)
    b = threads._Snapshot(2.0, 104.0, 12.0)  # 4 core-seconds busy, 2 of them ours, over 2 s
    assert threads.others_busy(a, b) == pytest.approx(1.0)
    assert threads.others_busy(a, threads._Snapshot(2.0, None, 12.0)) == 0.0


def test_overrides_win_and_bad_ones_are_one_line_errors(monkeypatch):
    _fake_machine(monkeypatch, 2)
    monkeypatch.setenv("EDGEQLORA_THREADS", "3")
    assert threads.torch_threads() == threads.runtime_threads() == threads.free_cores() == 3
    threads.set_override(1)  # --threads beats the environment
    assert threads.torch_threads() == threads.runtime_threads() == 1
    with pytest.raises(InputError, match="--threads 0"):
        threads.set_override(0)
    threads.set_override(None)
    monkeypatch.setenv("EDGEQLORA_THREADS", "many")
    with pytest.raises(InputError, match="EDGEQLORA_THREADS='many'"):
        threads.torch_threads()


def test_runtimes_never_take_the_last_core(monkeypatch):
    from edgeqlora.runtimes.base import default_threads

    _fake_machine(monkeypatch, 4)
    monkeypatch.setattr(threads, "free_cores", lambda sample=None: 4)
    assert default_threads() == 3
    monkeypatch.setattr(threads, "free_cores", lambda sample=None: 2)
    assert default_threads() == 2
    _fake_machine(monkeypatch, 1)
    monkeypatch.setattr(threads, "free_cores", lambda sample=None: 1)
    assert default_threads() == 1


def test_omp_num_threads_caps_torch(monkeypatch):
    _fake_machine(monkeypatch, 8)
    monkeypatch.setattr(threads, "free_cores", lambda sample=None: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.torch_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.torch_threads() == 8


def test_cgroup_quota_caps_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "_allowed", lambda: set(range(8)))
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 2.0)
    assert threads.available() == 2
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 0.3)
    assert threads.available() == 1


def test_adapt_sets_torch_prints_once_then_each_change(monkeypatch):
    import torch

    before = torch.get_num_threads()
    lines: list[str] = []
    counts = iter([2, 2, 1, 1])
    monkeypatch.setattr(threads, "torch_threads", lambda: next(counts))
    monkeypatch.setattr(threads, "RECHECK_S", 0.0)
    try:
        assert threads.adapt(lines.append, force=True) == 2
        assert torch.get_num_threads() == 2
        threads.adapt(lines.append)
        assert threads.adapt(lines.append) == 1 and torch.get_num_threads() == 1
        threads.adapt(lines.append)
    finally:
        torch.set_num_threads(before)
    assert len(lines) == 2, lines
    assert lines[0].startswith("threads: ")
    assert lines[1] == "threads: torch 2 -> 1 (another process took a core)"
    assert threads.summary()["changes"] == 1


def test_adapt_waits_between_looks(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(threads, "torch_threads", lambda: calls.append(1) or
                        torch.get_num_threads())
    threads.adapt(lambda line: None, force=True)
    for _ in range(50):
        threads.adapt(lambda line: None)
    assert len(calls) == 1  # RECHECK_S (5 s) has not passed


def test_a_busy_core_is_seen(monkeypatch):
    """The real /proc/stat: a process spinning on a core makes it not free."""
    if threads.available() < 2 or threads._proc_stat_busy() is None:
        pytest.skip("needs Linux and two cores")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        threads._state["last"] = threads._snapshot()
        time.sleep(1.0)
        assert threads.free_cores() <= threads.available() - 1
    finally:
        spin.kill()
        spin.wait()


def test_ticker_prints_at_most_every_interval_and_the_end():
    lines: list[str] = []
    t = Ticker("train", 10, "step", enabled=True, every=3600, out=lines.append)
    t.every = 0.0
    assert t.update(1, loss=1.23456, tok_s=1234.5).startswith("train: step 1/10 (10%), "
                                                               "loss 1.235, 1,234 tok/s, ")
    assert "ETA" in lines[0]
    t.every = 3600
    assert t.update(5) is None  # not due
    assert "ETA" not in t.update(10)  # the last one always prints
    assert len(lines) == 2
    assert Ticker("x", 3, enabled=False, out=lines.append).update(3) is None
    assert clock(59.6) == "1:00" and clock(3725) == "1:02:05"


def test_bad_progress_interval_is_one_line(monkeypatch):
    from edgeqlora.progress import every_s

    monkeypatch.setenv("EDGEQLORA_PROGRESS_S", "often")
    with pytest.raises(InputError, match="EDGEQLORA_PROGRESS_S"):
        every_s()


class _Tok:
    """Character-level stand-in for a tokenizer: token i is chr(i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


@pytest.mark.parametrize("text,stops_at", [
    ('{"a": 1} and then more', 8),
    ('Sure: {"device": "lamp", "x": {"y": 2}} ok', 39),
    ('{"a": {"b": 1}', None),  # the first { has not closed: an inner object is not the answer
    ("no json here }", None),
])
def test_the_stop_rule_fires_once_the_first_object_closes(text, stops_at):
    import torch

    from edgeqlora.evaluate import _Scored
    from edgeqlora.tasks.iot_score import parse_action

    prompt = [ord("p")] * 3
    ids = prompt + [ord(c) for c in text]
    rule = _Scored(_Tok(), len(prompt), 1)
    stopped = None
    for n in range(len(prompt) + 1, len(ids) + 1):
        if bool(rule(torch.tensor([ids[:n]]), None)[0]):
            stopped = n - len(prompt)
            break
    assert stopped == stops_at
    if stopped is not None:  # what the score reads is the same as from the whole answer
        assert parse_action(text[:stopped]) == parse_action(text)


def test_stage_time_rows_in_order():
    from edgeqlora.quickstart import stage_times

    rows = stage_times({"train_s": 300.0, "base_eval_s": 40.0, "train_steps_s": 200.0,
                        "final_eval_s": 30.0, "export_gguf-q8_0_s": 50.0, "parity_s": 90.0})
    assert [r[0] for r in rows] == ["training stage", "  base evaluation (untrained)",
                                    "  training steps", "  final evaluation",
                                    "export gguf-q8_0", "parity"]


def test_base_eval_is_kept_across_runs_and_keyed(tiny_model_dir, tmp_path, monkeypatch,
                                                 capsys):
    """A second run on the same base and data reads the untrained base's figures from the
    cache (and says so); another held-out set or max_new_tokens is a new key."""
    from edgeqlora import train as train_mod
    from edgeqlora.config import build_config
    from edgeqlora.tasks import iot

    monkeypatch.setenv("EDGEQLORA_EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEQLORA_PROGRESS_S", "0")  # every step and batch, off a terminal
    train_rows, eval_rows = iot.generate(seed=0, n_train=24, n_eval=6)
    data = iot.write_jsonl(train_rows, tmp_path / "train.jsonl")
    held = iot.write_jsonl(eval_rows, tmp_path / "eval.jsonl")
    held2 = iot.write_jsonl(eval_rows[:4], tmp_path / "eval2.jsonl")

    def run(name, **extra):
        values = {"base": str(tiny_model_dir), "data": str(data), "eval_data": str(held),
                  "max_steps": 1, "batch_size": 4, "max_len": 160, "save_every": 0,
                  "quant_report_tokens": 0, "max_new_tokens": 6, "lora.r": 4,
                  "eval_examples": 6, **extra}
        train_mod.train(build_config(values), tmp_path / name)
        records = [json.loads(line) for line in
                   (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in records if r["kind"] == "eval" and r["step"] == 0)

    first = run("a")
    assert not first.get("cached")
    err = capsys.readouterr().err
    assert "train: step 1/1 (100%), loss " in err and "tok/s" in err
    assert "eval @ step 0: answers 6/6 (100%)" in err
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    capsys.readouterr()
    second = run("b")
    assert second["cached"] is True and second["eval_time_s"] == 0.0
    assert "kept from an earlier run" in capsys.readouterr().out
    for key in ("eval_loss", "exact_match", "parse_rate", "field_accuracy"):
        assert second[key] == first[key]
    assert not run("c", eval_data=str(held2)).get("cached")
    assert not run("d", max_new_tokens=5).get("cached")
    for entry in (tmp_path / "cache").glob("*.json"):
        entry.write_text("{not json")  # damaged: evaluated again, and kept anew
    assert not run("e").get("cached")
    assert run("f").get("cached")
    monkeypatch.setenv("EDGEQLORA_EVAL_CACHE", "0")
    assert not run("g").get("cached")


def test_static_gives_the_counts_from_before_the_policy(monkeypatch):
    _fake_machine(monkeypatch, 4)
    monkeypatch.setattr(threads, "others_busy", lambda a, b: 3.0)  # a very busy machine
    monkeypatch.setenv("EDGEQLORA_THREADS", "static")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.free_cores() == threads.torch_threads() == 4
    assert threads.runtime_threads() == 3
    monkeypatch.delenv("EDGEQLORA_THREADS")
    assert threads.free_cores() == threads.torch_threads() == 1


def test_parity_progress_in_a_log_is_a_line_per_phase_and_interval(monkeypatch, capsys):
    from edgeqlora.parity import _progress_printer

    monkeypatch.setenv("EDGEQLORA_PROGRESS_S", "3600")
    say = _progress_printer(True)
    for name in ("a", "b"):
        for i in range(1, 4):
            say(f"greedy answers: {name} {i}/3")
    assert capsys.readouterr().err.splitlines() == [
        "parity: greedy answers: a 1/3", "parity: greedy answers: a 3/3",
        "parity: greedy answers: b 1/3", "parity: greedy answers: b 3/3"]


def test_an_export_in_a_log_shows_where_its_parity_gate_is(tiny_model_dir, tmp_path,
                                                          monkeypatch, capsys):
    """``edgeqlora export > log``: the gate (minutes on 200 held-out commands) prints its
    phases and counts off a terminal; it printed nothing before."""
    pytest.importorskip("llama_cpp")
    from lora_fixtures import make_adapter

    from edgeqlora.cli import main

    monkeypatch.setenv("EDGEQLORA_PROGRESS_S", "3600")  # phases and last counts only
    adapter = make_adapter(tmp_path / "adapter", tiny_model_dir)
    rc = main(["export", str(adapter), "export.eval_tokens=64", "parity.eval_examples=2",
               "parity.text_tokens=48", "max_new_tokens=4", "parity.max_kld=10",
               "parity.min_top1=0", "parity.max_ppl_ratio=100",
               "parity.min_exact_match_ratio=0", "--min-top1", "0", "--max-kld", "10",
               "--quant", "q8_0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("parity: ")]
    # From the measuring on (a failure while loading stays one line: test_hostile_inputs).
    assert lines[0] == "parity: logits: task 1/2", lines
    # The gate runs in the atomic write's hidden work directory; it is named for --out.
    assert "parity: logits: task 2/2" in lines and "parity: greedy answers: out 2/2" in lines, \
        lines
    assert len(lines) < 12, lines  # one a phase and its last count, not one an example


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_non_finite_or_negative_progress_interval_is_refused(monkeypatch, value):
    from edgeqlora.progress import every_s

    monkeypatch.setenv("EDGEQLORA_PROGRESS_S", value)
    with pytest.raises(InputError, match="EDGEQLORA_PROGRESS_S"):
        every_s()


@pytest.mark.parametrize("argv,needle", [
    (["train", "--threads", "0", "max_steps=1"], "--threads 0 must be >= 1"),
    (["export", "no-such-adapter", "--out", "x", "--threads", "-2"], "--threads -2 must be >= 1"),
])
def test_bad_threads_on_the_command_line_is_one_line(argv, needle, capsys, tmp_path,
                                                     monkeypatch):
    from edgeqlora.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not any(tmp_path.iterdir())  # nothing written

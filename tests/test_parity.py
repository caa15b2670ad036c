"""The parity gate: metric functions against torch, the gate logic, the report files, the CLI,
and (slow) the real thing: trained NF4 + adapter in torch vs its GGUF export and a damaged one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeqlora import metrics as PM
from edgeqlora import parity as P
from edgeqlora.artifacts import write_manifest
from edgeqlora.errors import InputError, ParityError

# Metric functions vs torch (an independent implementation). Tolerance: float64 numpy vs
# float64 torch, differences only from summation order, so 1e-10.


def _random_logits(seed: int, n: int = 7, vocab: int = 50, scale: float = 5.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, scale, size=(n, vocab))
    x[0, 3] = 80.0  # a very peaked row: exp() overflows without the max shift
    x[1] = 0.0      # a flat row
    return x


def test_metric_functions_match_torch():
    import torch
    import torch.nn.functional as F

    ref, cand = _random_logits(0), _random_logits(1)
    targets = np.random.default_rng(2).integers(0, ref.shape[1], size=ref.shape[0])
    tr, tc = torch.tensor(ref, dtype=torch.float64), torch.tensor(cand, dtype=torch.float64)
    assert np.allclose(PM.log_softmax(ref), F.log_softmax(tr, -1).numpy(), atol=1e-10)
    expected_kld = F.kl_div(F.log_softmax(tc, -1), F.log_softmax(tr, -1), log_target=True,
                            reduction="none").sum(-1).numpy()
    assert np.allclose(PM.kl_divergence(ref, cand), expected_kld, atol=1e-10)
    assert PM.top1_agreement(ref, cand) == pytest.approx(
        float((tr.argmax(-1) == tc.argmax(-1)).double().mean()))
    ce = F.cross_entropy(tc, torch.tensor(targets), reduction="none").numpy()
    assert np.allclose(PM.nll(cand, targets), ce, atol=1e-10)
    assert PM.perplexity(cand, targets) == pytest.approx(float(np.exp(ce.mean())), rel=1e-10)


def test_metric_properties_and_shapes():
    x = _random_logits(3)
    assert np.all(PM.kl_divergence(x, x) == 0.0)
    assert PM.kl_divergence(x, x + 3.0).max() < 1e-12  # shift-invariant
    assert PM.top1_agreement(x, x) == 1.0
    uniform = np.zeros((4, 10))
    assert PM.perplexity(uniform, [1, 2, 3, 4]) == pytest.approx(10.0)
    assert PM.kl_divergence(x[0], x[0] * 2).shape == (1,)  # a single row works too
    with pytest.raises(InputError, match="differ in shape"):
        PM.kl_divergence(x, x[:, :-1])
    with pytest.raises(InputError, match="targets"):
        PM.nll(x, [0, 1])
    s = PM.summarize(np.arange(101, dtype=float), np.ones(101, bool), np.zeros(5), np.ones(5))
    assert s["p99_kld"] == pytest.approx(99.0) and s["mean_kld"] == pytest.approx(50.0)
    assert s["ppl_ratio"] == pytest.approx(np.e)


# The gate with fake models: logits are a fixed function of the token ids.

VOCAB = 64


def _base_logits(ids) -> np.ndarray:
    rows = [np.random.default_rng(1000 + 31 * i + t).normal(0, 4, VOCAB)
            for i, t in enumerate(ids)]
    return np.stack(rows).astype(np.float32)


class FakeModel:
    """Both sides of the interface: a Reference (tokenize/chat_ids/logits/greedy) and a runtime
    (chat/info/close). ``noise`` perturbs logits, ``template`` changes the prompt tokens."""

    name = "fake"

    def __init__(self, noise: float = 0.0, template: str = "<{role}>{content}\n",
                 answer: str = '{"device":"light"}'):
        self.noise, self.template, self.answer = noise, template, answer

    def tokenize(self, text):
        return [ord(c) % VOCAB for c in text]

    def chat_ids(self, messages, add_generation_prompt=True):
        text = "".join(self.template.format(**m) for m in messages)
        return self.tokenize(text + ("<assistant>" if add_generation_prompt else ""))

    def logits(self, ids):
        base = _base_logits(ids)
        if self.noise:
            rng = np.random.default_rng(len(ids))
            base = base + rng.normal(0, self.noise, base.shape).astype(np.float32)
        return base

    def greedy(self, conversations, max_new_tokens):
        return [self.chat(c, max_new_tokens) for c in conversations]

    def chat(self, messages, max_new_tokens=64, temperature=0.0):
        return self.answer

    def info(self):
        return {"runtime": "fake"}

    def close(self):
        pass


def _task(n=4) -> P.TaskSet:
    convs = [[{"role": "system", "content": "sys"}, {"role": "user", "content": f"cmd {i}"},
              {"role": "assistant", "content": '{"device":"light"}'}] for i in range(n)]
    return P.TaskSet(convs, targets=[{"device": "light"}] * n, source="test")


def test_distinct_positions_count_a_shared_prompt_once():
    seqs = [[5, 6, 7, 1], [5, 6, 7, 2, 3], [5, 6, 7, 1], [9, 6]]
    masks = PM.distinct_positions(seqs)
    assert [m.tolist() for m in masks] == [[True] * 4, [False] * 3 + [True] * 2,
                                           [False] * 4, [True, True]]
    # The accumulator drops the repeated contexts from every metric.
    rng = np.random.default_rng(0)
    acc = P._Acc()
    for ids, keep in zip(seqs, masks):
        logits = rng.normal(size=(len(ids), 16))
        acc.add(logits, logits, ids, keep)
    assert acc.summary()["tokens"] == 8


def test_compare_and_gate_pass_identical_and_fail_damaged():
    ref = FakeModel()
    cands = {"same": FakeModel(), "noisy": FakeModel(noise=6.0),
             "wrong-template": FakeModel(template="[{role}] {content}\n"),
             "bad-answers": FakeModel(answer="no json")}
    text = [ref.tokenize("some general english text " * 3)]
    report = P.compare(ref, cands, _task(), text, max_new_tokens=8)
    th = P.thresholds_from({"max_kld": 0.5, "min_top1": 0.8, "max_ppl_ratio": 1.25,
                            "min_exact_match_ratio": 0.9})
    failures = P.gate(report, th)
    same = report["candidates"]["same"]
    assert same["all"]["mean_kld"] == 0 and same["all"]["top1"] == 1.0
    assert same["all"]["ppl_ratio"] == pytest.approx(1.0)
    assert same["task"]["exact_match"] == 1.0 and same["task"]["identical_answers"] == 4
    assert report["reference"]["task"]["exact_match"] == 1.0
    assert failures["same"] == []
    noisy = " ".join(failures["noisy"])
    assert "mean KLD" in noisy and "top-1" in noisy and "perplexity ratio" in noisy
    assert any("prompt tokens differ" in f for f in failures["wrong-template"])
    assert any("exact match" in f for f in failures["bad-answers"])
    assert report["candidates"]["bad-answers"]["task"]["identical_answers"] == 0
    # The task and text sets are reported separately and together.
    tok = report["candidates"]["noisy"]
    assert tok["all"]["tokens"] == tok["task"]["tokens"] + tok["text"]["tokens"]


def test_thresholds_come_from_the_config():
    from edgeqlora.config import load_config

    cfg = load_config(None, ["parity.max_kld=0.1", "parity.min_top1=0.95"])
    th = P.thresholds_from(cfg.parity)
    assert th["max_kld"] == 0.1 and th["min_top1"] == 0.95 and "max_ppl_ratio" in th


def test_english_text_ships_and_is_long_enough():
    text = P.ENGLISH_TEXT.read_text(encoding="utf-8")
    assert len(text) > 5000 and text.isascii()
    seqs = P.english_sequences(lambda t: list(range(len(t.split()))), 1100)
    assert sum(map(len, seqs)) == 1100 and max(map(len, seqs)) <= P.TEXT_CHUNK


# run_parity end to end with a real candidate runtime (a GGUF of the tiny model, through
# llama.cpp) and a reference that is the same GGUF (exact) or the same with noise (must fail).


class RuntimeReference:
    def __init__(self, rt, noise: float = 0.0):
        self.rt, self.noise = rt, noise

    def tokenize(self, text):
        return self.rt.tokenize(text)

    def chat_ids(self, messages, add_generation_prompt):
        return self.rt.chat_ids(messages, add_generation_prompt=add_generation_prompt)

    def logits(self, ids):
        out = self.rt.logits(ids)
        if self.noise:
            out = out + np.random.default_rng(0).normal(0, self.noise, out.shape)
        return out

    def greedy(self, conversations, max_new_tokens):
        return [self.rt.chat(c, max_new_tokens=max_new_tokens) for c in conversations]


@pytest.fixture(scope="module")
def candidate_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model as one GGUF file (tokenizer and chat template in its metadata): the
    parity machinery's candidate, 20x quicker to run than the real 135M model."""
    pytest.importorskip("llama_cpp")
    from edgeqlora.exporters.gguf import write_model_gguf

    path = tmp_path_factory.mktemp("parity-candidate") / "tiny.q8_0.gguf"
    write_model_gguf(tiny_model_dir, path, "q8_0")
    return path


@pytest.fixture(scope="module")
def candidate_runtime(candidate_gguf):
    from edgeqlora import runtimes

    with runtimes.load(candidate_gguf, n_ctx=1024) as rt:
        yield rt


@pytest.fixture
def fake_adapter(tmp_path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    write_manifest(d, "adapter", {"data": {"spec": "embedded:iot"}, "base": {}})
    return d


def test_run_parity_writes_reports_and_gates(tmp_path, fake_adapter, candidate_runtime,
                                             candidate_gguf):
    from edgeqlora.config import ParityConfig

    kw = dict(examples=1, text_tokens=32, max_new_tokens=4, progress=False)
    out = tmp_path / "ok"
    report = P.run_parity(fake_adapter, [candidate_gguf], out, ParityConfig(),
                          reference_model=RuntimeReference(candidate_runtime), **kw)
    assert report["passed"]
    name = candidate_gguf.stem
    c = report["candidates"][name]
    assert c["all"]["mean_kld"] < 1e-6 and c["all"]["top1"] == 1.0
    assert c["task"]["identical_answers"] == 1 and c["task"]["prompt_token_mismatches"] == 0
    assert c["text"]["tokens"] == 32
    saved = json.loads((out / "parity.json").read_text())
    assert saved["passed"] is True and saved["thresholds"]["max_kld"] == 0.5
    assert "| " + name + " |" in (out / "parity.md").read_text()
    assert (out / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = tmp_path / "bad"
    with pytest.raises(ParityError, match=f"{name}: .*top-1 agreement"):
        P.run_parity(fake_adapter, [candidate_gguf], bad, ParityConfig(),
                     reference_model=RuntimeReference(candidate_runtime, noise=8.0), **kw)
    # The report of a failing gate is still written, saying so.
    assert json.loads((bad / "parity.json").read_text())["passed"] is False
    assert "FAIL" in (bad / "parity.md").read_text()

    # NaN logits fail the gate, and the report stays strict JSON ("NaN" strings, no bare NaN).
    nan = tmp_path / "nan"
    with pytest.raises(ParityError):
        P.run_parity(fake_adapter, [candidate_gguf], nan, ParityConfig(),
                     reference_model=RuntimeReference(candidate_runtime, noise=float("nan")),
                     **kw)

    def refuse(token):
        raise ValueError(f"bare {token} in parity.json")

    saved = json.loads((nan / "parity.json").read_text(), parse_constant=refuse)
    assert saved["passed"] is False
    assert saved["candidates"][name]["all"]["mean_kld"] == "NaN"

    with pytest.raises(InputError, match="already exists"):
        P.run_parity(fake_adapter, [candidate_gguf], out, ParityConfig(),
                     reference_model=RuntimeReference(candidate_runtime), **kw)


def test_run_parity_bad_inputs(tmp_path, fake_adapter):
    from edgeqlora.errors import ManifestError

    with pytest.raises(InputError, match="at least one"):
        P.run_parity(fake_adapter, [], tmp_path / "o")
    with pytest.raises(InputError, match="examples"):
        P.run_parity(fake_adapter, ["x"], tmp_path / "o", examples=0)
    with pytest.raises(ManifestError, match="expected 'adapter'"):
        export = tmp_path / "export"
        export.mkdir()
        write_manifest(export, "export", {"target": "gguf"})
        P.run_parity(export, ["x"], tmp_path / "o")
    with pytest.raises(InputError, match="does not exist"):
        P.run_parity(fake_adapter, [tmp_path / "missing"], tmp_path / "o",
                     reference_model=FakeModel())
    assert not (tmp_path / "o").exists()


def test_cli_parity_exit_codes(tmp_path, fake_adapter, candidate_runtime, candidate_gguf,
                              monkeypatch, capsys):
    from edgeqlora.cli import main

    monkeypatch.setattr(P, "TorchReference", lambda adapter: RuntimeReference(candidate_runtime))
    args = ["parity", "--reference", str(fake_adapter), "--candidate", str(candidate_gguf),
            "--examples", "1", "--text-tokens", "32", "--max-new-tokens", "4"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "parity passed" in capsys.readouterr().out
    # parity.min_top1=1.01 cannot be met: exit 1 naming the metric, report still printed.
    assert main(args + ["--out", str(tmp_path / "b"), "parity.min_top1=1.01"]) == 1
    captured = capsys.readouterr()
    assert "top-1 agreement" in captured.err and "FAIL" in captured.out
    assert main(args + ["--out", str(tmp_path / "c"), "parity.min_topp=1"]) == 2
    assert "parity.min_top1" in capsys.readouterr().err


# Slow: the real reference (NF4 base + adapter in torch) against a real GGUF export of it, and a
# damaged candidate (another model's weights under the same tokenizer) that the gate rejects.


@pytest.mark.slow
def test_parity_real_reference_vs_gguf_export(tmp_path, tiny_model_dir, tokenizer_dir):
    pytest.importorskip("llama_cpp")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tiny_model
    from lora_fixtures import make_adapter

    from edgeqlora.exporters.gguf import write_model_gguf
    from edgeqlora.export import export_adapter

    adapter = make_adapter(tmp_path / "adapter", tiny_model_dir)
    good = tmp_path / "export-q8_0"
    export_adapter(adapter, good, target="gguf", quant="q8_0")
    other = build_tiny_model(tmp_path / "other-base", tokenizer_dir, seed=7)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    write_model_gguf(other, damaged / "model.f16.gguf", "f16")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (good / name).exists():
            shutil.copy(good / name, damaged / name)
    write_manifest(damaged, "export", {"target": "gguf"})

    with pytest.raises(ParityError, match="damaged: .*top-1") as err:
        P.run_parity(adapter, [good, damaged], tmp_path / "parity", examples=3,
                     text_tokens=128, max_new_tokens=8, progress=False)
    assert "export-q8_0" not in str(err.value)
    report = json.loads((tmp_path / "parity" / "parity.json").read_text())
    q8 = report["candidates"]["export-q8_0"]
    assert report["failures"]["export-q8_0"] == []
    assert q8["all"]["mean_kld"] < 0.05 and q8["all"]["top1"] > 0.9
    assert q8["task"]["prompt_token_mismatches"] == 0


def test_the_parity_task_set_is_the_trainers_eval_sample():
    """The trainer scores a fixed sample of the held-out split, and the parity gate's reference
    scores the same commands: before, the gate took the first rows, so the quickstart's two
    exact-match figures of the same model (80 % and 75 %) were of different commands. On the
    device-aware quickstart adapter both now read 77.5 %."""
    from edgeqlora.config import build_config
    from edgeqlora.evaluate import prompt_messages
    from edgeqlora.heldout import heldout_conversations
    from edgeqlora.parity import task_set
    from edgeqlora.train import _eval_rows

    cfg = build_config({"data": "embedded:iot", "eval_examples": 40})
    manifest = {"data": {"spec": "embedded:iot"}, "config": {"data": "embedded:iot"}}
    trainer = [prompt_messages(r) for r in _eval_rows(cfg)]
    assert len(trainer) == 40 and task_set(manifest, 40).prompts == trainer
    first = [c[:-1] for c in heldout_conversations(manifest, 40)]
    assert first != trainer  # a spread sample, not the first rows


def _report(task: dict, text: dict) -> dict:
    base = {"tokens": 100, "mean_kld": 0.01, "p99_kld": 0.05, "top1": 0.99, "ppl_ratio": 1.0}
    return {"reference": {"task": {"exact_match": 0.8}},
            "candidates": {"c": {"task": {**base, **task, "exact_match": 0.8, "examples": 40,
                                          "prompt_token_mismatches": 0},
                                 "text": {**base, **text},
                                 "all": {**base}}}}


@pytest.mark.parametrize("text, why", [
    ({"top1": 0.46, "mean_kld": 1.10}, "text mean KLD 1.1000 > max_kld"),  # lost language
    ({"p99_kld": 3.0}, "text p99 KLD 3.0000 > max_p99_kld"),  # a tail the mean hides
    ({"mean_kld": float("nan")}, "text mean KLD nan"),  # fails closed
    ({"ppl_ratio": float("nan")}, "text perplexity ratio nan"),
])
def test_each_set_is_judged_on_its_own(text, why):
    """The task set passing (and the pooled figures, which the old gate judged, passing) does
    not carry a failing general-text set; NaN fails."""
    from edgeqlora.config import ParityConfig
    from edgeqlora.parity import gate, thresholds_from

    th = thresholds_from(ParityConfig())
    assert gate(_report({}, {}), th) == {"c": []}
    failures = gate(_report({}, text), th)["c"]
    assert failures and failures[0].startswith(why), failures

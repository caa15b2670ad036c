"""The QLoRA recipe (edgeqlora.train) on a tiny random Llama: outputs, exact resume, Ctrl-C,
non-finite loss, eval not breaking training, data parallel on 2 CPU processes, bad input via the
CLI. One slow test trains the real embedded model briefly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeqlora import train as train_mod
from edgeqlora.cli import main
from edgeqlora.config import build_config
from edgeqlora.errors import ConfigError, InputError, TrainingError
from edgeqlora.tasks import iot


@pytest.fixture(scope="module")
def iot_files(tmp_path_factory):
    """A small slice of the embedded task as JSONL (train, held-out): tokenizing 2,000 rows per
    run would dominate these tests."""
    d = tmp_path_factory.mktemp("iot")
    train_rows, eval_rows = iot.generate(seed=0, n_train=48, n_eval=8)
    return (iot.write_jsonl(train_rows, d / "train.jsonl"),
            iot.write_jsonl(eval_rows, d / "eval.jsonl"))


def _cfg(base, data, **overrides):
    values = {"base": str(base), "data": str(data), "max_steps": 2, "batch_size": 4,
              "lr": 2e-3, "warmup_steps": 1, "max_len": 160, "save_every": 0,
              "eval_examples": 0, "quant_report_tokens": 0, "max_new_tokens": 8,
              "lora.r": 4, "lora.dropout": 0.0}
    values.update(overrides)
    return build_config(values)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def _adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_shared_prefix_training_matches_plain_packing(tiny_model_dir, iot_files, tmp_path):
    """Packing the system prompt once per row changes how much is computed, not the training:
    the same loss curve as plain packing (no dropout, so both draw no random numbers).
    Tolerance: fp32 sums in another order, ~1e-6 relative per step, compounding over 3 steps."""
    a = train_mod.train(_cfg(tiny_model_dir, iot_files[0], max_steps=3), tmp_path / "shared")
    b = train_mod.train(_cfg(tiny_model_dir, iot_files[0], max_steps=3, share_prefix=False),
                        tmp_path / "plain")
    assert _losses(a.parent) == pytest.approx(_losses(b.parent), rel=1e-4)
    wa, wb = _adapter_weights(a.parent), _adapter_weights(b.parent)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_tensorboard_logs(tiny_model_dir, iot_files, tmp_path):
    """tensorboard=true writes event files holding the same losses as metrics.jsonl."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    adapter = train_mod.train(_cfg(tiny_model_dir, iot_files[0], tensorboard=True),
                              tmp_path / "run")
    events = EventAccumulator(str(adapter.parent / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("train/loss")]
    assert logged == pytest.approx(_losses(adapter.parent), rel=1e-6)


def test_train_outputs_and_reload(tiny_model_dir, iot_files, tmp_path, monkeypatch):
    """A run writes a PEFT adapter + manifest + metrics; load_trained gives the same logits as
    the trainer's in-memory model, and eval numbers appear before and after."""
    from edgeqlora.qlora import cpu_repacked_layers, load_trained

    captured = {}
    real_write = train_mod._write_adapter

    def capture(adapter, model, *args, **kwargs):
        captured["model"] = model
        return real_write(adapter, model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "_write_adapter", capture)
    schema = tmp_path / "answer.schema.json"
    schema.write_text(json.dumps(iot.json_schema()))
    cfg = _cfg(tiny_model_dir, iot_files[0], eval_data=str(iot_files[1]), eval_examples=4,
               eval_every=1, quant_report_tokens=64, save_every=1, keep_checkpoints=1,
               schema=str(schema))
    adapter = train_mod.train(cfg, tmp_path / "run")
    assert adapter == tmp_path / "run" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json",
            "schema.json"} <= {p.name for p in adapter.iterdir()}
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["schema"] == {"file": "schema.json", "source": str(schema.resolve())}
    assert json.loads((adapter / "schema.json").read_text()) == iot.json_schema()
    assert manifest["kind"] == "adapter"
    assert manifest["base"]["path"] == str(Path(tiny_model_dir).resolve())
    assert len(manifest["base"]["weights_sha256"]) == 64
    assert manifest["quant"] == {"quant": "nf4", "double_quant": True, "block_size": 64,
                                 "compute_dtype": "float32"}
    assert manifest["lora"]["r"] == 4 and "gate_proj" in manifest["lora"]["target_modules"]
    assert manifest["data"]["train_rows"] + sum(manifest["data"]["skipped"].values()) == 48
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(manifest["versions"])
    assert manifest["config"]["lora"]["r"] == 4
    metrics = manifest["metrics"]
    assert metrics["steps"] == 2 and metrics["tokens_per_s"] > 0
    assert 0 <= metrics["quantization"]["top1"] <= 1
    assert "exact_match" in metrics["eval_before"] and "exact_match" in metrics["eval_after"]
    # The final evaluation also reports the answers under the schema (2 steps and 8 new
    # tokens: noise, cut before any object closes, so every answer is decoded again).
    after_schema = metrics["eval_after"]["schema"]
    assert set(after_schema) == {"exact_match", "valid_json", "valid_json_unconstrained",
                                 "redecoded"}
    assert after_schema["redecoded"] == 4 and after_schema["valid_json_unconstrained"] == 0.0
    assert "schema" not in metrics["eval_before"]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 1, 2]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002"]

    ids = torch.tensor([[1, 504, 3020, 288, 5355, 253, 1010, 30, 2, 1003]])
    live = captured["model"].eval()
    with torch.no_grad():
        expected = live(ids).logits
    reloaded = load_trained(adapter)
    with torch.no_grad():
        got = reloaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not reloaded.training and cpu_repacked_layers(reloaded) == []


def test_training_after_eval_learns_the_same(tiny_model_dir, iot_files, tmp_path):
    """The bitsandbytes CPU repack trap, end to end: a run with a generate()-based eval before
    and between steps follows the same loss curve as a run without any eval."""
    common = dict(max_steps=4, lr=5e-3)
    train_mod.train(_cfg(tiny_model_dir, iot_files[0], **common), tmp_path / "plain")
    train_mod.train(_cfg(tiny_model_dir, iot_files[0], eval_data=str(iot_files[1]),
                         eval_examples=2, eval_every=1, **common), tmp_path / "evals")
    plain, evals = _losses(tmp_path / "plain"), _losses(tmp_path / "evals")
    assert plain[-1] < plain[0]  # it learns at all
    assert evals == pytest.approx(plain, rel=1e-5)


def test_sigterm_stops_after_the_step_with_a_checkpoint(tiny_model_dir, iot_files, tmp_path,
                                                        monkeypatch):
    """SIGTERM (a scheduler's stop) ends the run after the current step with a checkpoint, and
    resuming it gives the straight run's losses."""
    cfg = _cfg(tiny_model_dir, iot_files[0], max_steps=3)
    train_mod.train(cfg, tmp_path / "straight")

    def terminate(state):
        if state["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_mod, "_after_step", terminate)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, tmp_path / "stopped")
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is put back
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == ["step-000001"]
    monkeypatch.undo()
    train_mod.train(_cfg(tiny_model_dir, iot_files[0], max_steps=3, resume=True),
                    tmp_path / "stopped")
    assert _losses(tmp_path / "stopped") == pytest.approx(_losses(tmp_path / "straight"),
                                                          rel=1e-5)


def test_resume_is_exact_and_ctrl_c_checkpoints(tiny_model_dir, iot_files, tmp_path,
                                                monkeypatch):
    """N steps, Ctrl-C, resume N steps == 2N straight steps (dropout on: RNG is restored)."""
    cfg = _cfg(tiny_model_dir, iot_files[0], max_steps=4, batch_size=2, **{"lora.dropout": 0.1},
               packing=False)
    train_mod.train(cfg, tmp_path / "straight")

    def interrupt(state):
        if state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_after_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "checkpoints" / "step-000002" / "state.json").is_file()
    assert not (tmp_path / "resumed" / "adapter").exists()
    monkeypatch.undo()
    resumed_cfg = _cfg(tiny_model_dir, iot_files[0], max_steps=4, batch_size=2,
                       **{"lora.dropout": 0.1}, packing=False, resume=True)
    train_mod.train(resumed_cfg, tmp_path / "resumed")
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "straight"),
                                                          rel=1e-5)
    a, b = _adapter_weights(tmp_path / "straight"), _adapter_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)

    # Resuming with a config that changes what is trained is refused.
    with pytest.raises(ConfigError, match="lr"):
        train_mod.train(_cfg(tiny_model_dir, iot_files[0], max_steps=4, batch_size=2,
                             **{"lora.dropout": 0.1}, packing=False, resume=True, lr=1.0),
                        tmp_path / "resumed")


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny_model_dir, iot_files, tmp_path,
                                                    monkeypatch):
    from edgeqlora import qlora

    real = qlora.token_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan"), n) if calls["n"] == 3 else (loss, n)

    monkeypatch.setattr(qlora, "token_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="loss is nan at step 3.*step-000002"):
        train_mod.train(_cfg(tiny_model_dir, iot_files[0], max_steps=5, save_every=1), out)
    assert (out / "checkpoints" / "step-000002" / "trainable.safetensors").is_file()
    assert not (out / "checkpoints" / "step-000003").exists()
    assert not (out / "adapter").exists()


def test_out_dir_rules(tiny_model_dir, iot_files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="already holds a run.*overwrite=true"):
        train_mod.train(_cfg(tiny_model_dir, iot_files[0], max_steps=1), out)
    with pytest.raises(InputError, match="holds no checkpoint"):
        train_mod.train(_cfg(tiny_model_dir, iot_files[0], max_steps=1, resume=True), out)
    with pytest.raises(ConfigError, match="contradict"):
        train_mod.train(_cfg(tiny_model_dir, iot_files[0], max_steps=1, resume=True,
                             overwrite=True), out)
    train_mod.train(_cfg(tiny_model_dir, iot_files[0], max_steps=1, overwrite=True), out)
    assert (out / "adapter" / "manifest.json").is_file()
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own entries are replaced


def test_data_parallel_two_processes_match_one(tiny_model_dir, iot_files, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) with the same global batch follows the same
    loss curve as one process. Tolerance: fp32 sums in another order (per-process packing and a
    gradient all-reduce) -> 1e-4 relative."""
    overrides = {"base": str(tiny_model_dir), "data": str(iot_files[0]), "max_steps": 3,
                 "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "max_len": 160,
                 "save_every": 0, "eval_examples": 0, "quant_report_tokens": 0, "lora.r": 4,
                 "lora.dropout": 0.0}
    train_mod.train(build_config(overrides), tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edgeqlora", "train",
           *[f"{k}={v}" for k, v in overrides.items()], "--out", str(tmp_path / "two")]
    # Own process group: on a timeout the workers go too, not just the launcher.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(two) == 3
    assert two == pytest.approx(one, rel=1e-4)
    manifest = json.loads((tmp_path / "two" / "adapter" / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2


def _cli_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_bad_inputs(tiny_model_dir, iot_files, tmp_path, capsys):
    base = [f"base={tiny_model_dir}", "max_steps=1", "batch_size=2", "eval_examples=0",
            "quant_report_tokens=0"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_assistant = tmp_path / "no_assistant.jsonl"
    no_assistant.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "metrics.jsonl").write_text("{}\n")

    assert "has no rows" in _cli_error(
        capsys, ["train", *base, f"data={empty}", "--out", str(tmp_path / "a")])
    assert "no_assistant_turn" in _cli_error(
        capsys, ["train", *base, f"data={no_assistant}", "--out", str(tmp_path / "b")])
    err = _cli_error(capsys, ["train", *base, f"data={iot_files[0]}", "lora.target=qkv_proj",
                              "--out", str(tmp_path / "c")])
    assert "qkv_proj" in err and "q_proj" in err
    assert "lora.r=0" in _cli_error(
        capsys, ["train", *base, f"data={iot_files[0]}", "lora.r=0", "--out", str(tmp_path / "d")])
    assert "already holds a run" in _cli_error(
        capsys, ["train", *base, f"data={iot_files[0]}", "--out", str(busy)])
    assert "/nonexistent" in _cli_error(
        capsys, ["train", "base=/nonexistent", "--out", str(tmp_path / "e")])
    assert "JSON schema" in _cli_error(
        capsys, ["train", *base, f"data={iot_files[0]}", f"schema={tmp_path / 'no.json'}",
                 "--out", str(tmp_path / "f")])
    # Nothing half-written by the refused runs.
    for name in "abcdef":
        assert not (tmp_path / name).exists()


@pytest.mark.slow
def test_embedded_model_learns_the_task(embedded_dir, tmp_path):
    """The real SmolLM2-135M on the embedded task: a short QLoRA run lowers the held-out loss
    and the training loss (exact match needs more steps than a test should take)."""
    cfg = build_config({"max_steps": 8, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
                        "eval_examples": 4, "max_new_tokens": 48, "save_every": 0,
                        "quant_report_tokens": 128})
    adapter = train_mod.train(cfg, tmp_path / "run")
    metrics = json.loads((adapter / "manifest.json").read_text())["metrics"]
    assert metrics["eval_after"]["eval_loss"] < 0.7 * metrics["eval_before"]["eval_loss"]
    losses = _losses(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert 0.5 < metrics["quantization"]["top1"] <= 1.0


def test_a_base_without_chat_template_is_one_line(tiny_model_dir, iot_files, tmp_path, capsys):
    import shutil

    base = tmp_path / "notemplate"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink()
    rc = main(["train", f"base={base}", f"data={iot_files[0]}", "max_steps=1",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no chat template" in err[0], err
    assert not (tmp_path / "run").exists()

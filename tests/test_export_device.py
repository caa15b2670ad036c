"""``edgeqlora export --device``: the quant is chosen for a device profile from footprints
predicted before anything is written, then the real export is verified, parity-gated and
fit-checked; losers are discarded, the decision and its reasons land in the manifest.

The model is a tiny untied Llama with a 256-wide hidden size, so K-quant rows divide into
256-value blocks and each quant has its own size (a 64-wide model falls back to the same
types for most quants)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_tiny_model, has_module
from lora_fixtures import make_adapter

pytestmark = pytest.mark.skipif(not has_module("llama_cpp"), reason="needs llama-cpp-python")

MiB = 2**20
# Small parity run with thresholds any faithful export meets (the tiny model is random, so the
# real thresholds are not the point here); verification loosened the same way.
LOOSE = ["export.eval_tokens=64", "parity.eval_examples=2", "parity.text_tokens=48",
         "max_new_tokens=8", "parity.max_kld=10", "parity.min_top1=0",
         "parity.max_ppl_ratio=100", "parity.min_exact_match_ratio=0",
         "--min-top1", "0", "--max-kld", "10", "--merge-base", "dequantized"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("device")
    base = build_tiny_model(root / "base", tokenizer_dir, hidden=256, intermediate=512,
                            tie=False)
    return {"root": root, "base": base, "adapter": make_adapter(root / "adapter", base)}


@pytest.fixture(scope="module")
def predicted(tiny):
    """Predicted resident bytes of each GGUF candidate on a 4 GB board at context 2048."""
    from edgeqlora.devices.fit import fit, predict_facts
    from edgeqlora.devices.profiles import parse_profile
    from edgeqlora.export_device import DEVICE_CANDIDATES
    from edgeqlora.merge import tensor_specs

    cfg = json.loads((tiny["base"] / "config.json").read_text())
    shapes = {name: shape for _, name, shape, _ in tensor_specs(tiny["base"])}
    board = parse_profile(_board_text(4096), "board.toml")
    return {q: fit(predict_facts(cfg, shapes, "gguf", q), board, 2048).total_bytes
            for q in DEVICE_CANDIDATES["gguf"]}


def _board_text(usable_mb: int, runtimes: str = '["gguf", "onnx"]') -> str:
    return f"""name = "test-board"
title = "a board for the tests"
[memory]
total_mb = 4096
usable_mb = {usable_mb}
bandwidth_gbs = 3.6
[cpu]
arch = "aarch64"
cores = 4
threads = 4
features = ["neon"]
[runtimes]
available = {runtimes}
"""


def _board(tmp_path: Path, usable_mb: int, **kw) -> Path:
    path = tmp_path / f"board-{usable_mb}.toml"
    path.write_text(_board_text(usable_mb, **kw))
    return path


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _last_line(capsys) -> str:
    # stderr also holds transformers' and llama.cpp's own output; the error is the last line.
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_prediction_follows_the_writer(tiny, predicted):
    """For the types this project writes itself, the predicted tensor types are the GGUF
    writer's own plan, tensor by tensor (the K-quant mixes are llama.cpp's; the tests below
    compare those with the written files). The candidates are ordered by precision and the
    prediction separates them by more than the board sizes below rely on."""
    from edgeqlora.devices.fit import predict_facts
    from edgeqlora.exporters import gguf as G
    from edgeqlora.merge import tensor_specs

    cfg = G.read_config(tiny["base"])
    shapes = {name: shape for _, name, shape, _ in tensor_specs(tiny["base"])}
    for quant in ("q8_0", "q4_0", "f16"):
        plan = {t["name"]: t["qtype"].name for t in G.plan_tensors(tiny["base"], cfg, quant)}
        facts = predict_facts(cfg, shapes, "gguf", quant)
        assert {t.name: t.type for t in facts.tensors} == plan, quant
    sizes = [predicted[q] for q in ("q8_0", "q6_k", "q5_k_m", "q4_k_m")]
    assert sizes == sorted(sizes, reverse=True)
    assert predicted["q8_0"] - predicted["q6_k"] > 2 * MiB


def _gate_failing(quants: dict[str, str], real: bool = False):
    """Stands in for the parity gate: fails the quants in ``quants`` with the given metric and
    passes the others (through the real gate when ``real``). The real gate cannot fail a
    higher-precision export while passing a lower one of the same model (its metrics are
    monotonic in precision), so the fall-back path is driven this way."""
    import edgeqlora.export as E

    real_gate = E._Gate.run

    def gate(self, export_dir, manifest, force):
        if real and manifest["quant"] not in quants:
            return real_gate(self, export_dir, manifest, force)
        failures = [quants[manifest["quant"]]] if manifest["quant"] in quants else []
        return E._rewrite_manifest(export_dir, manifest, parity={
            "passed": not failures, "failures": failures, "metrics": {}, "thresholds": {}})
    return gate


def test_picks_the_best_quant_that_fits_and_passes_the_gate(tiny, predicted, tmp_path,
                                                           monkeypatch, capsys):
    """On a board between q8_0's and q6_k's predicted footprint: q8_0 is not even exported;
    q6_k is, and fails the gate (forced, see ``_gate_failing``); q5_k_m fits, passes
    verification and the real parity gate, and is shipped with the reasons in its manifest."""
    import edgeqlora.export as E
    from edgeqlora.cli import main

    monkeypatch.setattr(E._Gate, "run", _gate_failing({"q6_k": "mean KLD 0.9 > max_kld 0.5"},
                                                  real=True))
    usable = int((predicted["q8_0"] + predicted["q6_k"]) / 2 / MiB)
    board = _board(tmp_path, usable)
    out = tmp_path / "out"
    rc = main(["export", str(tiny["adapter"]), *LOOSE, "--device", str(board),
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    m = json.loads((out / "manifest.json").read_text())
    assert m["quant"] == "q5_k_m"
    assert m["parity"]["passed"] is True and m["parity"]["metrics"]["all"]["tokens"] > 0
    dev = m["device"]
    assert dev["name"] == "test-board" and dev["context"] == 2048
    assert dev["usable_bytes"] == usable * MiB
    assert dev["verdict"] in ("fits", "tight") and dev["total_bytes"] <= usable * MiB
    # Predicted before export vs fitted on the written files: within 1 %.
    assert abs(dev["predicted_bytes"] / dev["total_bytes"] - 1) < 0.01
    assert [(t["quant"], t["outcome"]) for t in dev["tried"]] == [
        ("q8_0", "not exported"), ("q6_k", "failed the parity gate"), ("q5_k_m", "chosen")]
    assert dev["tried"][0]["why"] == (f"predicted {predicted['q8_0'] / MiB:.0f} MiB > "
                                      f"{usable} MiB usable")
    assert dev["tried"][1]["why"] == "mean KLD 0.9 > max_kld 0.5"
    assert dev["reason"].startswith("q5_k_m is the highest-precision gguf quant that fits")
    assert f"{usable} MiB usable at context 2048" in dev["reason"]
    assert "q8_0 not exported" in dev["reason"]
    assert "q6_k failed the parity gate (mean KLD 0.9 > max_kld 0.5)" in dev["reason"]
    # Only the chosen model was shipped; the attempt that lost left nothing behind.
    assert sorted(p.name for p in out.glob("*.gguf")) == ["model.q5_k_m.gguf"]
    assert not _leftovers(tmp_path, "out")
    assert dev["reason"] in captured.out and "test-board" in captured.out


def test_explicit_quant_that_does_not_fit_is_refused(tiny, predicted, tmp_path, capsys):
    from edgeqlora.cli import main

    usable = int((predicted["q8_0"] + predicted["q6_k"]) / 2 / MiB)
    out = tmp_path / "out"
    rc = main(["export", str(tiny["adapter"]), *LOOSE, "--device",
               str(_board(tmp_path, usable)), "--quant", "q8_0", "--out", str(out)])
    err = _last_line(capsys)
    assert rc == 2
    assert err.startswith("edgeqlora export: error: --quant q8_0 does not fit test-board")
    assert "q6_k is predicted to fit" in err
    assert not out.exists() and not _leftovers(tmp_path, "out")


def test_nothing_fits_names_the_smallest_footprint(tiny, predicted, tmp_path, capsys):
    from edgeqlora.cli import main

    out = tmp_path / "out"
    rc = main(["export", str(tiny["adapter"]), *LOOSE, "--device",
               str(_board(tmp_path, 64)), "--out", str(out)])
    err = _last_line(capsys)
    smallest = min(predicted, key=predicted.get)
    assert rc == 2
    assert err.startswith("edgeqlora export: error: no gguf quant fits test-board (64 MiB "
                          "usable) at context 2048: the smallest footprint is "
                          f"{smallest} at {predicted[smallest] / MiB:.0f} MiB")
    assert not out.exists() and not _leftovers(tmp_path, "out")


def test_device_errors_before_any_work(tiny, tmp_path, capsys):
    from edgeqlora.cli import main

    out = tmp_path / "out"
    args = ["export", str(tiny["adapter"]), "--out", str(out), "--device"]
    assert main([*args, "no-such-board"]) == 2
    err = _last_line(capsys)
    assert "unknown device 'no-such-board'" in err and "pi-zero-2w" in err
    assert main([*args, str(_board(tmp_path, 4096, runtimes='["onnx"]'))]) == 2
    assert "test-board has no gguf runtime (it has: onnx)" in _last_line(capsys)
    assert main([*args, "pi5", "--context", "8"]) == 2
    assert "context=8" in _last_line(capsys)
    assert main([*args[:-1], "--context", "512"]) == 2
    assert "--context sizes the memory for --device" in _last_line(capsys)
    assert not out.exists() and not _leftovers(tmp_path, "out")


def test_no_quant_passing_says_why_for_each(tiny, predicted, tmp_path, monkeypatch, capsys):
    """Every candidate loses: q8_0 is predicted to fit but its written files do not (the
    prediction is made wrong on purpose: the fit of the real files is the safety net, checked
    before the gate), q4_0 fits and fails the gate (forced). One line names both reasons, exit
    1 (a quality failure), nothing written."""
    import dataclasses

    import edgeqlora.devices.fit as F
    import edgeqlora.export as E
    import edgeqlora.export_device as D
    from edgeqlora.cli import main

    real_predict = F.predict_facts

    def optimistic(config, shapes, target, quant, *args, **kw):
        facts = real_predict(config, shapes, target, quant, *args, **kw)
        return dataclasses.replace(facts, file_bytes=facts.file_bytes // 2) \
            if quant == "q8_0" else facts

    monkeypatch.setattr(F, "predict_facts", optimistic)
    monkeypatch.setattr(D, "DEVICE_CANDIDATES", {"gguf": ("q8_0", "q4_0")})
    monkeypatch.setattr(E._Gate, "run", _gate_failing({"q4_0": "mean KLD 0.9 > max_kld 0.5"}))
    assert predicted["q4_0"] < predicted["q8_0"] - 2 * MiB
    usable = int((predicted["q8_0"] + predicted["q4_0"]) / 2 / MiB)
    out = tmp_path / "out"
    rc = main(["export", str(tiny["adapter"]), *LOOSE, "--merge-base", "original",
               "--device", str(_board(tmp_path, usable)), "--out", str(out)])
    err = _last_line(capsys)
    assert rc == 1
    assert err.startswith("edgeqlora export: error: no gguf quant that fits test-board passes "
                          "the gate: q8_0 does not fit (")
    assert err.endswith(f" MiB for the written files > {usable} MiB usable); q4_0 failed the "
                        "parity gate (mean KLD 0.9 > max_kld 0.5); nothing was written to "
                        f"{out} (loosen the parity.* thresholds, or train a better adapter)")
    assert not out.exists() and not _leftovers(tmp_path, "out")


def test_onnx_quants_tried_for_a_device_share_one_trace(tiny, tmp_path, monkeypatch, capsys):
    """ONNX under ``--device``: int8 fails the gate (forced), int4-gptq-q8head is shipped, and
    the merged checkpoint was traced into ONNX once for both (``reuse_traces``), the kept trace
    gone afterwards."""
    pytest.importorskip("onnxruntime")
    import edgeqlora.export as E
    from edgeqlora.cli import main
    from edgeqlora.exporters.onnx import graph as G

    monkeypatch.setattr(E._Gate, "run", _gate_failing({"int8": "mean KLD 0.9 > max_kld 0.5"}))
    real, traced = G._trace, []

    def counting(model_dir, path, opset):
        traced.append(model_dir)
        return real(model_dir, path, opset)

    monkeypatch.setattr(G, "_trace", counting)
    out = tmp_path / "out"
    rc = main(["export", str(tiny["adapter"]), "--target", "onnx", *LOOSE, "--device",
               str(_board(tmp_path, 4096, runtimes='["onnx"]')), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert [(t["quant"], t["outcome"]) for t in m["device"]["tried"]] == [
        ("int8", "failed the parity gate"), ("int4-gptq-q8head", "chosen")]
    assert len(traced) == 1 and G._reuse is None

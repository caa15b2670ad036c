"""The main job end to end on a tiny model: train -> exports -> parity -> summary.json."""

from __future__ import annotations

import json

import pytest

from conftest import has_module

pytestmark = pytest.mark.skipif(not has_module("llama_cpp"), reason="needs llama-cpp-python")


OVERRIDES = ["max_steps=2", "batch_size=4", "eval_examples=3", "max_new_tokens=6",
             "quant_report_tokens=0", "export.eval_tokens=48", "parity.eval_examples=2",
             "parity.text_tokens=32", "save_every=0"]


def test_quickstart_layout_summary_device_aware_variant_and_resume(tiny_model_dir, tmp_path,
                                                                   capsys, monkeypatch):
    """One quickstart with ``--device-aware gguf,onnx`` (its NF4 run is the plain
    quickstart's): the layout and summary; the device-aware variants (runs on the gguf-q4_k_m
    and onnx-int4 bases, exported unmerged as the base + the LoRA, each gated against its own
    trained model) beside the NF4 run's merged exports; then an interrupted run continuing."""
    from edgeqlora.quickstart import DEVICE_AWARE, quickstart

    out = tmp_path / "qs"
    overrides = [f"base={tiny_model_dir}", *OVERRIDES]
    summary = quickstart(out, overrides=overrides, device_aware="gguf,onnx")
    quant, name, folder, _ = DEVICE_AWARE["gguf"]

    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "manifest.json").is_file()
    data = json.loads((out / "summary.json").read_text())
    assert data == json.loads(json.dumps(summary, default=str))
    for key in ("base_exact_match", "trained_exact_match", "exports"):
        assert key in data
    assert isinstance(data["base_exact_match"], float)
    names = [e["name"] for e in data["exports"]]
    assert names[:3] == ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
    merged = [e for e in data["exports"] if not e["name"].endswith("-device-aware")]
    shipped = [e for e in merged if "error" not in e]
    assert shipped, data["exports"]
    for e in shipped:
        assert (out / "exports" / e["name"] / "manifest.json").is_file()
        assert e["size_bytes"] > 0 and e["target"] in ("gguf", "onnx")
        for key in ("exact_match", "kld", "top1", "decode_tokens_per_s"):
            assert key in e
        assert e["device_aware"] is False  # the quickstart's NF4 adapter, merged
    assert (out / "parity" / "parity.json").is_file()
    assert data["samples"] and "answer" in data["samples"][0]
    printed = capsys.readouterr().out
    assert "edgeqlora quickstart" in printed

    row = next(e for e in summary["exports"] if e["name"] == name)
    assert row["device_aware"] is True and "error" not in row, row
    manifest = json.loads((out / "exports" / name / "manifest.json").read_text())
    assert manifest["device_aware"] is True and manifest["adapter_only"] is True
    assert manifest["exporter"]["adapter_file"].startswith("adapter.")
    assert manifest["source"]["quant"]["quant"] == quant
    for key in ("exact_match", "kld", "top1", "identical_answers", "decode_tokens_per_s"):
        assert row.get(key) is not None, key
    devices = summary["device_aware"]
    assert [d["quant"] for d in devices] == ["gguf-q4_k_m", "onnx-int4"]
    for target, device in zip(("gguf", "onnx"), devices):
        quant, name, folder, export_quant = DEVICE_AWARE[target]
        assert device["quant"] == quant and device["export"] == name
        assert device["trained_exact_match"] is not None
        run = json.loads((out / folder / "adapter" / "manifest.json").read_text())
        assert run["quant"]["quant"] == quant and "eval_before" not in run["metrics"]
        assert (out / folder / "parity" / "parity.json").is_file()
        row = next(e for e in summary["exports"] if e["name"] == name)
        assert row["target"] == target and row["quant"] == export_quant
        assert row["passed"] and row.get("identical_answers") is not None, row
    assert "onnx-int4 base" in " ".join(printed.split())

    # An interrupted quickstart continues: the finished training is not redone (same adapter
    # weights), the base's score comes back from metrics.jsonl, later stages run again (one
    # export of the four is enough to show it).
    import edgeqlora.quickstart as Q

    monkeypatch.setattr(Q, "EXPORTS", Q.EXPORTS[1:2])
    weights = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    stamp = (out / "exports" / "gguf-q8_0" / "manifest.json").stat().st_mtime_ns
    again = quickstart(out, overrides=overrides, resume=True)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == weights
    assert again["base_exact_match"] == data["base_exact_match"]
    assert again["trained_exact_match"] is not None
    assert [e["name"] for e in again["exports"]] == ["gguf-q8_0"]
    assert (out / "exports" / "gguf-q8_0" / "manifest.json").stat().st_mtime_ns != stamp


def test_quickstart_refuses_foreign_dir(tmp_path):
    from edgeqlora.errors import InputError
    from edgeqlora.quickstart import quickstart

    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="--force"):
        quickstart(out)
    with pytest.raises(InputError, match="refusing to delete"):
        quickstart(out, force=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_quickstart_resume_needs_a_run(tmp_path):
    from edgeqlora.errors import InputError
    from edgeqlora.quickstart import quickstart

    with pytest.raises(InputError, match="cannot resume"):
        quickstart(tmp_path / "nothing-here", resume=True)


def test_device_aware_targets_and_a_bad_one(tmp_path, capsys):
    from edgeqlora.cli import main
    from edgeqlora.quickstart import device_aware_targets

    assert device_aware_targets(True) == ("gguf",) and device_aware_targets(None) == ()
    assert device_aware_targets("onnx") == ("onnx",)
    assert device_aware_targets("onnx-hqq") == ("onnx-hqq",)
    assert device_aware_targets(" GGUF,onnx,gguf") == ("gguf", "onnx")
    assert main(["quickstart", "--device-aware", "tflite", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the targets are gguf, onnx, onnx-hqq" in err, err
    assert not (tmp_path / "q").exists()


def test_cpu_sizing_yields_to_overrides():
    from edgeqlora.quickstart import quickstart_config

    cfg = quickstart_config(None, ["max_steps=7"], full=False)
    assert cfg.max_steps == 7
    full = quickstart_config(None, [], full=True)
    assert full.max_steps == 200  # the recipe as written

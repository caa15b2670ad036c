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
                                                                   capsys):
    """One quickstart with ``--device-aware`` (its NF4 run is the plain quickstart's): the
    layout and summary; the device-aware variant (a second run on the gguf-q4_k_m base,
    exported unmerged as its base GGUF + the LoRA GGUF, gated against its own trained model)
    beside the NF4 run's merged exports; then an interrupted run continuing."""
    from edgeqlora.quickstart import DEVICE_AWARE, quickstart

    out = tmp_path / "qs"
    overrides = [f"base={tiny_model_dir}", *OVERRIDES]
    summary = quickstart(out, overrides=overrides, device_aware=True)
    quant, name = DEVICE_AWARE

    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "manifest.json").is_file()
    data = json.loads((out / "summary.json").read_text())
    assert data == json.loads(json.dumps(summary, default=str))
    for key in ("base_exact_match", "trained_exact_match", "exports"):
        assert key in data
    assert isinstance(data["base_exact_match"], float)
    names = [e["name"] for e in data["exports"]]
    assert names[:3] == ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
    merged = [e for e in data["exports"] if e["name"] != name]
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
    assert "edgeqlora quickstart" in capsys.readouterr().out

    row = next(e for e in summary["exports"] if e["name"] == name)
    assert row["device_aware"] is True and "error" not in row, row
    manifest = json.loads((out / "exports" / name / "manifest.json").read_text())
    assert manifest["device_aware"] is True and manifest["adapter_only"] is True
    assert manifest["exporter"]["adapter_file"].startswith("adapter.")
    assert manifest["source"]["quant"]["quant"] == quant
    for key in ("exact_match", "kld", "top1", "identical_answers", "decode_tokens_per_s"):
        assert row.get(key) is not None, key
    device = summary["device_aware"]
    assert device["quant"] == quant and device["trained_exact_match"] is not None
    run = json.loads((out / "device-aware" / "adapter" / "manifest.json").read_text())
    assert run["quant"]["quant"] == quant and "eval_before" not in run["metrics"]
    assert (out / "device-aware" / "parity" / "parity.json").is_file()

    # An interrupted quickstart continues: the finished training is not redone (same adapter
    # weights), the base's score comes back from metrics.jsonl, later stages run again.
    weights = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    again = quickstart(out, overrides=overrides, resume=True)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == weights
    assert again["base_exact_match"] == data["base_exact_match"]
    assert again["trained_exact_match"] is not None


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


def test_cpu_sizing_yields_to_overrides():
    from edgeqlora.quickstart import quickstart_config

    cfg = quickstart_config(None, ["max_steps=7"], full=False)
    assert cfg.max_steps == 7
    full = quickstart_config(None, [], full=True)
    assert full.max_steps == 200  # the recipe as written

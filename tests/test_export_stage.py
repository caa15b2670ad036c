"""The export stage itself: a merged checkpoint exported to GGUF, and checks that fail closed."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import build_tiny_model, has_module
from lora_fixtures import make_adapter

needs_llama_cpp = pytest.mark.skipif(not has_module("llama_cpp"), reason="needs llama-cpp-python")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("stage")
    base = build_tiny_model(root / "base", tokenizer_dir)
    return {"base": base, "adapter": make_adapter(root / "adapter", base)}


@needs_llama_cpp
def test_export_merged_writes_a_verified_gguf(tiny, tmp_path):
    from edgeqlora.export import export_merged

    m = export_merged(tiny["base"], tmp_path / "g", target="gguf", quant="q8_0",
                      eval_tokens=64)
    assert m["target"] == "gguf" and m["quant"] == "q8_0"
    assert m["source"] == {"merged": str(tiny["base"].resolve())}
    assert m["verification"]["passed"] and m["verification"]["reference"] == "merged model"
    assert (tmp_path / "g" / "model.q8_0.gguf").is_file()


def test_export_merged_refuses_a_checkpoint_without_tokenizer(tiny, tmp_path):
    from edgeqlora.errors import InputError
    from edgeqlora.export import export_merged

    src = tmp_path / "notok"
    shutil.copytree(tiny["base"], src)
    (src / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="has no tokenizer.json"):
        export_merged(src, tmp_path / "x", target="gguf", quant="f16")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_threshold_is_refused_before_any_work(tiny, tmp_path, value):
    from edgeqlora.errors import ConfigError
    from edgeqlora.export import export_adapter

    with pytest.raises(ConfigError, match="finite"):
        export_adapter(tiny["adapter"], tmp_path / "x", quant="f16", merge_base="original",
                       thresholds={"max_kld": value}, eval_tokens=32)
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]


@needs_llama_cpp
def test_nan_metrics_fail_verification_even_if_the_exporter_passed_them(tiny, tmp_path,
                                                                       monkeypatch):
    from edgeqlora.errors import ExportError
    from edgeqlora.export import export_adapter
    from edgeqlora.exporters import gguf as G

    real = G.verify_export

    def nan_verify(*args, **kwargs):
        check = real(*args, **kwargs)
        return {**check, "kld": math.nan, "passed": True, "problems": []}

    monkeypatch.setattr(G, "verify_export", nan_verify)
    with pytest.raises(ExportError, match="non-finite metrics"):
        export_adapter(tiny["adapter"], tmp_path / "x", quant="f16", merge_base="original",
                       eval_tokens=32)
    assert not (tmp_path / "x").exists()
    # Kept on request, but recorded as failed (never as passed), and still an error.
    with pytest.raises(ExportError, match="kept for inspection"):
        export_adapter(tiny["adapter"], tmp_path / "y", quant="f16", merge_base="original",
                       eval_tokens=32, keep_failed=True)
    m = json.loads((tmp_path / "y" / "manifest.json").read_text())
    assert m["verification"]["passed"] is False and m["verification"]["kld"] == "NaN"


@needs_llama_cpp
def test_auto_exports_the_trained_base_without_measuring_the_other(tiny, tmp_path, monkeypatch):
    """``auto`` merges into the dequantized NF4 base the adapter was trained on, with no merge
    measurement (no trained-model run: the parity gate is that comparison); the file equals the
    explicit ``dequantized`` export's, byte for byte."""
    from edgeqlora import merge_measure
    from edgeqlora.export import export_adapter

    def no_measurement(*args, **kwargs):
        raise AssertionError("auto measured a merge base during an export")

    monkeypatch.setattr(merge_measure, "measure_against_trained", no_measurement)
    monkeypatch.setattr("edgeqlora.merge.measure_against_trained", no_measurement)
    m = export_adapter(tiny["adapter"], tmp_path / "auto", quant="q8_0", eval_tokens=64)
    assert m["merge"]["merge_base"] == "dequantized" and m["merge"]["requested"] == "auto"
    assert m["merge"]["kld"] == {} and m["verification"]["reference"] == "merged model"
    export_adapter(tiny["adapter"], tmp_path / "deq", quant="q8_0", eval_tokens=64,
                   merge_base="dequantized")
    assert (tmp_path / "auto" / "model.q8_0.gguf").read_bytes() == \
        (tmp_path / "deq" / "model.q8_0.gguf").read_bytes()


def test_a_4bit_only_merge_base_on_a_plain_lora_adapter_is_one_line(tiny, tmp_path):
    from edgeqlora.errors import ConfigError
    from edgeqlora.export import export_adapter

    plain = make_adapter(tmp_path / "plain", tiny["base"], quant="none")
    with pytest.raises(ConfigError, match="merge_base=dequantized needs an adapter trained on "
                                          "a 4-bit base"):
        export_adapter(plain, tmp_path / "x", quant="q8_0", merge_base="dequantized")
    assert not (tmp_path / "x").exists()


@needs_llama_cpp
def test_the_answer_schema_travels_from_the_adapter_to_the_runtime(tiny, tmp_path):
    """An adapter trained on the embedded task (before adapters carried a schema) exports the
    task's schema; an adapter's own schema.json wins; one trained with schema=none has none.
    The runtime loads it from the export (hash-checked with the other files)."""
    from edgeqlora import runtimes
    from edgeqlora.artifacts import read_manifest, write_manifest
    from edgeqlora.export import export_adapter
    from edgeqlora.schema import write_schema
    from edgeqlora.tasks import iot

    m = export_adapter(tiny["adapter"], tmp_path / "task", quant="q8_0", eval_tokens=64)
    assert m["schema"] == {"file": "schema.json", "source": "embedded:iot"}
    assert "schema.json" in m["files"]
    with runtimes.load(tmp_path / "task", verify=True) as rt:
        assert rt.json_schema == iot.json_schema() and rt.info()["json_schema"]

    own, none = tmp_path / "own", tmp_path / "none"
    for d, schema in ((own, {"type": "object", "required": ["x"]}), (none, None)):
        shutil.copytree(tiny["adapter"], d)
        manifest = {k: v for k, v in read_manifest(d).items()
                    if k not in ("format_version", "kind", "created", "files")}
        manifest["schema"] = {"file": write_schema(d, schema), "source": "mine"} if schema \
            else None
        write_manifest(d, "adapter", manifest)
    m = export_adapter(own, tmp_path / "own-x", quant="q8_0", eval_tokens=64)
    assert m["schema"]["source"] == "mine"
    assert json.loads((tmp_path / "own-x" / "schema.json").read_text()) == \
        {"type": "object", "required": ["x"]}
    m = export_adapter(none, tmp_path / "none-x", quant="q8_0", eval_tokens=64)
    assert m["schema"] is None and not (tmp_path / "none-x" / "schema.json").exists()
    with runtimes.load(tmp_path / "none-x") as rt:
        assert rt.json_schema is None


def test_tokenizer_kept_per_file_content(tmp_path, tokenizer_dir):
    """The export stage loads a tokenizer once per content of its files: another directory
    with the same files gets the same one, a changed chat template a new one that uses it."""
    from edgeqlora import export_inputs

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tokenizer_dir, a)
    shutil.copytree(tokenizer_dir, b)
    assert export_inputs.tokenizer(a) is export_inputs.tokenizer(b)
    (b / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    changed = export_inputs.tokenizer(b)
    assert changed is not export_inputs.tokenizer(a)
    assert changed.apply_chat_template([{"role": "user", "content": "hi"}],
                                       tokenize=False) == "hi!"

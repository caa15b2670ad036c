"""The GGUF exporter's size prediction (``predict``) against the files ``write_export`` writes:
for every quant, the predicted tensor table (names, types, ggml dims, bytes, offsets) is the
written file's as ``read_gguf_header`` reads it, and the size is the file's (exact with the
tokenizer files; within the per-vocabulary-entry estimate without). 80-layer models, whose
K-quant mix the writer leaves to llama.cpp's quantizer, are predicted with llama.cpp's 70B
rule."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_tiny_model, has_module

needs_llama_cpp = pytest.mark.skipif(not has_module("llama_cpp"),
                                     reason="needs llama-cpp-python")


def _shapes(model_dir: Path) -> dict[str, list[int]]:
    from edgeqlora.exporters.gguf.plan import weight_specs

    return {name: shape for _, name, shape in weight_specs(model_dir)}


def _check(base: Path, out: Path, quant: str) -> None:
    from edgeqlora.exporters import gguf as G
    from edgeqlora.runtimes.gguf_header import read_gguf_header

    cfg = json.loads((base / "config.json").read_text())
    out.mkdir()
    info = G.write_export(base, out, quant)
    path = out / info["model_file"]
    size = path.stat().st_size
    tensors = read_gguf_header(path)[1]
    exact = G.predict(cfg, _shapes(base), quant, tokenizer_dir=base)
    # The metadata is measured on the writer's own GGUFWriter: exact, not just within 0.1 %.
    assert exact["file_bytes"] == size, (quant, exact["file_bytes"], size)
    assert abs(exact["file_bytes"] - size) <= 0.001 * size
    assert exact["tensors"] == tensors, quant
    assert exact["n_params"] == sum(t.n_elements for t in tensors)
    # Without the tokenizer files: the same tensors at other offsets, 37 bytes per vocabulary
    # entry for the metadata (36.3 measured on SmolLM2's; the tiny model is mostly vocabulary,
    # so the estimate's 1 % here is 0.05 % of the 135M model).
    rough = G.predict(cfg, _shapes(base), quant)
    assert [(t.name, t.type, t.dims, t.n_bytes) for t in rough["tensors"]] == \
        [(t.name, t.type, t.dims, t.n_bytes) for t in tensors]
    assert abs(rough["file_bytes"] - size) < 0.01 * size, (quant, rough["file_bytes"], size)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, tokenizer_dir):
    """64-wide rows: every K type falls back (Q5_0 / Q8_0), the q4_0 head is Q8_0."""
    return build_tiny_model(tmp_path_factory.mktemp("predict-narrow"), tokenizer_dir)


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer_dir):
    """256-wide rows, untied head, GQA 4:1: the K-quant mixes use their K types."""
    return build_tiny_model(tmp_path_factory.mktemp("predict-wide"), tokenizer_dir, hidden=256,
                            intermediate=512, layers=3, heads=4, kv_heads=1, tie=False)


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1",
                                   pytest.param("q4_k_m", marks=needs_llama_cpp),
                                   pytest.param("q5_k_m", marks=needs_llama_cpp),
                                   pytest.param("q6_k", marks=needs_llama_cpp),
                                   pytest.param("q3_k_m", marks=needs_llama_cpp)])
def test_prediction_is_the_written_file(narrow, tmp_path, quant):
    _check(narrow, tmp_path / quant, quant)


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q4_0"])
def test_prediction_is_the_written_file_k_types(wide, tmp_path, quant):
    _check(wide, tmp_path / quant, quant)


def test_every_quant_has_a_prediction_and_bad_input_is_named(narrow):
    from edgeqlora.errors import ConfigError
    from edgeqlora.exporters import gguf as G

    cfg = json.loads((narrow / "config.json").read_text())
    shapes = _shapes(narrow)
    sizes = {q: G.predict(cfg, shapes, q)["file_bytes"] for q in G.QUANTS}
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"] > sizes["q4_0"]
    # Parameters: every tensor once (the tied head is the embedding).
    assert G.predict(cfg, shapes, "q8_0")["n_params"] == sum(
        math.prod(s) for n, s in shapes.items() if n != "lm_head.weight")
    with pytest.raises(ConfigError, match="q2_k.*valid: f32"):
        G.predict(cfg, shapes, "q2_k")
    with pytest.raises(ConfigError, match="unknown GGUF export option 'imatrx'"):
        G.predict(cfg, shapes, "q4_k_m", imatrx="auto")


def test_prediction_is_torch_free(narrow):
    """devices.fit asks for predictions on a device install: no torch, no transformers."""
    code = ("import json, sys; from edgeqlora.exporters import gguf as G; "
            "from edgeqlora.exporters.gguf.plan import weight_specs; "
            f"d = {str(narrow)!r}; cfg = json.load(open(d + '/config.json')); "
            "shapes = {n: s for _, n, s in weight_specs(d)}; "
            "p = G.predict(cfg, shapes, 'q4_k_m', tokenizer_dir=d); "
            "print(p['file_bytes'], 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert int(out[0]) > 0 and out[1:] == ["False", "False"]


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("arch,kv_heads", [("llama", 1), ("llama", 4), ("qwen2", 1)])
def test_80_layers_follow_llama_cpps_70b_rule(tmp_path, tokenizer_dir, arch, kv_heads):
    """80 layers: llama.cpp classes llama with fewer KV heads than heads, and qwen2, as 70B and
    gives attn_v Q5_K instead of Q3_K/Q4_K (llama with as many: 65B, no change). The writer
    leaves those mixes to llama.cpp's quantizer; the prediction must still be its file."""
    from edgeqlora.exporters.gguf import plan as P

    base = build_tiny_model(tmp_path / "base", tokenizer_dir, arch=arch, hidden=256,
                            intermediate=256, layers=80, heads=4, kv_heads=kv_heads)
    cfg = json.loads((base / "config.json").read_text())
    assert P.is_70b(cfg) is (arch == "qwen2" or kv_heads != 4)
    for quant in ("q4_k_m", "q3_k_m"):
        _check(base, tmp_path / quant, quant)

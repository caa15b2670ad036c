"""The GGUF files the exporter writes are the bytes it wrote before the export-stage redesign.

The sha256s below were taken with the pre-redesign exporter (commit 15121b2, the single-module
``exporters/gguf.py``) on the same model, and the redesigned package gives the same digests.
The model's weights come from numpy's seeded generator (not torch's initialisation), and the
tokenizer from tests/assets, so the input is the same on every machine; the digests also depend
on the gguf package (metadata layout) and llama.cpp's kernels (K-quants), so with other
versions of those the test says so and skips: re-take the digests with the old and the new
code side by side before trusting a change.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_model

PINNED_VERSIONS = {"gguf": "0.19.0", "llama_cpp_python": "0.3.36"}
DIGESTS = {
    "f32": "1feadc0ec736475763bb818bbe4c2b0d8e8c46e2b858719ad5c0a05eeb78f345",
    "f16": "5d7239d22e6ca90ebc903ad7d36cbb651ae12b87906f19193b0edb1f0368d7c6",
    "q8_0": "f8184cbadf632c75bb802c3c915549be1e6eb24e50e6c5b626732b85361b7a8d",
    "q4_0": "8e0f952bf3d3fcdef2498961c90b631f0547dbc61c1ddf6ae85505009d3d591e",
    "q4_k_m": "cc91b59b7bf6d7525a9efa6ef4e1fb8bf60205c95cfa28eae8989e4a1557568f",
    "q6_k": "61ef266b2768f67bed482e8ae6dfa5cb37741cb76961c4faa0b93ece2f41cbfd",
}


def numpy_seeded_model(out: Path, tokenizer_dir: Path) -> Path:
    """A tiny Llama (hidden 256, 2 layers, tied) whose every weight is drawn from
    ``np.random.default_rng(0)`` in sorted tensor-name order (norms around 1)."""
    from safetensors.numpy import load_file, save_file

    build_tiny_model(out, tokenizer_dir, hidden=256, intermediate=512, layers=2, tie=True)
    path = out / "model.safetensors"
    shapes = {k: v.shape for k, v in load_file(path).items()}
    rng = np.random.default_rng(0)
    weights = {}
    for name in sorted(shapes):
        w = rng.standard_normal(shapes[name]).astype(np.float32) * 0.02
        weights[name] = 1.0 + w if name.endswith("norm.weight") else w
    save_file(weights, str(path), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, tokenizer_dir):
    return numpy_seeded_model(tmp_path_factory.mktemp("seeded"), tokenizer_dir)


@pytest.mark.parametrize("quant", sorted(DIGESTS))
def test_gguf_bytes_are_the_pre_redesign_bytes(seeded, tmp_path, quant):
    pytest.importorskip("llama_cpp")
    found = {k: metadata.version(k) for k in PINNED_VERSIONS}
    if found != PINNED_VERSIONS:
        pytest.skip(f"digests were taken with {PINNED_VERSIONS}, installed: {found}")
    from edgeqlora.exporters import gguf as G

    info = G.write_export(seeded, tmp_path, quant)
    digest = hashlib.sha256((tmp_path / info["model_file"]).read_bytes()).hexdigest()
    assert digest == DIGESTS[quant]


def test_long_arrays_packed_once_and_again_when_changed(tmp_path):
    """The writer keeps a long metadata array's bytes per list: the same list again gives the
    same file as gguf's own writer without packing it again, a list changed in place (or an
    equal new one) is packed from what it holds now."""
    import gguf

    from edgeqlora.exporters.gguf import common

    tokens = [f"tok{i}\u2581" for i in range(5000)]
    scores = [float(i) / 3 for i in range(5000)]

    def write(path, writer_class, values):
        w = writer_class(path, "llama")
        w.add_token_list(values)
        w.add_token_scores(scores)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return path.read_bytes()

    def ours(path, arch):
        return common.gguf_writer(path, arch)

    common._packed.clear()
    reference = write(tmp_path / "ref.gguf", gguf.GGUFWriter, tokens)
    assert write(tmp_path / "a.gguf", ours, tokens) == reference
    assert {id(tokens), id(scores)} <= set(common._packed)
    packed = common._packed[id(tokens)][2]
    assert write(tmp_path / "b.gguf", ours, tokens) == reference
    assert common._packed[id(tokens)][2] is packed  # the kept bytes, not packed again
    tokens[7] = "changed"
    changed = write(tmp_path / "c.gguf", ours, tokens)
    assert changed == write(tmp_path / "ref-c.gguf", gguf.GGUFWriter, tokens) != reference
    assert write(tmp_path / "d.gguf", ours, list(tokens)) == changed

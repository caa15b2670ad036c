"""``base=path/to/model.gguf``: a local GGUF converted once into a checkpoint (``base_gguf``),
with its tokenizer checked against llama.cpp's; what cannot be converted faithfully is refused
in one line before any work."""

from __future__ import annotations

import pytest

from conftest import build_tiny_model, has_module
from edgeqlora import base_gguf
from edgeqlora.base import resolve_base
from edgeqlora.errors import InputError

pytestmark = pytest.mark.skipif(not has_module("llama_cpp"), reason="needs llama-cpp-python")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A model cache of this module's own; the tiny Llama GGUF is converted once in it (the
    last test refuses and removes that conversion)."""
    root = tmp_path_factory.mktemp("gguf-base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEQLORA_HOME", str(root / "home"))
        yield root


@pytest.fixture(scope="module")
def llama_gguf(home, tokenizer_dir):
    return _gguf(home, tokenizer_dir)


def _gguf(tmp_path, tokenizer_dir, arch="llama"):
    from edgeqlora.exporters import gguf as G

    src = build_tiny_model(tmp_path / f"src-{arch}", tokenizer_dir, arch=arch)
    path = tmp_path / f"tiny-{arch}.f32.gguf"
    G.write_model_gguf(src, path, "f32")
    return src, path


def test_a_gguf_file_becomes_the_same_model(llama_gguf):
    """F32 GGUF of a tiny Llama with SmolLM2's tokenizer -> checkpoint: every weight equal to
    the model the file was written from, the tokenizer llama.cpp's, cached on the second use."""
    import torch
    from safetensors.torch import load_file

    from edgeqlora.artifacts import read_json

    src, path = llama_gguf
    out = resolve_base(str(path))
    assert out.parent.name == "models" and out.name.startswith("gguf-tiny-llama.f32-")
    want, got = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(got) == set(want) - {"lm_head.weight"} or set(got) == set(want)
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name].float()), name
    manifest = read_json(out / "manifest.json")
    assert manifest["id"] == str(path.resolve()) and manifest["source"]["size_bytes"] > 0
    assert base_gguf.tokenizer_mismatch(path, out) is None
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert resolve_base(str(path)) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # not converted again


def test_a_gguf_whose_tokenizer_cannot_be_rebuilt_is_refused(home, tokenizer_dir):
    _, path = _gguf(home, tokenizer_dir, arch="qwen2")
    with pytest.raises(InputError, match=r"a qwen2 GGUF with a 'gpt2' tokenizer.*supported GGUF "
                                         r"bases: llama with the smollm BPE") as err:
        resolve_base(str(path))
    assert "\n" not in str(err.value)
    assert not any(p.name.startswith("gguf-tiny-qwen2") for p in
                   (home / "home" / "models").glob("*"))


def test_a_file_that_is_not_gguf_is_one_line(home):
    bad = home / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(60)))
    with pytest.raises(InputError, match="is not a readable GGUF file") as err:
        resolve_base(str(bad))
    assert "\n" not in str(err.value)


def test_a_tokenizer_that_splits_differently_is_refused_and_removed(home, llama_gguf,
                                                                    monkeypatch):
    """Stand-in for a converted tokenizer that disagrees with llama.cpp: one probe string's
    ids differ. The base is refused naming the string (checked on every resolve, the cached
    conversion too), and the converted directory is gone."""
    real = base_gguf._ids
    _, path = llama_gguf
    monkeypatch.setattr(base_gguf, "_ids", lambda tok, text: real(tok, text)
                        + ([0] if "12345678" in text else []))
    with pytest.raises(InputError, match=r"splits '  0\.  12345678.*differently from llama\.cpp"):
        resolve_base(str(path))
    assert not any(p.name.startswith("gguf-") for p in (home / "home" / "models").iterdir())

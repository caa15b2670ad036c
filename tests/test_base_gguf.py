"""``base=path/to/model.gguf``: a local GGUF converted once into a checkpoint (``base_gguf``),
with its tokenizer checked against llama.cpp's; what cannot be converted faithfully is refused
in one line before any work."""

from __future__ import annotations

import shutil

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
    """The tiny Llama as an older converter wrote it: no ``llama.vocab_size`` (the token list
    gives the size); the other modules' files have one."""
    import gguf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "add_vocab_size", lambda self, n: None)
        return _gguf(home, tokenizer_dir)


def _gguf(tmp_path, tokenizer_dir, arch="llama"):
    from edgeqlora.exporters import gguf as G

    src = build_tiny_model(tmp_path / f"src-{arch}", tokenizer_dir, arch=arch)
    path = tmp_path / f"tiny-{arch}.f32.gguf"
    G.write_model_gguf(src, path, "f32")
    return src, path


def test_a_gguf_file_becomes_the_same_model(llama_gguf, monkeypatch):
    """F32 GGUF of a tiny Llama with SmolLM2's tokenizer -> checkpoint: every weight equal to
    the model the file was written from (its vocabulary size counted from the token list), the
    tokenizer llama.cpp's, cached on the second use. transformers' loader reads the file for the
    config and again for the tensors: one ``GGUFReader`` serves both, and ``gguf.GGUFReader`` is
    itself again afterwards."""
    import gguf
    import torch
    from safetensors.torch import load_file

    from edgeqlora.artifacts import read_json

    src, path = llama_gguf
    original, opened = gguf.GGUFReader, []

    def counting(*args, **kwargs):
        opened.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    assert "llama.vocab_size" not in original(path).fields
    out = resolve_base(str(path))
    assert len(opened) == 1 and gguf.GGUFReader is counting
    vocab = read_json(src / "config.json")["vocab_size"]
    assert read_json(out / "config.json")["vocab_size"] == vocab
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
    with pytest.raises(InputError, match=r"a qwen2 GGUF with a 'gpt2' tokenizer \(pre-tokenizer "
                                         r"'smollm'\).*supported GGUF bases: llama with the "
                                         r"smollm \(SmolLM2\) or llama-bpe") as err:
        resolve_base(str(path))
    assert "\n" not in str(err.value)
    assert not any(p.name.startswith("gguf-tiny-qwen2") for p in
                   (home / "home" / "models").glob("*"))


def _gguf_with_pre(tmp_path, tokenizer_dir, monkeypatch, arch: str, pre: str,
                   add_bos: bool = False):
    """A tiny ``arch`` GGUF whose vocabulary (SmolLM2's) is labelled with llama.cpp's ``pre``
    pre-tokenizer (and, with ``add_bos``, asks for a BOS): llama.cpp then splits its text with
    that pre-tokenizer's regex, which the converted tokenizer must reproduce."""
    from edgeqlora.exporters.gguf import metadata

    with monkeypatch.context() as mp:
        mp.setattr(metadata, "pre_tokenizer_name", lambda tok: pre)
        if add_bos:
            mp.setattr(metadata, "adds_bos", lambda tok, cfg: True)
        return _gguf(tmp_path / pre, tokenizer_dir, arch=arch)


@pytest.mark.parametrize("arch, pre, add_bos", [("qwen2", "qwen2", False),
                                                ("qwen3", "qwen2", False),
                                                ("llama", "llama-bpe", True)])
def test_qwen_and_llama3_pre_tokenizers_are_rebuilt(home, tokenizer_dir, monkeypatch, arch, pre,
                                                    add_bos):
    """Qwen2/Qwen3 (``qwen2``) and Llama 3 (``llama-bpe``, BOS added) GGUFs become checkpoints
    with the same weights whose tokenizer splits every probe as llama.cpp does on the file, BOS
    rule included; the same vocabulary under SmolLM2's own pre-tokenizer splits some probes
    otherwise, so the rebuilt regex is what makes them agree."""
    import json

    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from edgeqlora.artifacts import read_json

    (home / pre).mkdir(exist_ok=True)
    src, path = _gguf_with_pre(home, tokenizer_dir, monkeypatch, arch, pre, add_bos)
    out = resolve_base(str(path))
    want, got = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(got) <= set(want) and len(got) >= len(want) - 1
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name].float()), name
    manifest = read_json(out / "manifest.json")
    assert manifest["model_type"] == arch and manifest["tokenizer"]["pre_tokenizer"] == pre
    assert json.loads((out / "config.json").read_text())["model_type"] == arch
    assert base_gguf.tokenizer_mismatch(path, out) is None
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    smollm = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert any(base_gguf._ids(ours, t) != base_gguf._ids(smollm, t) for t in base_gguf.PROBES)
    ids = ours.encode("lamp on").ids
    bos = ours.token_to_id(manifest["tokenizer"]["bos_token"])
    plain = smollm.encode("lamp on", add_special_tokens=False).ids
    assert ids == ([bos, *plain] if add_bos else plain)
    shutil.rmtree(out)  # the module's last test expects no other conversion in its cache


def test_a_model_transformers_cannot_rebuild_is_one_line_and_nothing_kept(home, tokenizer_dir,
                                                                          monkeypatch):
    """Without the Qwen3 head-size mapping transformers' loader meets q_proj shapes it did not
    expect (head_dim 32 here, not hidden / heads): one line naming the file, no cache left."""
    import contextlib

    from edgeqlora import base

    (home / "nohead").mkdir(exist_ok=True)
    _, path = _gguf_with_pre(home / "nohead", tokenizer_dir, monkeypatch, "qwen3", "qwen2")
    monkeypatch.setattr(base, "_qwen3_head_dim", contextlib.nullcontext)
    with pytest.raises(InputError, match=r"transformers could not rebuild the model in "
                                         r"tiny-qwen3\.f32\.gguf") as err:
        resolve_base(str(path))
    assert "\n" not in str(err.value)
    assert not any(p.name.startswith("gguf-tiny-qwen3") for p in
                   (home / "home" / "models").glob("*"))


def test_a_llama31_gguf_rebuilds_its_rope_scaling(home, tokenizer_dir, monkeypatch):
    """A Llama 3.1+ GGUF keeps its RoPE scaling only as the rope_freqs divisors (transformers'
    loader ignores them): the checkpoint gets Llama 3's parameters solved from them, so it
    gives the source model's logits past the original context; divisors of no Llama 3 form
    are refused in one line before any work."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from edgeqlora.artifacts import read_json
    from edgeqlora.base_gguf import llama3_rope
    from edgeqlora.exporters.gguf import plan

    (home / "rope").mkdir(exist_ok=True)
    src, path = _gguf_with_pre(home / "rope", tokenizer_dir, monkeypatch, "llama3", "llama-bpe")
    want = read_json(src / "config.json")["rope_parameters"]
    assert want["rope_type"] == "llama3" and llama3_rope(path) == want
    out = resolve_base(str(path))
    assert read_json(out / "config.json")["rope_parameters"] == want
    ids = torch.randint(3, 40000, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)  # positions 256-299 too: past original_max_position_embeddings
    shutil.rmtree(out)  # the module's last test expects no other conversion in its cache

    (home / "rope-bad").mkdir(exist_ok=True)
    with monkeypatch.context() as mp:
        mp.setattr(plan, "llama3_rope_factors",
                   lambda cfg: np.array([1, 3, 1.5, 8, 8, 8, 8, 8], dtype=np.float32))
        _, bad = _gguf_with_pre(home / "rope-bad", tokenizer_dir, monkeypatch, "llama3",
                                "llama-bpe")
    with pytest.raises(InputError, match="rope_freqs tensor whose divisors are not of Llama "
                                         "3's form") as err:
        resolve_base(str(bad))
    assert "\n" not in str(err.value)
    assert not any(p.name.startswith("gguf-tiny-llama3") for p in
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
    monkeypatch.setattr(base_gguf, "_ids", lambda tok, text, special=False:
                        real(tok, text, special) + ([0] if "12345678" in text else []))
    with pytest.raises(InputError, match=r"splits '  0\.  12345678.*differently from llama\.cpp"):
        resolve_base(str(path))
    assert not any(p.name.startswith("gguf-") for p in (home / "home" / "models").iterdir())

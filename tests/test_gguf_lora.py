"""LoRA adapters in the GGUF runtime: switching adapters on a loaded base gives the logits of a
model loaded with that adapter (and of llama-cpp-python's own ``Llama(lora_path=...)``), the base
is never reloaded, and every bad adapter file is a clear error instead of a crash.

The adapters are written with the exporter's adapter writer (``write_lora_gguf``, what
``edgeqlora export --adapter-only`` uses) from random LoRA matrices on a tiny random base, so the
whole module runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeqlora.errors import InputError

pytest.importorskip("llama_cpp")

IDS = list(range(200, 240))
# Same base, same adapter, same batch: llama.cpp computes the same graph, so the logits agree to
# float32 rounding (measured max |diff| 0.0 on the tiny model); the margin allows for a
# different ubatch split inside llama.cpp.
ATOL = 1e-4


def _deltas(cfg: dict, seed: int, shrink: int = 1, r: int = 4,
            modules=("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")):
    """Random LoRA (A [r, in], B [out, r], scale) per module of the model ``cfg`` describes,
    large enough to move the logits; ``shrink`` > 1 sizes it for a narrower model."""
    rng = np.random.default_rng(seed)
    hidden, inter = cfg["hidden_size"] // shrink, cfg["intermediate_size"] // shrink
    kv = hidden // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.v_proj": (hidden, kv),
              "mlp.down_proj": (inter, hidden)}
    return {f"model.layers.{layer}.{m}.weight": (rng.normal(0, 0.5, (r, shapes[m][0])),
                                                 rng.normal(0, 0.5, (shapes[m][1], r)), 2.0 / r)
            for layer in range(cfg["num_hidden_layers"]) for m in modules}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The session's tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 128)."""
    from edgeqlora.exporters.gguf import write_lora_gguf, write_model_gguf

    root = tmp_path_factory.mktemp("gguf-lora")
    base_dir = tiny_model_dir
    out = {"base": root / "base.f32.gguf", "a": root / "a.f32.gguf", "b": root / "b.f32.gguf",
           "other": root / "other-base.f32.gguf"}
    cfg = json.loads((base_dir / "config.json").read_text())
    write_model_gguf(base_dir, out["base"], "f32")
    write_lora_gguf(_deltas(cfg, 1), base_dir, out["a"], "f32")
    write_lora_gguf(_deltas(cfg, 2), base_dir, out["b"], "f32")
    # An adapter for a model half as wide: the tensor names exist in the base, the shapes do
    # not fit (what an adapter trained on another base looks like to llama.cpp).
    write_lora_gguf(_deltas(cfg, 3, shrink=2, modules=("self_attn.v_proj", "mlp.down_proj")),
                    base_dir, out["other"], "f32")
    return out


def _runtime(path: Path, **kwargs):
    from edgeqlora.runtimes.gguf import GGUFRuntime

    return GGUFRuntime(path, n_ctx=64, n_threads=1, **kwargs)


@pytest.fixture(scope="module")
def reference(files) -> dict[str, np.ndarray]:
    """Logits of fresh runtimes: the base alone and the base loaded with each adapter."""
    out = {}
    for name, lora in (("base", None), ("a", files["a"]), ("b", files["b"])):
        with _runtime(files["base"], lora_path=lora) as rt:
            out[name] = rt.logits(IDS)
    return out


def _llama_lora_logits(base: Path, ids: list[int], lora: Path) -> np.ndarray:
    """llama-cpp-python's own ``Llama(lora_path=...)`` with ``logits_all``: a route to the
    adapted model that shares nothing with the runtime's adapter API or its batch decoding."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(base), lora_path=str(lora), logits_all=True, n_ctx=64,
                n_batch=64, n_threads=1, verbose=False, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def test_switching_adapters_without_reloading_the_base(files, reference):
    # The adapters really change the model, and differently: otherwise the checks prove nothing.
    assert np.abs(reference["a"] - reference["base"]).max() > 0.1
    assert np.abs(reference["a"] - reference["b"]).max() > 0.1
    # llama-cpp-python's own Llama(lora_path=A): an independent route to the same model.
    raw = _llama_lora_logits(files["base"], IDS, files["a"])
    np.testing.assert_allclose(reference["a"], raw, atol=ATOL, rtol=0)

    with _runtime(files["base"]) as rt:
        llm, model = rt._llm, rt._llm._model
        np.testing.assert_array_equal(rt.logits(IDS), reference["base"])
        rt.set_adapter(files["a"])
        assert rt.lora_path == files["a"] and rt.lora_scale == 1.0
        np.testing.assert_allclose(rt.logits(IDS), reference["a"], atol=ATOL, rtol=0)
        rt.set_adapter(files["b"])
        np.testing.assert_allclose(rt.logits(IDS), reference["b"], atol=ATOL, rtol=0)
        rt.set_adapter(None)
        assert rt.lora_path is None and rt.info()["lora"] is None
        np.testing.assert_allclose(rt.logits(IDS), reference["base"], atol=ATOL, rtol=0)
        rt.set_adapter(files["a"])  # back again: the loaded copy is reused
        np.testing.assert_allclose(rt.logits(IDS), reference["a"], atol=ATOL, rtol=0)
        assert len(rt.info()["loaded_adapters"]) == 2
        # The same llama.cpp model and context throughout: the base was loaded once.
        assert rt._llm is llm and rt._llm._model is model


def test_adapter_scale(files, reference):
    with _runtime(files["base"]) as rt:
        rt.set_adapter(files["a"], scale=0.0)
        np.testing.assert_allclose(rt.logits(IDS), reference["base"], atol=ATOL, rtol=0)
        rt.set_adapter(files["a"], scale=0.5)
        half = rt.logits(IDS)
        assert rt.info()["lora_scale"] == 0.5
    assert np.abs(half - reference["base"]).max() > 0.05
    assert np.abs(half - reference["a"]).max() > 0.05
    with _runtime(files["base"], lora_path=files["a"], lora_scale=0.5) as rt:
        np.testing.assert_allclose(rt.logits(IDS), half, atol=ATOL, rtol=0)


def test_switch_drops_the_prompt_cache(files):
    """With prompt_cache=True a second call reuses the cached keys/values of a shared prefix;
    after a switch they belong to the old adapter and must not be reused."""
    prompt = IDS[:24]
    with _runtime(files["base"], lora_path=files["b"]) as rt:
        want_b = rt.generate(prompt, max_new_tokens=12)
    with _runtime(files["base"], lora_path=files["a"], prompt_cache=True) as rt:
        want_a = rt.generate(prompt, max_new_tokens=12)
        rt.set_adapter(files["b"])
        assert rt.generate(prompt, max_new_tokens=12) == want_b
        rt.set_adapter(files["a"])
        assert rt.generate(prompt, max_new_tokens=12) == want_a
    assert want_a != want_b


def test_bad_adapter_files_are_clear_errors(files, reference, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(files["a"].read_bytes()[:-512])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with _runtime(files["base"], lora_path=files["a"]) as rt:
        for path, match in [
            (tmp_path / "missing.gguf", r"missing\.gguf does not exist"),
            (junk, r"junk\.gguf is not a GGUF file"),
            (files["other"], r"returned NULL: .*incorrect shape"),
            (files["base"], r"returned NULL: .*general\.type .*model"),
            (truncated, r"returned NULL: .*(corrupted|incomplete)"),
        ]:
            with pytest.raises(InputError, match=match):
                rt.set_adapter(path)
        with pytest.raises(InputError, match="scale"):
            rt.set_adapter(files["b"], scale=float("nan"))
        # A failed switch leaves the previous adapter in place.
        assert rt.lora_path == files["a"]
        np.testing.assert_allclose(rt.logits(IDS), reference["a"], atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="closed"):
        rt.set_adapter(files["a"])
    # At load time too (llama-cpp-python's own lora_path check would let this one crash).
    with pytest.raises(InputError, match=r"other-base\.f32\.gguf .*incorrect shape"):
        _runtime(files["base"], lora_path=files["other"])


def test_cli_run_with_a_lora(files, capsys):
    """`edgeqlora run BASE --lora A` answers as the base with A applied; a bad adapter or an
    ONNX-only option is a one-line error (exit 2)."""
    from edgeqlora.cli import main

    with _runtime(files["base"], lora_path=files["a"]) as rt:
        expected = rt.generate("Once upon a time", max_new_tokens=6)
    args = ["run", str(files["base"]), "--prompt", "Once upon a time", "--max-new-tokens", "6",
            "--threads", "1", "--n-ctx", "64"]
    assert main(args + ["--lora", str(files["a"])]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(args + ["--lora", str(files["other"])]) == 2
    err = capsys.readouterr().err
    assert "could not load LoRA adapter" in err and len(err.strip().splitlines()) == 1


def test_cli_lora_scale_needs_an_adapter_and_a_finite_number(files, capsys):
    """`--lora-scale` on a model that runs no adapter, or a NaN scale, is a one-line error rather
    than a flag silently ignored."""
    from edgeqlora.cli import main

    args = ["run", str(files["base"]), "--prompt", "Once", "--max-new-tokens", "2",
            "--threads", "1", "--n-ctx", "64"]
    assert main(args + ["--lora-scale", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "runs no LoRA adapter" in err and len(err.strip().splitlines()) == 1
    for bad in ("nan", "inf"):
        assert main(args + ["--lora", str(files["a"]), "--lora-scale", bad]) == 2
        err = capsys.readouterr().err
        assert "finite" in err and len(err.strip().splitlines()) == 1
    assert main(args + ["--lora", str(files["a"]), "--lora-scale", "0.5"]) == 0

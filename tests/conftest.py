"""Shared fixtures: tiny random Llama-family models built from a config, with the embedded
model's real tokenizer. Nothing is downloaded; seeds are fixed.

The tokenizer files are committed under ``tests/assets/smollm2-tokenizer`` (``tokenizer_dir``),
exactly as the embedded conversion writes them (``tests/test_assets.py`` keeps them so), so that
tests of tiny models never convert the embedded model. ``embedded_dir`` converts it (once per
``EDGEQLORA_HOME``), for the tests of its real weights, which are marked ``slow``."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest

# Two cores: keep torch from oversubscribing them when pytest runs helpers in subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["EDGEQLORA_EVAL_CACHE"] = "0"  # no run sees another run's base evaluation
# Round trips of the tiny bases kept per test process, not in the user's cache (merges of the
# same tiny base in later tests read them back: edgeqlora/roundtrip.py).
os.environ["EDGEQLORA_NF4_CACHE"] = tempfile.mkdtemp(prefix="edgeqlora-test-nf4-")
atexit.register(shutil.rmtree, os.environ["EDGEQLORA_NF4_CACHE"], True)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
# What the embedded conversion writes of those (no special_tokens_map.json: tokenizer_config.json
# holds the special tokens), copied from it; tests/test_assets.py checks they still match.
TOKENIZER_ASSETS = Path(__file__).resolve().parent / "assets" / "smollm2-tokenizer"


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: list[int]  # ggml dims, ne[0] (the row length) first
    data: Any  # numpy: F32/F16 as their dtype [rows.., row]; block types uint8 [rows.., bytes]


def read_gguf(path) -> tuple[dict, list[GGUFTensor]]:
    """A GGUF file's metadata (GGUF.* header counts left out) and its tensors in file order, as
    ``gguf.GGUFReader`` gives them, read through ``read_gguf_header(whole_arrays=True)`` in a
    fraction of its time (GGUFReader spends ~5 s building a view per vocabulary entry;
    tests/test_gguf_export.py checks the two agree)."""
    import gguf
    import numpy as np

    from edgeqlora.runtimes.gguf_header import read_gguf_header

    fields, table = read_gguf_header(path, whole_arrays=True)
    data = np.fromfile(path, dtype=np.uint8)
    floats = {"F32": np.float32, "F16": np.float16}
    tensors = []
    for t in table:
        raw = data[t.offset:t.offset + t.n_bytes]
        rows = tuple(reversed(t.dims[1:]))
        raw = (raw.view(floats[t.type]).reshape(*rows, t.dims[0]) if t.type in floats
               else raw.reshape(*rows, -1))
        tensors.append(GGUFTensor(t.name, gguf.GGMLQuantizationType[t.type], list(t.dims), raw))
    return fields, tensors


def wait_until_serving(base: str, proc, tries: int = 300) -> None:
    """Poll ``base/health`` until an ``edgeqlora serve`` subprocess answers (fails with its
    stderr if it exits first)."""
    import time

    import httpx

    for _ in range(tries):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.1)
    raise AssertionError(f"{base} did not answer /health")


def schema_validator(schema):
    """jsonschema's validator for ``schema``, the schema checked once: what
    ``jsonschema.validate`` does on every call (3.5 ms a call for the task schema, against
    0.04 ms for a validation alone)."""
    import json

    key = json.dumps(schema, sort_keys=True)
    if key not in _VALIDATORS:
        import jsonschema

        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        _VALIDATORS[key] = cls(schema)
    return _VALIDATORS[key]


_VALIDATORS: dict[str, Any] = {}


def schema_valid(text: str, schema) -> bool:
    """Whether ``text`` is one JSON value that ``schema`` accepts (jsonschema, independent of
    the grammar engine the runtimes constrain with)."""
    import json

    import jsonschema

    try:
        schema_validator(schema).validate(json.loads(text))
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the marks added here must count
def pytest_collection_modifyitems(config, items):
    # A test that needs the real embedded model (its ~1-minute conversion) is slow by
    # definition, so `make test-fast` never converts it; tiny-model tests use tests/assets.
    for item in items:
        if "embedded_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _bitsandbytes_imported_quietly():
    """bitsandbytes as the toolkit imports it (``quiet_bnb_import``: 0.4 s, where a plain
    import sets up torch.compile's inductor for 3 s), before any test imports it directly."""
    from edgeqlora.bnb_import import quiet_bnb_import

    quiet_bnb_import(required=False)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct's tokenizer files (no weights), committed with the
    tests. Read it, never write into it."""
    return TOKENIZER_ASSETS


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face checkpoint (converted once, cached):
    only for tests of its weights, which are marked slow; the tokenizer is ``tokenizer_dir``."""
    from edgeqlora.base import resolve_base

    return resolve_base("embedded")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


# The model families every stage is tested on: family -> (transformers model_type, the config
# keys that make a tiny random model of it look like the family's real checkpoints). Head
# dimensions are 16 (hidden 64, 4 heads) unless a family sets its own.
FAMILIES = {
    "llama": ("llama", {}),
    # Llama 3.x: RoPE scaled by frequency band (GGUF: a rope_freqs tensor).
    "llama3": ("llama", {"norm_noise": 0.2, "rope_theta": 500000.0,
                         "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 256}}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    # Qwen3: RMSNorm on each head's queries and keys; head_dim not hidden / heads.
    "qwen3": ("qwen3", {"norm_noise": 0.2, "head_dim": 32}),
    # Gemma 2: (1 + w) RMSNorm, norms after attention and MLP, scaled embeddings, GELU-tanh,
    # sliding and global layers alternating, soft-capped attention and final logits (caps
    # small enough for a random model's scores and logits to reach them: 50 and 30 would
    # leave tanh linear here, and a cap written wrongly unseen).
    "gemma2": ("gemma2", {"norm_noise": 0.2, "head_dim": 16, "query_pre_attn_scalar": 16,
                          "sliding_window": 8, "attn_logit_softcapping": 0.005,
                          "final_logit_softcapping": 0.5}),
    # Gemma 3 (text): Gemma 2's layout plus q/k norms, five sliding layers per global one
    # (each with its own RoPE base), no soft-capping.
    "gemma3": ("gemma3_text", {"norm_noise": 0.2, "head_dim": 16, "query_pre_attn_scalar": 16,
                               "sliding_window": 8, "layers": 6}),
    # Phi-3: fused qkv_proj and gate_up_proj, an untied output head.
    "phi3": ("phi3", {"norm_noise": 0.2, "tie": False}),
}


def build_tiny_model(out: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0,
                     hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 128, tie: bool = True) -> Path:
    """Write a tiny random model with the real SmolLM2 tokenizer into ``out`` as safetensors,
    like any local HF checkpoint. ``arch``: a transformers model_type (llama, mistral, qwen2,
    ...) or a name of ``FAMILIES``, whose settings override the keyword arguments."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    extra: dict = {}
    if arch in FAMILIES:
        arch, extra = FAMILIES[arch][0], dict(FAMILIES[arch][1])
        layers = extra.pop("layers", layers)
        tie = extra.pop("tie", tie)
        norm_noise = extra.pop("norm_noise", 0.0)
    else:
        norm_noise = 0.0
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        arch, vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=tie, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5, **extra,
    )
    model = AutoModelForCausalLM.from_config(config)
    if norm_noise:
        # Freshly initialised norms are all ones (Gemma: zeros, for 1 + w): random ones make a
        # norm written wrongly (the shift, the wrong tensor) change the logits.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1 and "norm" in name:
                    p.add_(norm_noise * torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists():
            shutil.copy(src, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="module")
def onnx_traces_reused():
    """For a module that exports the same tiny checkpoints many times: each is traced once
    (``exporters.onnx.reuse_traces``, itself tested in tests/test_onnx_export.py)."""
    from edgeqlora.exporters.onnx import reuse_traces

    with reuse_traces():
        yield


def train_tiny_device_aware(root: Path, tokenizer_dir: Path, quant: str,
                            hidden: int = 64, intermediate: int = 128) -> dict:
    """A tiny tied Llama in ``root/base`` trained 3 steps on its ``quant`` device base (32
    smart-home rows); returns {"root", "base", "adapter"}."""
    from edgeqlora import train as train_mod
    from edgeqlora.config import build_config
    from edgeqlora.tasks import iot

    base = build_tiny_model(root / "base", tokenizer_dir, hidden=hidden,
                            intermediate=intermediate)
    rows, _ = iot.generate(seed=0, n_train=32, n_eval=0)
    data = iot.write_jsonl(rows, root / "train.jsonl")
    cfg = build_config({"base": str(base), "data": str(data), "max_steps": 3, "batch_size": 4,
                        "lr": 2e-3, "warmup_steps": 1, "max_len": 160, "save_every": 0,
                        "eval_examples": 0, "quant_report_tokens": 0, "lora.r": 4,
                        "lora.dropout": 0.0, "quant": quant})
    adapter = train_mod.train(cfg, root / "run")
    return {"root": root, "base": base, "adapter": Path(adapter)}


def packed_layers_match_dense(base: Path, quant: str) -> list:
    """Load the device base ``quant`` of ``base`` dense (fp32) and packed (``GGMLLinear``) on
    CPU, put the same non-zero LoRA on both, and assert bit-identical logits and LoRA
    gradients. Returns the packed model's ``GGMLLinear`` layers for the caller's checks."""
    import torch

    from edgeqlora import device_base, qlora
    from edgeqlora.config import LoraConfig
    from edgeqlora.ggml_torch import GGMLLinear

    models = []
    for packed in (False, True):
        model = device_base.load_device_base(base, quant, "float32", "cpu", qlora.load_base,
                                             packed=packed)
        torch.manual_seed(0)
        models.append(qlora.attach_lora(model, LoraConfig(r=4, dropout=0.0)))
    dense, packed = models
    with torch.no_grad():  # the same non-zero LoRA in both
        theirs = dict(packed.named_parameters())
        for name, p in dense.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
                theirs[name].copy_(p)
    ids = torch.tensor([[1, 500, 600, 700, 42, 9, 12000, 3]])
    out = [m(ids).logits for m in models]
    assert torch.equal(out[0], out[1])
    for m, o in zip(models, out):
        o.float().pow(2).mean().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    return [m for m in packed.modules() if isinstance(m, GGMLLinear)]


def cuda_packed_matches_cpu(base: Path, quant: str, layers: int = 14) -> None:
    """On a GPU the device base ``quant``'s linear layers hold their packed bytes (the point
    of a 4-bit base), and the model computes what the CPU's dense fp32 device base computes.
    Skips without CUDA."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from edgeqlora import device_base, qlora
    from edgeqlora.ggml_torch import GGMLLinear

    gpu = device_base.load_device_base(base, quant, "float32", "cuda", qlora.load_base)
    cpu = device_base.load_device_base(base, quant, "float32", "cpu", qlora.load_base)
    packed = [m for m in gpu.modules() if isinstance(m, GGMLLinear)]
    assert len(packed) == layers and all(m.qweight.is_cuda for m in packed)
    ids = torch.tensor([[1, 500, 600, 700, 42, 9, 12000, 3]])
    with torch.no_grad():
        a, b = gpu(ids.cuda()).logits.cpu(), cpu(ids).logits
    # CUDA's fp32 matmuls sum in another order than the CPU's: measured differences are ~1e-6.
    assert (a - b).abs().max().item() < 1e-3


def refused_export(adapter: Path, tmp_path: Path, capsys, args=(), changed_tensor=None) -> str:
    """``edgeqlora export ADAPTER --no-parity *args`` must exit 2 with one line and write
    nothing (no ``x``, no hidden sibling); returns the line. ``changed_tensor``: first record
    another sha256 for that tensor in a copy of the adapter's device-base manifest, as if the
    base or the quantizer had changed since training."""
    import json
    import shutil

    from edgeqlora.artifacts import write_manifest
    from edgeqlora.cli import main

    if changed_tensor is not None:
        ad = tmp_path / "ad"
        shutil.copytree(adapter, ad)
        manifest = json.loads((ad / "manifest.json").read_text())
        manifest["quant"]["device"]["tensors"][changed_tensor]["sha256"] = "0" * 64
        write_manifest(ad, "adapter", {k: v for k, v in manifest.items()
                                       if k not in ("format_version", "kind", "created",
                                                    "files")})
        adapter = ad
    capsys.readouterr()
    rc = main(["export", str(adapter), "--out", str(tmp_path / "x"), "--no-parity", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x")]
    return err

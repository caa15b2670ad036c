"""A local GGUF file as the training base: ``base=path/to/model.gguf``.

Many users have only the GGUF they run in llama.cpp or Ollama. It is converted once into a
Hugging Face checkpoint under ``$EDGEQLORA_HOME/models/gguf-<name>-<key>/`` (lock, atomic
directory, manifest with sha256s: ``base_cache``), by the converter of the embedded model whose
tokenizer it shares, so its tokenizer splits text as llama.cpp does:

- files with a GPT-2-style BPE vocabulary: Llama-architecture ones with the ``smollm``
  pre-tokenizer (SmolLM2 and its fine-tunes) or ``llama-bpe`` (Llama 3), Qwen2 and Qwen3 ones
  with ``qwen2``: ``base.convert_embedded``, which rebuilds each pre-tokenizer's split;
- Gemma 3 files (SentencePiece vocabulary): ``base_gemma.convert_gemma3``

(the table is ``base.gguf_converters``, passed in: this module imports neither).

Anything else is refused before any work, naming what the file holds: a tokenizer rebuilt by
guesswork would train on other tokens than the device reads. After the conversion the new
tokenizer is checked against llama.cpp's on the same file (``PROBES``, with llama-cpp-python):
a single differing string refuses the base, naming it, and nothing is kept.

The cache key is the file's resolved path, size and modification time (hashing a multi-GB file
on every resolve would cost more than the check is worth); the manifest records its sha256.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from .base_cache import build_locked, cache_problem, models_dir
from .errors import InputError

# Strings whose tokenization a converted tokenizer must share with llama.cpp: digits, spaces
# and newlines in runs, punctuation, accents, CJK, emoji, code, chat markup.
PROBES = [
    "Turn on the kitchen light at 7:30 and set the thermostat to 21.5 degrees",
    "  0.  12345678  007 3.14159 -42 1e-5", "a\n\nb\n\n\n c\t\td  \n  e", " " * 33 + "x",
    "Hello, world! It's a test: (brackets) [square] {curly} <angle> \"quotes\" 'single'",
    "naïve café über señor Ωμέγα Привет мир", "日本語のテキストと中文文本", "emoji 🙂🚀 👍🏽",
    "def f(x):\n    return x ** 2  # comment\n", "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "http://example.com/a?b=c&d=e",
    "ALL CAPS and MiXeD cAsE", "tab\tseparated\tvalues", "", "end with space ",
]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "model"


def _header(path: Path) -> tuple[dict[str, Any], list]:
    """The file's metadata less the vocabulary arrays (the fast header reader skips them; gguf's
    GGUFReader spends seconds on a 49k-entry vocabulary, which the converters read themselves),
    and its tensor table."""
    from .runtimes.gguf_header import read_gguf_header

    try:
        fields, tensors = read_gguf_header(path)
    except InputError as exc:
        raise InputError(f"base model {path} is not a readable GGUF file ({exc})") from None
    return {k: v for k, v in fields.items()
            if not k.endswith((".tokens", ".scores", ".token_type", ".merges"))}, tensors


def _check_rope(path: Path, fields: dict[str, Any], tensors: list) -> None:
    """Refuse a file whose RoPE scaling lives in a ``rope_freqs`` tensor (Llama 3.1 and later):
    llama.cpp's converter keeps only the per-frequency factors, not the config transformers
    builds its RoPE from, so the checkpoint would rotate positions otherwise than the device."""
    if any(t.name == "rope_freqs.weight" for t in tensors):
        raise InputError(f"base model {path}: a {fields.get('general.architecture')} GGUF whose "
                         "RoPE scaling is a rope_freqs tensor (Llama 3.1 and later) cannot be "
                         "converted to a checkpoint with the same RoPE; pass the model's Hugging "
                         "Face directory instead")


def converter_for(fields: dict[str, Any], path: Path, converters: dict[tuple, Any]):
    """(convert function, converter version) for this file from ``converters`` (keyed by
    (architecture, tokenizer model, pre-tokenizer or None for any); ``base`` passes its
    table), or an InputError naming what the file holds and what is supported."""
    arch = fields.get("general.architecture")
    model, pre = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre")
    for (a, m, p), converter in converters.items():
        if (a, m) == (arch, model) and p in (None, pre):
            return converter
    raise InputError(f"base model {path}: a {arch} GGUF with a {model!r} tokenizer (pre-tokenizer "
                     f"{pre!r}) cannot be converted to a checkpoint whose tokenizer is known to "
                     "match llama.cpp's; supported GGUF bases: llama with the smollm "
                     "(SmolLM2) or llama-bpe (Llama 3) BPE tokenizer, qwen2 and qwen3 with the "
                     "qwen2 one, gemma3. Pass the model's Hugging Face directory instead")


def ensure_gguf_base(path: Path, converters: dict[tuple, Any]) -> Path:
    """Directory of the checkpoint converted from the GGUF ``path``, converting it once."""
    path = Path(path).resolve()
    fields, tensors = _header(path)
    convert, version = converter_for(fields, path, converters)
    _check_rope(path, fields, tensors)
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    out = models_dir() / f"gguf-{_slug(path.stem)}-{key[:12]}"

    def source_problem(source: dict[str, Any]) -> str | None:
        if (source.get("size_bytes"), source.get("mtime_ns")) != (stat.st_size,
                                                                  stat.st_mtime_ns):
            return f"converted from another version of {path.name}"
        return None

    def run() -> dict[str, Any]:
        from .artifacts import sha256_file

        name = fields.get("general.name") or path.stem
        record = {"id": str(path), "name": name, "license": fields.get("general.license"),
                  "source": {"file": str(path), "sha256": sha256_file(path),
                             "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}}
        return convert(path, out, record)

    done = build_locked(out, lambda: cache_problem(out, version, source_problem), run,
                        str(path), f"converting {path.name} into {out} (once)")
    problem = tokenizer_mismatch(path, done)
    if problem is not None:
        import shutil

        shutil.rmtree(done, ignore_errors=True)
        raise InputError(f"base model {path}: the converted tokenizer splits {problem!r} "
                         "differently from llama.cpp on the same file; refusing a base that "
                         "would train on other tokens than the device reads")
    return done


def tokenizer_mismatch(gguf_path: Path, model_dir: Path) -> str | None:
    """The first of ``PROBES`` the checkpoint's tokenizer and llama.cpp's split differently
    (special tokens on, the checkpoint's BOS rule), or None; None without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    theirs = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        for text in PROBES:
            want = theirs.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if _ids(ours, text) != want:
                return text
        # With the file's own special tokens (llama.cpp adds a BOS where the file says so).
        for text in PROBES[:2]:
            want = theirs.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            if _ids(ours, text, special=True) != want:
                return f"{text} (with the special tokens added)"
    finally:
        theirs.close()
    return None


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special).ids)

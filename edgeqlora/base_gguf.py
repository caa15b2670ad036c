"""A local GGUF file as the training base: ``base=path/to/model.gguf``.

Many users have only the GGUF they run in llama.cpp or Ollama. It is converted once into a
Hugging Face checkpoint under ``$EDGEQLORA_HOME/models/gguf-<name>-<key>/`` (lock, atomic
directory, manifest with sha256s: ``base_cache``), by the converter of the embedded model whose
tokenizer it shares, so its tokenizer splits text as llama.cpp does:

- files with a GPT-2-style BPE vocabulary: Llama-architecture ones with the ``smollm``
  pre-tokenizer (SmolLM2 and its fine-tunes) or ``llama-bpe`` (Llama 3), Qwen2 and Qwen3 ones
  with ``qwen2``: ``base.convert_embedded``, which rebuilds each pre-tokenizer's split;
- Gemma 3 files (SentencePiece vocabulary): ``base_gemma.convert_gemma3``

(the table is ``base.gguf_converters``, passed in: this module imports neither). A Llama 3.1+
file's RoPE scaling, kept only as the ``rope_freqs`` divisors, is solved back into Llama 3's
``rope_parameters`` (``llama3_rope``).

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


def llama3_rope(path: Path, fields: dict[str, Any] | None = None,
                tensors: list | None = None) -> dict[str, Any] | None:
    """transformers' ``rope_parameters`` for a GGUF whose RoPE scaling is a ``rope_freqs``
    tensor (Llama 3.1 and later), None for a file without one. llama.cpp's converter keeps only
    the per-frequency divisors, and transformers' GGUF loader ignores them (the checkpoint
    would rotate positions otherwise than the device), so Llama 3's parameters are solved from
    the divisors and the divisors computed again from them (``llama3_rope_factors``, the
    exporter's): what does not come back to float32 rounding is refused. The divisors depend
    only on ratios of ``original_max_position_embeddings`` and the two frequency factors, so
    ``low_freq_factor`` is taken as Llama 3.1's 1 and the other two solved. Hand-written: no
    library inverts the converter."""
    import math

    import numpy as np

    from .exporters.gguf.metadata import llama3_rope_factors

    if fields is None or tensors is None:
        fields, tensors = _header(path)
    table = next((t for t in tensors if t.name == "rope_freqs.weight"), None)
    if table is None:
        return None
    arch = fields.get("general.architecture")

    def refuse(why: str) -> InputError:
        return InputError(f"base model {path}: a {arch} GGUF whose RoPE scaling is a rope_freqs "
                          f"tensor {why}; pass the model's Hugging Face directory instead")

    heads = int(fields.get(f"{arch}.attention.head_count") or 0)
    head_dim = int(fields.get(f"{arch}.rope.dimension_count") or
                   (fields.get(f"{arch}.embedding_length") or 0) // max(heads, 1))
    theta = float(fields.get(f"{arch}.rope.freq_base") or 10000.0)
    if table.type != "F32" or table.n_elements != head_dim // 2 or not head_dim:
        raise refuse(f"of {table.n_elements} {table.type} values for {head_dim}-wide heads")
    got = np.fromfile(path, dtype="<f4", count=table.n_elements, offset=table.offset)
    if not np.all(np.isfinite(got)) or got.min() < 1.0 - 1e-6:
        raise refuse("holding divisors below 1 or not finite (not Llama 3's scaling)")
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(got.max())
    unscaled, scaled = wavelen[got <= 1 + 1e-6], wavelen[got >= factor * (1 - 1e-6)]
    smooth = (got > 1 + 1e-6) & (got < factor * (1 - 1e-6))
    low = 1.0
    # s = (old / wavelen - low) / (high - low) with 1 / divisor = (1 - s) / factor + s
    s = (1 / got[smooth] - 1 / factor) / (1 - 1 / factor) if smooth.any() else got[smooth]
    if smooth.sum() >= 2:  # s is linear in 1 / wavelen: slope old / (high - low)
        slope, intercept = np.polyfit(1 / wavelen[smooth], s, 1)
        span = -low / intercept if intercept < 0 else 0.0
        high, old = low + span, slope * span
    elif smooth.sum() == 1:  # Llama 3.1's high_freq_factor 4; old from the one point
        high = 4.0
        old = float((s[0] * (high - low) + low) * wavelen[smooth][0])
    elif factor > 1 + 1e-6:  # no divisor between 1 and factor: edges anywhere between the two
        old = float(scaled.min()) * (1 - 1e-3)
        high = min(4.0, math.sqrt(old / float(unscaled.max()))) if len(unscaled) else 4.0
    else:
        return None  # every divisor 1: the unscaled RoPE
    if not (math.isfinite(old) and math.isfinite(high) and high > low and old > 0):
        raise refuse("whose divisors are not of Llama 3's form")
    worst = 0.0
    # The solved values as a config writes them (8192, 4.0) where those give the same divisors.
    for rounded in ((round(old), round(float(high), 3), round(factor, 3)),
                    (old, float(high), factor)):
        params = {"rope_type": "llama3", "rope_theta": theta, "factor": rounded[2],
                  "low_freq_factor": low, "high_freq_factor": rounded[1],
                  "original_max_position_embeddings": rounded[0]}
        again = llama3_rope_factors({"head_dim": head_dim, "rope_parameters": params})
        worst = float(np.abs(again / got - 1).max())
        if worst < 1e-5:
            return params
    raise refuse(f"whose divisors are not of Llama 3's form (the solved parameters give them "
                 f"back to {worst:.1e}, not to float32 rounding)")


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
    llama3_rope(path, fields, tensors)  # refused here, before any work, if not solvable
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

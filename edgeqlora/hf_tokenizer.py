"""A base's Hugging Face tokenizer, loaded once per content of the files that make it.

A load costs ~0.2-0.3 s (transformers parses tokenizer.json in Python and again in Rust); an
export loads the same files more than once, and the quickstart trains, exports and gates three
runs of one base in one process. The trainer, the export stage, the merge measurement and the
parity gate's reference share these objects and only read them (encode, chat templates): none
may change one (padding side, special tokens, template), or the next caller would see it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_loaded: dict[str, Any] = {}  # by artifacts.tokenizer_digest, the last four


def load(model_dir: str | Path):
    """``AutoTokenizer.from_pretrained(model_dir)``, kept by the content of its files."""
    from transformers import AutoTokenizer

    from .artifacts import tokenizer_digest

    key = tokenizer_digest(model_dir)
    if key not in _loaded:
        while len(_loaded) >= 4:
            _loaded.pop(next(iter(_loaded)))
        _loaded[key] = AutoTokenizer.from_pretrained(model_dir)
    return _loaded[key]

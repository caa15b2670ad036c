"""The untrained base's evaluation, kept across runs: the "before" column of every training run
on the same base and held-out set is the same greedy decoding of the same model, and on CPU it
is minutes of a rambling model writing 64 tokens an answer (174 s of a busy quickstart).

The key is everything the figures depend on: the base's weights (sha256), how it is quantized
and computed (quant, double_quant, compute_dtype, the device type), the LoRA settings (a zero
LoRA B leaves the outputs exactly the base's, but DoRA and some inits do not), the held-out
rows and their tokens, the decoding settings (max_new_tokens, eval_batch_size: left padding
changes the float rounding) and the versions of torch, transformers, peft, bitsandbytes and
edgeqlora. Files live in ``$EDGEQLORA_HOME/evals/<key>.json``, written atomically; a file that
cannot be read is ignored and rewritten. ``EDGEQLORA_EVAL_CACHE=0`` turns the cache off (the
test suite does, except where it tests the cache); ``EDGEQLORA_EVAL_CACHE=DIR`` moves it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = 1


def cache_dir() -> Path | None:
    """Where cached evaluations live, or None when the cache is off."""
    from .base_cache import cache_dir

    return cache_dir("EDGEQLORA_EVAL_CACHE", "evals")


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("edgeqlora", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def base_eval_key(cfg, fingerprint: dict[str, Any], rows: list[dict], examples: list[dict],
                  device: str) -> str:
    """The cache key of the untrained base's evaluation under ``cfg`` (see the module
    docstring for what goes in)."""
    from .config import to_dict

    tokens = hashlib.sha256()
    for ex in examples:
        tokens.update(json.dumps([list(map(int, ex["input_ids"])),
                                  list(map(int, ex["labels"]))]).encode())
    parts = {
        "format": FORMAT,
        "base": fingerprint.get("weights_sha256"), "model_type": fingerprint.get("model_type"),
        "quant": cfg.quant, "double_quant": cfg.double_quant,
        "compute_dtype": cfg.compute_dtype, "device": device,
        "lora": to_dict(cfg.lora), "max_len": cfg.max_len,
        "max_new_tokens": cfg.max_new_tokens, "eval_batch_size": cfg.eval_batch_size,
        "rows": hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode())
        .hexdigest(),
        "tokens": tokens.hexdigest(), "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load(key: str) -> dict[str, Any] | None:
    """The cached evaluation under ``key``, or None (cache off, not there, unreadable)."""
    root = cache_dir()
    if root is None:
        return None
    try:
        record = json.loads((root / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key \
            or not isinstance(record.get("result"), dict):
        return None
    return record["result"]


def store(key: str, result: dict[str, Any]) -> None:
    """Keep ``result`` under ``key``; a cache that cannot be written is skipped silently (the
    run's own records have the figures)."""
    root = cache_dir()
    if root is None or not result:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".eval-", dir=root)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "result": result}, f, default=str)
        os.replace(tmp, root / f"{key}.json")
    except OSError:
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass

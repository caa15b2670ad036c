"""The 4-bit round trip of a base's weights, kept across runs.

A QLoRA adapter was trained against its base's weights quantized by bitsandbytes and
dequantized back (``quantize_4bit`` + ``dequantize_4bit``, what ``Linear4bit`` computes with).
A merge into the ``dequantized`` base (``merge_base=auto`` for a 4-bit adapter, the default)
needs that for every 2-D decoder weight: 106 M values on SmolLM2-135M, 3-4 s of bitsandbytes'
CPU quantizer an export (``torch.bucketize`` and the block absmax), and the same for every
adapter trained on the same base with the same settings. So the quantized weights -- the 4-bit
codes and each weight's ``QuantState`` as ``QuantState.as_dict(packed=True)`` gives it, the
layout transformers saves 4-bit checkpoints in -- are kept in
``$EDGEQLORA_HOME/nf4/<key>.safetensors`` (55 MB for SmolLM2-135M) and later merges only
dequantize them (0.04 s), with bitsandbytes' own ``dequantize_4bit``: the same numbers (tested).

The key is everything the codes depend on: the base's weights (sha256), the settings (quant
type, block size, double quantization, the dtype quantized from) and the torch and bitsandbytes
versions. A file that cannot be read, or lacks a weight or has it in another shape, is ignored
and rewritten; one that cannot be written is skipped. ``EDGEQLORA_NF4_CACHE=0`` turns the cache
off; ``EDGEQLORA_NF4_CACHE=DIR`` moves it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = 1
# The keys ``QuantState.as_dict(packed=True)`` gives, each stored as ``<weight name>.<key>``.
_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
               "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")


def settings(quant: dict[str, Any]) -> dict[str, Any]:
    """bitsandbytes' ``quantize_4bit`` arguments (and the dtype it quantizes from) for an
    adapter's ``quant`` record."""
    import torch

    return {"dtype": getattr(torch, quant.get("compute_dtype") or "float32", torch.float32),
            "blocksize": int(quant.get("block_size") or 64),
            "compress_statistics": bool(quant.get("double_quant", True)),
            "quant_type": quant.get("quant", "nf4")}


def _bnb():
    from .bnb_import import quiet_bnb_import

    quiet_bnb_import()
    import bitsandbytes.functional as bnbf

    return bnbf


def _quantize(weight, s: dict[str, Any]):
    bnbf = _bnb()

    s = dict(s)
    return bnbf.quantize_4bit(weight.to(s.pop("dtype")).contiguous(), **s)


def _dequantize(q, state):
    return _bnb().dequantize_4bit(q, state).float()


def nf4_roundtrip(weight, quant: dict[str, Any]):
    """``weight`` as the trained model saw it: quantized to 4-bit by bitsandbytes with the
    adapter's settings, dequantized back to fp32 (the same two calls Linear4bit makes)."""
    return _dequantize(*_quantize(weight, settings(quant)))


def cache_dir() -> Path | None:
    """Where kept round trips live, or None when the cache is off."""
    from .base_cache import cache_dir

    return cache_dir("EDGEQLORA_NF4_CACHE", "nf4")


def cache_key(weights_sha256: str, quant: dict[str, Any]) -> str | None:
    """The cache file's name for this base and these settings (None without bitsandbytes)."""
    from importlib.metadata import PackageNotFoundError, version

    s = settings(quant)
    try:
        versions = {"torch": version("torch"), "bitsandbytes": version("bitsandbytes")}
    except PackageNotFoundError:
        return None
    parts = {"format": FORMAT, "base": weights_sha256, "quant_type": s["quant_type"],
             "blocksize": s["blocksize"], "double_quant": s["compress_statistics"],
             "dtype": str(s["dtype"]), **versions}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class RoundTrips:
    """The round trips of one base's weights under one adapter's settings: ``get(name, w)``
    answers from the cache file when it holds ``name``, else quantizes ``w``; ``save()`` keeps
    what was quantized, once every weight asked for is in hand."""

    def __init__(self, weights_sha256: str | None, quant: dict[str, Any]):
        self.settings = settings(quant)
        root = cache_dir() if weights_sha256 else None
        key = cache_key(weights_sha256, quant) if root else None
        self.path = root / f"{key}.safetensors" if key else None
        self._file, self._names = self._open()
        self._all: dict[str, Any] = {}  # every weight asked for: packed codes + state, to save
        self.hits = self.misses = 0

    def _open(self):
        """The cache file (or None) and, by weight name, the keys of its state."""
        if self.path is None or not self.path.is_file():
            return None, {}
        from safetensors import SafetensorError, safe_open

        try:
            f = safe_open(str(self.path), framework="pt")
            keys = set(f.keys())
        except (OSError, SafetensorError):
            return None, {}
        names: dict[str, list[str]] = {}
        for key in keys:
            for part in _STATE_KEYS:
                if key.endswith("." + part):
                    names.setdefault(key[:-len(part) - 1], []).append(key)
        return f, {n: parts for n, parts in names.items() if n in keys}

    def get(self, name: str, weight):
        """``weight`` (the base tensor ``name``) round-tripped through 4-bit."""
        q, state = self._cached(name, tuple(weight.shape))
        if q is None:
            self.misses += 1
            q, state = _quantize(weight, self.settings)
        else:
            self.hits += 1
        if self.path is not None:
            self._all[name] = (q, state)
        return _dequantize(q, state)

    def _cached(self, name: str, shape: tuple[int, ...]):
        if self._file is None or name not in self._names:
            return None, None
        import torch

        QuantState = _bnb().QuantState
        try:
            parts = {k[len(name) + 1:]: self._file.get_tensor(k) for k in self._names[name]}
            state = QuantState.from_dict(parts, device=torch.device("cpu"))
            q = self._file.get_tensor(name)
        except Exception:  # a damaged entry is a cache miss, never an error
            return None, None
        if tuple(state.shape) != shape or state.dtype != self.settings["dtype"] \
                or state.blocksize != self.settings["blocksize"] \
                or state.quant_type != self.settings["quant_type"] \
                or state.nested != self.settings["compress_statistics"]:
            return None, None
        return q, state

    def save(self) -> None:
        """Write the cache file when this run quantized anything (atomically; an unwritable
        cache is skipped: it only saves time)."""
        if self.path is None or not self.misses or not self._all:
            return
        from safetensors.torch import save_file

        tensors = {}
        for name, (q, state) in self._all.items():
            tensors[name] = q.contiguous()
            for k, v in state.as_dict(packed=True).items():
                tensors[f"{name}.{k}"] = v.clone().contiguous()  # safetensors refuses shared
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".nf4-", dir=self.path.parent)
            os.close(fd)
            save_file(tensors, tmp, metadata={"format": str(FORMAT)})
            os.replace(tmp, self.path)
        except OSError:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

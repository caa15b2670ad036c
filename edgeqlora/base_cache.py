"""The caches of converted base models under ``$EDGEQLORA_HOME/models/``, for every embedded model.

An embedded model (``edgeqlora.base`` for SmolLM2, ``edgeqlora.base_gemma`` for Gemma 3) is a GGUF
file converted once into a Hugging Face checkpoint directory. What they share lives here: the
cache root, the cheap "can this cache be used" check against its manifest, and the build under a
file lock (another process may be converting the same model) into an atomic directory, with the
leftovers of a killed converter removed first. The conversion itself is the caller's.

Torch-free; ``filelock`` is imported only when a conversion has to run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from .artifacts import read_manifest
from .errors import EdgeQloraError, InputError

log = logging.getLogger(__name__)

MANIFEST_KIND = "base-model"
# A conversion takes about a minute alone; with several processes queued on two cores, longer.
LOCK_TIMEOUT_S = 1800


def edgeqlora_home() -> Path:
    """Cache root: ``$EDGEQLORA_HOME`` if set, else ``~/.cache/edgeqlora``."""
    env = os.environ.get("EDGEQLORA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgeqlora"


def cache_dir(env_var: str, name: str) -> Path | None:
    """A cache's folder: ``$EDGEQLORA_HOME/<name>``, or where ``env_var`` moves it; None when
    ``env_var`` turns it off (0, off, false, no)."""
    env = os.environ.get(env_var, "").strip()
    if env.lower() in ("0", "off", "false", "no"):
        return None
    return Path(env).expanduser() if env else edgeqlora_home() / name


def models_dir() -> Path:
    return edgeqlora_home() / "models"


def cache_problem(out: Path, converter_version: int,
                  source_problem: Callable[[dict[str, Any]], str | None]) -> str | None:
    """Why the converted cache at ``out`` cannot be used (None when it can).

    Cheap on purpose (sizes, not hashes): it runs on every resolve. ``source_problem`` gets the
    manifest's ``source`` record and says whether it was converted from another file.
    """
    if not out.is_dir():
        return "not converted yet"
    try:
        manifest = read_manifest(out, kind=MANIFEST_KIND)
    except EdgeQloraError as exc:
        return str(exc)
    if manifest.get("converter_version") != converter_version:
        return (f"written by converter version {manifest.get('converter_version')!r}, "
                f"this is {converter_version}")
    problem = source_problem(manifest.get("source", {}))
    if problem is not None:
        return problem
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for name, info in files.items():
        p = out / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info.get("size_bytes"):
            return (f"{name} has {p.stat().st_size} bytes, the manifest says "
                    f"{info.get('size_bytes')}")
    return None


def build_locked(out: Path, problem: Callable[[], str | None], convert: Callable[[], Any],
                 what: str, announce: str) -> Path:
    """Return ``out`` once ``problem()`` is None, running ``convert()`` under a lock if needed.

    ``what`` names the model in messages; ``announce`` is printed to stderr before a conversion
    (it runs once per machine and takes a while: a person waiting should know why).
    """
    if problem() is None:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the model cache {out.parent}: {exc.strerror}; set "
                         "EDGEQLORA_HOME to a writable directory") from None
    from filelock import FileLock, Timeout

    lock_path = out.parent / f".{out.name}.lock"
    try:
        lock = FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout:
        raise InputError(f"waited {LOCK_TIMEOUT_S} s for {lock_path} held by another edgeqlora "
                         f"process converting {what}; if none runs, delete the lock file"
                         ) from None
    except OSError as exc:
        raise InputError(f"cannot lock {lock_path}: {exc.strerror}; set EDGEQLORA_HOME to a "
                         "writable directory") from None
    try:
        # Another process may have converted it while we waited for the lock.
        why = problem()
        if why is None:
            return out
        if out.exists() and not out.is_dir():
            out.unlink()  # a stray file where the cache belongs: nothing of ours to keep
        if out.exists():
            log.warning("rebuilding the model cache %s: %s", out, why)
        remove_stale_temps(out)
        print(f"edgeqlora: {announce}", file=sys.stderr, flush=True)
        convert()
    finally:
        lock.release()
    return out


def remove_stale_temps(out: Path) -> None:
    # Left by a converter that was killed; safe to remove because the caller holds the lock.
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(old, ignore_errors=True)


def make_readable(tmp: Path) -> None:
    # mkdtemp makes the directory private; the cache is meant to be read like any model dir.
    tmp.chmod(0o755)
    for p in tmp.iterdir():
        p.chmod(0o644)


def combined_sha(weights: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(f"{name}:{weights[name]}\n".encode())
    return h.hexdigest()

"""Runtime shims (installed as ``edgeqlora.runtimes``): load an export and run it on a device.

Device side: numpy, jinja2 and one runtime library only. Never imports torch, transformers or
peft (``tests/test_runtimes.py`` checks ``sys.modules`` in a fresh interpreter).

    from edgeqlora import runtimes
    rt = runtimes.load("runs/quickstart/export-q4_k_m")     # an export dir or a bare .gguf
    rt.chat([{"role": "user", "content": "Turn on the kitchen light"}], max_new_tokens=64)
    for piece in rt.generate("Once upon a time", stream=True): print(piece, end="")
    rt.logits(rt.tokenize("Hello world"))                   # [n, vocab] float32, for parity

Every runtime has the interface of :class:`runtimes.base.Runtime`: ``tokenize``, ``detokenize``,
``render_chat`` / ``chat_ids`` (the model's own chat template, rendered as transformers does),
``chat``, ``generate`` (streaming or not), ``complete`` (streaming with finish reason and token
counts) and ``logits``. Runtimes are looked up by the export's ``target`` in ``RUNTIMES``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from edgeqlora.artifacts import MANIFEST, check_usable_export, read_manifest, sha256_file
from edgeqlora.errors import InputError, ManifestError
from edgeqlora.schema import read_schema

from .base import Completion, Runtime, default_threads

# target name -> "module:function" of its loader, imported only when that target is loaded, so
# a device with only llama-cpp-python never needs onnxruntime and vice versa. Each loader is
# called as loader(model_path, export_dir=..., manifest=..., **kwargs) and returns a Runtime.
# A new backend is one line here, e.g. "onnx": "edgeqlora.runtimes.onnx:load_onnx".
RUNTIMES: dict[str, str] = {
    "gguf": "edgeqlora.runtimes.gguf:load_gguf",
    "onnx": "edgeqlora.runtimes.onnx:load_onnx",
}

# Manifest keys an exporter may use to name its main model file.
_MODEL_FILE_KEYS = ("model_file", "model", "file")
_SUFFIXES = {"gguf": (".gguf",), "onnx": (".onnx",)}


def _loader(target: str) -> Callable[..., Runtime]:
    if target not in RUNTIMES:
        raise InputError(f"unknown runtime target {target!r}; known targets: "
                         f"{', '.join(sorted(RUNTIMES))}")
    module, _, func = RUNTIMES[target].partition(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise InputError(f"the {target!r} runtime is not part of this edgeqlora install "
                             f"({module} is missing)") from None
        raise


def _named_file(export_dir: Path, manifest: dict[str, Any], key: str) -> Path | None:
    # The exporter records its file names at the top level or in its "exporter" info.
    files = manifest.get("files") or {}
    for table in (manifest, manifest.get("exporter") or {}):
        name = table.get(key) if isinstance(table, dict) else None
        if isinstance(name, str) and name:
            if name not in files:
                raise ManifestError(f"{export_dir / MANIFEST}: {key}={name!r} is not listed "
                                    "in its 'files'")
            return export_dir / name
    return None


def model_files(export_dir: Path, manifest: dict[str, Any], target: str
                ) -> tuple[Path, Path | None]:
    """The main model file of an export and its separate adapter file, if it has one."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{export_dir / MANIFEST} has no 'files' table; re-export it")
    adapter = _named_file(export_dir, manifest, "adapter_file")
    for key in _MODEL_FILE_KEYS:
        found = _named_file(export_dir, manifest, key)
        if found is not None:
            return found, adapter
    suffixes = _SUFFIXES.get(target, ())
    models = sorted(n for n in files if n.endswith(suffixes)
                    and (adapter is None or export_dir / n != adapter))
    if len(models) != 1:
        raise ManifestError(f"{export_dir / MANIFEST} lists {len(models)} {'/'.join(suffixes)} "
                            f"model files ({', '.join(models) or 'none'}); expected one, or a "
                            f"'model_file' key naming it")
    return export_dir / models[0], adapter


def check_export_files(export_dir: Path, manifest: dict[str, Any], verify: bool) -> None:
    """Every file the manifest lists exists with its size (and sha256 when ``verify``)."""
    problems = []
    for name, meta in manifest.get("files", {}).items():
        p = export_dir / name
        if not p.is_file():
            problems.append(f"{name}: missing")
            continue
        size = meta.get("size_bytes") if isinstance(meta, dict) else None
        if size is not None and p.stat().st_size != size:
            problems.append(f"{name}: {p.stat().st_size} bytes, the manifest says {size} "
                            "(truncated or replaced)")
        elif verify and isinstance(meta, dict) and meta.get("sha256") \
                and sha256_file(p) != meta["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file changed)")
    if problems:
        raise InputError(f"export {export_dir} does not match its manifest: "
                         + "; ".join(problems) + ". Re-run the export.")


def load(path: str | Path, verify: bool = False, allow_failed: bool = False,
         **kwargs: Any) -> Runtime:
    """Load an export directory (``manifest.json`` with ``kind: export``) or a bare model file.

    The format comes from the manifest's ``target``, or for a bare file from its magic bytes.
    ``verify=True`` also checks every file's sha256 against the manifest (sizes are always
    checked). An export whose manifest records a failed verification or parity gate (kept
    with ``--keep-failed``) is refused unless ``allow_failed``. Keyword arguments go to the
    runtime (``n_ctx``, ``n_threads``, ``lora_path``...).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist; pass an export directory or a .gguf file")
    if p.is_dir():
        manifest = read_manifest(p)
        if manifest.get("kind") != "export":
            raise ManifestError(f"{p} holds a {manifest.get('kind')!r} artifact, not an export; "
                                "run 'edgeqlora export' first")
        target = manifest.get("target")
        if not isinstance(target, str):
            raise ManifestError(f"{p / MANIFEST} has no 'target' (expected one of "
                                f"{', '.join(sorted(RUNTIMES))})")
        loader = _loader(target)
        check_usable_export(p, manifest, allow_failed, "load")
        check_export_files(p, manifest, verify)
        model, adapter = model_files(p, manifest, target)
        if adapter is not None:
            # An adapter-only export: the base plus a LoRA file the runtime applies at load.
            kwargs.setdefault("lora_path", adapter)
        runtime = loader(model, export_dir=p, manifest=manifest, **kwargs)
        # The schema the model's answers follow (schema.json, listed in the manifest's files and
        # so size- and hash-checked with them): what run/serve constrain decoding to by default.
        runtime.json_schema = read_schema(p) if (manifest.get("schema") or {}).get("file") \
            else None
        return runtime
    from .gguf import is_gguf

    if is_gguf(p):
        return _loader("gguf")(p, **kwargs)
    if p.suffix == ".onnx":
        raise InputError(f"{p}: load ONNX models from their export directory (the runtime "
                         "needs the tokenizer files next to the model)")
    raise InputError(f"{p} is neither an export directory nor a GGUF file (first bytes are "
                     "not 'GGUF')")


__all__ = ["RUNTIMES", "Completion", "Runtime", "default_threads", "load",
           "check_export_files", "model_files"]

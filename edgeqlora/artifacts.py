"""Artifact directories: manifests, hashes and atomic writes.

Stages talk through directories on disk, each with a ``manifest.json``. Outputs are written into
a temporary sibling and renamed into place only when complete and verified, so a failed run
leaves no half-written model behind and never overwrites a good one silently.

Torch-free: the runtimes and devices import this too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InputError, ManifestError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# The files a Hugging Face tokenizer can consist of: what ``edgeqlora merge`` copies beside the
# merged weights and what every exporter ships beside the model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json",
                   # exporters.gguf.metadata.SOURCE_METADATA: the vocabulary of a base that was
                   # converted from a GGUF, as llama.cpp reads it
                   "source_metadata.json")
# What an export ships beside its model: the tokenizer files less the GGUF vocabulary sidecar,
# which only the GGUF writer reads (a GGUF export holds the vocabulary itself).
SHIPPED_TOKENIZER_FILES = tuple(f for f in TOKENIZER_FILES if f != "source_metadata.json")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_digest(directory: str | Path,
                     config_keys: Callable[[str], bool] | None = None) -> str:
    """sha256 of what makes a directory's tokenizer: its tokenizer files, extra chat templates
    and config.json (transformers picks the tokenizer class from it). The key of the caches that
    load or convert a tokenizer once per content (the export stage, the GGUF vocabulary). A
    reader that takes only some of config.json's top-level keys passes them as ``config_keys``:
    then only those keys count (the other models of one tokenizer share its entry)."""
    root = Path(directory)
    names = [*SHIPPED_TOKENIZER_FILES, "config.json",
             *(p.relative_to(root).as_posix()
               for p in sorted((root / "additional_chat_templates").glob("*.jinja")))]
    h = hashlib.sha256()
    for name in names:
        path = root / name
        if path.is_file():
            data = path.read_bytes()
            if name == "config.json" and config_keys is not None:
                data = _config_subset(data, config_keys)
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _config_subset(data: bytes, keep: Callable[[str], bool]) -> bytes:
    try:
        config = json.loads(data)
    except ValueError:
        return data  # unreadable: the whole file counts, and its reader says what is wrong
    if not isinstance(config, dict):
        return data
    subset = {k: v for k, v in config.items() if keep(k)}
    return json.dumps(subset, sort_keys=True).encode()


def file_table(directory: str | Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``directory`` except the manifest itself."""
    root = Path(directory)
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            table[rel] = {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
    return table


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones are left out)."""
    from importlib import metadata

    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(directory: str | Path, kind: str, data: dict[str, Any],
                   hash_files: bool = True) -> dict[str, Any]:
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **data,
    }
    manifest.setdefault("versions", versions("edgeqlora"))
    if hash_files:
        manifest["files"] = file_table(directory)
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(json_safe(manifest), indent=2, sort_keys=False,
                               allow_nan=False) + "\n")
    return manifest


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by the string ``"NaN"``,
    ``"Infinity"`` or ``"-Infinity"``: Python's json writes them bare, which is not JSON (other
    readers refuse the file), and a string cannot pass a numeric comparison by accident."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if obj != obj else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def export_failures(manifest: dict[str, Any]) -> list[str]:
    """Why an export's manifest says it must not be used: it records a verification or a
    parity gate that did not pass (a ``--keep-failed`` export). Whether its files are all
    there is ``verify_files`` / ``runtimes.check_export_files``."""
    problems = []
    check = manifest.get("verification")
    if isinstance(check, dict) and check.get("passed") is not True:
        why = "; ".join(str(p) for p in check.get("problems") or [])
        problems.append("its verification failed" + (f" ({why})" if why else ""))
    elif isinstance(check, dict):
        # "passed" beside a metric that is not a finite number (a NaN is written "NaN"): the
        # manifest contradicts itself, so it fails closed.
        bad = [k for k in ("top1", "kld") if k in check and not _finite_number(check[k])]
        if bad:
            records = ", ".join(f"{k} {check[k]!r}" for k in bad)
            problems.append(f"its verification records {records} (not a finite number) "
                            "beside passed: true")
    gate = manifest.get("parity")
    if isinstance(gate, dict) and gate.get("passed") is not True:
        problems.append("its parity gate failed"
                        + (f" ({', '.join(map(str, gate.get('failures') or []))})"
                           if gate.get("failures") else ""))
    return problems


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def check_usable_export(directory: str | Path, manifest: dict[str, Any],
                        allow_failed: bool = False, use: str = "use") -> None:
    """Refuse an export whose manifest records a failed check (``export_failures``) unless
    ``allow_failed`` (the ``--allow-failed`` of run, serve, parity, bundle and devices fit)."""
    problems = export_failures(manifest)
    if problems and not allow_failed:
        raise ManifestError(f"export {directory}: {'; '.join(problems)}, so it will not "
                            f"{use} it; export it again, or pass --allow-failed to {use} it "
                            "anyway")


def check_apart(out: str | Path, inputs: dict[str, str | Path], what: str = "output") -> None:
    """Refuse an output directory that is, contains or lies inside one of ``inputs`` (name ->
    path): replacing it would delete the input, and writing inside it would change the
    directory its manifest describes. Checked before any work."""
    o = Path(out).resolve()
    for name, path in inputs.items():
        if not Path(path).exists():
            continue  # the stage that reads it says it does not exist
        i = Path(path).resolve()
        if o == i or i.is_relative_to(o) or o.is_relative_to(i):
            rel = "is" if o == i else ("contains" if i.is_relative_to(o) else "is inside")
            raise InputError(f"{what} {out} {rel} the {name} {path}; choose another --out")


def remove_stale_siblings(out: str | Path) -> list[Path]:
    """Remove the hidden ``.NAME.tmp-PID-*``, ``.NAME.work-PID-*`` and ``.NAME.old-PID``
    siblings of ``out`` that a killed run (kill -9, a power cut) left behind: those whose
    process ``PID`` is gone. Returns what was removed."""
    out = Path(out)
    parent = out.resolve().parent
    removed = []
    if not parent.is_dir():
        return removed
    prefix = f".{out.name}."
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        kind, _, rest = p.name[len(prefix):].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "work", "old", "stage") or not pid.isdigit():
            continue
        if _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def scratch_dir(out: str | Path, kind: str) -> Path:
    """A private hidden sibling of ``out`` named ``.NAME.KIND-PID-XXXX`` (on the same
    filesystem, so renames are atomic); ``remove_stale_siblings`` recognises it once this
    process is gone."""
    out = Path(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-",
                                 dir=out.resolve().parent))


def read_json(path: str | Path, error: type[Exception] = InputError) -> Any:
    """Parse a JSON file; one that is not valid JSON raises ``error`` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})") from None


def read_manifest(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    d = Path(directory)
    if not d.exists():
        raise InputError(f"{d} does not exist")
    path = d / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{d} has no {MANIFEST}; is it a directory edgeqlora wrote?")
    manifest = read_json(path, ManifestError)
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version {version!r}; this edgeqlora reads "
                            f"format_version {FORMAT_VERSION}")
    if kind is not None and manifest.get("kind") != kind:
        raise ManifestError(f"{d} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    return manifest


def read_verified_manifest(directory: str | Path, kind: str, what: str) -> dict[str, Any]:
    """``read_manifest`` plus a check that every file still matches its recorded sha256."""
    manifest = read_manifest(directory, kind=kind)
    problems = verify_files(directory, manifest)
    if problems:
        raise ManifestError(f"{what} {directory} does not match its manifest: "
                            f"{'; '.join(problems)}")
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Problems (changed, missing or extra files) between ``directory`` and its manifest."""
    expected = manifest.get("files", {})
    actual = file_table(directory)
    problems = []
    for name, info in expected.items():
        if name not in actual:
            problems.append(f"{name}: missing")
        elif actual[name]["sha256"] != info["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file changed)")
    for name in actual:
        if name not in expected:
            problems.append(f"{name}: not in the manifest (extra file)")
    return problems


def prepare_output(out: str | Path, force: bool = False, what: str = "output") -> Path:
    """Check that ``out`` may be written: refuse to overwrite without ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{what} {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{what} {out} already exists and is not empty; "
                         "pass --force to replace it")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True) if not parent.exists() else None
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {what} {out}: {parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success rename it to ``out``.

    On any exception the temporary directory is removed and ``out`` (if it existed) is left
    untouched. With ``force`` an existing ``out`` is replaced only once the new one is complete.
    """
    out = prepare_output(out, force=force, what=what)
    parent = out.resolve().parent
    try:
        tmp = scratch_dir(out, "tmp")
    except OSError as exc:
        raise InputError(f"cannot write {what} {out}: {exc.strerror}") from None
    try:
        yield tmp
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_lora_config(cfg: Any, path: str | Path) -> None:
    """The fields of a PEFT ``adapter_config.json`` the merge and PEFT's loader compute with:
    a JSON object, ``r`` a positive integer, ``lora_alpha`` and every ``alpha_pattern`` /
    ``rank_pattern`` value a finite number. Anything else is one InputError naming them all,
    before PEFT or a division meets it."""
    if not isinstance(cfg, dict):
        raise InputError(f"{path} must hold a JSON object (a PEFT LoRA config), not a "
                         f"{type(cfg).__name__}")
    problems = []

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    r = cfg.get("r", 8)
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        problems.append(f"r = {r!r} must be a positive integer")
    if not number(cfg.get("lora_alpha", 8)):
        problems.append(f"lora_alpha = {cfg.get('lora_alpha')!r} must be a finite number")
    for key in ("alpha_pattern", "rank_pattern"):
        table = cfg.get(key) or {}
        if not isinstance(table, dict):
            problems.append(f"{key} must be an object of module pattern -> number")
            continue
        bad = [k for k, v in table.items() if not number(v) or (key == "rank_pattern" and v <= 0)]
        if bad:
            problems.append(f"{key} has invalid value(s) for {', '.join(map(repr, bad))}")
    if problems:
        raise InputError(f"{path}: {'; '.join(problems)}")


def safetensors_files(model_dir: str | Path, what: str = "model") -> list[Path]:
    """A checkpoint's safetensors files: the shards of its index, or every ``*.safetensors``."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = read_json(index)["weight_map"].values()
        return [model_dir / s for s in dict.fromkeys(sorted(shards))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{what} {model_dir} has no *.safetensors weights")
    return files


def safetensors_specs(model_dir: str | Path, what: str = "model"
                      ) -> list[tuple[Path, str, list[int], str]]:
    """(file, name, shape, safetensors dtype) of every tensor of a checkpoint, in file order,
    from the safetensors headers alone (the JSON header keeps the order its writer streamed
    in); a file shorter than its header says is refused. Hand-written because the
    ``safetensors`` package needs a framework to open a file, and this is what the torch-free
    layers (the exporters' size predictions) read too."""
    specs = []
    for path in safetensors_files(model_dir, what):
        try:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            size = path.stat().st_size
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{what} weights {path} cannot be read as safetensors ({exc}); the "
                             "file is truncated or corrupt: copy or write it again") from None
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            specs.append((path, name, list(info["shape"]), info["dtype"]))
            end = max(end, info["data_offsets"][1])
        if 8 + n + end > size:
            raise InputError(f"{what} weights {path} are truncated ({size} bytes, the header "
                             f"describes {8 + n + end}); copy or convert the model again")
    return specs



class SafetensorsStreamWriter:
    """Write a safetensors file whose tensor names, shapes and dtypes (``F32``, ``F16``,
    ``BF16``) are known up front, one tensor at a time. Hand-written because the safetensors
    library only saves whole dicts; the layout follows the format spec: u64 little-endian header
    size, JSON header (padded with spaces to 8 bytes), then the tensors' bytes in header order.
    Reading it back goes through the library (tests do)."""

    _ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}

    def __init__(self, path: Path, specs: list[tuple[str, list[int]]], dtype: str):
        self.path = path
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.order = []
        for name, shape in specs:
            nbytes = math.prod(shape) * self._ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.fh = open(path, "wb")
        self.fh.write(len(raw).to_bytes(8, "little"))
        self.fh.write(raw)
        self.next = 0

    def write(self, name: str, data) -> None:
        """The next tensor's raw little-endian bytes (any buffer: bytes, a uint8 array)."""
        want, nbytes = self.order[self.next]
        assert name == want, (name, want)
        view = memoryview(data).cast("B")
        assert view.nbytes == nbytes, (name, view.nbytes, nbytes)
        self.fh.write(view)
        self.next += 1

    def close(self) -> None:
        self.fh.close()
        assert self.next == len(self.order), "not every tensor was written"

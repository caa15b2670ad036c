"""Device bundles: one verified ``.tar.gz`` that carries an export to a device.

Layout inside the archive (one top-level folder, so unpacking never spills into the cwd)::

    <name>/manifest.json   kind "bundle": sha256 and size of every other file, the device,
                           the fit prediction, the export's target and quant
    <name>/device.toml     the device profile, verbatim (comments and sources included)
    <name>/run.sh          starts `edgeqlora serve` (or a terminal chat) on export/
    <name>/export/...      the export directory as written (model, tokenizer, its manifest)

``verify_bundle`` reads the archive without extracting it and refuses members with absolute
paths, ``..`` components, links, devices or duplicate names before hashing anything; then it
compares every file with the manifest and names each changed, missing or extra file.
``unpack_bundle`` verifies, then extracts with tarfile's ``data`` filter as a second line of
defence. Bundles are written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from edgeqlora.artifacts import (FORMAT_VERSION, MANIFEST, check_usable_export,
                                 export_failures, read_manifest, remove_stale_siblings,
                                 scratch_dir, sha256_file, verify_files)
from edgeqlora.errors import DeviceError, InputError

from .fit import MiB, fit, model_facts
from .profiles import DeviceProfile, load_profile

BUNDLE_KIND = "bundle"
PROFILE_NAME = "device.toml"
RUN_SCRIPT = "run.sh"
EXPORT_DIR = "export"
MAX_MANIFEST_BYTES = 4 << 20  # ~20k files' entries: read no more than that


def _run_script(profile: DeviceProfile, context: int, failed: bool = False) -> str:
    """The bundle's start script. Only integers and constants are interpolated, and the title
    only into a comment with every non-printable character (a newline would end the comment
    and start a command) replaced: profile validation refuses them too, this is the second
    line of defence. ``failed``: the export failed its checks and was bundled with
    --allow-failed, so the script passes it on (the device's run and serve refuse it otherwise)
    and says so."""
    threads = int(profile.threads)
    context = int(context)
    title = "".join(c if c.isprintable() else "?" for c in profile.title)
    allow = " --allow-failed" if failed else ""
    note = ("# The export in this bundle FAILED its checks (see manifest.json: export_failures);"
            "\n# it was bundled with --allow-failed, so it starts with --allow-failed.\n"
            if failed else "")
    return f"""#!/usr/bin/env bash
# Start the model in this bundle on a {title}.
#   ./run.sh            OpenAI-compatible server + web chat on 127.0.0.1:${{PORT:-8080}}
#   HOST=0.0.0.0 EDGEQLORA_API_KEY=... ./run.sh   the same on the network, behind that key
#   ./run.sh chat       chat in the terminal
# Needs: pip install 'edgeqlora[device-gguf,serve]' (see devices/raspberry-pi/install.sh).
{note}set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export EDGEQLORA_THREADS="${{EDGEQLORA_THREADS:-{threads}}}"
# Re-check every file's sha256 (seconds per GB); EDGEQLORA_SKIP_VERIFY=1 skips it.
if [[ "${{EDGEQLORA_SKIP_VERIFY:-0}}" != "1" ]]; then
    edgeqlora bundle verify "$here" >/dev/null
fi
if [[ "${{1:-serve}}" == "chat" ]]; then
    exec edgeqlora run "$here/{EXPORT_DIR}" --chat --n-ctx {context}{allow}
fi
exec edgeqlora serve "$here/{EXPORT_DIR}" --n-ctx {context}{allow} \\
    --host "${{HOST:-127.0.0.1}}" --port "${{PORT:-8080}}"
"""


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root`` except its top-level manifest."""
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise InputError(f"{p} is a symbolic link; a bundle carries regular files only")
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
    return table


def _export_source(export: Path) -> tuple[Path, dict[str, Any] | None]:
    if not export.exists():
        raise InputError(f"{export} does not exist; pass an export directory")
    if export.is_file():
        raise InputError(f"{export} is a file; bundle an export directory (written by "
                         "'edgeqlora export'), which carries the tokenizer and manifest")
    manifest = read_manifest(export, kind="export")
    problems = verify_files(export, manifest)
    if problems:
        raise InputError(f"export {export} does not match its manifest: "
                         + "; ".join(problems) + ". Re-run the export before bundling it.")
    return export, manifest


def create_bundle(export: str | Path, device: str | Path, out: str | Path,
                  context: int = 2048, force: bool = False,
                  allow_failed: bool = False, ignore_fit: bool = False) -> dict[str, Any]:
    """Write ``out`` (a .tar.gz) carrying ``export`` for ``device``; returns its manifest.

    The export must match its own manifest and fit the device at ``context`` ("fits" or
    "tight"); ``ignore_fit`` bundles one that does not fit; ``force`` replaces an existing
    ``out`` (one meaning each: a forced replacement used to bundle a misfit silently too). An
    export whose manifest records a failed verification or gate is refused unless
    ``allow_failed`` (then the bundle manifest says so).
    """
    export, export_manifest = _export_source(Path(export))
    check_usable_export(export, export_manifest, allow_failed, "bundle")
    profile = load_profile(device)
    if not profile.text:
        raise DeviceError("a bundle is made for a named device profile (a shipped name or a "
                          f".toml file), not {profile.name!r}")
    facts = model_facts(export, allow_failed=allow_failed)
    result = fit(facts, profile, context)
    if result.verdict in ("does not fit", "no runtime") and not ignore_fit:
        raise DeviceError(f"{export} {result.verdict.replace('no runtime', 'has no runtime')} "
                          f"on {profile.name}: {result.total_bytes / MiB:.0f} MiB predicted, "
                          f"{profile.usable_mb} MiB usable"
                          + (f" ({'; '.join(result.notes)})" if result.notes else "")
                          + "; pass --ignore-fit to bundle it anyway")
    out = Path(out)
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise InputError(f"--out {out} must end in .tar.gz")
    if out.is_dir():
        # checked before any work: the final rename would only fail after the whole bundle
        raise InputError(f"--out {out} is a directory; --force replaces a bundle file, never "
                         "a directory; choose another --out")
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    top = out.name.removesuffix(".tar.gz").removesuffix(".tgz")

    # Hidden siblings named by this process (.OUT.stage-PID-*, .OUT.tmp-PID-*): what a killed
    # bundle left behind is removed by the next one, as an export's is.
    remove_stale_siblings(out)
    stage = scratch_dir(out, "stage")
    try:
        manifest = _stage_and_pack(export, export_manifest, profile, context, result, out, top,
                                   Path(stage))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _stage_and_pack(export, export_manifest, profile, context, result, out, top, stage):
    """Lay the bundle out in ``stage`` (hard links to the export's files), then write it to a
    hidden temporary tarball beside ``out``, verify it and rename it into place."""
    root = stage / top
    (root / EXPORT_DIR).mkdir(parents=True)
    for p in sorted(export.rglob("*")):
        if p.is_symlink():
            raise InputError(f"{p} is a symbolic link; a bundle carries regular files only")
        dest = root / EXPORT_DIR / p.relative_to(export)
        if p.is_dir():
            dest.mkdir(exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Hard links keep staging instant for multi-GB models; copy across devices.
            try:
                os.link(p, dest)
            except OSError:
                shutil.copyfile(p, dest)
    (root / PROFILE_NAME).write_text(profile.text, encoding="utf-8")
    failures = export_failures(export_manifest)
    (root / RUN_SCRIPT).write_text(_run_script(profile, context, bool(failures)),
                                   encoding="utf-8")
    (root / RUN_SCRIPT).chmod(0o755)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": BUNDLE_KIND,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": profile.name,
        "device_title": profile.title,
        "context": context,
        "export": {"target": export_manifest.get("target"),
                   "quant": export_manifest.get("quant"), "source": str(export.resolve())},
        "fit": result.to_dict(),
        "export_failures": failures,
        "files": _file_table(root),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-",
                                    dir=out.parent)
    os.close(fd)
    try:
        # Level 1: quantized weights hardly compress, and level 9 costs minutes on a Pi.
        with tarfile.open(tmp_name, "w:gz", compresslevel=1) as tar:
            tar.add(root, arcname=top, filter=_normalize)
        verify_bundle(tmp_name)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return manifest


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # No local user names or ids in a file meant for another machine.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _check_member(m: tarfile.TarInfo, archive: str) -> PurePosixPath:
    name = m.name
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise InputError(f"{archive}: member {name!r} has an absolute path; refusing the bundle")
    if ".." in path.parts or "\\" in name:
        raise InputError(f"{archive}: member {name!r} climbs out of the bundle ('..'); "
                         "refusing it")
    if not (m.isreg() or m.isdir()):
        kind = ("symbolic link" if m.issym() else "hard link" if m.islnk() else
                "device" if (m.ischr() or m.isblk()) else "fifo" if m.isfifo() else
                "special file")
        raise InputError(f"{archive}: member {name!r} is a {kind}; a bundle holds regular "
                         "files only")
    return path


def _open(path: Path) -> tarfile.TarFile:
    if not path.is_file():
        raise InputError(f"bundle {path} does not exist")
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable .tar.gz bundle ({exc})") from None


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check a bundle file (or an unpacked bundle directory); returns its manifest.

    Raises InputError naming every changed, missing or extra file, or the first unsafe member.
    """
    path = Path(path)
    if path.is_dir():
        return _verify_dir(path)
    try:
        with _open(path) as tar:
            members = tar.getmembers()
            tops, seen = set(), set()
            for m in members:
                p = _check_member(m, str(path))
                norm = p.as_posix().rstrip("/")
                if m.isreg():
                    if norm in seen:
                        raise InputError(f"{path}: member {m.name!r} appears twice; refusing "
                                         "the bundle (the second copy would win on extraction)")
                    seen.add(norm)
                if p.parts:
                    tops.add(p.parts[0])
            if len(tops) != 1:
                raise InputError(f"{path}: a bundle has exactly one top-level folder, found "
                                 f"{sorted(tops) or 'none'}")
            top = tops.pop()
            files: dict[str, str] = {}
            manifest_raw = None
            for m in members:
                if not m.isreg():
                    continue
                rel = PurePosixPath(m.name).relative_to(top).as_posix()
                f = tar.extractfile(m)
                if rel == MANIFEST:
                    if m.size > MAX_MANIFEST_BYTES:
                        raise InputError(f"{path}: {m.name} is {m.size} bytes; a bundle "
                                         f"manifest is at most {MAX_MANIFEST_BYTES}")
                    manifest_raw = f.read(MAX_MANIFEST_BYTES + 1)
                    continue
                h = hashlib.sha256()
                while block := f.read(1 << 20):
                    h.update(block)
                files[rel] = h.hexdigest()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(f"{path} is damaged ({exc}); copy the bundle again") from None
    if manifest_raw is None:
        raise InputError(f"{path}: {top}/{MANIFEST} is missing; not a bundle edgeqlora wrote")
    manifest = _parse_manifest(manifest_raw, f"{path}:{top}/{MANIFEST}")
    _compare(manifest, files, str(path))
    return manifest


def _parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != BUNDLE_KIND:
        raise InputError(f"{where} is not a bundle manifest (kind != 'bundle')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{where} has format_version {manifest.get('format_version')!r}; "
                         f"this edgeqlora reads {FORMAT_VERSION}")
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise InputError(f"{where} has no 'files' table")
    return manifest


def _compare(manifest: dict[str, Any], actual: dict[str, str], where: str) -> None:
    expected = manifest["files"]
    problems = []
    for name, meta in sorted(expected.items()):
        if name not in actual:
            problems.append(f"{name}: missing")
        elif not isinstance(meta, dict) or actual[name] != meta.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (file changed)")
    for name in sorted(set(actual) - set(expected)):
        problems.append(f"{name}: not in the manifest (extra file)")
    if problems:
        raise InputError(f"bundle {where} failed verification: " + "; ".join(problems))


def _verify_dir(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise InputError(f"{root} has no {MANIFEST}; not an unpacked bundle")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise InputError(f"{mpath} is {mpath.stat().st_size} bytes; a bundle manifest is at "
                         f"most {MAX_MANIFEST_BYTES}")
    manifest = _parse_manifest(mpath.read_bytes(), str(mpath))
    actual = {rel: meta["sha256"] for rel, meta in _file_table(root).items()}
    _compare(manifest, actual, str(root))
    return manifest


def unpack_bundle(path: str | Path, dest: str | Path) -> Path:
    """Verify ``path`` and extract it under ``dest``; returns the bundle's folder. Atomic like
    an export: extracted into a hidden sibling, verified again, then renamed into place, so a
    full disk or a kill leaves no partial folder (and the next unpack removes a dead one's)."""
    import errno


    path, dest = Path(path), Path(dest)
    verify_bundle(path)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot unpack into {dest} ({exc.strerror or exc})") from None
    with _open(path) as tar:
        top = PurePosixPath(tar.getmembers()[0].name).parts[0]
        final = dest / top
        if final.exists():
            raise InputError(f"{final} already exists; remove it or unpack elsewhere")
        remove_stale_siblings(final)
        try:
            stage = scratch_dir(final, "tmp")
        except OSError as exc:
            raise InputError(f"cannot unpack into {dest} ({exc.strerror or exc})") from None
        try:
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(stage, filter="data")
                else:  # Python before 3.10.12 / 3.11.4: members were checked by verify_bundle
                    tar.extractall(stage)
            except (tarfile.TarError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise InputError(f"disk full while unpacking {path} into {dest}; nothing "
                                     "was kept: free space and unpack again") from None
                raise InputError(f"cannot unpack {path} into {dest} ({exc})") from None
            _verify_dir(stage / top)
            os.replace(stage / top, final)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return final


def describe(manifest: dict[str, Any]) -> str:
    files = manifest.get("files", {})
    size = sum(int(m.get("size_bytes", 0)) for m in files.values() if isinstance(m, dict))
    exp = manifest.get("export") or {}
    failures = manifest.get("export_failures") or []
    return (f"{len(files)} files, {size / MiB:.1f} MiB; {exp.get('target')} "
            f"{exp.get('quant')} for {manifest.get('device')} at context "
            f"{manifest.get('context')}"
            + (f"; the export FAILED its checks ({'; '.join(map(str, failures))}) and was "
               "bundled with --allow-failed" if failures else ""))


__all__ = ["create_bundle", "verify_bundle", "unpack_bundle", "describe"]

"""Device profiles: TOML data files, validated into frozen ``DeviceProfile`` objects.

The shipped profiles live in ``devices/profiles/<name>.toml`` (package data of
``edgeqlora.devices``), one per device, each figure with a comment saying where it comes from.
A user adds a device by writing a file of the same shape and passing its path wherever a device
name is accepted (``--device path/to/board.toml``).

Schema (every key required unless marked optional)::

    name = "pi5"                      # id used with --device; [a-z0-9][a-z0-9._-]*
    title = "Raspberry Pi 5 (8 GB)"
    kind = "sbc"                      # optional: sbc, phone, laptop, desktop, other
    [memory]
    total_mb = 8192                   # physical RAM
    usable_mb = 7200                  # what one process can count on after the OS
    bandwidth_gbs = 17.1              # theoretical peak DRAM bandwidth, GB/s
    [cpu]
    arch = "aarch64"                  # aarch64, armv7l, x86_64
    cores = 4
    threads = 4                       # threads the runtime should use
    features = ["neon", "dotprod"]    # see FEATURES
    [runtimes]
    available = ["gguf", "onnx"]      # export targets that run there

A file that does not validate raises ``DeviceError`` naming the file and every bad field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

from edgeqlora.errors import DeviceError

# ISA / accelerator features a profile may list. "neon" is Arm's Advanced SIMD (ASIMD); the rest
# use the names of /proc/cpuinfo (Linux) or llama.cpp's system_info line.
FEATURES = frozenset({
    "neon", "dotprod", "i8mm", "fp16", "bf16", "sve", "sve2",
    "sse4.2", "avx", "avx2", "f16c", "fma", "avx512", "avx512_vnni", "avx_vnni", "amx",
    "cuda", "metal", "vulkan", "opencl",
})
ARCHES = frozenset({"aarch64", "armv7l", "x86_64"})
KINDS = frozenset({"sbc", "phone", "laptop", "desktop", "other"})
# Export targets a device may run; the names of edgeqlora.exporters.EXPORTERS.
RUNTIME_TARGETS = frozenset({"gguf", "onnx"})
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    name: str
    title: str
    kind: str
    total_mb: int
    usable_mb: int
    bandwidth_gbs: float
    arch: str
    cores: int
    threads: int
    features: tuple[str, ...]
    runtimes: tuple[str, ...]
    source: str  # the file it was read from (for messages)
    # The TOML text itself, comments included: bundles ship it verbatim.
    text: str = dataclasses.field(default="", repr=False, compare=False)

    @property
    def usable_bytes(self) -> int:
        return self.usable_mb * 2**20

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("text")
        return out


def _builtin_dir():
    return resources.files("edgeqlora.devices") / "profiles"


def builtin_names() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def _tomllib():
    # tomllib is in the standard library from Python 3.11; on 3.10 (Ubuntu 22.04, JetPack 6)
    # the same parser is the tomli package.
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            from edgeqlora.errors import MissingDependencyError

            raise MissingDependencyError("reading device profiles on Python 3.10 needs the "
                                         "package 'tomli': pip install tomli") from None
    return tomllib


def parse_profile(text: str, source: str) -> DeviceProfile:
    """Validate TOML ``text`` (read from ``source``, named in errors) into a DeviceProfile."""
    tomllib = _tomllib()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DeviceError(f"device profile {source} is not valid TOML ({exc})") from None
    problems: list[str] = []

    def get(table: str | None, key: str, kinds: tuple[type, ...], what: str) -> Any:
        where = f"{table}.{key}" if table else key
        section = data if table is None else data.get(table)
        if table is not None and not isinstance(section, dict):
            problems.append(f"[{table}] table is missing")
            return None
        if key not in section:
            problems.append(f"{where} is missing ({what})")
            return None
        value = section[key]
        # bool is an int in Python; a profile saying cores = true is a mistake.
        if isinstance(value, bool) or not isinstance(value, kinds):
            problems.append(f"{where} = {value!r} must be {what}")
            return None
        return value

    def positive(table: str, key: str, kinds: tuple[type, ...], what: str) -> Any:
        value = get(table, key, kinds, what)
        if value is not None and not (value > 0 and math.isfinite(value)):
            problems.append(f"{table}.{key} = {value!r} must be a finite number > 0")
            return None
        return value

    def names(table: str, key: str, allowed: frozenset[str]) -> tuple[str, ...]:
        value = get(table, key, (list,), "a list of strings")
        if value is None:
            return ()
        bad = [v for v in value if not isinstance(v, str) or v.lower() not in allowed]
        if bad:
            problems.append(f"{table}.{key} has unknown value(s) {bad!r}; known: "
                            f"{', '.join(sorted(allowed))}")
        return tuple(dict.fromkeys(v.lower() for v in value if isinstance(v, str)))

    name = get(None, "name", (str,), "a string")
    if name is not None and not _NAME_RE.match(name):
        problems.append(f"name = {name!r} must be lower-case letters, digits, '.', '_' or '-'")
    title = get(None, "title", (str,), "a string")
    if title is not None and any(not c.isprintable() for c in title):
        # The title is written into a bundle's run.sh and its manifest: one printable line.
        problems.append(f"title = {title!r} must be one line of printable characters (no "
                        "newlines or control characters)")
    kind = data.get("kind", "other")
    if not isinstance(kind, str) or kind not in KINDS:
        problems.append(f"kind = {kind!r} must be one of {', '.join(sorted(KINDS))}")
    total = positive("memory", "total_mb", (int,), "an integer number of MB")
    usable = positive("memory", "usable_mb", (int,), "an integer number of MB")
    if total is not None and usable is not None and usable > total:
        problems.append(f"memory.usable_mb = {usable} is more than memory.total_mb = {total}")
    bandwidth = positive("memory", "bandwidth_gbs", (int, float), "a number of GB/s")
    arch = get("cpu", "arch", (str,), "a string")
    if arch is not None and arch not in ARCHES:
        problems.append(f"cpu.arch = {arch!r} must be one of {', '.join(sorted(ARCHES))}")
    cores = positive("cpu", "cores", (int,), "an integer")
    threads = positive("cpu", "threads", (int,), "an integer")
    if cores is not None and threads is not None and threads > 2 * cores:
        problems.append(f"cpu.threads = {threads} is more than twice cpu.cores = {cores}")
    features = names("cpu", "features", FEATURES)
    runtimes = names("runtimes", "available", RUNTIME_TARGETS)
    if isinstance(data.get("runtimes"), dict) and "available" in data["runtimes"] \
            and not runtimes and not any("runtimes.available" in p for p in problems):
        problems.append("runtimes.available is empty; list at least one of "
                        f"{', '.join(sorted(RUNTIME_TARGETS))}")
    known = {None: {"name", "title", "kind", "memory", "cpu", "runtimes"},
             "memory": {"total_mb", "usable_mb", "bandwidth_gbs"},
             "cpu": {"arch", "cores", "threads", "features"}, "runtimes": {"available"}}
    for table, keys in known.items():
        section = data if table is None else data.get(table)
        for key in section if isinstance(section, dict) else ():
            if key not in keys:
                where = key if table is None else f"{table}.{key}"
                problems.append(f"unknown key {where!r} (known: {', '.join(sorted(keys))})")
    if problems:
        raise DeviceError(f"device profile {source} is invalid: " + "; ".join(problems))
    return DeviceProfile(name=name, title=title, kind=kind, total_mb=total, usable_mb=usable,
                         bandwidth_gbs=float(bandwidth), arch=arch, cores=cores, threads=threads,
                         features=features, runtimes=runtimes, source=source, text=text)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name (``pi5``), a user's TOML file by path, or ``host``."""
    value = str(name_or_path)
    if value == "host":
        return host_profile()
    path = Path(value)
    if value.endswith(".toml") or "/" in value or "\\" in value:
        if not path.is_file():
            raise DeviceError(f"device profile {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DeviceError(f"cannot read device profile {path} ({exc})") from None
        return parse_profile(text, str(path))
    if value not in builtin_names():
        raise DeviceError(f"unknown device {value!r}; known devices: "
                          f"{', '.join(builtin_names())} (or pass a path to a .toml profile)")
    resource = _builtin_dir() / f"{value}.toml"
    profile = parse_profile(resource.read_text(encoding="utf-8"), str(resource))
    if profile.name != value:
        raise DeviceError(f"device profile {resource} has name = {profile.name!r}; it must "
                          "match the file name")
    return profile


def load_profiles(spec: str | Path | None = "all") -> list[DeviceProfile]:
    """``"all"`` (or None) -> every shipped profile; otherwise the one profile named."""
    if spec is None or str(spec) == "all":
        return [load_profile(n) for n in builtin_names()]
    return [load_profile(spec)]


# /proc/cpuinfo flag -> profile feature (Linux x86 "flags", Arm "Features").
_CPUINFO_FLAGS = {
    "asimd": "neon", "neon": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "fphp": "fp16",
    "bf16": "bf16", "sve": "sve", "sve2": "sve2", "sse4_2": "sse4.2", "avx": "avx",
    "avx2": "avx2", "f16c": "f16c", "fma": "fma", "avx512f": "avx512",
    "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "amx_tile": "amx",
}


def host_profile() -> DeviceProfile:
    """This machine as a profile (``--device host``): CPU features from /proc/cpuinfo, usable
    memory = MemAvailable now. The bandwidth is unknown, so no speed is predicted."""
    import os
    import platform

    arch = {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine().lower(),
                                                       platform.machine().lower())
    feats: set[str] = set()
    total = avail = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                feats |= {_CPUINFO_FLAGS[f] for f in value.split() if f in _CPUINFO_FLAGS}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemTotal":
                total = int(value.split()[0]) // 1024
            elif key == "MemAvailable":
                avail = int(value.split()[0]) // 1024
    except OSError:
        pass  # not Linux: no features, memory from os.sysconf below
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        except (ValueError, OSError, AttributeError):
            total = 0
    cores = os.cpu_count() or 1
    return DeviceProfile(name="host", title=f"this machine ({platform.machine()})",
                         kind="other", total_mb=total, usable_mb=avail or total,
                         bandwidth_gbs=float("nan"), arch=arch, cores=cores, threads=cores,
                         features=tuple(sorted(feats)), runtimes=tuple(sorted(RUNTIME_TARGETS)),
                         source="host", text="")

"""The cached arm64 environment: its paths and readiness, and the steps that build it.

A Debian bookworm arm64 rootfs (debootstrap's first stage, every .deb unpacked with dpkg-deb),
arm64 wheels pinned to the host's versions, and llama.cpp cross-compiled for a Pi 5's
Cortex-A76 into llama-cpp-python's package; each step recorded in ``state.json`` and skipped
when done with the same inputs. ``arm64.py`` (beside this file) is the command line.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from edgeqlora.errors import EdgeQloraError

SUITE = "bookworm"            # what Raspberry Pi OS 64-bit (Bookworm) is built on
MIRROR = "http://deb.debian.org/debian"
PYTHON_VERSION = "3.11"       # bookworm's python3
ROOTFS_PACKAGES = ("python3", "libgomp1", "libstdc++6")
# The Pi 5 (Cortex-A76): Armv8.2-A with fp16 arithmetic and dot product. qemu 7.2 models the
# A76, so an instruction the Pi lacks (i8mm, SVE) would fault here instead of passing.
QEMU_CPU = "cortex-a76"
ARM_ARCH = "armv8.2-a+fp16+dotprod"
# arm64 wheels pinned to the host's versions; llama_cpp_python comes from its sdist.
WHEELS = ("numpy", "onnxruntime", "tokenizers", "jinja2", "markupsafe", "typing_extensions",
          "diskcache")
# glibc 2.36 on bookworm: wheels tagged for any manylinux up to 2.36 run there.
PLATFORMS = ("manylinux_2_36_aarch64", "manylinux_2_34_aarch64", "manylinux_2_31_aarch64",
             "manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
             "manylinux2014_aarch64")

TOOLS = {  # command -> the apt package that provides it
    "qemu-aarch64-static": "qemu-user-static",
    "debootstrap": "debootstrap",
    "dpkg-deb": "dpkg",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "cmake": "cmake",
}
APT_HINT = ("apt-get install -y qemu-user-static debootstrap gcc-aarch64-linux-gnu "
            "g++-aarch64-linux-gnu cmake")


# A Raspberry Pi 5's /proc/cpuinfo "Features" line (Cortex-A76, part 0xd0b).
A76_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                "lrcpc dcpop asimddp")


def host_cpus() -> int:
    # Highest possible CPU index + 1, as the cpuinfo library counts them from /sys.
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
        return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def write_cpuinfo(rootfs: Path) -> None:
    """A Cortex-A76 ``/proc/cpuinfo`` inside the rootfs, one block per host CPU.

    qemu-user passes the host's (x86) /proc/cpuinfo through, and the cpuinfo library inside
    onnxruntime's arm64 build finds no ARM processor in it and dereferences NULL at import.
    qemu's ``-L`` looks up every absolute path in the rootfs first, so a file at
    ``ROOTFS/proc/cpuinfo`` is what arm64 code reads; the rest of /proc stays the host's. The
    CPU count must match the host's /sys/devices/system/cpu, which is read unmapped. Rewritten
    before every run: the cache may move to a machine with another core count."""
    proc = rootfs / "proc"
    if proc.is_symlink():  # debootstrap's first stage links it to the host's /proc
        proc.unlink()
    proc.mkdir(exist_ok=True)
    text = "\n".join(
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {A76_FEATURES}\n"
        f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\n"
        f"CPU part\t: 0xd0b\nCPU revision\t: 1\n" for i in range(host_cpus())) + "\n"
    target = proc / "cpuinfo"
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)


class Arm64Error(EdgeQloraError):
    """A user-facing failure of the arm64 harness (missing tool, failed step, not set up)."""


def cache_dir() -> Path:
    home = os.environ.get("EDGEQLORA_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "edgeqlora") / "arm64"


def missing_tools(names: Sequence[str] = tuple(TOOLS)) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


def check_tools(names: Sequence[str] = tuple(TOOLS)) -> None:
    missing = missing_tools(names)
    if missing:
        pkgs = " ".join(sorted({TOOLS[n] for n in missing}))
        raise Arm64Error(f"missing {', '.join(missing)}; install with: apt-get install -y {pkgs} "
                         f"(everything the arm64 harness needs: {APT_HINT})")


def host_versions() -> dict[str, str]:
    """Versions of the x86 side's runtime packages; the arm64 side gets the same ones."""
    out, missing = {}, []
    for name in (*WHEELS, "llama_cpp_python"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise Arm64Error(f"the host Python ({sys.executable}) lacks {', '.join(missing)}, which "
                         "the arm64 side is pinned to; run the harness with the project's venv "
                         "(make setup, then .venv/bin/python devices/arm64/arm64.py)")
    return out


class Env:
    """Paths of the cached arm64 environment and its state file."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else cache_dir()
        self.rootfs = self.root / "rootfs"
        self.site = self.root / "site"
        self.state_path = self.root / "state.json"

    @property
    def python(self) -> Path:
        return self.rootfs / "usr" / "bin" / f"python{PYTHON_VERSION}"

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def save(self, key: str, value: dict[str, Any]) -> None:
        state = self.state()
        state[key] = value
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_path)

    def ready(self) -> str | None:
        """None when the environment can run a comparison, else what is missing."""
        state = self.state()
        for step in ("rootfs", "wheels", "llama_cpp"):
            if step not in state:
                return f"step {step!r} has not run (python devices/arm64/arm64.py setup)"
        if not self.python.is_file():
            return f"{self.python} is missing"
        if not (self.site / "llama_cpp" / "lib" / "libllama.so").is_file():
            return f"{self.site}/llama_cpp/lib/libllama.so is missing"
        missing = missing_tools(("qemu-aarch64-static",))
        if missing:
            return "qemu-aarch64-static is not installed (apt-get install -y qemu-user-static)"
        return None

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv[0] is the arm64 python; the rest its arguments."""
        return ["qemu-aarch64-static", "-cpu", QEMU_CPU, "-L", str(self.rootfs),
                str(self.python), *argv]

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "LD_", "VIRTUAL_ENV", "LLAMA_CPP"))}
        # -I would also drop PYTHONPATH, so isolate by hand: no user site, no host paths.
        env.update(PYTHONPATH=str(self.site), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
        return env


def _run(cmd: Sequence[str], what: str, log: Path | None = None, **kw: Any) -> None:
    """Run a setup command; on failure the error names it and the tail of its output."""
    print(f"  $ {' '.join(str(c) for c in cmd)[:200]}", flush=True)
    with tempfile.TemporaryFile("w+") as out:
        rc = subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT,
                            text=True, **kw).returncode
        out.seek(0)
        text = out.read()
    if log is not None:
        log.write_text(text)
    if rc != 0:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise Arm64Error(f"{what} failed (exit {rc}): {' '.join(map(str, cmd))[:300]}\n{tail}")


def _fresh(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return path


def _step_done(env: Env, key: str, inputs: dict[str, Any], *paths: Path) -> bool:
    done = env.state().get(key) or {}
    return done.get("inputs") == inputs and all(p.exists() for p in paths)


def setup_rootfs(env: Env) -> bool:
    inputs = {"suite": SUITE, "packages": list(ROOTFS_PACKAGES), "arch": "arm64"}
    if _step_done(env, "rootfs", inputs, env.python):
        return False
    check_tools(("debootstrap", "dpkg-deb", "qemu-aarch64-static"))
    t0 = time.time()
    tmp = _fresh(env.root / "rootfs.tmp")
    env.root.mkdir(parents=True, exist_ok=True)
    print(f"[arm64] debootstrap {SUITE} arm64 (minbase + {', '.join(ROOTFS_PACKAGES)}) -> "
          f"{env.rootfs}", flush=True)
    _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
          "--include=" + ",".join(ROOTFS_PACKAGES), SUITE, tmp, MIRROR], "debootstrap",
         log=env.root / "debootstrap.log")
    # The first stage unpacks only the 'required' set; the rest is downloaded for a second
    # stage that would run arm64 maintainer scripts. Unpacking every .deb as debootstrap does
    # (tar -k keeps the merged-/usr symlinks) gives a complete file tree without running any.
    debs = sorted((tmp / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    for deb in debs:
        fs = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        # tar -k exits non-zero for every file the first stage already unpacked: expected,
        # so only dpkg-deb's status says whether the package was read.
        subprocess.run(["tar", "-k", "--keep-directory-symlink", "-C", str(tmp), "-xf", "-"],
                       stdin=fs.stdout, stderr=subprocess.DEVNULL)
        fs.stdout.close()
        if fs.wait() != 0:
            raise Arm64Error(f"dpkg-deb could not read {deb}; run setup again")
        deb.unlink()
    write_cpuinfo(tmp)
    python = tmp / "usr" / "bin" / f"python{PYTHON_VERSION}"
    if not python.is_file():
        raise Arm64Error(f"debootstrap did not produce {python}; see {env.root}/debootstrap.log")
    check = "import platform, sys; print(platform.machine(), sys.version.split()[0])"
    out = subprocess.run(["qemu-aarch64-static", "-L", str(tmp), str(python), "-c", check],
                         capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.startswith("aarch64"):
        raise Arm64Error(f"the arm64 python in {tmp} does not start under qemu "
                         f"({out.stderr.strip()[-300:] or out.stdout.strip()})")
    _fresh(env.rootfs)
    tmp.replace(env.rootfs)
    env.save("rootfs", {"inputs": inputs, "python": out.stdout.split()[1], "debs": len(debs),
                        "seconds": round(time.time() - t0, 1)})
    return True


def setup_wheels(env: Env, versions: dict[str, str]) -> bool:
    pins = [f"{name}=={versions[name]}" for name in WHEELS]
    inputs = {"pins": pins, "platforms": list(PLATFORMS), "python": PYTHON_VERSION}
    if _step_done(env, "wheels", inputs, env.site / "numpy"):
        return False
    t0 = time.time()
    print(f"[arm64] arm64 wheels from PyPI: {' '.join(pins)}", flush=True)
    tmp = _fresh(env.root / "site.tmp")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "--target", tmp, "--python-version", PYTHON_VERSION, "--implementation", "cp",
           "--abi", "cp" + PYTHON_VERSION.replace(".", ""), "--only-binary=:all:"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    _run([*cmd, *pins], "pip install of the arm64 wheels", log=env.root / "pip.log")
    # Keep a llama_cpp package already built into the old site (the llama_cpp step owns it).
    old = env.site / "llama_cpp"
    if old.is_dir():
        shutil.move(str(old), tmp / "llama_cpp")
    _fresh(env.site)
    tmp.replace(env.site)
    env.save("wheels", {"inputs": inputs, "seconds": round(time.time() - t0, 1)})
    return True


def cmake_args(src: Path, build: Path) -> list[str]:
    return ["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
            "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
            "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc",
            "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
            "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={ARM_ARCH}",
            # As llama-cpp-python's own CMakeLists: OpenMP threads, no curl, no tools.
            "-DGGML_OPENMP=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
            # The libraries find each other next to themselves, wherever the cache is.
            "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN"]


def setup_llama_cpp(env: Env, versions: dict[str, str], jobs: int) -> bool:
    version = versions["llama_cpp_python"]
    inputs = {"llama_cpp_python": version, "arch": ARM_ARCH}
    lib = env.site / "llama_cpp" / "lib"
    if _step_done(env, "llama_cpp", inputs, lib / "libllama.so"):
        return False
    check_tools(("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "cmake"))
    if not env.site.is_dir():
        raise Arm64Error(f"{env.site} is missing; the wheels step must run first")
    t0 = time.time()
    src_root = env.root / "src"
    src_root.mkdir(parents=True, exist_ok=True)
    sdist = src_root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        print(f"[arm64] llama-cpp-python {version} sdist from PyPI", flush=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
              "--no-binary", ":all:", "--no-deps", "-d", src_root,
              f"llama-cpp-python=={version}"], "pip download of the llama-cpp-python sdist")
    src = _fresh(src_root / f"llama_cpp_python-{version}")
    with tarfile.open(sdist) as tar:
        tar.extractall(src_root, filter="data")
    build = _fresh(env.root / "build")
    print(f"[arm64] cross-compiling llama.cpp (vendor of llama-cpp-python {version}) for "
          f"{ARM_ARCH} with -j{jobs}", flush=True)
    _run(cmake_args(src / "vendor" / "llama.cpp", build), "cmake configure",
         log=env.root / "cmake-configure.log")
    _run(["cmake", "--build", build, "--target", "llama", f"-j{jobs}"], "cmake build",
         log=env.root / "cmake-build.log")
    libs = sorted(p for p in build.rglob("lib*.so*") if p.is_file() or p.is_symlink())
    names = {p.name for p in libs}
    for needed in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"):
        if needed not in names:
            raise Arm64Error(f"the llama.cpp build has no {needed}; see "
                             f"{env.root}/cmake-build.log")
    tmp = _fresh(env.site / "llama_cpp.tmp")
    shutil.copytree(src / "llama_cpp", tmp, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp / "lib").mkdir(exist_ok=True)
    for p in libs:
        shutil.copy2(p, tmp / "lib" / p.name, follow_symlinks=False)
    _fresh(env.site / "llama_cpp")
    tmp.replace(env.site / "llama_cpp")
    # The object files and the unpacked source are 300 MB; the sdist stays for a rebuild.
    shutil.rmtree(build)
    shutil.rmtree(src)
    env.save("llama_cpp", {"inputs": inputs, "libs": sorted(names),
                           "seconds": round(time.time() - t0, 1)})
    return True


def setup(env: Env, jobs: int = 2) -> dict[str, Any]:
    """Build what is missing; returns {step: built?} and the smoke test's result."""
    versions = host_versions()
    built = {"rootfs": setup_rootfs(env), "wheels": setup_wheels(env, versions),
             "llama_cpp": setup_llama_cpp(env, versions, jobs)}
    smoke = smoke_test(env)
    return {"built": built, "smoke": smoke}


def smoke_test(env: Env) -> dict[str, Any]:
    """Import every runtime library on the arm64 side and report what it runs on."""
    code = ("import json, platform, numpy, onnxruntime, tokenizers, jinja2, llama_cpp\n"
            "print(json.dumps({'machine': platform.machine(), 'numpy': numpy.__version__,"
            " 'onnxruntime': onnxruntime.__version__, 'tokenizers': tokenizers.__version__,"
            " 'llama_cpp': llama_cpp.__version__,"
            " 'ggml': llama_cpp.llama_print_system_info().decode()}))")
    write_cpuinfo(env.rootfs)
    out = subprocess.run(env.command(["-c", code]), capture_output=True, text=True,
                         env=env.environ())
    if out.returncode != 0:
        raise Arm64Error("the arm64 environment does not import its runtimes: "
                         + (out.stderr.strip().splitlines() or ["(no output)"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])

#!/usr/bin/env python3
"""Run an export on an arm64 Debian userland under qemu and compare it with the x86 run.

Raspberry Pi OS 64-bit is Debian bookworm for arm64; this is the closest a workstation without
a Pi gets to one. Nothing needs binfmt_misc, a chroot or root inside the userland: arm64
binaries run as ``qemu-aarch64-static -cpu cortex-a76 -L ROOTFS ROOTFS/usr/bin/python3 ...``
(``-L`` makes qemu resolve the ELF interpreter and absolute library paths inside ROOTFS).

    python devices/arm64/arm64.py setup                   # cold ~17 min on 2 cores; warm: 16 s
    python devices/arm64/arm64.py status
    python devices/arm64/arm64.py compare EXPORT [EXPORT...] --out bench/results/arm64.json

The cached environment lives in ``$EDGEQLORA_HOME/arm64`` (default ``~/.cache/edgeqlora/arm64``):

* ``rootfs/``: ``debootstrap --foreign --arch=arm64 --variant=minbase`` of bookworm with python3
  and libgomp1; every downloaded .deb is unpacked with ``dpkg-deb`` (the second stage, which
  would need to execute arm64 maintainer scripts, is not needed to run python under ``-L``).
* ``site/``: arm64 wheels from PyPI (``pip install --platform manylinux..._aarch64``), pinned to
  the versions installed on the x86 side so that only the CPU differs, plus llama-cpp-python's
  Python package with llama.cpp cross-compiled from the sdist of the same version
  (``aarch64-linux-gnu-gcc``, ``-march=armv8.2-a+fp16+dotprod``: a Pi 5's Cortex-A76) in
  ``site/llama_cpp/lib``, where the package looks first, as in its wheel.
* ``rootfs/proc/cpuinfo``: a Pi 5's, so that arm64 code does not read the host's x86 one
  (see ``write_cpuinfo``).
* ``state.json``: what was built, from which versions, and how long each step took.

Each step is skipped when ``state.json`` says it is done with the same inputs and its files are
there; a step that fails leaves nothing half-built under its final name. ``compare`` runs
``probe.py`` (beside this file) once under qemu and once on the host on the same prompts and
writes the agreement (top-1, max/mean |logit diff|, KL divergence, identical greedy answers).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from edgeqlora.errors import EdgeQloraError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROBE = HERE / "probe.py"

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


def _host_cpus() -> int:
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
        f"CPU part\t: 0xd0b\nCPU revision\t: 1\n" for i in range(_host_cpus())) + "\n"
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


# -- the cached environment ---------------------------------------------------------------------


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
    out = subprocess.run(["qemu-aarch64-static", "-L", str(tmp), str(python), "-c",
                          "import platform, sys; print(platform.machine(), sys.version.split()[0])"],
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


# -- the comparison -----------------------------------------------------------------------------


def held_out_prompts(export: Path, n: int) -> list[dict[str, Any]]:
    """``n`` held-out conversations of the data the export was trained on (as the parity gate
    picks them), split into the prompt messages and the reference answer."""
    from edgeqlora.artifacts import read_manifest
    from edgeqlora.merge import heldout_conversations

    prompts = []
    for conv in heldout_conversations(read_manifest(export), n=max(n * 4, 16)):
        if len(conv) >= 2 and conv[-1]["role"] == "assistant":
            prompts.append({"messages": conv[:-1], "answer": conv[-1]["content"]})
        if len(prompts) == n:
            break
    if not prompts:
        raise Arm64Error(f"no held-out conversation with an answer for {export}")
    return prompts


def _log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def agreement(ref, cand) -> dict[str, float]:
    """Per-position agreement of two ``[tokens, vocab]`` logit arrays (ref = x86).

    KL(ref || cand) of the next-token distributions in float64, as the parity gate measures
    (``edgeqlora.parity``); top-1 = same argmax; the absolute logit differences are raw."""
    import numpy as np

    lp, lq = _log_softmax(ref), _log_softmax(cand)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    return {"tokens": int(ref.shape[0]),
            "top1_hits": int((ref.argmax(-1) == cand.argmax(-1)).sum()),
            "max_abs_diff": float(diff.max()), "sum_abs_diff": float(diff.mean(-1).sum()),
            "kld_sum": float(kld.sum()), "kld_max": float(kld.max())}


def _first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_results(x86: dict, arm: dict, x86_dir: Path, arm_dir: Path,
                    prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per export: the arm64 run measured against the x86 run of the same file."""
    import numpy as np

    rows = []
    for ex, ea in zip(x86["exports"], arm["exports"]):
        tot = {"tokens": 0, "top1_hits": 0, "max_abs_diff": 0.0, "sum_abs_diff": 0.0,
               "kld_sum": 0.0, "kld_max": 0.0}
        answers, same_ids = [], True
        for prompt, px, pa in zip(prompts, ex["prompts"], ea["prompts"]):
            if px["ids"] != pa["ids"] or px["prompt_ids"] != pa["prompt_ids"]:
                same_ids = False  # tokenization differs: logits at different inputs
            else:
                a = agreement(np.load(x86_dir / px["logits"]), np.load(arm_dir / pa["logits"]))
                for k in ("tokens", "top1_hits", "sum_abs_diff", "kld_sum"):
                    tot[k] += a[k]
                for k in ("max_abs_diff", "kld_max"):
                    tot[k] = max(tot[k], a[k])
            answers.append({"prompt": prompt["messages"][-1]["content"],
                            "x86": px["answer"], "arm64": pa["answer"],
                            "identical": px["answer_ids"] == pa["answer_ids"],
                            "first_divergence": _first_divergence(px["answer_ids"],
                                                                  pa["answer_ids"])})
        n = max(tot["tokens"], 1)
        rows.append({
            "export": _display_path(Path(ex["export"])), "runtime": ex["runtime"],
            "identical_tokenization": same_ids, "tokens": tot["tokens"],
            "top1": tot["top1_hits"] / n, "max_abs_logit_diff": tot["max_abs_diff"],
            "mean_abs_logit_diff": tot["sum_abs_diff"] / n, "kld_mean": tot["kld_sum"] / n,
            "kld_max": tot["kld_max"],
            "greedy_identical": sum(a["identical"] for a in answers), "prompts": len(answers),
            "answers": answers,
            "seconds": {"x86": {k: ex[k] for k in ("load_s", "logits_s", "generate_s")},
                        "arm64": {k: ea[k] for k in ("load_s", "logits_s", "generate_s")}},
            "arm64_backend": {k: v for k, v in ea.items()
                              if k in ("llama_cpp", "system_info", "onnxruntime")},
            "x86_backend": {k: v for k, v in ex.items()
                            if k in ("llama_cpp", "system_info", "onnxruntime")},
        })
    return rows


def _display_path(p: Path) -> str:
    # No machine-specific absolute paths in results that get committed.
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return p.name


def run_probe(cmd: list[str], env: dict[str, str], what: str) -> float:
    t0 = time.time()
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    sys.stdout.write(out.stdout)
    if out.returncode != 0:
        raise Arm64Error(f"the {what} probe failed (exit {out.returncode}): "
                         + " | ".join(out.stdout.strip().splitlines()[-3:]))
    return time.time() - t0


def compare(env: Env, exports: Sequence[str | Path], n_prompts: int = 3,
            max_new_tokens: int = 16, n_threads: int = 1,
            work: Path | None = None) -> dict[str, Any]:
    """Run ``exports`` on the host and under qemu on the same held-out prompts; the report."""
    problem = env.ready()
    if problem:
        raise Arm64Error(f"the arm64 environment in {env.root} is not ready: {problem}")
    paths = [Path(e).resolve() for e in exports]
    for p in paths:
        if not (p / "manifest.json").is_file():
            raise Arm64Error(f"{p} is not an export directory (no manifest.json)")
    prompts = held_out_prompts(paths[0], n_prompts)
    job = {"exports": [str(p) for p in paths], "prompts": prompts,
           "max_new_tokens": max_new_tokens, "n_threads": n_threads}
    with tempfile.TemporaryDirectory(prefix="edgeqlora-arm64-", dir=work) as tmp:
        tmp = Path(tmp)
        (tmp / "job.json").write_text(json.dumps(job))
        write_cpuinfo(env.rootfs)
        host_env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_CPP")}
        x86_s = run_probe([sys.executable, str(PROBE), str(tmp / "job.json"), str(tmp / "x86")],
                          host_env, "x86")
        arm_s = run_probe(env.command([str(PROBE), str(tmp / "job.json"), str(tmp / "arm64")]),
                          env.environ(), "arm64 (qemu)")
        x86 = json.loads((tmp / "x86" / "result.json").read_text())
        arm = json.loads((tmp / "arm64" / "result.json").read_text())
        rows = compare_results(x86, arm, tmp / "x86", tmp / "arm64", prompts)
    state = env.state()
    return {
        "machine": {"host": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "arm64": {"userland": f"Debian {SUITE} arm64 ({state['rootfs'].get('python')})",
                  "emulator": f"qemu-aarch64-static -cpu {QEMU_CPU}",
                  "llama_cpp_march": ARM_ARCH, "wheels": state["wheels"]["inputs"]["pins"]},
        "prompts": len(prompts), "max_new_tokens": max_new_tokens, "threads": n_threads,
        "wall_s": {"x86": round(x86_s, 1), "arm64": round(arm_s, 1)},
        "rows": rows,
    }


def print_table(report: dict[str, Any], out=sys.stdout) -> None:
    head = (f"{'export':<36} {'tokens':>6} {'top1':>6} {'KLD mean':>9} {'KLD max':>9} "
            f"{'max|dl|':>8} {'mean|dl|':>8} {'greedy same':>11}")
    print(f"arm64 ({report['arm64']['emulator']}) vs x86, {report['prompts']} held-out prompts, "
          f"{report['max_new_tokens']} greedy tokens; wall x86 {report['wall_s']['x86']}s, "
          f"arm64 {report['wall_s']['arm64']}s", file=out)
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in report["rows"]:
        tok = "" if r["identical_tokenization"] else " (tokenization differs!)"
        print(f"{r['export'][-36:]:<36} {r['tokens']:>6} {r['top1']:>6.3f} {r['kld_mean']:>9.2e} "
              f"{r['kld_max']:>9.2e} {r['max_abs_logit_diff']:>8.4f} "
              f"{r['mean_abs_logit_diff']:>8.5f} {r['greedy_identical']:>5}/{r['prompts']:<5}{tok}",
              file=out)


# -- command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None,
                    help="environment folder (default $EDGEQLORA_HOME/arm64)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("setup", help="build the cached arm64 environment (idempotent)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="compile jobs (default 2)")
    sub.add_parser("status", help="say whether the environment is ready")
    p = sub.add_parser("compare", help="run exports on arm64 and x86 and compare them")
    p.add_argument("exports", nargs="+", help="export directories (GGUF or ONNX)")
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens (default 16)")
    p.add_argument("--threads", type=int, default=1,
                   help="runtime threads on both sides (default 1: deterministic, and qemu "
                        "threads on a shared machine spin)")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    env = Env(args.cache)
    try:
        if args.cmd == "setup":
            t0 = time.time()
            result = setup(env, jobs=args.jobs)
            built = [k for k, v in result["built"].items() if v]
            print(f"[arm64] {env.root}: {'built ' + ', '.join(built) if built else 'up to date'}"
                  f" in {time.time() - t0:.0f}s; arm64 side: {json.dumps(result['smoke'])}")
        elif args.cmd == "status":
            problem = env.ready()
            print(f"[arm64] {env.root}: {problem or 'ready'}")
            return 1 if problem else 0
        elif args.cmd == "compare":
            report = compare(env, args.exports, n_prompts=args.prompts,
                             max_new_tokens=args.max_new_tokens, n_threads=args.threads)
            print_table(report)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps(report, indent=2) + "\n")
                tmp.replace(args.out)
                print(f"[arm64] wrote {args.out}")
    except Arm64Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

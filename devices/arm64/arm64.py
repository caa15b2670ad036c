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

This file is the command line; the environment and the steps that build it are in
``arm64_setup.py``, the comparison and its table in ``arm64_compare.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
# Run as a script, this folder is on sys.path already; loaded by path (tests/test_arm64.py) it
# is not, and the siblings below are plain modules of this folder, not of a package.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# What callers (tests, scripts) use, importable from here.
from arm64_compare import agreement, compare, compare_results  # noqa: E402,F401
from arm64_compare import held_out_prompts, print_table  # noqa: E402,F401
from arm64_setup import APT_HINT, TOOLS, Arm64Error, Env, cache_dir  # noqa: E402,F401
from arm64_setup import check_tools, host_cpus, host_versions, missing_tools  # noqa: E402,F401
from arm64_setup import setup, smoke_test, write_cpuinfo  # noqa: E402,F401


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

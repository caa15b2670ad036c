"""``edgeqlora bench NAME [ARGS...]``: run a script from the repository's bench/ folder (it prints
a table and writes JSON). The scripts are not installed: this works from a source checkout."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ..errors import EdgeQloraError

HELP = "run a benchmark from bench/ (prints a table, writes JSON)"

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def add_arguments(p) -> None:
    p.add_argument("name", help="benchmark name (e.g. runtime, export, onnx, train_throughput)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark script")


def bench_scripts() -> dict[str, Path]:
    if not BENCH_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(BENCH_DIR.glob("*.py")) if not p.stem.startswith("_")}


def run(args) -> int:
    scripts = bench_scripts()
    if not scripts:
        raise EdgeQloraError(f"no benchmarks found: they live in the repository's bench/ folder "
                             f"({BENCH_DIR}); run edgeqlora from a source checkout")
    if args.name not in scripts:
        raise EdgeQloraError(f"unknown benchmark {args.name!r}; available: "
                             f"{', '.join(scripts)}")
    return subprocess.call([sys.executable, str(scripts[args.name]), *args.rest])

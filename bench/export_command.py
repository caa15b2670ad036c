"""Benchmark: the whole ``edgeqlora export ADAPTER --quant q4_k_m --no-parity`` command.

Wall time and peak RSS of the command as a user types it (merge base ``auto``, the default: the
base the adapter was trained against) and with ``--merge-base original``,
each repeated; with ``--baseline DIR`` the same commands run, interleaved, from another tree of
edgeqlora (a checkout of an older commit laid out as an importable package, put first on
``PYTHONPATH``), so a before/after pair shares the machine's state. The GGUF files of a pair
are compared byte for byte.

    python bench/export_command.py --adapter runs/x/adapter [--baseline DIR] [--repeats 2]
        [--cold] [--json bench/results/export_command.json]

``--cold`` adds this tree with ``EDGEQLORA_NF4_CACHE=0``: what the first export of a base costs
before its 4-bit round trip is kept.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], env: dict[str, str]) -> dict:
    """Wall seconds and the child's peak RSS (MiB) of one command run in a fresh process."""
    t = time.perf_counter()
    # A launcher process per run: ru_maxrss of RUSAGE_CHILDREN is a high-water mark over every
    # child this process ever waited for, so each measurement needs a parent of its own.
    code = ("import resource, subprocess, sys, json; "
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL).returncode; "
            "print(json.dumps({'rc': rc, 'kib': resource.getrusage("
            "resource.RUSAGE_CHILDREN).ru_maxrss}))")
    # cwd outside any checkout: ``python -m`` puts the working directory first on sys.path,
    # which would shadow the tree given by PYTHONPATH.
    out = subprocess.run([sys.executable, "-c", code, *cmd], env=env, capture_output=True,
                         text=True, check=True, cwd=tempfile.gettempdir()).stdout
    res = json.loads(out)
    if res["rc"] != 0:
        raise SystemExit(f"failed (exit {res['rc']}): {' '.join(cmd)}")
    return {"wall_s": round(time.perf_counter() - t, 2), "peak_rss_mib": round(res["kib"] / 1024)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--baseline", help="an older edgeqlora tree to put first on PYTHONPATH")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cold", action="store_true",
                    help="also run this tree with the 4-bit round trip not kept (a first export)")
    args = ap.parse_args(argv)
    trees = {"this tree": None, **({"baseline": args.baseline} if args.baseline else {})}
    if args.cold:  # the first export of a base: no 4-bit round trip kept (edgeqlora/roundtrip.py)
        trees["this tree, round trip not kept"] = None
    rows: dict[str, list[dict]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="edgeqlora-export-bench-"))
    try:
        for rep in range(args.repeats):
            for merge_base in ("auto", "original"):
                outs = {}
                for tree, path in trees.items():
                    if tree.endswith("not kept") and merge_base != "auto":
                        continue  # merging into the original weights has no round trip
                    env = dict(os.environ)
                    if path:
                        env["PYTHONPATH"] = str(Path(path).resolve())
                    if tree.endswith("not kept"):
                        env["EDGEQLORA_NF4_CACHE"] = "0"
                    out = scratch / f"{tree.replace(' ', '_')}-{merge_base}-{rep}"
                    cmd = [sys.executable, "-m", "edgeqlora.cli", "export", str(Path(args.adapter).resolve()),
                           "--quant", "q4_k_m", "--merge-base", merge_base, "--no-parity",
                           "--out", str(out)]
                    rows.setdefault(f"{tree}, merge base {merge_base}", []).append(
                        timed(cmd, env))
                    outs[tree] = out / "model.q4_k_m.gguf"
                if len(outs) >= 2:
                    first, *others = outs.values()
                    same = all(filecmp.cmp(first, o, shallow=False) for o in others)
                    rows.setdefault(f"same bytes, merge base {merge_base}", []).append(same)
                for out in outs.values():
                    shutil.rmtree(out.parent, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for name, runs in rows.items():
        if runs and isinstance(runs[0], dict):
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
            rss = max(r["peak_rss_mib"] for r in runs)
            print(f"{name:<40} {walls} s   peak {rss} MiB")
        else:
            print(f"{name:<40} {runs}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "edgeqlora export ADAPTER --quant q4_k_m --no-parity",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "load_avg_at_end": os.getloadavg()},
            "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

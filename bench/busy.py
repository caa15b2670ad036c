"""Benchmark: the quickstart's stages on an idle machine and with one core kept busy (issue #17).

The stages, each a fresh ``edgeqlora`` command as a user types it:

1. ``train`` (embedded base, NF4): the untrained base's evaluation on ``--examples`` held-out
   commands, ``--steps`` training steps, the final evaluation (times from the run's
   ``metrics.jsonl``; the base-evaluation cache off, so it is measured);
2. ``export --quant q4_k_m --no-parity`` of that adapter (merge, GGUF, verification);
3. ``parity`` of that export against the trained model on ``--examples`` examples.

Each runs idle and then "busy": with another process spinning on one core for the whole stage
(``while time.time() < deadline: pass``; bounded, and killed when the stage ends). Trees: this
one (the thread policy, ``edgeqlora.threads``), ``--static`` (this tree with
``EDGEQLORA_THREADS=static``: the thread counts from before the policy) and ``--baseline DIR``
(an older edgeqlora laid out as an importable package, put first on ``PYTHONPATH``). The table
gives each stage's seconds and the busy / idle ratio.

    python bench/busy.py [--baseline DIR] [--static] [--steps 10] [--examples 8]
        [--json bench/results/busy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN = "import time, sys\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: pass\n"


def run(cmd: list[str], env: dict[str, str], cwd: Path, busy: bool, limit_s: float,
        ok: tuple[int, ...] = (0,)) -> dict:
    spinner = subprocess.Popen([sys.executable, "-c", SPIN, str(limit_s)]) if busy else None
    try:
        if spinner is not None:
            time.sleep(0.5)  # let it take its core first, as a job already running would
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=limit_s)
        wall = time.perf_counter() - t
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if p.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return {"wall_s": round(wall, 1), "stderr": p.stderr, "stdout": p.stdout}


def stages(tree: str | None, static: bool, busy: bool, args, work: Path) -> dict:
    env = {**os.environ, "EDGEQLORA_EVAL_CACHE": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("EDGEQLORA_THREADS", None)
    if static:
        env["EDGEQLORA_THREADS"] = "static"
    if tree:
        env["PYTHONPATH"] = str(Path(tree).resolve())
    cli = [sys.executable, "-m", "edgeqlora"]
    run_dir, export_dir, parity_dir = work / "run", work / "export", work / "parity"
    out: dict = {}
    r = run(cli + ["train", f"max_steps={args.steps}", f"eval_examples={args.examples}",
                   "save_every=0", "--out", str(run_dir)], env, work, busy, args.limit_s)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    summary = json.loads((run_dir / "adapter" / "manifest.json").read_text())["metrics"]
    out["train command"] = r["wall_s"]
    out["  base evaluation"] = evals[0]["eval_time_s"]
    out[f"  {args.steps} training steps"] = summary["train_time_s"]
    out["  final evaluation"] = evals[-1]["eval_time_s"]
    out["  exact match after"] = evals[-1].get("exact_match")
    out["threads line"] = next((ln for ln in (r["stdout"] + r["stderr"]).splitlines()
                                if ln.startswith("threads:")), None)
    r = run(cli + ["export", str(run_dir / "adapter"), "--quant", "q4_k_m", "--no-parity",
                   "--out", str(export_dir)], env, work, busy, args.limit_s)
    out["export q4_k_m"] = r["wall_s"]
    r = run(cli + ["parity", "--reference", str(run_dir / "adapter"), "--candidate",
                   str(export_dir), "--out", str(parity_dir), "--examples", str(args.examples)],
            env, work, busy, args.limit_s, ok=(0, 1))  # 1: the gate failed; timed all the same
    out["parity"] = r["wall_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", help="an older edgeqlora tree to put first on PYTHONPATH")
    ap.add_argument("--static", action="store_true",
                    help="also this tree with EDGEQLORA_THREADS=static")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--limit-s", type=float, default=1800.0, help="per command")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    trees = {"policy": (None, False)}
    if args.static:
        trees["static"] = (None, True)
    if args.baseline:
        trees["baseline"] = (args.baseline, False)
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "python": sys.version.split()[0]},
                     "steps": args.steps, "examples": args.examples, "runs": {}}
    for load in ("idle", "busy"):  # paired: every tree idle, then every tree busy
        for name, (tree, static) in trees.items():
            with tempfile.TemporaryDirectory(prefix="busy-") as work:
                print(f"{name} {load} ...", file=sys.stderr, flush=True)
                results["runs"][f"{name} {load}"] = stages(tree, static, load == "busy", args,
                                                           Path(work))
    keys = [k for k in results["runs"]["policy idle"] if k != "threads line"]
    head = ["stage"] + [f"{n} {ld}" for n in trees for ld in ("idle", "busy", "ratio")]
    print(" | ".join(head))
    for k in keys:
        cells = [k]
        for n in trees:
            idle, busy = results["runs"][f"{n} idle"][k], results["runs"][f"{n} busy"][k]
            ratio = (f"{busy / idle:.2f}x" if isinstance(idle, (int, float)) and idle
                     and not k.strip().startswith("exact") else "")
            cells += [str(idle), str(busy), ratio]
        print(" | ".join(cells))
    for run_name, r in results["runs"].items():
        print(f"{run_name}: {r.get('threads line')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

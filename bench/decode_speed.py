"""Paired decode speed of exports through the runtime shims (GGUF or ONNX, adapters applied as
shipped): each measurement in a fresh subprocess, the exports alternating (A, B, C, A, B, C,
...), medians reported, so a CPU shared with other work moves every export alike.

Per run: prefill tokens/s (a fixed ~256-token prompt, time to the first token) and decode
tokens/s (greedy, the tokens after the first / the time they took), at ``--threads``.

    python bench/decode_speed.py EXPORT [EXPORT ...] [--threads 1] [--repeats 3]
        [--new-tokens 64] [--out bench/results/decode_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = ("A smart home hub listens for commands and turns them into actions on lights, blinds, "
          "thermostats, locks and speakers. ") * 12


def _measure(path: str, threads: int, new_tokens: int) -> dict:
    from edgeqlora import runtimes
    from edgeqlora.runtimes.base import Completion

    rt = runtimes.load(path, n_threads=threads)
    try:
        prompt = rt.render_chat([{"role": "user", "content": PROMPT}])
        result = Completion()
        start, first = time.perf_counter(), None
        for _ in rt.complete(prompt, max_new_tokens=new_tokens, temperature=0.0,
                             result=result, stop=[]):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        n = result.completion_tokens - 1
        return {"prompt_tokens": result.prompt_tokens, "tokens": result.completion_tokens,
                "prefill_tokens_per_s": result.prompt_tokens / (first - start),
                "decode_tokens_per_s": n / (end - first) if n > 0 else None}
    finally:
        rt.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(_measure(args._one, args.threads, args.new_tokens)))
        return 0
    runs: dict[str, list[dict]] = {e: [] for e in args.exports}
    for _ in range(args.repeats):
        for e in args.exports:
            out = subprocess.run([sys.executable, __file__, e, "--_one", e, "--threads",
                                  str(args.threads), "--new-tokens", str(args.new_tokens)],
                                 capture_output=True, text=True, check=True)
            runs[e].append(json.loads(out.stdout.strip().splitlines()[-1]))
    report = {"benchmark": "decode_speed", "threads": args.threads, "repeats": args.repeats,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average": os.getloadavg(), "exports": {}}
    for e, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs if r[k] is not None)
               for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
        report["exports"][e] = {**med, "runs": rs}
        print(f"{e}: decode {med['decode_tokens_per_s']:.1f} tok/s, prefill "
              f"{med['prefill_tokens_per_s']:.1f} tok/s (median of {len(rs)})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

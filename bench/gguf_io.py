"""Benchmark: the GGUF reading and writing the test suite and ``base=FILE.gguf`` pay for.

Four timings, each the best of ``--repeats`` in a fresh process per tree:

- ``header``: the embedded SmolLM2 GGUF's header with its whole vocabulary
  (``read_gguf_header(whole_arrays=True)``);
- ``tiny write``: an F32 GGUF of a tiny random Llama with SmolLM2's tokenizer (the second and
  later writes of one process, as a test module makes them);
- ``tiny conversion``: that GGUF back into a checkpoint (``base._write_model_from_gguf``);
- ``embedded conversion``: the embedded SmolLM2 GGUF into a checkpoint (``convert_embedded``).

With ``--baseline DIR`` (an older edgeqlora laid out as an importable package) the same runs
come from that tree too, interleaved, and the converted weights of the two are compared.

    python bench/gguf_io.py [--baseline DIR] [--repeats 2] [--json bench/results/gguf_io.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import hashlib, json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/tests")
from conftest import build_tiny_model
from edgeqlora import base
from edgeqlora.exporters import gguf as G
from edgeqlora.runtimes.gguf_header import read_gguf_header

def best(fn, n=3):
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)

tmp = Path(tempfile.mkdtemp())
out = {"header_s": best(lambda: read_gguf_header(base.embedded_gguf_path(), whole_arrays=True))}
tiny = build_tiny_model(tmp / "tiny", Path(sys.argv[1]) / "tests" / "assets" / "smollm2-tokenizer")
G.write_model_gguf(tiny, tmp / "first.gguf", "f32")
out["tiny_write_s"] = best(lambda: G.write_model_gguf(tiny, tmp / "t.gguf", "f32"), 5)
t = time.perf_counter(); base._write_model_from_gguf(tmp / "t.gguf", tmp / "tiny-back")
out["tiny_conversion_s"] = time.perf_counter() - t
t = time.perf_counter(); base.convert_embedded(base.embedded_gguf_path(), tmp / "embedded")
out["embedded_conversion_s"] = time.perf_counter() - t
out["embedded_weights_sha256"] = hashlib.sha256(
    (tmp / "embedded" / "model.safetensors").read_bytes()).hexdigest()
print(json.dumps(out))
"""


def run(tree: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if tree:
        env["PYTHONPATH"] = str(Path(tree).resolve())
    proc = subprocess.run([sys.executable, "-c", WORKER, str(ROOT)], env=env, cwd="/",
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="an older edgeqlora tree to put first on PYTHONPATH")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    trees = {"this tree": None, **({"baseline": args.baseline} if args.baseline else {})}
    rows: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            rows[name].append(run(tree))
    keys = ("header_s", "tiny_write_s", "tiny_conversion_s", "embedded_conversion_s")
    for name, runs in rows.items():
        print(f"{name:<10} " + "  ".join(
            f"{k[:-2]} {min(r[k] for r in runs):.3f} s" for k in keys))
    digests = {r["embedded_weights_sha256"] for runs in rows.values() for r in runs}
    print("embedded weights identical:", len(digests) == 1)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "gguf_io", "machine": {"cpus": os.cpu_count(),
                                                "platform": platform.platform(),
                                                "load_avg_at_end": os.getloadavg()},
            "results": rows, "same_embedded_weights": len(digests) == 1}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

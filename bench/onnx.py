"""Benchmark the ONNX export variants against each other (and the GGUF Q4_K_M / Q4_0 on
llama.cpp when that exporter and llama-cpp-python are installed).

Per variant: export time and peak RSS of the export (each export runs in its own child process;
peak RSS from ``os.wait4``), file size, top-1 / mean KLD against the merged model in fp32 on
held-out tokens (the export's own verification), then, in a fresh child per variant: prefill and
decode tokens/s through our runtime shim (same prompt, same threads for every format) and the
peak RSS of that process. With ``--adapter`` the source is a trained adapter (merged by the
export stage) and the task exact match of each variant is measured on the embedded task's
held-out set beside the trained model's.

    .venv/bin/python bench/onnx.py                      # embedded base, int4 int4-kquant-last int8
    .venv/bin/python bench/onnx.py --adapter runs/quickstart/adapter --variants int4 int8

Prints a table and writes ``bench/results/onnx.json``.
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

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder comes first on sys.path and this file would shadow the
# real ``onnx`` package; drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _child(args: list[str]) -> tuple[dict, float]:
    """Run this script in a child process; its JSON result and its peak RSS in MiB. Output goes
    to files, not pipes: a chatty library could fill a pipe and block the child."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as d:
        result, log = Path(d) / "result.json", Path(d) / "log.txt"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, __file__, *args, "--_result", str(result)],
                                    stdout=fh, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or not result.is_file():
            raise RuntimeError(f"child {args[:2]} failed:\n{log.read_text()[-3000:]}")
        return json.loads(result.read_text()), usage.ru_maxrss / 1024


def do_export(source: str, kind: str, target: str, quant: str, out: str) -> dict:
    t = time.perf_counter()
    if kind == "adapter":
        from edgeqlora.export import export_adapter

        m = export_adapter(source, out, target=target, quant=quant, force=True,
                           thresholds={"min_top1": 0.0, "max_kld": 1e9})
    elif target == "onnx":
        from edgeqlora.exporters.onnx import export_merged

        m = export_merged(source, out, quant, force=True, eval_tokens=1024,
                          thresholds={"min_top1": 0.0, "max_kld": 1e9})
    else:  # a GGUF of a merged dir: the GGUF exporter's own write + verify
        from transformers import AutoTokenizer

        from edgeqlora.artifacts import atomic_dir, write_manifest
        from edgeqlora.exporters import gguf as G
        from edgeqlora.merge import heldout_sequences

        tok = AutoTokenizer.from_pretrained(source)
        seqs = heldout_sequences({}, tok, 1024)
        with atomic_dir(out, force=True) as tmp:
            info = G.write_export(source, tmp, quant)
            check = G.verify_export(tmp, info, source, seqs, [],
                                    {"min_top1": 0.0, "max_kld": 1e9})
            info.pop("plan", None)
            m = write_manifest(tmp, "export", {"target": "gguf", "quant": quant,
                                               "exporter": info, "verification": check})
    v = m["verification"]
    size = sum(f["size_bytes"] for n, f in m["files"].items()
               if n.endswith((".gguf", ".onnx", ".onnx.data")))
    return {"export_s": round(time.perf_counter() - t, 1), "size_mb": round(size / 2**20, 1),
            "top1_vs_fp32": v.get("top1"), "kld_vs_fp32": v.get("kld"),
            "genai_loaded": (v.get("genai") or {}).get("loaded")}


def do_speed(export_dir: str, threads: int, prompt_tokens: int, decode_tokens: int) -> dict:
    from edgeqlora import runtimes

    rt = runtimes.load(export_dir, n_threads=threads)
    base = rt.tokenize("The living room lights are on, the thermostat is set to 21 degrees "
                       "and the front door is locked. ")
    ids = (base * (prompt_tokens // len(base) + 1))[:prompt_tokens]
    rt.logits(ids[:16])  # warm-up
    t = time.perf_counter()
    rt.logits(ids)
    prefill = prompt_tokens / (time.perf_counter() - t)
    from edgeqlora.runtimes.base import Completion

    done = Completion()
    stream = rt.complete(ids[:32], max_new_tokens=decode_tokens, result=done)
    next(stream)  # prefill + first token
    t = time.perf_counter()
    for _ in stream:
        pass
    n = max(1, done.completion_tokens - 1)
    decode = n / (time.perf_counter() - t)
    return {"prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 1),
            "decoded": done.completion_tokens}


def task_exact_match(export_dir: str, adapter_dir: str, n: int) -> dict:
    """Exact match of greedy answers through the runtime on the adapter's held-out task set,
    scored as the parity gate scores it (``parity.task_set`` / ``parity.exact_match``)."""
    from edgeqlora import runtimes
    from edgeqlora.artifacts import read_manifest
    from edgeqlora.parity import exact_match, task_set

    task = task_set(read_manifest(adapter_dir, kind="adapter"), n)
    rt = runtimes.load(export_dir)
    outputs = [rt.chat(p, max_new_tokens=96) for p in task.prompts]
    return {"exact_match": round(exact_match(outputs, task), 3), "rows": len(outputs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="merged HF checkpoint (default: the embedded base)")
    ap.add_argument("--adapter", help="a trained adapter dir (measures task exact match too)")
    ap.add_argument("--variants", nargs="+", default=["int4", "int4-kquant-last", "int8"])
    ap.add_argument("--gguf", nargs="*", default=["q4_k_m", "q4_0"],
                    help="GGUF quants to compare (needs llama-cpp-python); empty to skip")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--task-rows", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx.json"))
    ap.add_argument("--_export", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--_speed", help=argparse.SUPPRESS)
    ap.add_argument("--_task", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    job = None
    if a._export:
        job = lambda: do_export(*a._export)  # noqa: E731
    elif a._speed:
        job = lambda: do_speed(a._speed, a.threads, a.prompt_tokens, a.decode_tokens)  # noqa
    elif a._task:
        job = lambda: task_exact_match(*a._task, a.task_rows)  # noqa: E731
    if job is not None:
        Path(a._result).write_text(json.dumps(job()))
        return

    if a.adapter:
        source, kind = a.adapter, "adapter"
    else:
        from edgeqlora.base import resolve_base

        source, kind = str(a.model or resolve_base("embedded")), "merged"
    import importlib.util

    plans = [("onnx", v) for v in a.variants]
    if a.gguf and importlib.util.find_spec("llama_cpp") is not None and kind == "merged":
        plans += [("gguf", q) for q in a.gguf]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as scratch:
        for target, quant in plans:
            out = str(Path(scratch) / f"{target}-{quant}")
            row = {"target": target, "quant": quant}
            try:
                res, rss = _child(["--_export", source, kind, target, quant, out])
                row.update(res, export_peak_rss_mb=round(rss))
                res, rss = _child(["--_speed", out, "--threads", str(a.threads),
                                   "--prompt-tokens", str(a.prompt_tokens),
                                   "--decode-tokens", str(a.decode_tokens)])
                row.update(res, runtime_peak_rss_mb=round(rss))
                if kind == "adapter":
                    res, _ = _child(["--_task", out, source, "--task-rows", str(a.task_rows)])
                    row.update(res)
            except RuntimeError as exc:
                row["error"] = str(exc).splitlines()[-1]
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "source": source, "source_kind": kind, "threads": a.threads,
              "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    cols = ["target", "quant", "size_mb", "top1_vs_fp32", "kld_vs_fp32", "export_s",
            "export_peak_rss_mb", "prefill_tok_s", "decode_tok_s", "runtime_peak_rss_mb",
            "exact_match", "genai_loaded"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) and c.startswith(("kld", "top1"))
                         else str(v))
        print("| " + " | ".join(cells) + " |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""Benchmark the ONNX export variants against each other (and the GGUF Q4_K_M / Q4_0 on
llama.cpp when that exporter and llama-cpp-python are installed).

Per variant: export time and peak RSS of the export (each export runs in its own child process;
peak RSS from ``os.wait4``), file size, top-1 / mean KLD against the merged model in fp32 on
held-out tokens (the export's own verification), then, in a fresh child per variant: prefill and
decode tokens/s through our runtime shim (same prompt, same threads for every format) and the
peak RSS of that process. With ``--adapter`` the source is a trained adapter (merged by the
export stage) and the task exact match of each variant is measured on the embedded task's
held-out set beside the trained model's.

    .venv/bin/python bench/onnx_variants.py                      # embedded base, int4 int4-kquant-last int8
    .venv/bin/python bench/onnx_variants.py --adapter runs/quickstart/adapter --variants int4 int8

Prints a table and writes ``bench/results/onnx.json``.

``--task-table`` measures every variant against the trained model instead (the issue's
acceptance: task exact match of each variant beside the trained model's): each variant is
exported from ``--adapter`` (calibrated ones on the adapter's own training data), then one
``edgeqlora.parity.run_parity`` over all of them (same held-out examples, same greedy length,
one reference) gives exact match, identical answers, KLD and top-1 vs the trained model; with
size on disk and the export's KLD vs the merged fp32 model. Writes
``bench/results/onnx_task.json``:

    .venv/bin/python bench/onnx_variants.py --task-table --adapter runs/quickstart/adapter \
        --exports-dir runs/onnx-task --merge-base dequantized

On a busy CPU the torch reference (NF4 greedy decoding) is the slow part: ``--reference-em X``
takes the trained model's exact match on the same examples as given (the quickstart's
``trained_exact_match_parity_set``) and measures only each variant's exact match through its
runtime (KLD is then the export's own, against the merged fp32 model).
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


def do_export(source: str, kind: str, target: str, quant: str, out: str,
              merge_base: str = "auto") -> dict:
    t = time.perf_counter()
    if kind == "adapter":
        from edgeqlora.export import export_adapter

        # Calibrated quants calibrate on the data the adapter was trained on (the stage's
        # ``auto``: its manifest's spec).
        m = export_adapter(source, out, target=target, quant=quant, force=True,
                           merge_base=merge_base,
                           thresholds={"min_top1": 0.0, "max_kld": 1e9})
    else:  # a merged checkpoint: the stage's write + verify against it
        from edgeqlora.export import export_merged

        m = export_merged(source, out, target=target, quant=quant, force=True,
                          eval_tokens=1024, thresholds={"min_top1": 0.0, "max_kld": 1e9})
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


def task_exact_match(export_dir: str, adapter_dir: str, n: int,
                     max_new_tokens: int = 96) -> dict:
    """Exact match of greedy answers through the runtime on the adapter's held-out task set,
    scored as the parity gate scores it (``parity.task_set`` / ``parity.exact_match``)."""
    from edgeqlora import runtimes
    from edgeqlora.artifacts import read_manifest
    from edgeqlora.parity import exact_match, task_set

    task = task_set(read_manifest(adapter_dir, kind="adapter"), n)
    rt = runtimes.load(export_dir)
    outputs = [rt.chat(p, max_new_tokens=max_new_tokens, temperature=0.0).strip()
               for p in task.prompts]
    return {"exact_match": round(exact_match(outputs, task), 3), "rows": len(outputs)}


def _model_bytes(export_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(export_dir).iterdir()
               if p.name.endswith((".onnx", ".onnx.data", ".gguf")))


def _reusable(export_dir: Path, quant: str, adapter: str) -> bool:
    """An export already in ``--exports-dir`` made from this adapter with this quant."""
    from edgeqlora.artifacts import read_manifest

    try:
        m = read_manifest(export_dir, kind="export")
    except Exception:  # absent or unreadable: export it again
        return False
    return (m.get("quant") == quant and m.get("source", {}).get("adapter")
            == str(Path(adapter).resolve()))


def task_table(a) -> None:
    """Export each variant from the adapter (or reuse it), then one parity run over all of
    them (or, with ``--reference-em``, each one's exact match through its runtime)."""
    from edgeqlora.artifacts import read_manifest

    if not a.adapter:
        raise SystemExit("--task-table needs --adapter (the trained adapter is the reference)")
    exports = Path(a.exports_dir or tempfile.mkdtemp(prefix="bench-onnx-task-"))
    exports.mkdir(parents=True, exist_ok=True)
    rows, dirs = [], []
    for quant in a.variants:
        out = exports / f"onnx-{quant}"
        row: dict = {"quant": quant}
        if _reusable(out, quant, a.adapter):
            row["export_s"] = "reused"
        else:
            try:
                res, rss = _child(["--_export", a.adapter, "adapter", "onnx", quant, str(out),
                                   "--merge-base", a.merge_base])
                row.update(export_s=res["export_s"], export_peak_rss_mb=round(rss))
            except RuntimeError as exc:
                row["error"] = str(exc).splitlines()[-1]
                rows.append(row)
                continue
        m = read_manifest(out, kind="export")
        v = m.get("verification", {})
        recipe = m.get("exporter", {}).get("recipe", {})
        row.update(size_mb=round(_model_bytes(out) / 2**20, 1),
                   kld_vs_merged_fp32=v.get("kld"), top1_vs_merged_fp32=v.get("top1"),
                   merge_base=(m.get("merge") or {}).get("merge_base"),
                   algorithm=recipe.get("algorithm"), quant_mix=m.get("quant_mix"),
                   calibration=recipe.get("calibration"))
        rows.append(row)
        dirs.append(out)
        print(json.dumps(row), flush=True)
    t = time.perf_counter()
    if a.reference_em is not None:
        # No torch reference (its NF4 greedy decoding is the slow part on a busy CPU): each
        # variant's exact match through its runtime, the same examples and answer length as
        # parity; the trained model's exact match as given.
        for row, d in zip([r for r in rows if "error" not in r], dirs):
            res, _ = _child(["--_task", str(d), a.adapter, "--task-rows", str(a.task_rows),
                             "--max-new-tokens", str(a.max_new_tokens)])
            row.update(exact_match=res["exact_match"],
                       keeps_of_trained=round(res["exact_match"] / a.reference_em, 3))
            print(json.dumps({k: row[k] for k in ("quant", "exact_match", "keeps_of_trained")}),
                  flush=True)
        report = None
    else:
        report = _parity_rows(a, rows, dirs, exports)
    ref_em = a.reference_em if report is None else report["reference"]["task"]["exact_match"]
    settings = {"examples": a.task_rows, "max_new_tokens": a.max_new_tokens,
                "text_tokens": 0 if report is None else report["settings"]["text_tokens"],
                "reference_em": "given (--reference-em)" if report is None
                else "measured (parity)"}
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "adapter": a.adapter, "merge_base": a.merge_base,
              "reference": {"exact_match": ref_em, "examples": a.task_rows},
              "settings": settings, "measure_seconds": round(time.perf_counter() - t, 1),
              "rows": rows}
    _write_task_table(a, result, rows, ref_em)


def _parity_rows(a, rows: list, dirs: list, exports: Path) -> dict:
    from edgeqlora.errors import ParityError
    from edgeqlora.parity import run_parity

    try:
        report = run_parity(a.adapter, [str(d) for d in dirs], exports / "parity", None,
                            examples=a.task_rows, text_tokens=a.text_tokens,
                            max_new_tokens=a.max_new_tokens, force=True)
    except ParityError:  # the report is written either way; failing the gate is a result here
        report = json.loads((exports / "parity" / "parity.json").read_text())
    ref_em = report["reference"]["task"]["exact_match"]
    by_dir = {str(p): n for n, p in report["settings"]["candidates"].items()}
    for row, d in zip([r for r in rows if "error" not in r], dirs):
        c = report["candidates"][by_dir[str(d)]]
        em = c["task"]["exact_match"]
        row.update(exact_match=em, keeps_of_trained=round(em / ref_em, 3) if ref_em else None,
                   identical_answers=c["task"]["identical_answers"],
                   kld_vs_trained=c["all"].get("mean_kld"), top1_vs_trained=c["all"].get("top1"),
                   passed_gate=not report["failures"].get(by_dir[str(d)]))
    return report


def _write_task_table(a, result: dict, rows: list, ref_em: float) -> None:
    out_json = Path(a.out or ROOT / "bench" / "results" / "onnx_task.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    cols = ["quant", "size_mb", "kld_vs_merged_fp32", "kld_vs_trained", "top1_vs_trained",
            "exact_match", "keeps_of_trained", "identical_answers"]
    print(f"trained model (reference): exact match {ref_em:.3f} on {a.task_rows} held-out "
          "examples")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r.get(c):.4f}" if isinstance(r.get(c), float)
                                 and c.startswith(("kld", "top1"))
                                 else str(r.get(c, r.get("error", ""))) for c in cols) + " |")
    print(f"wrote {out_json}")


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
    ap.add_argument("--out", default=None,
                    help="result JSON (default bench/results/onnx.json, or onnx_task.json "
                         "with --task-table)")
    ap.add_argument("--task-table", action="store_true",
                    help="exact match / KLD vs the trained model of every variant (needs "
                         "--adapter); writes bench/results/onnx_task.json")
    ap.add_argument("--exports-dir", help="--task-table: where the exports go (kept; an "
                    "export of the same adapter and quant already there is reused)")
    ap.add_argument("--merge-base", default="auto", choices=("auto", "original", "dequantized"))
    ap.add_argument("--text-tokens", type=int, default=512,
                    help="--task-table: English text tokens for KLD (parity --text-tokens)")
    ap.add_argument("--max-new-tokens", type=int, default=48,
                    help="--task-table: greedy answer length (parity --max-new-tokens)")
    ap.add_argument("--reference-em", type=float, default=None,
                    help="--task-table: the trained model's exact match on the same examples "
                         "(e.g. the quickstart summary's trained_exact_match_parity_set); skips "
                         "the torch reference and KLD vs the trained model")
    ap.add_argument("--_export", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--_speed", help=argparse.SUPPRESS)
    ap.add_argument("--_task", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    job = None
    if a._export:
        job = lambda: do_export(*a._export, merge_base=a.merge_base)  # noqa: E731
    elif a._speed:
        job = lambda: do_speed(a._speed, a.threads, a.prompt_tokens, a.decode_tokens)  # noqa
    elif a._task:
        job = lambda: task_exact_match(*a._task, a.task_rows, a.max_new_tokens)  # noqa: E731
    if job is not None:
        Path(a._result).write_text(json.dumps(job()))
        return
    if a.task_table:
        task_table(a)
        return
    a.out = a.out or str(ROOT / "bench" / "results" / "onnx.json")

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
                res, rss = _child(["--_export", source, kind, target, quant, out,
                                   "--merge-base", a.merge_base])
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

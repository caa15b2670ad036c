"""Compare an export's arm64 run with its x86 run: the same held-out prompts through
``probe.py`` on both sides, then per-export agreement (top-1, KL divergence and |logit
difference| from ``edgeqlora.metrics``, identical greedy answers) and the table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from arm64_setup import ARM_ARCH, QEMU_CPU, SUITE, Arm64Error, Env, write_cpuinfo

from edgeqlora.metrics import kl_divergence, top1_agreement

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROBE = HERE / "probe.py"


def held_out_prompts(export: Path, n: int) -> list[dict[str, Any]]:
    """``n`` held-out conversations of the data the export was trained on (as the parity gate
    picks them), split into the prompt messages and the reference answer."""
    from edgeqlora.artifacts import read_manifest
    from edgeqlora.heldout import heldout_conversations

    prompts = []
    for conv in heldout_conversations(read_manifest(export), n=max(n * 4, 16)):
        if len(conv) >= 2 and conv[-1]["role"] == "assistant":
            prompts.append({"messages": conv[:-1], "answer": conv[-1]["content"]})
        if len(prompts) == n:
            break
    if not prompts:
        raise Arm64Error(f"no held-out conversation with an answer for {export}")
    return prompts


def agreement(ref, cand) -> dict[str, float]:
    """Per-position agreement of two ``[tokens, vocab]`` logit arrays (ref = x86).

    KL(ref || cand) of the next-token distributions and top-1 (same argmax) from
    ``edgeqlora.metrics``, as the parity gate measures them; the absolute logit differences are
    raw. Sums rather than means, so that ``compare_results`` can pool prompts."""
    kld = kl_divergence(ref, cand)
    diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    n = int(ref.shape[0])
    return {"tokens": n, "top1_hits": int(round(top1_agreement(ref, cand) * n)),
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

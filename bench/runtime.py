"""Runtime benchmark: our GGUF shim vs raw llama-cpp-python on the same file.

For each variant, in its own subprocess (so peak RSS is that variant's alone), with the same
threads, context size and prompt:

- prefill tokens/s: prompt tokens / time to the first generated token (from an empty cache);
- decode tokens/s: generated tokens after the first / time from the first to the last;
- peak RSS (``ru_maxrss``) of the process after loading and generating.

"raw" is ``llama_cpp.Llama.generate`` consumed token by token (the thinnest public path: no
detokenization, no stop strings); "shim" is ``edgeqlora.runtimes.load(...).complete(...)``,
which adds UTF-8 pieces, stop-string handling and finish reasons. Both decode greedily and
produce the same token ids; raw generates exactly as many tokens as the shim did.

Next to them: the bandwidth-bound limit. Decoding one token reads every weight once (the
token-embedding table too, when the output head is tied to it as in SmolLM2), so
``limit = memory bandwidth / model bytes``; bandwidth is measured with a numpy copy of a buffer
far larger than the caches (read + write bytes / time, best of several).

Variants alternate (raw, shim, raw, shim, ...) and medians are reported, because the CPU may be
shared with other work; run it on an idle machine for numbers worth quoting.

    python bench/runtime.py [--model EXPORT_OR_GGUF] [--threads N] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TEXT = (
    "The history of the bicycle is a story of many small improvements. Early machines had no "
    "pedals at all: riders pushed themselves along with their feet. Later designs added cranks "
    "to the front wheel, then chains, gears and air-filled tyres, and each change made cycling "
    "faster, safer or more comfortable. Today bicycles are used for commuting, racing, touring "
    "and delivering goods in crowded cities. "
)


def _model_path(model: str | None) -> Path:
    if model:
        return Path(model)
    from edgeqlora.base import embedded_gguf_path

    return embedded_gguf_path()


def _gguf_file(path: Path) -> Path:
    if path.is_dir():
        from edgeqlora.artifacts import read_manifest
        from edgeqlora.runtimes import model_files

        manifest = read_manifest(path)
        return model_files(path, manifest, manifest.get("target", "gguf"))[0]
    return path


def _prompt_ids(rt_or_llm, n: int, tokenize) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenize(PROMPT_TEXT)
    return ids[:n]


def worker(variant: str, model: Path, threads: int, n_ctx: int, prompt_tokens: int,
           new_tokens: int, exact_tokens: int | None) -> dict:
    """One measurement in this process; prints nothing, returns the numbers."""
    if variant == "shim":
        from edgeqlora import runtimes
        from edgeqlora.runtimes.base import Completion

        t0 = time.perf_counter()
        rt = runtimes.load(model, n_threads=threads, n_ctx=n_ctx)
        load_s = time.perf_counter() - t0
        ids = _prompt_ids(rt, prompt_tokens, lambda t: rt.tokenize(t, special=False))
        result = Completion()
        start = time.perf_counter()
        first = None
        for _ in rt.complete(ids, max_new_tokens=new_tokens, result=result):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        tokens = result.token_ids
        overhead_us = _shim_overhead_us(rt, tokens)
        rt.close()
    elif variant == "raw":
        import llama_cpp

        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=str(_gguf_file(model)), n_ctx=n_ctx, n_batch=512,
                              n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
        load_s = time.perf_counter() - t0
        ids = _prompt_ids(llm, prompt_tokens,
                          lambda t: llm.tokenize(t.encode(), add_bos=False, special=False))
        want = exact_tokens or new_tokens
        tokens = []
        start = time.perf_counter()
        first = None
        for tok in llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0,
                                repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter()
            tokens.append(int(tok))
            if len(tokens) >= want:
                break
        end = time.perf_counter()
        overhead_us = 0.0
        llm.close()
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    n = len(tokens)
    return {
        "variant": variant, "load_s": load_s, "prompt_tokens": len(ids), "new_tokens": n,
        "prefill_tok_s": len(ids) / (first - start) if first else 0.0,
        "decode_tok_s": (n - 1) / (end - first) if first and n > 1 else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "text_overhead_us_per_token": overhead_us,
        "tokens": tokens,
    }


def _shim_overhead_us(rt, tokens: list[int], repeats: int = 20) -> float:
    """Microseconds per token of what the shim adds on top of llama.cpp's sampler (the token's
    bytes, UTF-8 decoding, stop-string hold-back, bookkeeping), timed without the model: a
    number that does not move with the machine's load, unlike the end-to-end ratio."""
    from edgeqlora.runtimes.base import StopStream

    if not tokens:
        return 0.0
    best = float("inf")
    for _ in range(repeats):
        stream = StopStream(["</s>", "\n\nUser:"])
        ids: list[int] = []
        t = time.perf_counter()
        for tok in tokens:
            rt._is_eog(tok)
            ids.append(tok)
            stream.feed(rt._piece(tok))
        stream.flush()
        best = min(best, time.perf_counter() - t)
    return best / len(tokens) * 1e6


def memory_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth in bytes/s (read + write), best of ``repeats``."""
    import numpy as np

    n = mb * (1 << 20) // 8
    a = np.ones(n, dtype=np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def _run_worker(args, variant: str, exact: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--model", str(args.model),
           "--threads", str(args.threads), "--n-ctx", str(args.n_ctx),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    if exact:
        cmd += ["--exact-tokens", str(exact)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or export dir (default: embedded)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both (default: edgeqlora's default, all cores but one)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench/runtime.json")
    p.add_argument("--worker", choices=["raw", "shim"], help=argparse.SUPPRESS)
    p.add_argument("--exact-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = _model_path(args.model)
    if args.threads is None:
        from edgeqlora.runtimes import default_threads

        args.threads = default_threads()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.threads, args.n_ctx,
                                args.prompt_tokens, args.new_tokens, args.exact_tokens)))
        return 0

    runs: dict[str, list[dict]] = {"raw": [], "shim": []}
    for i in range(args.repeats):
        shim = _run_worker(args, "shim", None)
        raw = _run_worker(args, "raw", shim["new_tokens"])
        if raw["tokens"] != shim["tokens"]:
            print("warning: raw and shim generated different tokens", file=sys.stderr)
        runs["shim"].append(shim)
        runs["raw"].append(raw)
        print(f"repeat {i + 1}/{args.repeats}: shim decode {shim['decode_tok_s']:.1f} tok/s, "
              f"raw {raw['decode_tok_s']:.1f} tok/s", file=sys.stderr)

    def med(variant, key):
        return statistics.median(r[key] for r in runs[variant])

    model_bytes = _gguf_file(args.model).stat().st_size
    bw = memory_bandwidth()
    summary = {v: {k: med(v, k) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb",
                                          "load_s", "text_overhead_us_per_token")}
               for v in runs}
    ratio = {k: summary["shim"][k] / summary["raw"][k] if summary["raw"][k] else None
             for k in ("prefill_tok_s", "decode_tok_s")}
    limit = bw / model_bytes
    # The load-independent view: the shim's own per-token work against raw's time per token.
    raw_ms = 1e3 / summary["raw"]["decode_tok_s"] if summary["raw"]["decode_tok_s"] else 0.0
    overhead_ms = summary["shim"]["text_overhead_us_per_token"] / 1e3
    ratio["decode_bound_from_overhead"] = raw_ms / (raw_ms + overhead_ms) if raw_ms else None
    result = {
        "model": str(args.model), "model_bytes": model_bytes, "threads": args.threads,
        "n_ctx": args.n_ctx, "prompt_tokens": args.prompt_tokens,
        "new_tokens": runs["shim"][0]["new_tokens"], "repeats": args.repeats,
        "summary": summary, "shim_over_raw": ratio,
        "memory_bandwidth_gb_s": bw / 1e9,
        "bandwidth_bound_decode_tok_s": limit,
        "decode_fraction_of_bound": summary["shim"]["decode_tok_s"] / limit,
        "runs": {v: [{k: x for k, x in r.items() if k != "tokens"} for r in rs]
                 for v, rs in runs.items()},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg()},
    }
    rows = [("", "prefill tok/s", "decode tok/s", "peak RSS MB", "load s")]
    for v in ("raw", "shim"):
        s = summary[v]
        rows.append((v, f"{s['prefill_tok_s']:.1f}", f"{s['decode_tok_s']:.1f}",
                     f"{s['peak_rss_mb']:.0f}", f"{s['load_s']:.2f}"))
    rows.append(("shim/raw", f"{ratio['prefill_tok_s']:.3f}", f"{ratio['decode_tok_s']:.3f}",
                 "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"model {args.model.name} ({model_bytes / 1e6:.1f} MB), {args.threads} thread(s), "
          f"n_ctx {args.n_ctx}, {args.prompt_tokens} prompt tokens, "
          f"{result['new_tokens']} new tokens, median of {args.repeats}")
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print(f"shim text handling: {overhead_ms * 1e3:.1f} us/token, i.e. shim/raw decode >= "
          f"{ratio['decode_bound_from_overhead']:.4f} at raw's measured speed")
    print(f"memory bandwidth (numpy copy) {bw / 1e9:.1f} GB/s -> bandwidth-bound decode "
          f"<= {limit:.0f} tok/s; shim reaches {result['decode_fraction_of_bound']:.0%} of it. "
          f"Load average at the end: {os.getloadavg()[0]:.2f} (shared CPU inflates variance)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

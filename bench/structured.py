"""Structured output: does the JSON schema rescue what a 4-bit export loses, and what does the
constraint cost? And prefix reuse: how fast is a second request with the same system prompt?

For each export (an ``edgeqlora export`` directory), on the adapter's held-out commands (the
embedded task's 200 by default, the sample the trainer and the parity gate score):

- exact match and valid-JSON rate without and with the schema (``constrained_eval.answers``:
  the export's ``schema.json``, or the task's schema for an export made before exports carried
  one); valid = the schema's grammar accepts the whole answer;
- decode tokens/s without and with the constraint, paired and interleaved per command (free,
  constrained, constrained, free, ...), from the first generated piece to the last, over the
  first ``--speed-examples`` commands;
- time to first token of a request after another one with the same system prompt, with
  ``prompt_cache`` (the KV cache of the shared prefix is kept) against from scratch: for the
  task's short system prompt and for one that lists the house's devices (~400 tokens).

    python bench/structured.py EXPORT [EXPORT ...] --adapter ADAPTER [--examples 200]
        [--speed-examples 40] [--threads N] [--out bench/results/structured.json]

Run it on an idle machine; nothing else heavy at the same time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(rt, ids, schema, max_new_tokens):
    from edgeqlora.runtimes.base import Completion

    result = Completion()
    start = time.perf_counter()
    first = None
    for _ in rt.complete(ids, max_new_tokens=max_new_tokens, json_schema=schema, result=result):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return result, (first or end) - start, end - (first or end)


def speed(rt, prompts, schema, max_new_tokens):
    """Decode tokens/s (after the first token) free vs constrained, paired per prompt."""
    grammar = rt.grammar(schema)
    tot = {"free": [0, 0.0], "schema": [0, 0.0]}
    ratios = []
    for i, messages in enumerate(prompts):
        ids = rt.chat_ids(messages, add_generation_prompt=True)
        order = ("free", "schema") if i % 2 == 0 else ("schema", "free")
        per = {}
        for kind in order:
            result, _, decode_s = _timed(rt, ids, grammar if kind == "schema" else None,
                                         max_new_tokens)
            n = max(0, result.completion_tokens - 1)
            tot[kind][0] += n
            tot[kind][1] += decode_s
            per[kind] = n / decode_s if decode_s > 0 and n else None
        if per["free"] and per["schema"]:
            ratios.append(per["schema"] / per["free"])
    free = tot["free"][0] / tot["free"][1]
    constrained = tot["schema"][0] / tot["schema"][1]
    return {"free_tok_s": round(free, 1), "schema_tok_s": round(constrained, 1),
            "overhead": round(1 - constrained / free, 4),
            "median_pair_ratio": round(statistics.median(ratios), 4) if ratios else None,
            "pairs": len(ratios)}


def prefix_reuse(export, prompts, threads, max_new_tokens):
    """TTFT of each request after the first, same system prompt: cache on vs off (GGUF)."""
    from edgeqlora import runtimes

    out = {}
    for cached in (False, True):
        with runtimes.load(export, allow_failed=True, n_threads=threads,
                           prompt_cache=cached) as rt:
            ttfts = []
            for messages in prompts:
                ids = rt.chat_ids(messages, add_generation_prompt=True)
                _, ttft, _ = _timed(rt, ids, None, max_new_tokens)
                ttfts.append(ttft)
            out["cached" if cached else "scratch"] = ttfts
    first, later = out["scratch"][0], statistics.median(out["cached"][1:])
    return {"ttft_first_s": round(first, 4),
            "ttft_later_scratch_s": round(statistics.median(out["scratch"][1:]), 4),
            "ttft_later_cached_s": round(later, 4),
            "ratio_cached_to_first": round(later / first, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--adapter", required=True, help="the adapter the exports came from")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--speed-examples", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench/results/structured.json"))
    args = ap.parse_args()

    from edgeqlora import runtimes
    from edgeqlora.artifacts import read_manifest
    from edgeqlora.constrained_eval import answers
    from edgeqlora.parity import exact_match, task_set
    from edgeqlora.schema import resolve

    manifest = read_manifest(args.adapter, kind="adapter")
    task = task_set(manifest, args.examples)
    prompts = task.prompts
    kw = {"n_threads": args.threads} if args.threads else {}
    report = {"adapter": Path(args.adapter).name, "examples": len(prompts),
              "machine": {"platform": platform.platform(), "cpu": platform.processor(),
                          "threads": args.threads}, "exports": {}}
    for export in args.exports:
        name = Path(export).name
        with runtimes.load(export, allow_failed=True, **kw) as rt:
            schema = rt.json_schema or resolve(
                str((manifest.get("data") or {}).get("spec") or ""), "")[0]
            if schema is None:
                raise SystemExit(f"{export} has no schema and its data has none")
            rt.grammar(schema)  # compiled before anything is timed
            t = time.perf_counter()
            got = answers(rt, prompts, args.max_new_tokens, schema)
            n = len(prompts)
            row = {"runtime": rt.name, "threads": rt.info().get("n_threads"),
                   "exact_match": exact_match(got["free"], task),
                   "exact_match_schema": exact_match(got["constrained"], task),
                   "valid_json": sum(got["valid_free"]) / n,
                   "valid_json_schema": sum(got["valid_constrained"]) / n,
                   "redecoded": got["redecoded"],
                   "answers_s": round(time.perf_counter() - t, 1)}
            row["speed"] = speed(rt, prompts[:args.speed_examples], schema,
                                 args.max_new_tokens)
        # The hub's case: a long shared system prompt (the house's device list) before each
        # command; and the task's own short one.
        from edgeqlora.tasks.iot import DEVICE_ROOMS

        house = " Devices: " + ", ".join(f"{d} in the {r}" for d, rooms in DEVICE_ROOMS.items()
                                         for r in rooms if r) + "."
        long_prompts = [[{**m[0], "content": m[0]["content"] + house}, *m[1:]]
                        for m in prompts[:9]]
        row["prefix_reuse"] = {
            "task_prompt": prefix_reuse(export, prompts[:9], args.threads, args.max_new_tokens),
            "device_list_prompt": prefix_reuse(export, long_prompts, args.threads,
                                               args.max_new_tokens)}
        report["exports"][name] = row
        print(name, json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

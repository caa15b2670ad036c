"""``edgeqlora run EXPORT``: generate with an export through its runtime, streaming to stdout.

The device side: torch-free, only ``edgeqlora.runtimes``. One prompt (``--prompt`` or stdin), or
with ``--chat`` on a terminal an interactive chat that keeps the history.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ._common import add_runtime_args, load_runtime

HELP = "generate with an export through its runtime (streams)"


def add_arguments(p) -> None:
    add_runtime_args(p)
    p.add_argument("--prompt", default=None,
                   help="the prompt (default: read stdin; with --chat and a terminal, an "
                        "interactive chat)")
    p.add_argument("--chat", action="store_true",
                   help="treat the prompt as a user message and apply the model's chat template")
    p.add_argument("--system", default=None, help="system message (implies --chat)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed on stderr")
    schema = p.add_mutually_exclusive_group()
    schema.add_argument("--json-schema", default=None, metavar="FILE",
                        help="constrain the answer to one JSON value this JSON Schema accepts "
                             "(default: the export's own schema.json, when it has one)")
    schema.add_argument("--no-schema", action="store_true",
                        help="do not constrain the answer to the export's schema")


def run(args) -> int:
    from ..errors import InputError
    from ..runtimes.base import Completion, check_sampling
    from ..schema import load_schema

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    check_sampling(**sampling)  # fail on a bad flag before loading the model
    schema = load_schema(Path(args.json_schema)) if args.json_schema else None
    chat = args.chat or args.system is not None
    interactive = args.prompt is None and chat and sys.stdin.isatty()
    prompt = args.prompt
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        raise InputError("the prompt is empty; pass --prompt TEXT or pipe text on stdin")
    rt = load_runtime(args)
    if schema is None and not args.no_schema and rt.json_schema is not None:
        schema = rt.json_schema
        print("edgeqlora run: answers follow the export's JSON schema (schema.json); "
              "--no-schema turns it off", file=sys.stderr)
    if schema is not None:
        sampling["json_schema"] = rt.grammar(schema)  # compiled once, for every answer
    history = [{"role": "system", "content": args.system}] if args.system else []

    def answer(ids) -> str:
        result = Completion()
        start = time.perf_counter()
        for piece in rt.complete(ids, result=result, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.stats:
            dt = time.perf_counter() - start
            print(f"[{result.prompt_tokens} prompt + {result.completion_tokens} generated "
                  f"tokens in {dt:.2f} s, {result.completion_tokens / max(dt, 1e-9):.1f} tok/s, "
                  f"finish: {result.finish_reason}]", file=sys.stderr)
        return result.text

    try:
        if not interactive:
            if chat:
                answer(rt.chat_ids(history + [{"role": "user", "content": prompt}]))
            else:
                answer(prompt)
            return 0
        print("edgeqlora chat: an empty line or Ctrl-D ends it", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": answer(rt.chat_ids(history))})
        return 0
    finally:
        rt.close()

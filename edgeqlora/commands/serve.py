"""``edgeqlora serve EXPORT``: an OpenAI-compatible HTTP server over an export, web chat at /."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ._common import add_runtime_args, load_runtime

HELP = "OpenAI-compatible HTTP server over an export, with a web chat page at /"


def add_arguments(p) -> None:
    add_runtime_args(p, prompt_cache=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a name clients may use in the Host header besides IP addresses, "
                        "localhost and this machine's host name (repeatable; against DNS "
                        "rebinding every other name is refused)")
    p.add_argument("--model-id", default=None, help="model name in /v1/models (default: "
                   "the export's name)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="budget of one request, queueing and generation (default 600); past "
                        "it the answer is a 504 and its generation stops")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="every /v1 route wants 'Authorization: Bearer KEY' (default: "
                        "$EDGEQLORA_API_KEY; none on loopback)")
    p.add_argument("--insecure", action="store_true",
                   help="listen beyond loopback without an API key")
    p.add_argument("--max-queue", type=int, default=8,
                   help="requests in the server at once (one generates); one more gets a 503 "
                        "with Retry-After (default 8)")
    p.add_argument("--no-schema", action="store_true",
                   help="requests without response_format are not constrained to the export's "
                        "JSON schema")


def run(args) -> int:
    from ..runtimes.serve import create_app, serve

    api_key = args.api_key or os.environ.get("EDGEQLORA_API_KEY") or None
    rt = load_runtime(args)
    try:
        model_id = args.model_id or Path(args.export).resolve().name
        create_app(rt, model_id, args.max_body_bytes, args.max_tokens,  # check the limits first
                   request_timeout_s=args.request_timeout, api_key=api_key,
                   max_queue=args.max_queue)

        def ready() -> None:  # once the port is known to be free
            print(f"serving {args.export} as '{model_id}' on http://{args.host}:{args.port}/ "
                  "(OpenAI API under /v1)", file=sys.stderr)

        serve(rt, host=args.host, port=args.port, model_id=model_id,
              max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens,
              extra_hosts=tuple(args.allowed_host), on_ready=ready,
              request_timeout_s=args.request_timeout, api_key=api_key,
              insecure=args.insecure, max_queue=args.max_queue,
              use_schema=not args.no_schema)
    finally:
        rt.close()
    return 0

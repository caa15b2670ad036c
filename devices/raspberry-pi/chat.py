#!/usr/bin/env python3
"""Terminal chat with a running `edgeqlora serve` (or any OpenAI-compatible server).

Standard library only, so it runs on the device without the venv. It keeps the conversation,
posts it to /v1/chat/completions with ``stream: true`` and prints the server-sent events as
they arrive. An empty line or Ctrl-D ends the chat.

    ./chat.py                               # http://127.0.0.1:8080
    ./chat.py --url http://raspberrypi.local:8080 --system "You control the lights."
    echo "Turn on the kitchen light" | ./chat.py --once
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def stream_reply(url: str, messages: list[dict], max_tokens: int, temperature: float,
                 out=sys.stdout, api_key: str | None = None) -> str:
    body = json.dumps({"messages": messages, "stream": True, "max_tokens": max_tokens,
                       "temperature": temperature}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=body,
                                 headers=headers)
    pieces = []
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"].get("message", str(event["error"])))
            for choice in event.get("choices", []):
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    pieces.append(text)
                    out.write(text)
                    out.flush()
    out.write("\n")
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="server address")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--once", action="store_true", help="answer one message from stdin, exit")
    p.add_argument("--api-key", default=os.environ.get("EDGEQLORA_API_KEY"),
                   help="the server's API key (default $EDGEQLORA_API_KEY; install.sh keeps "
                        "the Pi's in ~/.local/share/edgeqlora/api-key.env)")
    args = p.parse_args(argv)
    history = [{"role": "system", "content": args.system}] if args.system else []
    try:
        if args.once:
            text = sys.stdin.read().strip()
            if not text:
                print("chat.py: nothing on stdin", file=sys.stderr)
                return 2
            stream_reply(args.url, history + [{"role": "user", "content": text}],
                         args.max_tokens, args.temperature, api_key=args.api_key)
            return 0
        print(f"chatting with {args.url} (empty line or Ctrl-D ends)", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append({"role": "user", "content": line})
            answer = stream_reply(args.url, history, args.max_tokens, args.temperature,
                                  api_key=args.api_key)
            history.append({"role": "assistant", "content": answer})
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        print(f"chat.py: server answered {exc.code}: {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ConnectionError, RuntimeError) as exc:
        print(f"chat.py: cannot talk to {args.url}: {getattr(exc, 'reason', exc)}; is "
              "`edgeqlora serve` running (systemctl status edgeqlora)?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

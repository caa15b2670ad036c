"""Benchmark: does one huge request freeze the server? ``/health`` latency while it runs.

Starts ``edgeqlora serve EXPORT`` on a free loopback port, sends one chat request of
``--messages`` tiny messages (25,000: ~0.94 MB, under a 2 MiB body limit), and polls ``/health``
every 50 ms until that request is answered; prints the request's status and time and the worst
``/health`` latency. Put an older tree first on ``PYTHONPATH`` to measure it the same way.

    python bench/server_freeze.py EXPORT [--messages 25000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import free_port, wait_until_serving  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("--messages", type=int, default=25000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeqlora", "serve", args.export, "--port",
                             str(port), "--max-body-bytes", str(2 << 20)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, proc)
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"}
                for i in range(args.messages)] + [{"role": "user", "content": "x"}]
        body = json.dumps({"messages": msgs, "max_tokens": 1}).encode()
        result: dict = {"body_bytes": len(body)}

        def big() -> None:
            t = time.perf_counter()
            r = httpx.post(f"{base}/v1/chat/completions", content=body, timeout=300,
                           headers={"content-type": "application/json"})
            result.update(status=r.status_code, request_s=round(time.perf_counter() - t, 2))

        worker = threading.Thread(target=big)
        worker.start()
        time.sleep(0.2)
        worst = 0.0
        while worker.is_alive():
            t = time.perf_counter()
            httpx.get(f"{base}/health", timeout=300)
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.05)
        worker.join()
        result["worst_health_s"] = round(worst, 3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"request of {result['body_bytes']} bytes: HTTP {result['status']} after "
          f"{result['request_s']} s; worst /health latency meanwhile {result['worst_health_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The server under load a hub could give it: N concurrent clients on loopback, a bounded run.

Starts ``edgeqlora serve EXPORT`` (real uvicorn, an API key, ``--max-queue``), then for
``--seconds`` keeps ``--clients`` OpenAI-style chat requests in flight (held-out commands, the
export's schema) while a watcher polls ``/health`` every 0.25 s. Reports every request's status
(only 200 and explicit 503s are acceptable), the slowest ``/health`` answer, throughput and the
server's own ``/metrics`` totals.

    python bench/serve_load.py EXPORT [--clients 8] [--max-queue 8] [--seconds 60]
        [--out bench/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import free_port, wait_until_serving  # noqa: E402

KEY = "bench-key"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve_load.json"))
    args = ap.parse_args()

    import httpx

    from edgeqlora.tasks import iot

    _, held = iot.generate(0, 200, 200)
    commands = [r["messages"][:2] for r in held]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "edgeqlora", "serve", args.export,
                             "--port", str(port), "--max-queue", str(args.max_queue),
                             "--allow-failed"],
                            env={**os.environ, "EDGEQLORA_API_KEY": KEY},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(base, proc)
        stop = time.monotonic() + args.seconds
        statuses: Counter = Counter()
        health_worst = [0.0]
        health_fail = [0]
        lock = threading.Lock()

        def client(i: int) -> None:
            n = i
            with httpx.Client(timeout=600, headers={"Authorization": f"Bearer {KEY}"}) as c:
                while time.monotonic() < stop:
                    try:
                        r = c.post(f"{base}/v1/chat/completions",
                                   json={"messages": commands[n % len(commands)],
                                         "max_tokens": 64})
                        code = r.status_code
                        if code == 503:
                            time.sleep(float(r.headers.get("retry-after", "1")))
                    except httpx.HTTPError as exc:
                        code = type(exc).__name__
                    with lock:
                        statuses[str(code)] += 1
                    n += args.clients

        def watcher() -> None:
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    ok = httpx.get(f"{base}/health", timeout=5).status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t
                health_worst[0] = max(health_worst[0], dt)
                health_fail[0] += not ok
                time.sleep(0.25)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        threads.append(threading.Thread(target=watcher))
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    totals = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line.startswith(("edgeqlora_completion_tokens_total",
                                  "edgeqlora_time_to_first_token_seconds_sum",
                                  "edgeqlora_time_to_first_token_seconds_count"))}
    report = {"export": Path(args.export).name, "clients": args.clients,
              "max_queue": args.max_queue, "seconds": round(wall, 1),
              "statuses": dict(statuses),
              "failures": sum(v for k, v in statuses.items() if k not in ("200", "503")),
              "health_worst_s": round(health_worst[0], 3), "health_failures": health_fail[0],
              "answers_per_s": round(statuses.get("200", 0) / wall, 2),
              "metrics": totals}
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["failures"] == 0 and report["health_failures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

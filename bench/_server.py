"""What the server benchmarks share: a free loopback port and waiting for ``edgeqlora serve``
to answer. (A leading underscore: not a benchmark of its own for ``edgeqlora bench``.)"""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(base: str, proc, tries: int = 600) -> None:
    """Poll ``base/health`` until the server answers; exit with its stderr if it died."""
    import httpx

    for _ in range(tries):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server did not start: {proc.communicate()[1][-500:]}")
        time.sleep(0.1)
    raise SystemExit(f"{base} did not answer /health")

"""What a hub needs to supervise ``edgeqlora serve``: an API key, a bounded queue, Prometheus
metrics, and OpenAI's ``response_format`` read into a schema for the runtime.

Kept apart from ``serve.py`` (the app and its routes) so each reads on its own. Torch-free;
``prometheus_client`` is imported only when the app is built.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import threading
import time
from typing import Any, Mapping

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
DEFAULT_MAX_QUEUE = 8  # requests admitted (one generating, the rest waiting) before a 503
RETRY_AFTER_S = 2


class GenerationTimeout(Exception):
    """A request ran past the server's per-request budget (counted from its arrival)."""


async def within_budget(budget: float | None, arrived: float, fn, *args):
    """``fn(*args)`` in a worker thread (CPU work kept off the event loop: parsing, template
    rendering, tokenization, compiling a schema), ``GenerationTimeout`` once the request's
    budget is spent; a thread cannot be stopped, so it finishes on its own, unanswered."""
    import asyncio

    call = asyncio.to_thread(fn, *args)
    if budget is None:
        return await call
    try:
        return await asyncio.wait_for(call, timeout=max(budget - (time.perf_counter() - arrived),
                                                        0.001))
    except asyncio.TimeoutError:
        raise GenerationTimeout(f"the request ran past this server's budget of {budget:g} s "
                                "(preparing its prompt; edgeqlora serve --request-timeout)"
                                ) from None


class RequestError(Exception):
    """An HTTP error answer: status, message (OpenAI's error object), optional headers."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.param = status, param
        self.headers = dict(headers or {})


def check_api_key(authorization: str | None, key: str | None) -> None:
    """``Authorization: Bearer KEY`` (what the OpenAI clients send) against the server's key;
    401 otherwise. Compared in constant time."""
    if key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                              key.encode()):
        raise RequestError("missing or wrong API key (send 'Authorization: Bearer KEY'; the "
                           "server's key is its --api-key or EDGEQLORA_API_KEY)", status=401,
                           headers={"WWW-Authenticate": "Bearer"})


class Admission:
    """At most ``max_queue`` requests in the server at once (one generates, the others wait for
    the runtime); one more is answered 503 with ``Retry-After`` instead of piling up."""

    def __init__(self, max_queue: int = DEFAULT_MAX_QUEUE):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue={max_queue!r} must be a positive integer")
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.depth = 0

    def enter(self) -> None:
        with self._lock:
            if self.depth >= self.max_queue:
                raise RequestError(f"the server is busy ({self.depth} requests queued, the "
                                   f"limit is {self.max_queue}; edgeqlora serve --max-queue); "
                                   "retry shortly", status=503,
                                   headers={"Retry-After": str(RETRY_AFTER_S)})
            self.depth += 1

    def leave(self) -> None:
        with self._lock:
            self.depth = max(0, self.depth - 1)


def response_schema(body: Mapping[str, Any], default: Any) -> Any:
    """What ``runtime.complete(json_schema=...)`` gets for a request: OpenAI's
    ``response_format`` (``text`` -> none, ``json_object`` -> any object, ``json_schema`` -> its
    ``schema``), or without one the server's default (the export's schema, unless
    ``--no-schema``). Shape errors are 400s; a schema that does not compile is found when the
    runtime compiles it (also a 400)."""
    if "response_format" not in body or body["response_format"] is None:
        return default
    fmt = body["response_format"]
    if not isinstance(fmt, Mapping) or not isinstance(fmt.get("type"), str):
        raise RequestError("'response_format' must be an object with a 'type' (text, "
                           "json_object or json_schema)", param="response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object"
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise RequestError("'response_format.json_schema.schema' must be a JSON Schema "
                               "object", param="response_format")
        return dict(schema)
    raise RequestError(f"response_format type {kind!r} is not one of text, json_object, "
                       "json_schema", param="response_format")


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (two apps in one process, as
    in the tests, do not collide)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgeqlora_requests", "Requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("edgeqlora_prompt_tokens", "Prompt tokens evaluated",
                                     registry=r)
        self.completion_tokens = Counter("edgeqlora_completion_tokens", "Tokens generated",
                                         registry=r)
        self.ttft = Histogram("edgeqlora_time_to_first_token_seconds",
                              "From the request's arrival to its first generated text",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        self.speed = Histogram("edgeqlora_decode_tokens_per_second",
                               "Generated tokens per second of one request, after the first",
                               buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320), registry=r)
        self.queue = Gauge("edgeqlora_queue_depth", "Requests in the server (generating or "
                           "waiting for the runtime)", registry=r)
        self.errors = Counter("edgeqlora_errors", "Requests that ended in an error, by kind",
                              ["kind"], registry=r)

    def observe(self, result: Any, arrived: float, first: list[float]) -> None:
        """One finished generation: its tokens, time to first token, decode speed."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        if first:
            self.ttft.observe(first[0] - arrived)
            spent = time.perf_counter() - first[0]
            if result.completion_tokens > 1 and spent > 0:
                self.speed.observe((result.completion_tokens - 1) / spent)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def default_allowed_hosts(bind: str) -> frozenset[str] | None:
    """``Host`` names a server bound to ``bind`` answers to, besides IP literals (which DNS
    rebinding cannot forge): the loopback names on loopback, plus this machine's host name (and
    ``NAME.local``) on any other address. None would switch the check off."""
    names = set(LOOPBACK_NAMES)
    if bind not in LOOPBACK_NAMES:
        host = socket.gethostname().lower()
        names |= {host, f"{host}.local", socket.getfqdn().lower()}
    return frozenset(names)


def host_allowed(header: str | None, allowed: frozenset[str] | None) -> bool:
    """Whether a request's ``Host`` header (``name[:port]``, ``[v6]:port``) is acceptable."""
    if allowed is None:
        return True
    if not header:
        return False
    name = header.strip().lower()
    if name.startswith("["):  # [::1]:8080
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name.rstrip(".") in allowed


def _text_content(content: Any, where: str) -> str:
    # OpenAI allows content as a list of parts; text parts are joined, anything else refused.
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{i}] is not a text part; this model takes text only",
                                   param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where} must be a string or a list of text parts", param="messages")


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    return data


HEADER_TIMEOUT_S = 10.0  # to receive a request's headers, from connecting or the last answer


def header_deadline_protocol():
    """uvicorn's h11 protocol with a deadline on each request's headers: a connection that has
    not sent a whole header block ``HEADER_TIMEOUT_S`` after it opened (or after its last
    answer) is closed. uvicorn times out only an idle kept-alive connection, and any byte
    cancels that timer, so 50 clients sending half a header each held 50 connections for good
    (slowloris). A request being answered, however long, is never cut."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            waiting = self.cycle  # a new request replaces it once its headers are in

            def late() -> None:
                idle = self.cycle is None or self.cycle.response_complete
                if self.cycle is waiting and idle and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(HEADER_TIMEOUT_S, late)

    return HeaderDeadline

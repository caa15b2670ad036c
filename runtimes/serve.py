"""An OpenAI-compatible HTTP server over any runtime: a small Starlette (ASGI) app.

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` gives server-sent events, as the
OpenAI API does; ``response_format`` json_object / json_schema constrains the answer), ``POST
/v1/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus) and a
minimal web chat page at ``/``. A request without ``response_format`` follows the export's JSON
schema when it carries one (``serve --no-schema`` turns that off). Written over our runtime interface rather than llama-cpp-python's server so
that one server serves every export format with the same chat template handling.

Robustness rules: the request body is read up to ``max_body_bytes`` and refused beyond it (413),
and within ``BODY_TIMEOUT_S`` (408: a stalled upload does not hold a connection forever); a POST
must say ``Content-Type: application/json`` (415: a cross-site form or ``text/plain`` "simple
request" is refused before any work); the ``Host`` header must name this server
(``allowed_hosts``: against DNS rebinding, 421 otherwise); ``max_tokens`` above the server's
limit, bad or too deeply nested JSON or fields of the wrong type answer 400 with an OpenAI-style
error object; an unexpected failure answers 500 and the server keeps running.

The event loop only moves bytes: reading a body, parsing it, rendering the chat template and
tokenizing run in worker threads, so one huge request never stalls ``/health`` or another
client. The runtime is not thread-safe for generation, so generation runs in a worker thread
holding a lock: requests are served one at a time, in order. A client that disconnects, streaming
or not, stops its generation at the next token, which releases the lock. At most ``max_queue``
requests are in the server at once (one generating); one more is a 503 with ``Retry-After``.
With an API key every ``/v1`` route wants ``Authorization: Bearer KEY`` (401). The guards and
metrics live in ``serve_guard.py``.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Mapping

from edgeqlora.errors import EdgeQloraError, InputError, require

from .base import Cancel, Completion, Runtime, check_sampling
from .serve_guard import (DEFAULT_MAX_QUEUE, LOOPBACK_NAMES, Admission,  # noqa: F401
                          GenerationTimeout, Metrics, RequestError, _parse_body, _text_content,
                          check_api_key, default_allowed_hosts, header_deadline_protocol,
                          host_allowed, response_schema, within_budget)
from .webchat import PAGE, web_app_routes

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS_LIMIT = 1024
DEFAULT_MAX_TOKENS = 256
BODY_TIMEOUT_S = 30.0  # to receive a whole request body
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # queueing + generation of one request (a Pi: ~200 s for 1k)


def _error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class ServerState:
    """The runtime, its lock and the limits, shared by all requests."""

    def __init__(self, runtime: Runtime, model_id: str, max_body_bytes: int,
                 max_tokens_limit: int, request_timeout_s: float | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, default_schema: Any = None):
        self.runtime = runtime
        self.request_timeout_s = request_timeout_s
        self.model_id = model_id
        self.max_body_bytes = max_body_bytes
        self.max_tokens_limit = max_tokens_limit
        self.lock = threading.Lock()
        self.started = int(time.time())
        self.admission = Admission(max_queue)
        self.metrics = Metrics()
        self.default_schema = default_schema

    def sampling(self, body: Mapping[str, Any]) -> dict[str, Any]:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.max_tokens_limit)
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) \
                and not 1 <= max_tokens <= self.max_tokens_limit:
            raise RequestError(f"max_tokens={max_tokens} must be between 1 and this server's "
                               f"limit of {self.max_tokens_limit} (edgeqlora serve --max-tokens)",
                               param="max_tokens")
        n = body.get("n", 1)
        if n != 1:
            raise RequestError(f"n={n!r}: this server returns one choice per request",
                               param="n")
        kwargs = {"max_new_tokens": max_tokens,
                  "temperature": body.get("temperature", 0.0),
                  "top_p": body.get("top_p", 1.0),
                  "top_k": body.get("top_k", 0),
                  "seed": body.get("seed"),
                  "stop": body.get("stop")}
        # OpenAI clients send explicit nulls for "use the default".
        defaults = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
        for key, value in defaults.items():
            if kwargs[key] is None:
                kwargs[key] = value
        try:
            check_sampling(**kwargs)
        except InputError as exc:
            # The API's name for the field, not the runtime's.
            raise RequestError(str(exc).replace("max_new_tokens", "max_tokens")) from None
        return kwargs

    async def run(self, prompt_ids: list[int], kwargs: dict[str, Any],
                  result: Completion, gone=None, arrived: float | None = None
                  ) -> AsyncIterator[str]:
        """Text pieces from a worker thread that holds the runtime lock. ``gone`` (an async
        callable: has the client disconnected?) is polled while waiting, so a client that went
        away stops its generation even when nothing is being sent to it, and frees its place in
        the queue (the admission is left when the worker ends). A full queue is a 503."""
        self.admission.enter()  # raises the 503 before anything is scheduled
        self.metrics.queue.set(self.admission.depth)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = Cancel()  # set: the runtime stops, inside a prompt batch too
        arrived = time.perf_counter() if arrived is None else arrived
        first: list[float] = []

        def post(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has gone away (server shutting down)
                cancel.set()

        def work():
            try:
                with self.lock:
                    try:
                        if cancel.is_set():
                            return
                        for piece in self.runtime.complete(prompt_ids, result=result,
                                                           cancel=cancel, **kwargs):
                            if not first:
                                first.append(time.perf_counter())
                            post(("piece", piece))
                            if cancel.is_set():
                                break
                        self.metrics.observe(result, arrived, first)
                        post(("done", None))
                    except BaseException as exc:  # handed to the request, never lost
                        post(("error", exc))
            finally:
                self.admission.leave()
                self.metrics.queue.set(self.admission.depth)

        loop.run_in_executor(None, work)
        budget = self.request_timeout_s
        deadline = None if budget is None else \
            loop.time() + budget - (time.perf_counter() - arrived)  # from its arrival
        try:
            while True:
                wait = 0.25 if gone is not None else None
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        # The worker stops at its next token (or before it takes the lock).
                        raise GenerationTimeout(
                            f"the request ran past this server's budget of {budget:g} s "
                            "(queueing and generation; edgeqlora serve --request-timeout)")
                    wait = left if wait is None else min(wait, left)
                if wait is None:
                    kind, value = await queue.get()
                else:
                    try:
                        kind, value = await asyncio.wait_for(queue.get(), timeout=wait)
                    except asyncio.TimeoutError:
                        if gone is not None and await gone():
                            return
                        continue
                    if gone is not None and await gone():
                        return
                if kind == "piece":
                    yield value
                elif kind == "done":
                    return
                else:
                    raise value
        finally:
            cancel.set()



def _chat_prompt(state: ServerState, body: Mapping[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects",
                           param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RequestError(f"messages[{i}] must be an object", param="messages")
        clean.append({**m, "content": _text_content(m.get("content"),
                                                    f"messages[{i}].content")})
    try:
        ids = state.runtime.chat_ids(clean, add_generation_prompt=True)
    except InputError as exc:
        raise RequestError(str(exc), param="messages") from None
    return ids


def _completion_prompt(state: ServerState, body: Mapping[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string", param="prompt")
    return state.runtime.tokenize(prompt, special=True)


def _check_room(state: ServerState, ids: list[int]) -> None:
    if len(ids) >= state.runtime.n_ctx:
        raise RequestError(f"the prompt has {len(ids)} tokens; the context window is "
                           f"{state.runtime.n_ctx}", param="messages")


def create_app(runtime: Runtime, model_id: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
               allowed_hosts: frozenset[str] | None = None,
               request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
               api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               use_schema: bool = True):
    """The ASGI app serving ``runtime``. Needs ``pip install 'edgeqlora[serve]'``.
    ``allowed_hosts`` (``default_allowed_hosts``; ``serve`` passes it) checks every request's
    ``Host``; None does not (an app mounted behind a proxy that checks). A request still
    generating ``request_timeout_s`` after it arrived is answered 504 (in-band when streaming)
    and its generation stopped. ``api_key``: every ``/v1`` route wants ``Authorization: Bearer
    KEY``. ``max_queue``: requests in the server at once, then 503s. ``use_schema``: a request
    without ``response_format`` follows the export's JSON schema (``runtime.json_schema``)."""
    require("starlette", "serve", "edgeqlora serve")
    require("prometheus_client", "serve", "edgeqlora serve's /metrics")
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    if max_body_bytes < 1024:
        raise InputError(f"max_body_bytes={max_body_bytes} is too small (>= 1024)")
    if max_tokens_limit < 1:
        raise InputError(f"max_tokens_limit={max_tokens_limit} must be >= 1")
    if request_timeout_s is not None and not 0 < request_timeout_s < float("inf"):
        raise InputError(f"request timeout {request_timeout_s!r} s must be a finite number > 0")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        raise InputError(f"max_queue={max_queue!r} must be a positive integer")
    if api_key is not None and not api_key.strip():
        raise InputError("the API key is empty")
    state = ServerState(runtime, model_id or runtime.path.stem, max_body_bytes,
                        max_tokens_limit, request_timeout_s, max_queue,
                        getattr(runtime, "json_schema", None) if use_schema else None)

    def error(exc: RequestError) -> JSONResponse:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        if exc.status >= 500 or exc.status == 401:
            state.metrics.errors.labels(kind={401: "auth", 503: "busy", 504: "timeout"}.get(
                exc.status, "server")).inc()
        return JSONResponse(_error_body(str(exc), kind, exc.param), status_code=exc.status,
                            headers=exc.headers)

    async def read_json(request: Request) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise RequestError(f"Content-Type must be application/json, got "
                               f"{kind or 'none'!r}", status=415)
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError("bad Content-Length header")
            if int(declared) > state.max_body_bytes:
                raise RequestError(f"request body of {declared} bytes is above the limit of "
                                   f"{state.max_body_bytes}", status=413)
        body = bytearray()

        async def receive() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > state.max_body_bytes:
                    raise RequestError(f"request body is above the limit of "
                                       f"{state.max_body_bytes} bytes", status=413)

        try:
            await asyncio.wait_for(receive(), timeout=BODY_TIMEOUT_S)
        except ClientDisconnect:
            raise RequestError("client disconnected", status=400) from None
        except asyncio.TimeoutError:
            raise RequestError(f"request body not received within {BODY_TIMEOUT_S:.0f} s",
                               status=408) from None
        # Parsed off the event loop: a megabyte of JSON is tens of milliseconds.
        return await asyncio.to_thread(_parse_body, bytes(body))

    def guarded(handler, route: str, keyed: bool = False):
        async def endpoint(request: Request):
            response = await answer(request)
            state.metrics.requests.labels(route=route, status=str(response.status_code)).inc()
            return response

        async def answer(request: Request):
            try:
                if not host_allowed(request.headers.get("host"), allowed_hosts):
                    raise RequestError(f"Host {request.headers.get('host')!r} is not this "
                                       "server's (edgeqlora serve --allowed-host NAME adds one)",
                                       status=421)
                if keyed:
                    check_api_key(request.headers.get("authorization"), api_key)
                return await handler(request)
            except RequestError as exc:
                return error(exc)
            except GenerationTimeout as exc:
                return error(RequestError(str(exc), status=504))
            except EdgeQloraError as exc:
                return error(RequestError(str(exc), status=400))
            except Exception:  # never take the server down; the traceback goes to the log
                log.exception("request failed")
                return error(RequestError("internal error while generating; see the server "
                                          "log", status=500))
        return endpoint

    def sse(data: Any) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def respond(request: Request, chat: bool):
        arrived = time.perf_counter()
        body = await read_json(request)
        kwargs = state.sampling(body)
        # Template rendering, tokenization and compiling a schema are CPU work: in a thread,
        # off the event loop (all read-only on the model, safe beside a generation).
        ids = await within_budget(state.request_timeout_s, arrived,
                                  _chat_prompt if chat else _completion_prompt, state, body)
        _check_room(state, ids)
        schema = response_schema(body, state.default_schema)
        if schema is not None:
            try:
                kwargs["json_schema"] = await within_budget(state.request_timeout_s, arrived,
                                                            runtime.grammar, schema)
            except EdgeQloraError as exc:
                raise RequestError(str(exc), param="response_format") from None
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be true or false", param="stream")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        result = Completion()
        obj = "chat.completion" if chat else "text_completion"

        def usage():
            return {"prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens}

        if not stream:
            text = "".join([p async for p in state.run(ids, kwargs, result,
                                                       gone=request.is_disconnected,
                                                       arrived=arrived)])
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": result.finish_reason} if chat else
                      {"index": 0, "text": text, "finish_reason": result.finish_reason,
                       "logprobs": None})
            return JSONResponse({"id": rid, "object": obj, "created": created,
                                 "model": state.model_id, "choices": [choice],
                                 "usage": usage()})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) \
            if isinstance(body.get("stream_options"), dict) else False

        def chunk(delta: dict | str, finish: str | None) -> dict[str, Any]:
            choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat else
                      {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None})
            return {"id": rid, "object": chunk_obj, "created": created,
                    "model": state.model_id, "choices": [choice]}

        # Admitted (or refused with a 503) before the response starts; a failure of the
        # generation itself is reported in-band, as OpenAI does once a stream has begun.
        pieces = state.run(ids, kwargs, result, arrived=arrived)
        first = early = None
        try:
            first = await pieces.__anext__()
        except StopAsyncIteration:
            pass
        except RequestError:
            raise
        except Exception as exc:
            early = exc

        async def events():
            try:
                if chat:
                    yield sse(chunk({"role": "assistant", "content": ""}, None))
                if early is not None:
                    raise early
                if first is not None:
                    yield sse(chunk({"content": first} if chat else first, None))
                async for piece in pieces:
                    yield sse(chunk({"content": piece} if chat else piece, None))
                yield sse(chunk({} if chat else "", result.finish_reason))
                if include_usage:
                    yield sse({"id": rid, "object": chunk_obj, "created": created,
                               "model": state.model_id, "choices": [], "usage": usage()})
            except asyncio.CancelledError:  # the client went away: stop generating
                await pieces.aclose()
                raise
            except Exception as exc:  # headers are sent: report in-band, as OpenAI does
                known = isinstance(exc, (EdgeQloraError, GenerationTimeout))
                message = str(exc) if known else \
                    "internal error while generating; see the server log"
                if not known:
                    log.exception("streaming request failed")
                yield sse(_error_body(message, "server_error"))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    async def completions(request: Request):
        return await respond(request, chat=False)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_id, "object": "model", "created": state.started,
             "owned_by": "edgeqlora", "meta": runtime.info()}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": state.model_id,
                             "runtime": runtime.name, "busy": state.lock.locked(),
                             "queue": state.admission.depth,
                             "max_queue": state.admission.max_queue})

    async def metrics(request: Request):
        data, kind = state.metrics.render()
        return Response(data, media_type=kind)

    async def page(request: Request):
        return HTMLResponse(PAGE.replace("{{MODEL}}", html.escape(state.model_id, quote=True))
                            .replace("{{SCHEMA_HIDDEN}}", "" if state.default_schema else "hidden")
                            .replace("{{KEY_HIDDEN}}", "" if api_key else "hidden"))

    routes = [
        Route("/", guarded(page, "/"), methods=["GET"]),
        *web_app_routes(guarded),
        Route("/health", guarded(health, "/health"), methods=["GET"]),
        Route("/metrics", guarded(metrics, "/metrics"), methods=["GET"]),
        Route("/v1/models", guarded(models, "/v1/models", keyed=True), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat_completions, "/v1/chat/completions",
                                              keyed=True), methods=["POST"]),
        Route("/v1/completions", guarded(completions, "/v1/completions", keyed=True),
              methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.edgeqlora = state
    return app


def serve(runtime: Runtime, host: str = "127.0.0.1", port: int = 8080,
          model_id: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, log_level: str = "info",
          extra_hosts: tuple[str, ...] = (), on_ready=None,
          request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
          api_key: str | None = None, insecure: bool = False,
          max_queue: int = DEFAULT_MAX_QUEUE, use_schema: bool = True) -> None:
    """Run the server until interrupted (uvicorn, one process). Requests must name this server
    in ``Host`` (``default_allowed_hosts`` plus ``extra_hosts``). Listening beyond loopback
    without ``api_key`` is refused unless ``insecure``. ``on_ready()`` is called once the port
    is known to be free, before serving (the CLI prints its address there)."""
    uvicorn = require("uvicorn", "serve", "edgeqlora serve")
    if api_key is None and not insecure and host not in LOOPBACK_NAMES:
        raise InputError(f"listening on {host} without an API key would let anyone on the "
                         "network use the model; pass --api-key KEY (or set EDGEQLORA_API_KEY),"
                         " or --insecure on a network you trust")
    allowed = default_allowed_hosts(host) | {h.strip().lower() for h in extra_hosts}
    app = create_app(runtime, model_id, max_body_bytes, max_tokens_limit, allowed,
                     request_timeout_s, api_key, max_queue, use_schema)
    if not 0 <= port <= 65535:
        raise InputError(f"port {port} is not in 0..65535")
    # uvicorn logs a bind failure and calls sys.exit; bind once ourselves for a clear error.
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                         "(another server there? pick --port)") from None
    if on_ready is not None:
        on_ready()
    # An idle kept-alive connection is closed after 5 s, stalled headers after HEADER_TIMEOUT_S,
    # a stalled body after BODY_TIMEOUT_S.
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                timeout_keep_alive=5, http=header_deadline_protocol())

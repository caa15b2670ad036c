"""What a smart-home hub relies on in ``edgeqlora serve``: structured output through the official
``openai`` client (unchanged client code), the export's schema by default, an API key, a
bounded queue that answers 503 instead of falling over, Prometheus metrics, and clean errors
for bad schemas — the server keeps serving after each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import has_module, schema_valid, wait_until_serving
from edgeqlora.tasks import iot

pytest.importorskip("llama_cpp")
pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytestmark = pytest.mark.skipif(
    not all(has_module(m) for m in ("llguidance", "prometheus_client", "jsonschema")),
    reason="needs llguidance, prometheus-client and jsonschema")

SCHEMA = iot.json_schema()
_, HELD = iot.generate(0, 200, 8)
COMMAND = HELD[0]["messages"][:2]


def valid_action(text: str) -> bool:
    return schema_valid(text, SCHEMA)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """The embedded GGUF as an export that carries the task's schema."""
    from edgeqlora.artifacts import write_manifest
    from edgeqlora.base import embedded_gguf_path
    from edgeqlora.schema import write_schema

    out = tmp_path_factory.mktemp("hub") / "export"
    out.mkdir()
    os.symlink(embedded_gguf_path(), out / "model.gguf")
    write_schema(out, SCHEMA)
    write_manifest(out, "export", {"target": "gguf",
                                   "schema": {"file": "schema.json", "source": "embedded:iot"}})
    return out


@pytest.fixture(scope="module")
def runtime(export):
    from edgeqlora import runtimes

    with runtimes.load(export, n_ctx=512) as rt:
        assert rt.json_schema == SCHEMA
        yield rt


def _client(runtime, **kw):
    from starlette.testclient import TestClient

    from edgeqlora.runtimes.serve import create_app

    return TestClient(create_app(runtime, "smol", max_tokens_limit=128, **kw),
                      raise_server_exceptions=False)


def test_export_schema_by_default_and_response_format_overrides(runtime):
    with _client(runtime) as c:
        req = {"messages": COMMAND, "max_tokens": 96}
        r = c.post("/v1/chat/completions", json=req)
        assert r.status_code == 200 and valid_action(r.json()["choices"][0]["message"]["content"])
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        free = c.post("/v1/chat/completions",
                      json={**req, "max_tokens": 24, "response_format": {"type": "text"}})
        assert not valid_action(free.json()["choices"][0]["message"]["content"])
        other = {"type": "object", "properties": {"on": {"type": "boolean"}},
                 "required": ["on"], "additionalProperties": False}
        r = c.post("/v1/chat/completions", json={**req, "response_format": {
            "type": "json_schema", "json_schema": {"name": "switch", "schema": other}}})
        assert json.loads(r.json()["choices"][0]["message"]["content"]) in ({"on": True},
                                                                             {"on": False})
        r = c.post("/v1/chat/completions", json={**req, "stream": True,
                                                  "response_format": {"type": "json_schema",
                                                                      "json_schema": {
                                                                          "schema": SCHEMA}}})
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "")
                       for e in r.text.split("\n\n") if e.startswith("data: {"))
        assert valid_action(text)
    with _client(runtime, use_schema=False) as c:
        r = c.post("/v1/chat/completions", json={"messages": COMMAND, "max_tokens": 24})
        assert not valid_action(r.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("fmt, match", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "Invalid type"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"schema": {"enum": []}}}, "nsatisfiable"),
    ({"type": "xml"}, "not one of"),
    ("json", "must be an object"),
])
def test_bad_response_formats_are_400s_and_the_server_keeps_serving(runtime, fmt, match):
    with _client(runtime) as c:
        r = c.post("/v1/chat/completions", json={"messages": COMMAND, "max_tokens": 8,
                                                  "response_format": fmt})
        assert r.status_code == 400 and match in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "response_format"
        assert c.get("/health").status_code == 200
        assert c.post("/v1/chat/completions",
                      json={"messages": COMMAND, "max_tokens": 4}).status_code == 200


def test_api_key_on_every_v1_route(runtime):
    with _client(runtime, api_key="s3cret") as c:
        for method, path, body in (("get", "/v1/models", None),
                                   ("post", "/v1/chat/completions",
                                    {"messages": COMMAND, "max_tokens": 4}),
                                   ("post", "/v1/completions", {"prompt": "hi", "max_tokens": 4})):
            call = getattr(c, method)
            kw = {"json": body} if body else {}
            assert call(path, **kw).status_code == 401
            wrong = call(path, headers={"Authorization": "Bearer nope"}, **kw)
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
            assert call(path, headers={"Authorization": "Bearer s3cret"}, **kw).status_code \
                == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


class _Slow:
    """A stand-in runtime that takes ``delay`` seconds per request."""

    name, n_ctx, json_schema, path = "slow", 512, None, Path("slow.gguf")

    def __init__(self, delay: float):
        self.delay = delay

    def chat_ids(self, messages, add_generation_prompt=True):
        return [1, 2, 3]

    def complete(self, ids, result=None, **kw):
        time.sleep(self.delay)
        result.prompt_tokens, result.completion_tokens = 3, 2
        yield "ok"

    def info(self):
        return {}


def test_full_queue_is_a_503_with_retry_after_and_health_stays_up():
    rt = _Slow(0.4)
    with _client(rt, max_queue=2) as c:
        req = {"messages": COMMAND, "max_tokens": 4}
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(c.post, "/v1/chat/completions", json=req) for _ in range(6)]
            time.sleep(0.1)
            t = time.perf_counter()
            health = c.get("/health")
            assert health.status_code == 200 and time.perf_counter() - t < 0.3
            replies = [f.result() for f in futures]
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 2 and set(codes) <= {200, 503} and 503 in codes
        busy = next(r for r in replies if r.status_code == 503)
        assert busy.headers["retry-after"] == "2" and "busy" in busy.json()["error"]["message"]
        assert c.get("/health").json()["queue"] == 0  # every slot given back
        metrics = c.get("/metrics").text
        assert 'edgeqlora_errors_total{kind="busy"}' in metrics
        assert 'edgeqlora_requests_total{route="/v1/chat/completions",status="503"}' in metrics


def test_eight_clients_within_the_queue_all_succeed_and_are_counted():
    rt = _Slow(0.05)
    with _client(rt, max_queue=8) as c:
        req = {"messages": COMMAND, "max_tokens": 4}
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: c.post("/v1/chat/completions", json=req),
                                    range(8)))
        assert [r.status_code for r in replies] == [200] * 8
        metrics = c.get("/metrics").text
        assert 'edgeqlora_requests_total{route="/v1/chat/completions",status="200"} 8.0' \
            in metrics
        assert "edgeqlora_completion_tokens_total 16.0" in metrics
        assert "edgeqlora_time_to_first_token_seconds_count 8.0" in metrics
        assert "edgeqlora_queue_depth 0.0" in metrics


def test_a_client_that_goes_away_frees_its_slot():
    from edgeqlora.runtimes.serve import ServerState
    import asyncio

    from edgeqlora.runtimes.base import Completion

    state = ServerState(_Slow(0.2), "m", 1 << 20, 64, max_queue=1)

    async def gone():
        return True

    async def scenario():
        out = [p async for p in state.run([1], {}, Completion(), gone=gone)]
        await asyncio.sleep(0.5)  # the worker finishes its token and leaves
        return out

    assert asyncio.run(scenario()) == []
    assert state.admission.depth == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_official_openai_client_unchanged(export):
    """Chat, streaming and response_format json_schema through openai.OpenAI, against a real
    uvicorn with an API key."""
    openai = pytest.importorskip("openai")
    import httpx

    port = _free_port()
    env = {**os.environ, "EDGEQLORA_API_KEY": "hub-key"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeqlora", "serve", str(export),
                             "--port", str(port), "--n-ctx", "512", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, proc)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="hub-key")
        reply = client.chat.completions.create(model="export", messages=COMMAND, max_tokens=96)
        assert valid_action(reply.choices[0].message.content)
        stream = client.chat.completions.create(model="export", messages=COMMAND,
                                                max_tokens=96, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) \
            == reply.choices[0].message.content
        shaped = client.chat.completions.create(
            model="export", messages=COMMAND, max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {
                "name": "switch", "strict": True,
                "schema": {"type": "object", "properties": {"on": {"type": "boolean"}},
                           "required": ["on"], "additionalProperties": False}}})
        assert set(json.loads(shaped.choices[0].message.content)) == {"on"}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong").models.list()
        with pytest.raises(openai.BadRequestError, match="Invalid type"):
            client.chat.completions.create(
                model="export", messages=COMMAND, max_tokens=8,
                response_format={"type": "json_schema", "json_schema": {
                    "name": "bad", "schema": {"type": "nonsense"}}})
        assert "edgeqlora_requests_total" in httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_listening_beyond_loopback_needs_a_key(export):
    out = subprocess.run([sys.executable, "-m", "edgeqlora", "serve", str(export), "--host",
                          "0.0.0.0", "--port", str(_free_port())],
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "EDGEQLORA_API_KEY"})
    assert out.returncode == 2 and "--api-key" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1



def test_web_page_shows_json_mode_and_key_field_only_when_they_apply(runtime):
    with _client(runtime, api_key="k") as c:
        page = c.get("/").text
        assert '<label id="jsonmode" >' in page and '<label id="keyfield" >' in page
        assert "{{" not in page
    with _client(runtime, use_schema=False) as c:
        page = c.get("/").text
        assert '<label id="jsonmode" hidden>' in page and '<label id="keyfield" hidden>' in page


def test_the_page_installs_as_a_web_app(runtime):
    with _client(runtime, api_key="k") as c:
        page = c.get("/").text
        assert 'rel="manifest" href="/manifest.webmanifest"' in page and "serviceWorker" in page
        m = c.get("/manifest.webmanifest")
        assert m.headers["content-type"].startswith("application/manifest+json")
        manifest = m.json()
        assert manifest["display"] == "standalone" and manifest["start_url"] == "/"
        icon = manifest["icons"][0]["src"]
        assert c.get(icon).headers["content-type"].startswith("image/svg+xml")
        sw = c.get("/sw.js")
        assert sw.headers["content-type"].startswith("text/javascript")
        # The shell it caches is exactly what the app needs offline, never an API answer.
        for path in ("/", "/manifest.webmanifest", icon):
            assert f'"{path}"' in sw.text
        assert "/v1" not in sw.text


def test_serve_reuses_the_shared_prefix_by_default_run_does_not():
    from edgeqlora.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "x"]).prompt_cache is True
    assert parser.parse_args(["serve", "x", "--no-prompt-cache"]).prompt_cache is False
    assert parser.parse_args(["run", "x"]).prompt_cache is False
    assert parser.parse_args(["run", "x", "--prompt-cache"]).prompt_cache is True


@pytest.mark.parametrize("flags, match", [(["--max-queue", "0"], "max_queue=0"),
                                          (["--api-key", " "], "API key is empty")])
def test_bad_server_limits_are_one_line(export, flags, match):
    out = subprocess.run([sys.executable, "-m", "edgeqlora", "serve", str(export), "--port",
                          str(_free_port()), *flags], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and match in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "serving" not in out.stderr

"""The OpenAI-compatible server: chat completions (streaming and not), completions, models,
health, the web page, limits and bad requests; one test over a real uvicorn on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from conftest import wait_until_serving

pytest.importorskip("llama_cpp")
pytest.importorskip("starlette")
pytest.importorskip("httpx")  # starlette's TestClient

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def gguf_path():
    from edgeqlora.base import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="module")
def runtime(gguf_path):
    from edgeqlora import runtimes

    with runtimes.load(gguf_path, n_ctx=512) as rt:
        yield rt


@pytest.fixture(scope="module")
def client(runtime):
    from starlette.testclient import TestClient

    from edgeqlora.runtimes.serve import create_app

    app = create_app(runtime, model_id="smol", max_body_bytes=4096, max_tokens_limit=64)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def sse_events(text: str) -> list:
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_chat_completion_matches_the_runtime(client, runtime):
    r = client.post("/v1/chat/completions",
                    json={"model": "smol", "messages": MESSAGES, "max_tokens": 16})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "smol"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == runtime.chat(MESSAGES, max_new_tokens=16)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(runtime.chat_ids(MESSAGES))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_chat_gives_the_same_text(client):
    req = {"messages": MESSAGES, "max_tokens": 16, "stream": True,
           "stream_options": {"include_usage": True}}
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    assert events[-1]["usage"]["completion_tokens"] > 0
    plain = client.post("/v1/chat/completions", json={**req, "stream": False}).json()
    assert text == plain["choices"][0]["message"]["content"]
    assert finals[0]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_text_completion_and_stop(client, runtime):
    full = runtime.generate("The three primary colours are", max_new_tokens=12)
    stop = full.strip().split()[1]
    r = client.post("/v1/completions", json={"prompt": "The three primary colours are",
                                             "max_tokens": 12, "stop": [stop]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:full.index(stop)] and choice["finish_reason"] == "stop"
    r = client.post("/v1/completions", json={"prompt": "The three primary colours are",
                                             "max_tokens": 12, "stream": True})
    text = "".join(e["choices"][0]["text"] for e in sse_events(r.text))
    assert text == full


def test_models_health_and_page(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["smol"]
    assert models["data"][0]["meta"]["runtime"] == "gguf"
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and "smol" in page.text


@pytest.mark.parametrize("body, status, match", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"content": "no role"}]}).encode(), 400, "role"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
     400, "text part"),
    (json.dumps({"messages": MESSAGES, "max_tokens": 65}).encode(), 400, "limit of 64"),
    (json.dumps({"messages": MESSAGES, "max_tokens": 0}).encode(), 400,
     "max_tokens=0 must be between 1 and this server's limit of 64"),
    (json.dumps({"messages": MESSAGES, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"messages": MESSAGES, "n": 3}).encode(), 400, "one choice"),
    (json.dumps({"messages": MESSAGES, "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"messages": MESSAGES, "stop": [1]}).encode(), 400, "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode(), 413,
     "limit"),
])
def test_bad_requests_get_clear_errors(client, body, status, match):
    r = client.post("/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_and_unknown_routes(client, runtime):
    long = " ".join(["word"] * 600)  # > n_ctx=512 tokens, < 4096 bytes
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                "content": long}]})
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"]
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/chat/completions").status_code == 405
    # Still serving after all of that.
    ok = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200


def test_runtime_failure_is_a_500_not_a_crash(runtime):
    from starlette.testclient import TestClient

    from edgeqlora.runtimes.serve import create_app

    class Broken:
        name, path, n_ctx = "broken", runtime.path, runtime.n_ctx

        def chat_ids(self, messages, add_generation_prompt=True):
            return [1, 2, 3]

        def complete(self, *a, **k):
            raise RuntimeError("boom")

        def info(self):
            return {}

    with TestClient(create_app(Broken(), "b"), raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert r.status_code == 500 and "internal error" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
        assert r.status_code == 200
        assert "internal error" in r.text and r.text.endswith("data: [DONE]\n\n")
        assert c.get("/health").json()["busy"] is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_over_real_uvicorn_on_loopback(gguf_path):
    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeqlora", "serve", str(gguf_path), "--port", str(port),
         "--n-ctx", "256", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, proc)
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                          json={"messages": MESSAGES, "max_tokens": 8, "stream": True}) as r:
            assert r.status_code == 200
            body = "".join(r.iter_text())
        assert body.endswith("data: [DONE]\n\n")
        bad = httpx.post(f"{base}/v1/chat/completions", content=b"{", timeout=10,
                         headers={"content-type": "application/json"})
        assert bad.status_code == 400
        # A body that does not say it is JSON (a cross-site form post) and a Host that is not
        # this server's (DNS rebinding) are refused.
        assert httpx.post(f"{base}/v1/chat/completions", content=b"{}",
                          timeout=10).status_code == 415
        assert httpx.get(f"{base}/health", headers={"host": "evil.example"},
                         timeout=10).status_code == 421
        # A second server on the same port is refused with a clear message, and never says
        # it is serving.
        second = subprocess.run(
            [sys.executable, "-m", "edgeqlora", "serve", str(gguf_path), "--port", str(port)],
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "cannot listen" in second.stderr
        assert "serving" not in second.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_concurrent_requests_are_serialised_not_corrupted(client, runtime):
    from concurrent.futures import ThreadPoolExecutor

    expected = runtime.chat(MESSAGES, max_new_tokens=6)
    req = {"messages": MESSAGES, "max_tokens": 6}
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: client.post("/v1/chat/completions", json=req),
                                range(3)))
    assert [r.status_code for r in replies] == [200] * 3
    assert {r.json()["choices"][0]["message"]["content"] for r in replies} == {expected}

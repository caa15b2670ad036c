"""Hostile and careless input, command by command: each case asserts the exit code, one line
on stderr, no traceback, nothing half-written left behind and a previous good output untouched.

New commands and features add their cases here, under their command's heading.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

from conftest import build_tiny_model, has_module
from lora_fixtures import make_adapter

needs_llama_cpp = pytest.mark.skipif(not has_module("llama_cpp"),
                                     reason="needs llama-cpp-python")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("hostile")
    base = build_tiny_model(root / "base", tokenizer_dir)
    return {"root": root, "base": base, "adapter": make_adapter(root / "adapter", base)}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _strict_json(path: Path) -> dict:
    """json.loads that refuses the bare NaN / Infinity Python's json writes by default."""
    def refuse(name):
        raise AssertionError(f"{path} holds a bare {name}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _edited_adapter(src: Path, dst: Path, edit) -> Path:
    """A copy of the adapter ``src`` changed by ``edit(dir)``, with its manifest's file table
    rewritten so that the edit is not caught as tampering but by the check under test."""
    from edgeqlora.artifacts import file_table

    shutil.copytree(src, dst)
    edit(dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"] = file_table(dst)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _export_args(adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["export", str(adapter), "export.eval_tokens=32", "--out", str(out), "--quant",
            "q4_0", "--merge-base", "original", "--no-parity", *extra]


FAILING = ("--min-top1", "1.01")  # top-1 agreement can never reach it


@pytest.fixture(scope="module")
def good_export(tiny):
    from edgeqlora.cli import main

    out = tiny["root"] / "good"
    assert main(_export_args(tiny["adapter"], out)) == 0
    return out


@pytest.fixture(scope="module")
def failed_export(tiny):
    from edgeqlora.cli import main

    out = tiny["root"] / "failed"
    assert main(_export_args(tiny["adapter"], out, *FAILING, "--keep-failed")) == 1
    return out


# export


@needs_llama_cpp
def test_export_failing_verification_writes_nothing_even_with_force(tiny, tmp_path, capsys):
    from edgeqlora.cli import main

    out = tmp_path / "out"
    for extra in ((), ("--force",)):
        assert main(_export_args(tiny["adapter"], out, *FAILING, *extra)) == 1
        err = _one_line(capsys)
        assert "failed verification" in err and "--keep-failed" in err
        assert not out.exists() and not _leftovers(tmp_path, "out")


@needs_llama_cpp
def test_export_force_never_replaces_a_good_export_with_a_failed_one(tiny, good_export, capsys):
    from edgeqlora.cli import main

    before = _snapshot(good_export)
    for extra in (("--force",), ("--force", "--keep-failed")):
        assert main(_export_args(tiny["adapter"], good_export, *FAILING, *extra)) == 1
        err = _one_line(capsys)
        assert "failed verification" in err
        assert _snapshot(good_export) == before
        assert not _leftovers(good_export.parent, good_export.name)


@needs_llama_cpp
def test_export_keep_failed_keeps_it_marked_and_exits_1(failed_export):
    manifest = _strict_json(failed_export / "manifest.json")
    assert manifest["verification"]["passed"] is False
    assert manifest["verification"]["thresholds"]["min_top1"] == 1.01
    assert manifest["parity"] == "not run (verification failed)"


@needs_llama_cpp
def test_export_keep_failed_refuses_device(tiny, tmp_path, capsys):
    from edgeqlora.cli import main

    rc = main(_export_args(tiny["adapter"], tmp_path / "o", "--keep-failed", "--device", "pi5"))
    assert rc == 2 and "--device" in _one_line(capsys)


def test_export_output_that_is_or_holds_the_input_is_refused_before_any_work(tiny, capsys):
    from edgeqlora.cli import main

    adapter = tiny["adapter"]
    before = _snapshot(adapter)
    for out, word in ((adapter, "is the adapter"), (adapter.parent, "contains the adapter"),
                      (adapter / "export", "is inside the adapter"),
                      (tiny["base"] / "export", "is inside the base model")):
        assert main(_export_args(adapter, out, "--force")) == 2
        assert word in _one_line(capsys)
    assert _snapshot(adapter) == before


@needs_llama_cpp
def test_export_nan_adapter_fails_closed_and_its_kept_manifest_is_json(tiny, tmp_path, capsys):
    from edgeqlora.cli import main

    def poison(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = load_file(d / "adapter_model.safetensors")
        for k in weights:
            if "lora_B" in k:
                weights[k].fill_(float("nan"))
        save_file(weights, d / "adapter_model.safetensors")

    adapter = _edited_adapter(tiny["adapter"], tmp_path / "nan-adapter", poison)
    out = tmp_path / "out"
    assert main(_export_args(adapter, out)) == 1
    assert "non-finite" in _one_line(capsys) and not out.exists()
    # q8_0 and f16 go through numpy's casts, which warn on NaN: nothing but the one line.
    for quant in ("q8_0", "f16"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(_export_args(adapter, out, "--quant", quant)) == 1
        assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], quant
        assert "non-finite" in _one_line(capsys) and not out.exists()
    assert main(_export_args(adapter, out, "--keep-failed")) == 1
    _one_line(capsys)
    check = _strict_json(out / "manifest.json")["verification"]
    assert check["passed"] is False and check["kld"] in ("NaN", "Infinity")
    # A manifest forged to say "passed" beside its NaN metric still fails closed.
    from edgeqlora.artifacts import write_manifest

    manifest = _strict_json(out / "manifest.json")
    manifest["verification"].update(passed=True, problems=[])
    manifest["parity"] = None
    write_manifest(out, "export", {k: v for k, v in manifest.items()
                                   if k not in ("format_version", "kind", "created", "files")})
    for argv in (["devices", "fit", str(out), "--device", "pi5"],
                 ["run", str(out), "--prompt", "hi", "--max-new-tokens", "2"]):
        assert main(argv) == 2, argv
        assert "not a finite number" in _one_line(capsys)


@pytest.mark.parametrize("config, word", [
    ([1, 2], "JSON object"),
    ({"peft_type": "LORA", "r": 0, "lora_alpha": 16}, "r = 0"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": "sixteen"}, "lora_alpha"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "alpha_pattern": {"q_proj": None}},
     "alpha_pattern"),
])
def test_export_bad_adapter_config_is_one_line(tiny, tmp_path, capsys, config, word):
    from edgeqlora.cli import main

    def rewrite(d: Path) -> None:
        if isinstance(config, dict):
            full = json.loads((d / "adapter_config.json").read_text())
            full.update(config)
        else:
            full = config
        (d / "adapter_config.json").write_text(json.dumps(full))

    adapter = _edited_adapter(tiny["adapter"], tmp_path / "ad", rewrite)
    assert main(_export_args(adapter, tmp_path / "out")) == 2
    err = _one_line(capsys)
    assert "adapter_config.json" in err and word in err
    assert not (tmp_path / "out").exists()


@needs_llama_cpp
def test_export_removes_what_a_killed_export_left_and_keeps_a_live_ones(tiny, tmp_path):
    from edgeqlora.cli import main

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = [tmp_path / f".out.work-{dead}-abc", tmp_path / f".out.tmp-{dead}-def",
             tmp_path / f".out.old-{dead}"]
    live = tmp_path / f".out.work-{os.getppid()}-xyz"  # pytest's parent: alive
    for d in (*stale, live):
        d.mkdir()
        (d / "model.gguf").write_bytes(b"x" * 1024)
    assert main(_export_args(tiny["adapter"], tmp_path / "out")) == 0
    assert not any(d.exists() for d in stale) and live.is_dir()


def test_sigterm_unwinds_and_cleans_up(tmp_path, monkeypatch, capsys):
    """SIGTERM in the middle of a command: the atomic write rolls back, exit 143, one line."""
    from edgeqlora import cli
    from edgeqlora.artifacts import atomic_dir
    from edgeqlora.commands import export as export_command

    out = tmp_path / "out"

    def killed(args):
        with atomic_dir(out) as tmp:
            (tmp / "model.gguf").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(export_command, "run", killed)
    rc = cli.main(["export", "adapter", "--out", str(out)])
    assert rc == 143 and "terminated" in _one_line(capsys)
    assert not out.exists() and not _leftovers(tmp_path, "out")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("exc, code, word", [
    (ValueError("boom"), 1, "--debug"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "disk full"),
    (PermissionError(errno.EACCES, "Permission denied", "/some/file"), 2, "/some/file"),
])
def test_unforeseen_errors_are_one_line(monkeypatch, capsys, exc, code, word):
    from edgeqlora import cli
    from edgeqlora.commands import export as export_command

    def broken(args):
        raise exc

    monkeypatch.setattr(export_command, "run", broken)
    assert cli.main(["export", "adapter", "--out", "x"]) == code
    assert word in _one_line(capsys)
    with pytest.raises(type(exc)):
        cli.main(["--debug", "export", "adapter", "--out", "x"])


# run, serve, parity, bundle, devices fit: consumers of an export


@needs_llama_cpp
def test_consumers_refuse_a_failed_export_unless_allowed(tiny, failed_export, tmp_path, capsys):
    from edgeqlora.cli import main
    from edgeqlora.errors import ManifestError
    from edgeqlora.runtimes import load

    cases = [["run", str(failed_export), "--prompt", "hi", "--max-new-tokens", "2"],
             ["serve", str(failed_export), "--port", "0"],
             ["devices", "fit", str(failed_export), "--device", "pi5"],
             ["bundle", str(failed_export), "--device", "pi5", "--out",
              str(tmp_path / "b.tar.gz")],
             ["parity", "--reference", str(tiny["adapter"]), "--candidate", str(failed_export),
              "--out", str(tmp_path / "parity")]]
    for argv in cases:
        assert main(argv) == 2, argv
        err = _one_line(capsys)
        assert "verification failed" in err and "--allow-failed" in err, err
    assert not (tmp_path / "b.tar.gz").exists() and not (tmp_path / "parity").exists()
    with pytest.raises(ManifestError):
        load(failed_export)
    load(failed_export, allow_failed=True).close()
    capsys.readouterr()
    assert main(cases[0] + ["--allow-failed"]) == 0
    # what it answers is not taken for the trained model's: one line says why it was refused
    warning = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and warning[0].startswith(f"warning: export {failed_export}: ")
    assert "verification failed" in warning[0] and "(--allow-failed)" in warning[0]
    assert main(cases[2] + ["--allow-failed"]) == 0
    assert main(cases[3] + ["--allow-failed"]) == 0
    capsys.readouterr()
    from edgeqlora.devices.bundle import verify_bundle

    assert verify_bundle(tmp_path / "b.tar.gz")["export_failures"]
    # ... and the bundle says so: verify does not print a plain OK, and its run.sh passes
    # --allow-failed on (the device's serve would refuse the export otherwise)
    assert main(["bundle", "verify", str(tmp_path / "b.tar.gz")]) == 0
    out = capsys.readouterr().out
    assert ": files OK (" in out and "FAILED its checks (its verification failed" in out, out
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/run.sh"))
        script = tar.extractfile(member).read().decode()
    assert "FAILED its checks" in script
    assert re.search(r'exec edgeqlora run "\$here/export" --chat --n-ctx \d+ --allow-failed\n',
                     script), script
    assert re.search(r'exec edgeqlora serve "\$here/export" --n-ctx \d+ --allow-failed ',
                     script), script


@needs_llama_cpp
def test_run_and_serve_check_every_file_against_its_sha256(good_export, tmp_path, capsys):
    from edgeqlora.cli import main

    changed = tmp_path / "changed"
    shutil.copytree(good_export, changed)
    gguf = next(changed.glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[-10] ^= 0xFF  # same size, one byte of tensor data flipped
    gguf.write_bytes(bytes(data))
    for argv in (["run", str(changed), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["serve", str(changed), "--port", "0"]):
        assert main(argv) == 2
        assert "sha256 differs" in _one_line(capsys)
    assert main(["run", str(changed), "--prompt", "hi", "--max-new-tokens", "2",
                 "--no-verify"]) == 0


@needs_llama_cpp
def test_run_threads_zero_is_refused(good_export, capsys):
    from edgeqlora.cli import main

    assert main(["run", str(good_export), "--prompt", "hi", "--threads", "0"]) == 2
    assert "--threads" in _one_line(capsys)


@needs_llama_cpp
def test_devices_fit_refuses_truncated_models(good_export, tmp_path, capsys):
    from edgeqlora.cli import main

    gguf = next(good_export.glob("*.gguf"))
    bare = tmp_path / "cut.gguf"
    bare.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 3])
    assert main(["devices", "fit", str(bare), "--device", "pi5"]) == 2
    assert "truncated" in _one_line(capsys)
    cut = tmp_path / "cut-export"
    shutil.copytree(good_export, cut)
    (cut / gguf.name).write_bytes(gguf.read_bytes()[:4096])
    assert main(["devices", "fit", str(cut), "--device", "pi5"]) == 2
    assert "does not match its manifest" in _one_line(capsys)


# bundle and device profiles


PROFILE = """name = "board"
title = TITLE
kind = KIND

[memory]
total_mb = 8192
usable_mb = 7200
bandwidth_gbs = 17.1

[cpu]
arch = "aarch64"
cores = 4
threads = 4
features = ["neon"]

[runtimes]
available = ["gguf"]
"""


@pytest.mark.parametrize("title, kind, word", [
    ('"Board\\ntouch /tmp/pwned"', '"sbc"', "title"),
    ('"Board"', '["sbc"]', "kind"),
])
def test_hostile_profiles_are_one_line(tmp_path, capsys, title, kind, word):
    from edgeqlora.cli import main

    profile = tmp_path / "board.toml"
    profile.write_text(PROFILE.replace("TITLE", title).replace("KIND", kind))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["devices", "fit", str(gguf), "--device", str(profile)]) == 2
    assert word in _one_line(capsys)


def test_run_script_never_runs_profile_text_and_binds_loopback():
    import dataclasses

    from edgeqlora.devices.bundle import _run_script
    from edgeqlora.devices.profiles import load_profile

    profile = dataclasses.replace(load_profile("pi5"), title="Pi\ntouch /tmp/pwned\r$(id)")
    script = _run_script(profile, 2048)
    assert "\ntouch" not in script and "\r" not in script
    comment = [line for line in script.splitlines() if "Pi" in line and "pwned" in line]
    assert comment and all(line.startswith("#") for line in comment)
    assert '"${HOST:-127.0.0.1}"' in script and "0.0.0.0}" not in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


# serve


class _SlowRuntime:
    """A runtime stand-in: records the thread chat_ids runs in and streams pieces slowly."""

    name, n_ctx = "slow", 512

    def __init__(self):
        import threading

        self.path = Path("slow.gguf")
        self.chat_thread = None
        self.pieces = 0
        self.stopped = threading.Event()

    def chat_ids(self, messages, add_generation_prompt=True):
        import threading

        self.chat_thread = threading.current_thread()
        return [1, 2, 3]

    def tokenize(self, text, special=True):
        return [1, 2]

    def complete(self, ids, max_new_tokens=2000, **k):
        import time

        try:
            for _ in range(min(max_new_tokens, 2000)):  # a runtime keeps to the budget
                time.sleep(0.005)
                self.pieces += 1
                yield "x"
        finally:
            self.stopped.set()

    def info(self):
        return {}


def _asgi_post(app, body: bytes | None, headers: dict[str, str], receive_after=None):
    """One POST through the ASGI app with a hand-made receive: ``receive_after()`` is what
    every receive after the body returns (default: wait forever)."""
    import asyncio

    sent: list[dict] = []

    async def go():
        # body None: the headers came, the body never does (a stalled upload).
        messages = [] if body is None else [{"type": "http.request", "body": body,
                                             "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            if receive_after is not None:
                return await receive_after()
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
                 "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                 "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 8080)}
        await asyncio.wait_for(app(scope, receive, send), timeout=20)

    asyncio.run(go())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


JSON = {"content-type": "application/json", "host": "127.0.0.1:8080"}
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.mark.parametrize("headers, status, word", [
    ({"content-type": "text/plain", "host": "127.0.0.1:8080"}, 415, "Content-Type"),
    ({"host": "127.0.0.1:8080"}, 415, "Content-Type"),
    ({"content-type": "application/json", "host": "evil.example:8080"}, 421, "Host"),
    ({"content-type": "application/json"}, 421, "Host"),
])
def test_serve_refuses_cross_site_and_rebinding_requests(headers, status, word):
    from edgeqlora.runtimes.serve import create_app, default_allowed_hosts

    app = create_app(_SlowRuntime(), "m", allowed_hosts=default_allowed_hosts("127.0.0.1"))
    got, body = _asgi_post(app, CHAT, headers)
    assert got == status and word in json.loads(body)["error"]["message"]


def test_serve_host_check_accepts_this_server():
    from edgeqlora.runtimes.serve import default_allowed_hosts, host_allowed

    loop = default_allowed_hosts("127.0.0.1")
    assert all(host_allowed(h, loop) for h in ("localhost:8080", "127.0.0.1", "[::1]:80",
                                               "192.168.1.5:8080", "LOCALHOST"))
    assert not any(host_allowed(h, loop) for h in ("evil.example", "", None, "pi.local"))
    lan = default_allowed_hosts("0.0.0.0") | {"pi.local"}
    assert host_allowed("pi.local:8080", lan) and not host_allowed("evil.example", lan)


def test_serve_nested_json_is_a_400_and_prompt_work_runs_off_the_event_loop():
    import threading

    from edgeqlora.runtimes.serve import create_app

    rt = _SlowRuntime()
    app = create_app(rt, "m", max_body_bytes=1 << 20)
    nested = b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, body = _asgi_post(app, nested, JSON)
    assert status == 400 and "nested" in json.loads(body)["error"]["message"]
    status, _ = _asgi_post(app, json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 3}).encode(), JSON)
    assert status == 200
    assert rt.chat_thread is not None and rt.chat_thread is not threading.main_thread()


def test_serve_stalled_body_times_out(monkeypatch):
    import edgeqlora.runtimes.serve as S

    monkeypatch.setattr(S, "BODY_TIMEOUT_S", 0.3)
    app = S.create_app(_SlowRuntime(), "m")
    status, _ = _asgi_post(app, None, {"content-type": "application/json"})
    assert status == 408


def test_serve_stalled_headers_are_closed_and_answers_are_not(monkeypatch):
    """Half a header block (slowloris) is closed after HEADER_TIMEOUT_S; a whole request on
    the same server is answered, and its kept-alive connection is not cut by the deadline."""
    import socket
    import threading
    import time

    import uvicorn

    import edgeqlora.runtimes.serve as S
    import edgeqlora.runtimes.serve_guard as G

    monkeypatch.setattr(G, "HEADER_TIMEOUT_S", 0.5)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(S.create_app(_SlowRuntime(), "m"), host="127.0.0.1",
                                           port=port, log_level="error",
                                           http=G.header_deadline_protocol()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
        stalled.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        t0 = time.monotonic()
        assert stalled.recv(100) == b""  # closed by the server
        assert time.monotonic() - t0 < 3
        with socket.create_connection(("127.0.0.1", port), timeout=5) as ok:
            ok.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert ok.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(10)


def test_serve_client_that_disconnects_stops_a_non_streaming_generation():
    import asyncio

    from edgeqlora.runtimes.serve import create_app

    rt = _SlowRuntime()
    app = create_app(rt, "m", max_tokens_limit=4096)

    import time

    start = time.monotonic()

    async def disconnect_soon():  # as a server's receive: queued once the socket closed
        if time.monotonic() - start > 0.3:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    body = json.dumps({"messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2000}).encode()
    try:
        _asgi_post(app, body, JSON, receive_after=disconnect_soon)
    except StopIteration:  # nothing sent to a client that is gone
        pass
    assert rt.stopped.wait(5) and rt.pieces < 1000
    assert not app.state.edgeqlora.lock.locked()


# run and serve: hostile chat templates (the template is a program from the export's files)


@pytest.mark.parametrize("source, word", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "s;"),  # never ends: stopped by the clock
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
     "characters of output"),
    ("{{ 'a' * 100000000 }}", "product"),
    ("{{ [1] * 100000000 }}", "product"),
    ("{{ 7 ** 100000000 }}", "**"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
])
def test_hostile_chat_templates_are_stopped_with_one_line(monkeypatch, source, word):
    import time

    from edgeqlora.errors import InputError
    from edgeqlora.runtimes import chat_template as C

    monkeypatch.setattr(C, "RENDER_SECONDS", 0.5)
    monkeypatch.setattr(C, "RENDER_CHARS", 10_000)
    start = time.monotonic()
    with pytest.raises(InputError) as info:
        C.ChatTemplate(source, origin="x/chat_template.jinja").render(
            [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "x/chat_template.jinja" in message and word in message and "\n" not in message
    # The budget leaves nothing behind: a normal template still renders, tracing is off.
    assert C.ChatTemplate("{{ messages[0].content }}").render(
        [{"role": "user", "content": "ok"}]) == "ok"
    assert sys.gettrace() is None or "coverage" in type(sys.gettrace()).__module__


def test_serve_answers_a_hostile_template_with_a_400_and_keeps_serving(monkeypatch):
    from edgeqlora.runtimes import chat_template as C
    from edgeqlora.runtimes.serve import create_app

    monkeypatch.setattr(C, "RENDER_SECONDS", 0.3)
    hostile = C.ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}"
                             "{% endfor %}{% endfor %}", origin="hostile template")

    class Templated(_SlowRuntime):
        def chat_ids(self, messages, add_generation_prompt=True):
            hostile.render(messages)
            return [1]

    app = create_app(Templated(), "m")
    status, body = _asgi_post(app, CHAT, JSON)
    assert status == 400 and "rendering budget" in json.loads(body)["error"]["message"]


# train: datasets


def test_huge_and_deeply_nested_dataset_lines_are_skipped_in_bounded_memory(tmp_path):
    import tracemalloc

    from edgeqlora.data import load_dataset

    good = {"messages": [{"role": "user", "content": "turn on the light"},
                         {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(good) + "\n")
        f.write(json.dumps({"text": "x" * (20 << 20)}) + "\n")  # a 20 MB line
        f.write('{"text": ' + "[" * 100000 + "]" * 100000 + "}\n")  # nested too deep
        f.write(json.dumps(good) + "\n")
    tracemalloc.start()
    try:
        data = load_dataset(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data.rows) == 2
    assert data.skipped.get("line_too_long") == 1 and data.skipped.get("invalid_json") == 1
    assert "line 2" in data.skip_examples["line_too_long"]
    assert peak < 80 << 20, f"peak {peak / 2**20:.0f} MiB for a 20 MiB line"


def test_a_huge_row_of_a_json_array_is_skipped_before_tokenizing(tmp_path):
    """A ``.json`` array is read whole (it is one document), but a row over the JSON Lines cap
    is skipped and reported before it reaches the tokenizer (20 MB of text was 2 GB there)."""
    from edgeqlora.data import load_dataset

    good = {"messages": [{"role": "user", "content": "turn on the light"},
                         {"role": "assistant", "content": "ok"}]}
    huge = {"messages": [{"role": "user", "content": "a" * (20 << 20)},
                         {"role": "assistant", "content": "b"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, huge, good]))
    data = load_dataset(str(path))
    assert len(data.rows) == 2 and data.skipped.get("line_too_long") == 1
    assert "row 1" in data.skip_examples["line_too_long"]


# stray output


def test_importing_onnxruntimes_quantizer_leaves_logging_alone(monkeypatch):
    """matmul_nbits_quantizer calls logging.basicConfig(level=INFO) at import; through
    ``quantizer_module`` the root logger stays as it was (no library INFO lines on stderr)."""
    import logging

    pytest.importorskip("onnxruntime")
    from edgeqlora.exporters.onnx.graph import quantizer_module

    name = "onnxruntime.quantization.matmul_nbits_quantizer"
    monkeypatch.delitem(sys.modules, name, raising=False)  # imported afresh, side effect and all
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    assert quantizer_module().MatMulNBitsQuantizer
    assert (list(root.handlers), root.level) == before


def test_serve_request_past_its_time_budget_is_a_504_and_frees_the_runtime():
    import time

    from edgeqlora.runtimes.serve import create_app

    rt = _SlowRuntime()  # 2,000 pieces, 5 ms apiece: 10 s
    app = create_app(rt, "m", max_tokens_limit=4096, request_timeout_s=0.4)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2000}).encode()
    start = time.monotonic()
    status, raw = _asgi_post(app, body, JSON)
    assert status == 504 and "--request-timeout" in json.loads(raw)["error"]["message"]
    assert time.monotonic() - start < 5
    assert _stopped_or_never_started(rt)
    assert not app.state.edgeqlora.lock.locked()
    # Streaming: the headers are sent, so the error comes in-band, then [DONE].
    rt2 = _SlowRuntime()
    app = create_app(rt2, "m", max_tokens_limit=4096, request_timeout_s=0.4)
    stream = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
                         "stream": True}).encode()
    status, raw = _asgi_post(app, stream, JSON)
    text = raw.decode()
    assert status == 200 and "--request-timeout" in text and text.endswith("data: [DONE]\n\n")
    assert _stopped_or_never_started(rt2)


def _stopped_or_never_started(rt) -> bool:
    """The runtime stopped at its next piece after the deadline, long before its 2,000; or, on
    a loaded machine whose worker thread only got going after the 0.4 s deadline, the worker
    saw the cancel and never started it (pieces 0, nothing to stop)."""
    if rt.stopped.wait(5):
        return rt.pieces < 1000
    return rt.pieces == 0


class _LongPromptRuntime(_SlowRuntime):
    """A stand-in whose first step is one long native call (a prompt batch) that only its
    ``Cancel`` ends, as llama.cpp's abort callback does."""

    def complete(self, ids, cancel=None, **k):
        try:
            if cancel is not None and cancel.wait(30):
                return
            yield "x"
        finally:
            self.stopped.set()


def test_serve_timeout_stops_the_runtime_inside_a_long_prompt():
    import time

    from edgeqlora.runtimes.serve import create_app

    rt = _LongPromptRuntime()
    app = create_app(rt, "m", request_timeout_s=0.4)
    start = time.monotonic()
    status, _ = _asgi_post(app, CHAT, JSON)
    assert status == 504
    assert rt.stopped.wait(2) and time.monotonic() - start < 3
    deadline = time.monotonic() + 2
    while app.state.edgeqlora.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not app.state.edgeqlora.lock.locked()  # the next request does not wait 30 s


class _SlowPromptRuntime(_SlowRuntime):
    """A stand-in whose prompt takes long to prepare (a template over 25,000 messages)."""

    def chat_ids(self, messages, add_generation_prompt=True):
        import time

        time.sleep(1.5)
        return super().chat_ids(messages, add_generation_prompt)


def test_serve_timeout_counts_the_prompts_preparation():
    """The budget runs from the request's arrival: it ends while the prompt is still being
    prepared (before: only queueing and generation counted, so 25,000 messages ran 54 s under
    a 6 s budget). (The time is not measured here: ``asyncio.run`` in ``_asgi_post`` waits for
    the worker thread at shutdown, where a server's loop goes on.)"""
    from edgeqlora.runtimes.serve import create_app

    app = create_app(_SlowPromptRuntime(), "m", request_timeout_s=0.3)
    status, raw = _asgi_post(app, CHAT, JSON)
    assert status == 504 and "preparing its prompt" in json.loads(raw)["error"]["message"]


def test_serve_refuses_a_nonpositive_request_timeout():
    from edgeqlora.errors import InputError
    from edgeqlora.runtimes.serve import create_app

    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(InputError, match="request timeout"):
            create_app(_SlowRuntime(), "m", request_timeout_s=bad)

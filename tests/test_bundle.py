"""Bundles: create, verify (changed / missing / extra files, unsafe members), unpack, CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from edgeqlora.artifacts import write_manifest
from edgeqlora.cli import main
from edgeqlora.devices.bundle import create_bundle, unpack_bundle, verify_bundle
from edgeqlora.devices.profiles import load_profile
from edgeqlora.errors import DeviceError, InputError


def tiny_gguf(path: Path) -> Path:
    """A small but well-formed llama GGUF (a few KB): what the fit check and the bundle read.
    The real 98 MB model makes every hash and gzip pass slow on two shared cores."""
    import numpy as np

    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_vocab_size(100)
    w.add_file_type(0)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((100, 64), dtype=np.float32))
    for i in range(2):
        for name, shape in (("attn_q", (64, 64)), ("attn_k", (32, 64)), ("attn_v", (32, 64)),
                            ("attn_output", (64, 64)), ("ffn_up", (128, 64)),
                            ("ffn_gate", (128, 64)), ("ffn_down", (64, 128))):
            w.add_tensor(f"blk.{i}.{name}.weight", rng.standard_normal(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def export_dir(tmp_path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    tiny_gguf(d / "model.f32.gguf")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    write_manifest(d, "export", {"target": "gguf", "quant": "f32",
                                 "model_file": "model.f32.gguf"})
    return d


@pytest.fixture
def bundle(export_dir, tmp_path) -> Path:
    out = tmp_path / "out" / "smart-home-pi5.tar.gz"
    create_bundle(export_dir, "pi5", out)
    return out


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a bundle member by member; ``edit(name, data) -> [(name, data, info_changes)]``."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isreg() else None
            for name, new, changes in edit(m.name, data):
                info = tarfile.TarInfo(name)
                info.type, info.mode = m.type, m.mode
                for k, v in changes.items():
                    setattr(info, k, v)
                if new is not None and info.isreg():
                    info.size = len(new)
                    tout.addfile(info, io.BytesIO(new))
                else:
                    tout.addfile(info)
    return dst


def test_bundle_layout_and_verify(bundle, export_dir):
    manifest = verify_bundle(bundle)
    assert manifest["kind"] == "bundle" and manifest["device"] == "pi5"
    assert manifest["fit"]["verdict"] == "fits" and manifest["context"] == 2048
    files = manifest["files"]
    assert {"device.toml", "run.sh", "export/manifest.json", "export/model.f32.gguf",
            "export/tokenizer_config.json"} == set(files)
    assert files["export/model.f32.gguf"]["size_bytes"] == \
        (export_dir / "model.f32.gguf").stat().st_size
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        assert all(n.split("/")[0] == "smart-home-pi5" for n in names)
        run = tar.getmember("smart-home-pi5/run.sh")
        assert run.mode & 0o111 and run.uname == "" and run.uid == 0
        assert b"Raspberry Pi 5" in tar.extractfile("smart-home-pi5/device.toml").read()
    assert not [p for p in bundle.parent.iterdir() if p.name != bundle.name]  # no temp left


def test_run_script_is_valid_bash(bundle, tmp_path):
    folder = unpack_bundle(bundle, tmp_path / "unpacked")
    subprocess.run(["bash", "-n", str(folder / "run.sh")], check=True)
    assert os.access(folder / "run.sh", os.X_OK)
    text = (folder / "run.sh").read_text()
    assert "edgeqlora serve" in text and "--n-ctx 2048" in text and "bundle verify" in text
    assert "--allow-failed" not in text and "FAILED" not in text  # a bundle of a passing export


def test_tampered_file_is_named(bundle, tmp_path):
    bad = _rewrite(bundle, tmp_path / "bad.tar.gz", lambda n, d: [
        (n, d.replace(b"im_end", b"im_END") if n.endswith("tokenizer_config.json") else d, {})])
    with pytest.raises(InputError, match=r"export/tokenizer_config.json: sha256 differs"):
        verify_bundle(bad)


def test_tampered_model_byte_is_named(bundle, tmp_path):
    def flip(n, d):
        if n.endswith(".gguf"):
            d = bytearray(d)
            d[len(d) // 2] ^= 1
            d = bytes(d)
        return [(n, d, {})]

    with pytest.raises(InputError, match=r"export/model.f32.gguf: sha256 differs"):
        verify_bundle(_rewrite(bundle, tmp_path / "bad.tar.gz", flip))


def test_missing_and_extra_files_are_named(bundle, tmp_path):
    missing = _rewrite(bundle, tmp_path / "missing.tar.gz",
                       lambda n, d: [] if n.endswith("device.toml") else [(n, d, {})])
    with pytest.raises(InputError, match=r"device.toml: missing"):
        verify_bundle(missing)
    extra = _rewrite(bundle, tmp_path / "extra.tar.gz", lambda n, d: [(n, d, {})] + (
        [("smart-home-pi5/export/evil.py", b"import os", {})] if n.endswith("run.sh") else []))
    with pytest.raises(InputError, match=r"export/evil.py: not in the manifest \(extra file\)"):
        verify_bundle(extra)


@pytest.mark.parametrize("name, changes, message", [
    ("smart-home-pi5/../escape.txt", {}, r"climbs out of the bundle"),
    ("../smart-home-pi5/x.txt", {}, r"climbs out of the bundle"),
    ("/etc/evil.txt", {}, r"absolute path"),
    ("smart-home-pi5/link", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"},
     r"symbolic link"),
    ("smart-home-pi5/hard", {"type": tarfile.LNKTYPE, "linkname": "smart-home-pi5/run.sh"},
     r"hard link"),
    ("smart-home-pi5/dev", {"type": tarfile.CHRTYPE}, r"is a device"),
    ("smart-home-pi5/run.sh", {}, r"appears twice"),
])
def test_unsafe_members_are_refused(bundle, tmp_path, name, changes, message):
    def add(n, d):
        out = [(n, d, {})]
        if n.endswith("device.toml"):
            out.append((name, b"#!/bin/sh\necho owned\n", changes))
        return out

    bad = _rewrite(bundle, tmp_path / "unsafe.tar.gz", add)
    with pytest.raises(InputError, match=message) as err:
        verify_bundle(bad)
    assert name in str(err.value)
    dest = tmp_path / "dest"
    with pytest.raises(InputError):
        unpack_bundle(bad, dest)
    assert not (tmp_path / "escape.txt").exists() and not list(dest.glob("**/*.txt"))


def test_not_a_bundle(tmp_path, export_dir):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match="junk.tar.gz"):
        verify_bundle(junk)
    with pytest.raises(InputError, match="does not exist"):
        verify_bundle(tmp_path / "none.tar.gz")
    plain = tmp_path / "plain.tar.gz"
    with tarfile.open(plain, "w:gz") as tar:
        tar.add(export_dir, arcname="export")
    with pytest.raises(InputError, match="not a bundle manifest"):
        verify_bundle(plain)


def test_unpack_and_verify_the_folder(bundle, tmp_path):
    folder = unpack_bundle(bundle, tmp_path / "dest")
    assert verify_bundle(folder)["device"] == "pi5"
    with pytest.raises(InputError, match="already exists"):
        unpack_bundle(bundle, tmp_path / "dest")
    (folder / "export" / "tokenizer_config.json").write_text("{}")
    (folder / "notes.txt").write_text("hi")
    with pytest.raises(InputError) as err:
        verify_bundle(folder)
    assert "export/tokenizer_config.json: sha256 differs" in str(err.value)
    assert "notes.txt: not in the manifest" in str(err.value)


def test_refuses_what_does_not_fit_and_leaves_nothing(export_dir, tmp_path):
    out = tmp_path / "o" / "b.tar.gz"
    board = tmp_path / "tiny-board.toml"
    board.write_text((Path(load_profile("pi-zero-2w").source).read_text()
                      .replace('name = "pi-zero-2w"', 'name = "tiny-board"')
                      .replace("usable_mb = 330", "usable_mb = 60")))
    with pytest.raises(DeviceError, match=r"does not fit on tiny-board.*--ignore-fit"):
        create_bundle(export_dir, board, out)
    assert not out.exists() and not list((tmp_path / "o").glob("*"))
    # --force only replaces: it never bundles a misfit (it used to mean both)
    with pytest.raises(DeviceError, match="does not fit"):
        create_bundle(export_dir, board, out, force=True)
    create_bundle(export_dir, board, out, ignore_fit=True)
    assert verify_bundle(out)["fit"]["verdict"] == "does not fit"


def test_refuses_bad_inputs(export_dir, tmp_path, bundle):
    with pytest.raises(InputError, match="already exists"):
        create_bundle(export_dir, "pi5", bundle)
    with pytest.raises(InputError, match=r"must end in \.tar\.gz"):
        create_bundle(export_dir, "pi5", tmp_path / "b.zip")
    (tmp_path / "dir.tar.gz").mkdir()  # refused before any work, --force or not
    with pytest.raises(InputError, match=r"dir\.tar\.gz is a directory; --force replaces"):
        create_bundle(export_dir, "pi5", tmp_path / "dir.tar.gz", force=True)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".dir.tar.gz")]
    with pytest.raises(DeviceError, match="unknown device"):
        create_bundle(export_dir, "pi9", tmp_path / "b.tar.gz")
    with pytest.raises(DeviceError, match="named device profile"):
        create_bundle(export_dir, "host", tmp_path / "b.tar.gz")
    with pytest.raises(InputError, match="bundle an export directory"):
        create_bundle(export_dir / "model.f32.gguf", "pi5", tmp_path / "g.tar.gz")
    with pytest.raises(InputError, match="does not exist"):
        create_bundle(tmp_path / "nothing", "pi5", tmp_path / "g.tar.gz")
    (export_dir / "tokenizer_config.json").write_text("{}")
    with pytest.raises(InputError, match=r"tokenizer_config.json: sha256 differs"):
        create_bundle(export_dir, "pi5", tmp_path / "c.tar.gz")
    assert not (tmp_path / "c.tar.gz").exists()


def test_cli_bundle_and_verify(export_dir, tmp_path, capsys):
    out = tmp_path / "cli.tar.gz"
    assert main(["bundle", str(export_dir), "--device", "pi4", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["bundle", "verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = _rewrite(out, tmp_path / "bad.tar.gz", lambda n, d: [
        (n, b"rm -rf /" if n.endswith("run.sh") else d, {})])
    assert main(["bundle", "verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "run.sh: sha256 differs" in err and err.count("\n") == 1
    assert main(["bundle", str(export_dir)]) == 2
    assert "--device" in capsys.readouterr().err
    assert main(["bundle", "unpack", str(out), str(tmp_path / "u")]) == 0
    assert (tmp_path / "u" / "cli" / "run.sh").is_file()


@pytest.mark.slow
def test_unpacked_bundle_serves_with_its_run_script(tmp_path):
    """End to end: the embedded GGUF as an export, bundled for a Pi 5, unpacked, started with
    the bundle's own run.sh, answering /health and a chat request."""
    import shutil
    import signal
    import socket
    import sys
    import time
    import urllib.request

    pytest.importorskip("llama_cpp")
    pytest.importorskip("uvicorn")
    from edgeqlora.base import embedded_gguf_path

    d = tmp_path / "export"
    d.mkdir()
    shutil.copyfile(embedded_gguf_path(), d / "model.q4_1.gguf")
    write_manifest(d, "export", {"target": "gguf", "quant": "q4_1",
                                 "model_file": "model.q4_1.gguf"})
    create_bundle(d, "pi5", tmp_path / "e2e.tar.gz", context=512)
    folder = unpack_bundle(tmp_path / "e2e.tar.gz", tmp_path / "device")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HOST": "127.0.0.1", "PORT": str(port), "EDGEQLORA_THREADS": "1"}
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([str(folder / "run.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail((tmp_path / "run.log").read_text()[-2000:])
                time.sleep(0.3)
        body = json.dumps({"messages": [{"role": "user", "content": "Say hi"}],
                           "max_tokens": 8}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        assert reply["choices"][0]["message"]["content"].strip()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_fit_counts_the_adapter_of_an_adapter_only_export(tmp_path):
    from edgeqlora.devices.fit import model_facts

    d = tmp_path / "adapter-export"
    d.mkdir()
    tiny_gguf(d / "base.f32.gguf")
    tiny_gguf(d / "adapter.f32.gguf")
    write_manifest(d, "export", {"target": "gguf", "quant": "f32", "adapter_only": True,
                                 "model_file": "base.f32.gguf",
                                 "adapter_file": "adapter.f32.gguf"})
    facts = model_facts(d)
    base = model_facts(d / "base.f32.gguf")
    assert facts.file_bytes == 2 * base.file_bytes
    assert len(facts.tensors) == 2 * len(base.tensors)
    assert facts.kv_values_per_token == base.kv_values_per_token == 2 * 2 * (16 + 16)


def test_unpack_onto_a_full_disk_leaves_nothing_and_the_next_unpack_works(bundle, tmp_path,
                                                                         monkeypatch):
    """Extraction is staged in a hidden sibling: a full disk halfway leaves no partial folder
    (which would make the next unpack refuse with "already exists")."""
    import errno

    real = tarfile.TarFile.extractall

    def full(self, path, *a, **k):
        (Path(path) / "half-written").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    dest = tmp_path / "dest"
    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(InputError, match="disk full"):
        unpack_bundle(bundle, dest)
    assert [p.name for p in dest.iterdir()] == []
    monkeypatch.setattr(tarfile.TarFile, "extractall", real)
    folder = unpack_bundle(bundle, dest)
    assert verify_bundle(folder)["device"] == "pi5" and os.access(folder / "run.sh", os.X_OK)
    assert [p.name for p in dest.iterdir()] == [folder.name]


def test_oversized_manifest_is_refused_before_it_is_read(bundle, tmp_path, monkeypatch):
    import edgeqlora.devices.bundle as B

    monkeypatch.setattr(B, "MAX_MANIFEST_BYTES", 64)
    with pytest.raises(InputError, match="a bundle manifest is at most 64"):
        verify_bundle(bundle)


def test_a_killed_bundles_leftovers_are_removed_by_the_next(export_dir, tmp_path):
    """kill -9 during ``bundle create`` leaves its hidden stage folder and temporary tarball;
    both carry the dead process's id, and the next bundle to the same path removes them (a live
    process's are kept) and leaves none of its own."""
    import os

    from edgeqlora.devices.bundle import create_bundle

    out = tmp_path / "b.tar.gz"
    dead = 2**22 + 12345  # above any pid_max default: no such process
    stale_stage = tmp_path / f".b.tar.gz.stage-{dead}-abcd"
    (stale_stage / "b" / "export").mkdir(parents=True)
    (stale_stage / "b" / "export" / "model.gguf").write_bytes(b"x" * 1000)
    stale_tmp = tmp_path / f".b.tar.gz.tmp-{dead}-efgh"
    stale_tmp.write_bytes(b"half a tarball")
    live = tmp_path / f".b.tar.gz.tmp-{os.getppid()}-ijkl"
    live.write_bytes(b"another bundle in progress")
    create_bundle(export_dir, "pi5", out)
    assert not stale_stage.exists() and not stale_tmp.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".b.")) == [live.name]

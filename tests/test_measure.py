"""Resident-memory measurement (``edgeqlora.devices.measure``) for every export format, and the
NF4 byte count of ``bench/memory.py`` against what bitsandbytes really stores."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from edgeqlora.artifacts import write_manifest
from edgeqlora.devices.measure import BACKEND_MODULES, export_target, measure_rss
from edgeqlora.errors import DeviceError

ROOT = Path(__file__).resolve().parents[1]
linux = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="RSS needs /proc")


def _export(tmp: Path, target: str) -> Path:
    d = tmp / f"export-{target}"
    d.mkdir()
    write_manifest(d, "export", {"target": target, "files": {}})
    return d


def test_export_target_follows_the_format(tmp_path):
    from edgeqlora.base import embedded_gguf_path

    assert export_target(embedded_gguf_path()) == "gguf"
    assert export_target(_export(tmp_path, "onnx")) == "onnx"
    assert export_target(_export(tmp_path, "gguf")) == "gguf"
    # Each backend's modules are importable names (the runtime module and its library).
    assert BACKEND_MODULES["onnx"][0] == "edgeqlora.runtimes.onnx"
    assert "onnxruntime" in BACKEND_MODULES["onnx"] and "llama_cpp" in BACKEND_MODULES["gguf"]
    with pytest.raises(DeviceError, match="'tflite'.*known: gguf, onnx"):
        export_target(_export(tmp_path, "tflite"))
    junk = tmp_path / "model.bin"
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(DeviceError, match="model.bin is neither"):
        export_target(junk)


@linux
def test_measure_rss_on_a_gguf():
    """The embedded Q4_1 GGUF (~90 MB) in a fresh process: its weights are memory-mapped and all
    read while decoding, so the growth over the baseline is at least most of the file."""
    pytest.importorskip("llama_cpp")
    from edgeqlora.base import embedded_gguf_path

    path = embedded_gguf_path()
    m = measure_rss(path, context=64, fill=16)
    assert m["runtime"] == "gguf" and m["prompt_tokens"] == 16
    assert m["delta_rss"] > 0.8 * path.stat().st_size
    assert m["peak_rss"] >= m["loaded_rss"] > m["base_rss"]


@linux
def test_measure_rss_failure_is_a_device_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)  # right magic, nothing else
    with pytest.raises(DeviceError, match="bad.gguf"):
        measure_rss(bad, context=64, fill=8)


def _bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape, double", [((576, 576), True), ((1536, 576), True),
                                           ((192, 576), False), ((130, 64), True)])
def test_nf4_bytes_match_bitsandbytes(shape, double):
    """Reference: bitsandbytes' own 4-bit quantization, blocks of 64, as QLoRA loads the base;
    every byte of the packed weight and its quantization state is counted, exactly."""
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    memory = _bench_memory()
    w = torch.randn(*shape)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double,
                                    quant_type="nf4")
    tensors = [packed, state.absmax, state.code]
    if double:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    stored = sum(t.numel() * t.element_size() for t in tensors)
    assert memory.nf4_bytes(w.numel(), 64, double) == stored


def test_bench_memory_sizes_from_shapes(tmp_path, embedded_dir):
    """Parameter count and fp32/fp16 bytes from the checkpoint's headers; NF4 counts every
    *_proj weight at ~4.5 bits and keeps the rest in fp32."""
    memory = _bench_memory()
    sizes = memory.base_sizes(embedded_dir, 64, True)
    assert sizes["params"] == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    assert sizes["fp32_bytes"] == 4 * sizes["params"] == 2 * sizes["fp16_bytes"]
    kept = sizes["params"] - sizes["quantized_params"]
    assert sizes["nf4_quantized_tensors"] == 30 * 7
    nf4_bits = (sizes["nf4_bytes"] - 4 * kept) * 8 / sizes["quantized_params"]
    assert 4.1 < nf4_bits < 4.2  # 4 bits + 8-bit absmax per 64 + nested fp32 per 256 blocks


def test_bench_memory_cli_rejects_a_non_adapter(tmp_path):
    import subprocess

    d = _export(tmp_path, "gguf")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), str(d),
                           "--no-torch", "--out", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "adapter" in proc.stderr
    assert not (tmp_path / "m.json").exists()

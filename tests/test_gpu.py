"""The CUDA-only paths, for a session with a GPU (``make test-gpu``): bf16 compute, paged 8-bit
AdamW, bitsandbytes' 4-bit CUDA kernels, the packed device-aware layers in training, and NCCL
data parallel. Every test is marked ``gpu`` and skips cleanly without CUDA (conftest); the NCCL
one also needs two GPUs. Tiny random models from a config, nothing downloaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from edgeqlora.config import build_config
from edgeqlora.tasks import iot

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def iot_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("iot-gpu")
    rows, _ = iot.generate(seed=0, n_train=48, n_eval=8)
    return iot.write_jsonl(rows, d / "train.jsonl")


def _cfg(base, data, **overrides):
    values = {"base": str(base), "data": str(data), "max_steps": 3, "batch_size": 4,
              "lr": 2e-3, "warmup_steps": 1, "max_len": 160, "save_every": 0,
              "eval_examples": 0, "quant_report_tokens": 0, "max_new_tokens": 8,
              "lora.r": 4, "lora.dropout": 0.0}
    values.update(overrides)
    return build_config(values)


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_nf4_training_on_cuda_uses_bf16_and_paged_8bit_adamw(tiny_model_dir, iot_file,
                                                             tmp_path, monkeypatch):
    """quant=nf4 on CUDA: bitsandbytes' 4-bit layers on the GPU, bf16 compute (auto), the
    optimizer is PagedAdamW8bit, and training runs with finite, falling loss."""
    import bitsandbytes as bnb
    import torch

    from edgeqlora import train as train_mod

    made = []
    real = train_mod._optimizer

    def spy(params, cfg, device):
        opt = real(params, cfg, device)
        made.append(opt)
        return opt

    monkeypatch.setattr(train_mod, "_optimizer", spy)
    adapter = train_mod.train(_cfg(tiny_model_dir, iot_file, max_steps=6, lr=5e-3),
                              tmp_path / "run")
    assert isinstance(made[0], bnb.optim.PagedAdamW8bit)
    manifest = json.loads((adapter / "manifest.json").read_text())
    want = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert manifest["quant"]["quant"] == "nf4" and manifest["quant"]["compute_dtype"] == want
    losses = _losses(tmp_path / "run")
    assert len(losses) == 6 and all(map(lambda x: x == x and abs(x) < 1e4, losses))
    assert min(losses[-2:]) < losses[0]


def test_cuda_4bit_kernels_compute_what_the_cpu_path_computes(tiny_model_dir, iot_file,
                                                              tmp_path):
    """The trained model loaded on CUDA (bitsandbytes' fused 4-bit kernels, fp32 compute as
    recorded) and on CPU (one dequantization, then linear): the same logits up to the order of
    CUDA's sums."""
    import torch

    from edgeqlora import train as train_mod
    from edgeqlora.qlora import dequantized_weights, load_trained

    adapter = train_mod.train(_cfg(tiny_model_dir, iot_file, compute_dtype="float32"),
                              tmp_path / "run")
    ids = torch.tensor([[1, 500, 600, 700, 42, 9, 12000, 3]])
    gpu = load_trained(adapter, device="cuda")
    cpu = load_trained(adapter, device="cpu")
    with torch.no_grad(), dequantized_weights(cpu):
        a = gpu(ids.cuda()).logits.float().cpu()
        b = cpu(ids).logits.float()
    assert (a - b).abs().max().item() < 1e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_device_aware_training_on_cuda_keeps_the_base_packed(tiny_model_dir, iot_file,
                                                             tmp_path):
    """quant=gguf-q4_k_m on CUDA: the linear layers stay GGML-packed while training (bits per
    weight as computed), LoRA learns, and the adapter exports on the CPU to the recorded base
    bytes (the export checks every tensor's sha256)."""
    import torch

    from edgeqlora import train as train_mod
    from edgeqlora.device_base import is_packed
    from edgeqlora.export import export_adapter
    from edgeqlora.qlora import load_trained

    adapter = train_mod.train(_cfg(tiny_model_dir, iot_file, quant="gguf-q4_k_m", lr=5e-3,
                                   max_steps=6), tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert min(losses[-2:]) < losses[0]
    model = load_trained(adapter, device="cuda")
    assert is_packed(model)
    del model
    torch.cuda.empty_cache()
    manifest = export_adapter(adapter, tmp_path / "export", eval_tokens=64)
    assert manifest["device_aware"] and manifest["verification"]["passed"]
    assert manifest["exporter"]["device_base_tensors_checked"] > 0


def test_nccl_two_gpus_follow_one_process(tiny_model_dir, iot_file, tmp_path):
    """torchrun on two GPUs (NCCL) with the same global batch follows the one-GPU loss curve
    (bf16 sums in another order: 2e-2 relative)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from edgeqlora import train as train_mod

    overrides = {"base": str(tiny_model_dir), "data": str(iot_file), "max_steps": 3,
                 "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "max_len": 160,
                 "save_every": 0, "eval_examples": 0, "quant_report_tokens": 0, "lora.r": 4,
                 "lora.dropout": 0.0}
    train_mod.train(build_config(overrides), tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edgeqlora", "train", *[f"{k}={v}" for k, v in overrides.items()],
           "--out", str(tmp_path / "two")]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=2e-2)
    manifest = json.loads((tmp_path / "two" / "adapter" / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2

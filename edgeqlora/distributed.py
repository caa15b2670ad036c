"""Data parallelism for the trainer: the ``torchrun`` process group and the DDP-wrapped loss.

``Distributed`` reads RANK / WORLD_SIZE / LOCAL_RANK (NCCL on GPUs, gloo on CPU) or stands for a
single process, where every collective is a no-op, so the training loop has one code path.
``loss_module`` puts the whole loss computation inside the module DDP wraps and tells DDP to
sync only the adapters.
"""

from __future__ import annotations

import os


class Distributed:
    """The process group under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK), or a single
    process. Collectives are no-ops when alone."""

    def __init__(self, rank: int, world: int, device):
        self.rank, self.world, self.device = rank, world, device
        self.enabled = world > 1
        self.is_main = rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        import torch
        import torch.distributed as dist

        from .qlora import default_device

        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        device = default_device()
        if world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world, device)

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)

    def sum(self, value):
        """Sum of a number or 0-d tensor over processes (a float/int comes back as such)."""
        if not self.enabled:
            return value
        import torch
        import torch.distributed as dist

        t = value.detach().clone().double() if torch.is_tensor(value) else \
            torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t if torch.is_tensor(value) else type(value)(t.item())

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def loss_module(model, ddp):
    """The PEFT model wrapped so that one ``forward`` returns (loss_sum, n_tokens): DDP needs
    the whole loss computation inside the module it wraps."""
    import torch

    from .qlora import token_loss

    class LossModule(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, batch):
            return token_loss(self.inner, batch)

    module = LossModule(model)
    if not ddp.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Frozen (quantized) weights are identical everywhere: DDP syncs only the adapters.
    frozen = [f"inner.{n}" for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [f"inner.{n}" for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DistributedDataParallel(
        module, device_ids=[ddp.device.index] if ddp.device.type == "cuda" else None)

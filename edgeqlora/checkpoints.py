"""The training run's directory and checkpoints: what makes ``resume=true`` continue exactly.

``check_out`` refuses to mix two runs in one directory before anything is written;
``claim_out`` clears an old run (``overwrite=true``) once every input has been checked.
A checkpoint (``checkpoints/step-NNNNNN/``) holds the adapter weights, optimizer, scheduler,
every process's RNG and the data position, written atomically; ``load_checkpoint`` refuses a
config that differs from the run's in anything but ``RESUMABLE_CHANGES``. ``StopRequest`` turns
SIGTERM into a checkpoint at the end of the current step.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
from pathlib import Path

from .config import Config, to_dict, to_yaml
from .errors import ConfigError, InputError

RUN_ENTRIES = ("adapter", "checkpoints", "metrics.jsonl", "config.yaml", "tensorboard")
# Keys that may change when resuming (the run continues, just longer or with other logging).
RESUMABLE_CHANGES = ("max_steps", "resume", "overwrite", "save_every", "eval_every",
                     "eval_examples", "eval_batch_size", "max_new_tokens", "keep_checkpoints",
                     "tensorboard", "quant_report_tokens")


def check_out(out: Path, cfg: Config) -> Path | None:
    """Check ``out`` for another run (writes nothing); returns the checkpoint to resume from."""
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true and overwrite=true contradict each other; choose one")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    held = [e for e in RUN_ENTRIES if (out / e).exists()]
    if cfg.resume:
        last = latest_checkpoint(out)
        if last is None:
            raise InputError(f"resume=true but {out / 'checkpoints'} holds no checkpoint; "
                             "start a new run without resume=true")
        return last
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        what = ", ".join(held) if held else "other files"
        raise InputError(f"output {out} already holds a run ({what}); pass overwrite=true to "
                         "replace it, resume=true to continue it, or another --out")
    return None


def claim_out(out: Path, cfg: Config) -> None:
    """Clear a previous run's entries (overwrite=true; other files are left alone) and record
    the config."""
    for entry in RUN_ENTRIES:
        path = out / entry
        if not path.exists():
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))


class StopRequest:
    """SIGTERM (what ``kill``, job schedulers and preemption send) stops the run at the end of
    the current step, which then takes the Ctrl-C path: a checkpoint, resumable exactly. A flag
    checked between steps rather than an exception raised mid-step, so the checkpoint never
    holds weights updated by a step its counter does not include. Only the main thread may
    install signal handlers; elsewhere this does nothing."""

    def __init__(self):
        self.requested: int | None = None
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in (out / "checkpoints").glob("step-*")
                   if (p / "state.json").is_file())
    return found[-1] if found else None


def _rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(out: Path, cfg: Config, state: dict, model, optimizer, scheduler, ddp,
                     collective: bool = True) -> Path:
    """Adapter weights, optimizer, scheduler, every process's RNG and the data position, written
    atomically; keeps the last ``keep_checkpoints``."""
    import torch
    from safetensors.torch import save_file

    from .artifacts import atomic_dir

    rngs = ddp.gather(_rng_state()) if collective else [_rng_state()]
    path = checkpoint_dir(out, state["step"])
    if ddp.is_main:
        with atomic_dir(path, force=True, what="checkpoint") as tmp:
            save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                       if p.requires_grad}, tmp / "trainable.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for rank, rng in enumerate(rngs):
                torch.save(rng, tmp / f"rng-rank{rank}.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "world_size": ddp.world,
                                                        "config": to_dict(cfg)}, indent=2))
        if cfg.keep_checkpoints:
            for old in sorted((out / "checkpoints").glob("step-*"))[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    if collective:
        ddp.barrier()
    return path


def load_checkpoint(path: Path, cfg: Config, model, optimizer, scheduler, ddp) -> dict:
    import torch
    from safetensors.torch import load_file

    saved = json.loads((path / "state.json").read_text())
    old, new = saved.pop("config"), to_dict(cfg)
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new
               if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if changed:
        raise ConfigError(f"cannot resume {path} with a different config ({'; '.join(changed)}); "
                          "use the run's config.yaml, or start a new run")
    weights = load_file(path / "trainable.safetensors", device=str(ddp.device))
    named = dict(model.named_parameters())
    missing = [n for n, p in named.items() if p.requires_grad and n not in weights]
    if missing:
        raise InputError(f"checkpoint {path} lacks adapter weights {missing[0]} "
                         f"(+{len(missing) - 1} more)")
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value)
    # Optimizer/scheduler/RNG state (no weights: those are safetensors) through torch's
    # restricted unpickler, which refuses arbitrary code (the default since torch 2.6; explicit
    # for older releases).
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=ddp.device,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-rank{ddp.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        torch.manual_seed(cfg.seed + ddp.rank + saved["step"])
    return {k: saved[k] for k in ("step", "epoch", "cursor", "tokens", "elapsed_s")}

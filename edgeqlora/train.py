"""The QLoRA recipe: a 4-bit base + LoRA adapters trained on answer tokens only.

Read it top to bottom: ``train`` is the whole run, in order: out dir, data, quantized base (and
what quantization cost it), adapters, optimizer and schedule, resume, the loop (eval, steps,
checkpoints), the adapter. The components it composes live beside it: ``qlora`` (model),
``data`` (chat template, answer-only labels, packing), ``evaluate`` (held-out loss, greedy
exact match).

Run as ``edgeqlora train [RECIPE] key=value ... --out DIR``, or data-parallel with
``torchrun --nproc_per_node N -m edgeqlora train ...`` (DDP; NCCL on GPUs, gloo on CPU). The
global batch is ``batch_size`` examples x ``grad_accum`` per optimizer step whatever the number
of processes (each process takes ``batch_size / N`` of every micro-batch), and the loss is the
mean over all answer tokens of the step, so N processes follow the same curve as one.

Output (``DIR``): ``adapter/`` (PEFT format + manifest.json), ``metrics.jsonl``, ``config.yaml``,
``checkpoints/step-NNNNNN/`` (adapter weights, optimizer, scheduler, RNG and data position:
``resume=true`` continues exactly).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from .config import Config, to_dict, to_yaml
from .errors import ConfigError, InputError, TrainingError

RUN_ENTRIES = ("adapter", "checkpoints", "metrics.jsonl", "config.yaml", "tensorboard")
# Keys that may change when resuming (the run continues, just longer or with other logging).
RESUMABLE_CHANGES = ("max_steps", "resume", "overwrite", "save_every", "eval_every",
                     "eval_examples", "eval_batch_size", "max_new_tokens", "keep_checkpoints",
                     "tensorboard", "quant_report_tokens")


def train(cfg: Config, out: Path) -> Path:
    """Train an adapter as ``cfg`` says; write the run to ``out``; return ``out / "adapter"``."""
    import torch

    from . import qlora
    from .base import base_fingerprint, resolve_base
    from .data import load_dataset, tokenize_dataset

    out = Path(out)
    ddp = _Distributed.from_env()
    if cfg.batch_size % ddp.world:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the "
                          f"{ddp.world} processes; make it a multiple of {ddp.world}")
    say = ddp.print

    # 1. Data: the base's tokenizer and chat template, loss on assistant tokens only. (Inputs
    # are checked before anything is written.)
    base_path = resolve_base(cfg.base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train_data = load_dataset(cfg.data)
    train_tok = tokenize_dataset(tokenizer, train_data.rows, cfg.max_len)
    eval_rows = _eval_rows(cfg)
    eval_tok = tokenize_dataset(tokenizer, eval_rows, cfg.max_len).examples if eval_rows else []
    say(f"data: {train_data.summary()}; {train_tok.summary(cfg.max_len)}; "
        f"held-out: {len(eval_rows)} rows")

    # The run directory: refuse early to mix two runs in one (nothing is written yet).
    resume_from = _check_out(out, cfg) if ddp.is_main else None
    resume_from = ddp.broadcast(resume_from)

    # 2. The quantized base, and what quantization costs it on held-out tokens.
    model = qlora.load_base(base_path, cfg.quant, cfg.double_quant, cfg.compute_dtype,
                            ddp.device)
    quant_report = {}
    if ddp.is_main and cfg.quant != "none" and cfg.quant_report_tokens > 0:
        quant_report = _quant_report(model, base_path, eval_tok or train_tok.examples, cfg,
                                     ddp.device)
        say(f"quantization: {cfg.quant} base vs 16/32-bit base on {quant_report['tokens']} "
            f"held-out tokens: top-1 agreement {quant_report['top1']:.1%}, "
            f"KLD {quant_report['kld']:.3f}")
    if cfg.grad_checkpointing:
        # Non-reentrant checkpointing needs no input-grad hooks and works under DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # 3. LoRA adapters: the only trainable weights.
    torch.manual_seed(cfg.seed)  # the same LoRA init in every process and every run
    model = qlora.attach_lora(model, cfg.lora)
    if ddp.device.type == "cpu":
        from .lora_dropout import use_fast_dropout

        # Same Bernoulli(p) masks from a faster random source (torch's CPU bernoulli_ was ~20 %
        # of a step); still seeded by torch's generator, so resume stays exact.
        use_fast_dropout(model)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    loss_model = _LossModule.wrap(model, ddp)
    share_prefix = cfg.share_prefix and qlora.supports_shared_prefix(model)
    if ddp.is_main and resume_from is None:
        _claim_out(out, cfg)  # every input checked: now clear an old run (overwrite=true)

    # 4. Optimizer and schedule.
    optimizer = _optimizer(params, cfg, ddp.device)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)

    # 5. Resume: weights, optimizer, scheduler, RNG and data position exactly as saved.
    state = {"step": 0, "epoch": 0, "cursor": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume_from is not None:
        state = _load_checkpoint(resume_from, cfg, model, optimizer, scheduler, ddp)
        say(f"resumed from {resume_from} at step {state['step']}")
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # dropout masks differ across processes
        random.seed(cfg.seed + ddp.rank)
    metrics = _Metrics(out / "metrics.jsonl", ddp.is_main, state["step"], cfg.tensorboard)

    # 6. The loop. On CPU, 4-bit weights are dequantized once for the whole run instead of at
    # every forward and backward (qlora.dequantized_weights: same numbers, ~0.4 GB for 135M).
    weight_cache = contextlib.ExitStack()
    if ddp.device.type == "cpu":
        weight_cache.enter_context(qlora.dequantized_weights(model))
    evaluate = _Evaluator(model, tokenizer, eval_rows, eval_tok, cfg, ddp)
    history: dict[str, Any] = {}
    history["before"] = evaluate(0, metrics) if state["step"] == 0 else metrics.first_eval
    last_saved = state["step"] if resume_from is not None else None
    per_rank = cfg.batch_size // ddp.world
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    progress = _Progress(cfg.max_steps, state["step"], ddp.is_main)
    tokens_at_start, elapsed_at_start = state["tokens"], state["elapsed_s"]
    model.train()
    stop = _StopRequest()
    try:
        with progress, stop:
            while state["step"] < cfg.max_steps:
                t0, cpu0 = time.perf_counter(), time.process_time()
                # The step's examples: batch_size x grad_accum from a seeded per-epoch shuffle;
                # this process takes its slice of every micro-batch.
                indices = _take(state, len(train_tok.examples), cfg.batch_size * cfg.grad_accum,
                                cfg.seed)
                micro = [indices[m * cfg.batch_size:(m + 1) * cfg.batch_size]
                         [ddp.rank * per_rank:(ddp.rank + 1) * per_rank]
                         for m in range(cfg.grad_accum)]
                examples = [[train_tok.examples[i] for i in idx] for idx in micro]
                batches = [_batch(ex, cfg, pad_id, ddp.device, share_prefix) for ex in examples]
                # Mean over every answer token of the step (all processes, all micro-batches);
                # DDP averages gradients over processes, hence the factor world.
                n_tokens = ddp.sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
                step_loss = torch.zeros((), device=ddp.device)
                for m, batch in enumerate(batches):
                    sync = m == len(batches) - 1
                    with (contextlib.nullcontext() if sync or not ddp.enabled
                          else loss_model.no_sync()):
                        loss_sum, _ = loss_model(batch)
                        (loss_sum * ddp.world / max(n_tokens, 1)).backward()
                    step_loss += loss_sum.detach()
                loss = float(ddp.sum(step_loss)) / max(n_tokens, 1)
                if not math.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    where = (f"the last good checkpoint is {_checkpoint_dir(out, last_saved)}"
                             if last_saved else "no checkpoint was written yet")
                    raise TrainingError(
                        f"loss is {loss} at step {state['step'] + 1}; {where}; lower lr "
                        f"(now {cfg.lr}) or check the data, then resume with resume=true")
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                             if cfg.max_grad_norm > 0 else torch.zeros(()))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                seen = ddp.sum(sum(_token_count(ex) for ex in examples))  # padding excluded
                state["step"] += 1
                state["tokens"] += seen
                dt = time.perf_counter() - t0
                state["elapsed_s"] += dt
                record = {"step": state["step"], "loss": loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm), "tokens": state["tokens"],
                          "tokens_per_s": seen / dt, "elapsed_s": round(state["elapsed_s"], 3),
                          # CPU seconds of this process: on a shared machine, the work done.
                          "cpu_s": round(time.process_time() - cpu0, 3)}
                metrics.log(record)
                progress.update(state["step"], loss, seen / dt)
                _after_step(state)
                if stop.requested:
                    say(f"signal {stop.requested} received: stopping after step {state['step']}")
                    raise KeyboardInterrupt

                if cfg.eval_every and state["step"] % cfg.eval_every == 0 \
                        and state["step"] < cfg.max_steps:
                    evaluate(state["step"], metrics)
                if (cfg.save_every and state["step"] % cfg.save_every == 0) \
                        or state["step"] == cfg.max_steps:
                    _save_checkpoint(out, cfg, state, model, optimizer, scheduler, ddp)
                    last_saved = state["step"]
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: keep what was done. Under torchrun every process gets the signal, so only
        # this process's RNG is saved (other processes' dropout streams restart from seed).
        if state["step"] and last_saved != state["step"]:
            path = _save_checkpoint(out, cfg, state, model, optimizer, scheduler, ddp,
                                    collective=False)
            say(f"interrupted: checkpoint written to {path}; continue with resume=true")
        raise

    # 7. Final eval, the adapter, the table.
    history["after"] = evaluate(state["step"], metrics)
    weight_cache.close()
    metrics.close()
    train_s = state["elapsed_s"] - elapsed_at_start  # step time only, evals excluded
    summary = {
        "steps": state["step"], "train_tokens": state["tokens"],
        "tokens_per_s": (state["tokens"] - tokens_at_start) / max(train_s, 1e-9),
        "train_time_s": round(state["elapsed_s"], 1), "peak_memory_mb": _peak_memory_mb(),
        "trainable_params": n_trainable, "world_size": ddp.world,
        "quantization": quant_report, **{f"eval_{k}": v for k, v in history.items() if v},
    }
    adapter = out / "adapter"
    if ddp.is_main:
        _write_adapter(adapter, model, cfg, base_path, base_fingerprint(base_path, cfg.base),
                       train_data, train_tok, summary)
        _final_table(summary, history)
    ddp.barrier()
    ddp.close()
    return adapter


def _after_step(state: dict) -> None:
    """Called after every optimizer step (a seam for tests, e.g. to simulate Ctrl-C)."""


# ---------------------------------------------------------------------------------------------
# Run directory


def _check_out(out: Path, cfg: Config) -> Path | None:
    """Check ``out`` for another run (writes nothing); returns the checkpoint to resume from."""
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true and overwrite=true contradict each other; choose one")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    held = [e for e in RUN_ENTRIES if (out / e).exists()]
    if cfg.resume:
        last = _latest_checkpoint(out)
        if last is None:
            raise InputError(f"resume=true but {out / 'checkpoints'} holds no checkpoint; "
                             "start a new run without resume=true")
        return last
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        what = ", ".join(held) if held else "other files"
        raise InputError(f"output {out} already holds a run ({what}); pass overwrite=true to "
                         "replace it, resume=true to continue it, or another --out")
    return None


def _claim_out(out: Path, cfg: Config) -> None:
    """Clear a previous run's entries (overwrite=true; other files are left alone) and record
    the config."""
    for entry in RUN_ENTRIES:
        path = out / entry
        if not path.exists():
            continue
        path = out / entry
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))


def _eval_rows(cfg: Config) -> list[dict]:
    """Held-out rows: ``eval_data``, or the embedded task's held-out split; a fixed sample of
    ``eval_examples`` of them (same rows every run, a mix of the held-out kinds)."""
    from .data import load_dataset

    spec = cfg.eval_data or ("embedded:iot:eval" if cfg.data.startswith("embedded:iot")
                             else "")
    if not spec or cfg.eval_examples == 0:
        return []
    rows = load_dataset(spec).rows
    if len(rows) > cfg.eval_examples:
        keep = sorted(random.Random(0).sample(range(len(rows)), cfg.eval_examples))
        rows = [rows[i] for i in keep]
    return rows


# ---------------------------------------------------------------------------------------------
# Data order and batches


def _take(state: dict, n_examples: int, count: int, seed: int) -> list[int]:
    """The next ``count`` example indices of a per-epoch shuffle seeded by (seed, epoch); moves
    the data position (epoch, cursor) in ``state``, which checkpoints save."""
    import torch

    out: list[int] = []
    while len(out) < count:
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(
            seed * 100_003 + state["epoch"])).tolist()
        chunk = perm[state["cursor"]:state["cursor"] + count - len(out)]
        out += chunk
        state["cursor"] += len(chunk)
        if state["cursor"] >= n_examples:
            state["epoch"], state["cursor"] = state["epoch"] + 1, 0
    return out


# Shorter shared prefixes are not worth a second kind of batch.
MIN_SHARED_PREFIX = 8


def _batch(examples: list[dict], cfg: Config, pad_id: int, device,
           share_prefix: bool = False) -> dict:
    """Packed rows (examples never attend to each other) or a right-padded batch. With
    ``share_prefix``, examples that all start with the same unlabelled tokens (a system prompt)
    are packed with that prefix once per row (``data.pack_shared_prefix``): the same loss, fewer
    positions computed. Rows may then hold up to 2 x max_len tokens."""
    from .data import (collate, collate_packed, collate_shared_prefix, pack,
                       pack_shared_prefix, shared_prefix_length)

    prefix = shared_prefix_length(examples) if cfg.packing and share_prefix else 0
    if prefix >= MIN_SHARED_PREFIX:
        batch = collate_shared_prefix(pack_shared_prefix(examples, prefix, 2 * cfg.max_len),
                                      pad_id)
    elif cfg.packing:
        batch = collate_packed(pack(examples, cfg.max_len), pad_id)
    else:
        batch = collate(examples, pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def _token_count(examples: list[dict]) -> int:
    return sum(len(e["input_ids"]) for e in examples)


# ---------------------------------------------------------------------------------------------
# Model pieces the loop needs


class _LossModule:
    """Wraps the PEFT model so that one ``forward`` returns (loss_sum, n_tokens): DDP needs
    the whole loss computation inside the module it wraps."""

    @staticmethod
    def wrap(model, ddp):
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


def _optimizer(params, cfg: Config, device):
    """Paged 8-bit AdamW on CUDA (optimizer state in 8 bits, paged out under memory pressure,
    as in the QLoRA paper); AdamW elsewhere (bitsandbytes' 8-bit optimizers need a GPU)."""
    import torch

    if device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fused: torch's one-pass CPU kernel per parameter (the default foreach path makes several
    # passes over the optimizer state); the same AdamW update.
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=device.type == "cpu")


def _quant_report(model_q, base_path: Path, examples: list[dict], cfg: Config, device) -> dict:
    """Top-1 agreement and KLD of the quantized base against the full-precision base."""
    import torch

    from .qlora import load_base, quantization_loss

    ids: list[int] = []
    for ex in examples:
        ids += ex["input_ids"]
        if len(ids) >= cfg.quant_report_tokens:
            break
    ids = ids[:cfg.quant_report_tokens]
    # Chunks of max_len, so positions stay within what the model was trained on.
    width = min(cfg.max_len, len(ids))
    rows = [ids[i:i + width] for i in range(0, len(ids) - width + 1, width)]
    model_fp = load_base(base_path, quant="none", compute_dtype=cfg.compute_dtype, device=device)
    report = quantization_loss(model_fp, model_q, torch.tensor(rows))
    del model_fp
    return report


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# Evaluation


class _Evaluator:
    """Held-out loss, plus exact match / per-field accuracy when the rows carry IoT targets;
    on the main process only (the others wait)."""

    def __init__(self, model, tokenizer, rows, examples, cfg: Config, ddp):
        self.model, self.tokenizer, self.cfg, self.ddp = model, tokenizer, cfg, ddp
        self.rows, self.examples = rows, examples
        self.task_rows = [r for r in rows if "target" in r]

    def __call__(self, step: int, metrics) -> dict:
        if not self.rows:
            return {}
        result: dict[str, Any] = {}
        if self.ddp.is_main:
            from .data import collate
            from .evaluate import eval_loss, evaluate_task

            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
                else self.tokenizer.eos_token_id
            bs = self.cfg.eval_batch_size
            batches = ({k: v.to(self.ddp.device) for k, v in
                        collate(self.examples[i:i + bs], pad).items()}
                       for i in range(0, len(self.examples), bs))
            t0, cpu0 = time.perf_counter(), time.process_time()
            result.update(eval_loss(self.model, batches))
            if self.task_rows:
                task = evaluate_task(self.model, self.tokenizer, self.task_rows,
                                     self.cfg.max_new_tokens, bs)
                samples = task.pop("samples")
                result.update(task)
                result["samples"] = samples
            result["eval_time_s"] = round(time.perf_counter() - t0, 1)
            result["eval_cpu_s"] = round(time.process_time() - cpu0, 1)
            line = f"eval @ step {step}: loss {result['eval_loss']:.4f}"
            if "exact_match" in result:
                line += (f", exact match {result['exact_match']:.1%}, "
                         f"parse rate {result['parse_rate']:.1%}")
            self.ddp.print(line + f" ({result['eval_time_s']}s)")
            metrics.log({"step": step, **{k: v for k, v in result.items() if k != "samples"}},
                        kind="eval")
        self.ddp.barrier()
        return result


# ---------------------------------------------------------------------------------------------
# Checkpoints


class _StopRequest:
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

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in (out / "checkpoints").glob("step-*")
                   if (p / "state.json").is_file())
    return found[-1] if found else None


def _rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_checkpoint(out: Path, cfg: Config, state: dict, model, optimizer, scheduler, ddp,
                     collective: bool = True) -> Path:
    """Adapter weights, optimizer, scheduler, every process's RNG and the data position, written
    atomically; keeps the last ``keep_checkpoints``."""
    import torch
    from safetensors.torch import save_file

    from .artifacts import atomic_dir

    rngs = ddp.gather(_rng_state()) if collective else [_rng_state()]
    path = _checkpoint_dir(out, state["step"])
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


def _load_checkpoint(path: Path, cfg: Config, model, optimizer, scheduler, ddp) -> dict:
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


# ---------------------------------------------------------------------------------------------
# The adapter


def _write_adapter(adapter: Path, model, cfg: Config, base_path: Path, fingerprint: dict,
                   train_data, train_tok, summary: dict) -> None:
    """PEFT's own format (``PeftModel.from_pretrained`` loads it) plus the manifest, atomically."""
    from . import qlora
    from .artifacts import atomic_dir, versions, write_manifest

    with atomic_dir(adapter, force=True, what="adapter") as tmp:
        model.save_pretrained(tmp)
        write_manifest(tmp, "adapter", {
            "base": {"spec": cfg.base, "path": str(Path(base_path).resolve()),
                     "weights_sha256": fingerprint["weights_sha256"],
                     "model_type": fingerprint.get("model_type")},
            "quant": qlora.quant_info(model, cfg.quant, cfg.double_quant),
            "lora": qlora.lora_info(model, cfg.lora),
            "data": {"spec": cfg.data, "sha256": train_data.sha256,
                     "train_rows": len(train_tok.examples),
                     "skipped": {**train_data.skipped,
                                 **({"too_long": train_tok.dropped_too_long}
                                    if train_tok.dropped_too_long else {})}},
            "metrics": _jsonable(summary),
            "config": to_dict(cfg),
            "versions": versions("edgeqlora", "torch", "transformers", "peft", "bitsandbytes",
                                 "accelerate"),
        })


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------------------------------------
# Logging: metrics.jsonl, progress bar, final table


class _Metrics:
    """``metrics.jsonl`` (one JSON object per train step / eval), optional TensorBoard. On
    resume, lines after the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int, tensorboard: bool):
        self.path, self.enabled, self.tb = path, enabled, None
        self.first_eval: dict = {}  # the eval before training, when resuming
        if not enabled:
            return
        if resume_step and path.is_file():
            keep = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            keep = [r for r in keep if r["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))
            self.first_eval = next((r for r in keep if r["kind"] == "eval"
                                    and r["step"] == 0), {})
        elif path.exists():
            path.unlink()
        if tensorboard:
            from .errors import require

            require("tensorboard", "tensorboard", "tensorboard=true")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def log(self, record: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, **_jsonable(record)}) + "\n")
        if self.tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()


class _Progress:
    """A rich progress bar with loss, tokens/s and ETA (main process only)."""

    def __init__(self, total: int, done: int, enabled: bool):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            disable=not enabled)
        self.task = self.progress.add_task("train", total=total, completed=done, loss="-",
                                           tps="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, tps: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")


def _final_table(summary: dict, history: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    before, after = history.get("before") or {}, history.get("after") or {}
    table = Table(title="edgeqlora train")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")

    def fmt(v, pct=False):
        if v is None:
            return "-"
        return f"{v:.1%}" if pct else f"{v:.4f}"

    table.add_row("held-out loss", fmt(before.get("eval_loss")), fmt(after.get("eval_loss")))
    if "exact_match" in after:
        table.add_row("exact match", fmt(before.get("exact_match"), True),
                      fmt(after["exact_match"], True))
        table.add_row("JSON parse rate", fmt(before.get("parse_rate"), True),
                      fmt(after["parse_rate"], True))
        for field, acc in after["field_accuracy"].items():
            table.add_row(f"  field {field}",
                          fmt((before.get("field_accuracy") or {}).get(field), True),
                          fmt(acc, True))
    quant = summary.get("quantization") or {}
    if quant:
        table.add_row("4-bit vs full base: top-1 / KLD",
                      f"{quant['top1']:.1%} / {quant['kld']:.3f}", "")
    table.add_row("steps / train tokens", "", f"{summary['steps']} / {summary['train_tokens']:,}")
    table.add_row("tokens/s / peak memory", "",
                  f"{summary['tokens_per_s']:,.0f} / {summary['peak_memory_mb']:,.0f} MB")
    Console().print(table)


# ---------------------------------------------------------------------------------------------
# Data parallelism


class _Distributed:
    """The process group under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK), or a single
    process. Collectives are no-ops when alone."""

    def __init__(self, rank: int, world: int, device):
        self.rank, self.world, self.device = rank, world, device
        self.enabled = world > 1
        self.is_main = rank == 0

    @classmethod
    def from_env(cls) -> "_Distributed":
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

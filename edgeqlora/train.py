"""The QLoRA recipe: a 4-bit base + LoRA adapters trained on answer tokens only.

Read it top to bottom: ``train`` is the whole run, in order: out dir, data, quantized base (and
what quantization cost it), adapters, optimizer and schedule, resume, the loop (eval, steps,
checkpoints), the adapter. The components it composes live beside it: ``qlora`` (model),
``data`` (chat template, answer-only labels, packing), ``evaluate`` (held-out loss, greedy
exact match), ``checkpoints`` (the run directory, checkpoints, exact resume), ``distributed``
(torchrun and DDP), ``train_report`` (evals during the run, metrics.jsonl, progress bar, the
final table).

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
import math
import random
import time
from pathlib import Path
from typing import Any

from .checkpoints import (StopRequest, check_out, checkpoint_dir, claim_out, load_checkpoint,
                          save_checkpoint)
# What a run directory holds and what a resume may change: part of this stage's interface.
from .checkpoints import RESUMABLE_CHANGES, RUN_ENTRIES  # noqa: F401
from .config import Config, to_dict
from .distributed import Distributed, loss_module
from .device_base import check_model as device_check, is_device_quant
from .errors import ConfigError, TrainingError
from .heldout import sample_rows
from . import threads
from .train_report import Evaluator, Metrics, Progress, final_table, jsonable


def train(cfg: Config, out: Path) -> Path:
    """Train an adapter as ``cfg`` says; write the run to ``out``; return ``out / "adapter"``."""
    import torch

    from . import qlora
    from .base import base_fingerprint, resolve_base
    from .data import load_dataset, tokenize_dataset
    from .eval_cache import base_eval_key
    from .evaluate import check_schema
    from .schema import resolve as resolve_schema

    out = Path(out)
    ddp = Distributed.from_env()
    if cfg.batch_size % ddp.world:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the "
                          f"{ddp.world} processes; make it a multiple of {ddp.world}")
    say = ddp.print

    # 1. Data: the base's tokenizer and chat template, loss on assistant tokens only. (Inputs
    # are checked before anything is written.)
    base_path = resolve_base(cfg.base)
    if is_device_quant(cfg.quant):  # the exporter must be able to write this base
        device_check(base_path, cfg.quant)
    from .hf_tokenizer import load as load_tokenizer

    tokenizer = load_tokenizer(base_path)
    train_data = load_dataset(cfg.data)
    schema, schema_source = resolve_schema(cfg.data, cfg.schema)
    check_schema(schema)
    train_tok = tokenize_dataset(tokenizer, train_data.rows, cfg.max_len)
    eval_rows = _eval_rows(cfg)
    eval_tok = tokenize_dataset(tokenizer, eval_rows, cfg.max_len).examples if eval_rows else []
    say(f"data: {train_data.summary()}; {train_tok.summary(cfg.max_len)}; "
        f"held-out: {len(eval_rows)} rows")

    # The run directory: refuse early to mix two runs in one (nothing is written yet).
    resume_from = check_out(out, cfg) if ddp.is_main else None
    resume_from = ddp.broadcast(resume_from)

    # 2. The quantized base, and what quantization costs it on held-out tokens.
    model = qlora.load_base(base_path, cfg.quant, cfg.double_quant, cfg.compute_dtype,
                            ddp.device)
    threads.adapt(say, force=True)  # torch's threads: the free cores (edgeqlora.threads)
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
    loss_model = loss_module(model, ddp)
    share_prefix = cfg.share_prefix and qlora.supports_shared_prefix(model)
    if ddp.is_main and resume_from is None:
        claim_out(out, cfg)  # every input checked: now clear an old run (overwrite=true)

    # 4. Optimizer and schedule.
    optimizer = _optimizer(params, cfg, ddp.device)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)

    # 5. Resume: weights, optimizer, scheduler, RNG and data position exactly as saved.
    state = {"step": 0, "epoch": 0, "cursor": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, cfg, model, optimizer, scheduler, ddp)
        say(f"resumed from {resume_from} at step {state['step']}")
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # dropout masks differ across processes
        random.seed(cfg.seed + ddp.rank)
    metrics = Metrics(out / "metrics.jsonl", ddp.is_main, state["step"], cfg.tensorboard)

    # 6. The loop. On CPU, 4-bit weights are dequantized once for the whole run instead of at
    # every forward and backward (qlora.dequantized_weights: same numbers, ~0.4 GB for 135M).
    weight_cache = contextlib.ExitStack()
    if ddp.device.type == "cpu":
        weight_cache.enter_context(qlora.dequantized_weights(model))
    evaluate = Evaluator(model, tokenizer, eval_rows, eval_tok, cfg, ddp, schema)
    history: dict[str, Any] = {}
    fingerprint = base_fingerprint(base_path, cfg.base)
    if state["step"] == 0:
        key = base_eval_key(cfg, fingerprint, eval_rows, eval_tok, ddp.device.type) \
            if cfg.eval_base and eval_rows else None
        history["before"] = evaluate.base(metrics, key) if cfg.eval_base else {}
    else:
        history["before"] = metrics.first_eval
    last_saved = state["step"] if resume_from is not None else None
    per_rank = cfg.batch_size // ddp.world
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    progress = Progress(cfg.max_steps, state["step"], ddp.is_main)
    tokens_at_start, elapsed_at_start = state["tokens"], state["elapsed_s"]
    model.train()
    stop = StopRequest()
    try:
        with progress, stop:
            while state["step"] < cfg.max_steps:
                threads.adapt(say)  # a core another job took (or gave back) since
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
                    where = (f"the last good checkpoint is {checkpoint_dir(out, last_saved)}"
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
                    save_checkpoint(out, cfg, state, model, optimizer, scheduler, ddp)
                    last_saved = state["step"]
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: keep what was done. Under torchrun every process gets the signal,
        # so only this process's RNG is saved (other processes' dropout streams restart from seed).
        if state["step"] and last_saved != state["step"]:
            path = save_checkpoint(out, cfg, state, model, optimizer, scheduler, ddp,
                                    collective=False)
            say(f"interrupted: checkpoint written to {path}; continue with resume=true")
        raise

    # 7. Final eval, the adapter, the table.
    history["after"] = evaluate(state["step"], metrics, with_schema=True)
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
        _write_adapter(adapter, model, cfg, base_path, fingerprint,
                       train_data, train_tok, summary, (schema, schema_source))
        final_table(summary, history)
    ddp.barrier()
    ddp.close()
    return adapter


def _after_step(state: dict) -> None:
    """Called after every optimizer step (a seam for tests, e.g. to simulate Ctrl-C)."""


def _eval_rows(cfg: Config) -> list[dict]:
    """Held-out rows: ``eval_data``, or the embedded task's held-out split; a fixed sample of
    ``eval_examples`` of them (same rows every run, a mix of the held-out kinds)."""
    from .data import load_dataset

    spec = cfg.eval_data or ("embedded:iot:eval" if cfg.data.startswith("embedded:iot")
                             else "")
    if not spec or cfg.eval_examples == 0:
        return []
    return sample_rows(load_dataset(spec).rows, cfg.eval_examples)


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


def _optimizer(params, cfg: Config, device):
    """Paged 8-bit AdamW on CUDA (optimizer state in 8 bits, paged out under memory pressure,
    as in the QLoRA paper); AdamW elsewhere (bitsandbytes' 8-bit optimizers need a GPU)."""
    import torch

    if device.type == "cuda":
        from .bnb_import import quiet_bnb_import

        quiet_bnb_import(purpose="paged 8-bit AdamW on CUDA")
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


def _write_adapter(adapter: Path, model, cfg: Config, base_path: Path, fingerprint: dict,
                   train_data, train_tok, summary: dict, schema=(None, None)) -> None:
    """PEFT's own format (``PeftModel.from_pretrained`` loads it) plus the manifest, atomically."""
    from . import qlora
    from .artifacts import atomic_dir, versions, write_manifest
    from .schema import write_schema

    with atomic_dir(adapter, force=True, what="adapter") as tmp:
        model.save_pretrained(tmp)
        schema_file = write_schema(tmp, schema[0])
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
            "schema": {"file": schema_file, "source": schema[1]} if schema_file else None,
            "metrics": jsonable(summary),
            "config": to_dict(cfg),
            "versions": versions("edgeqlora", "torch", "transformers", "peft", "bitsandbytes",
                                 "accelerate"),
        })

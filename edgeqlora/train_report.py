"""What a training run shows and records: held-out evals during the run, ``metrics.jsonl``
(and TensorBoard), the progress bar, and the before/after table at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import Config


class Evaluator:
    """Held-out loss, plus exact match / per-field accuracy when the rows carry IoT targets;
    on the main process only (the others wait)."""

    def __init__(self, model, tokenizer, rows, examples, cfg: Config, ddp, schema=None):
        self.model, self.tokenizer, self.cfg, self.ddp = model, tokenizer, cfg, ddp
        self.rows, self.examples = rows, examples
        self.task_rows = [r for r in rows if "target" in r]
        self.schema = schema  # the answers' JSON schema: the final eval reports both ways

    def __call__(self, step: int, metrics, with_schema: bool = False) -> dict:
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
                from .progress import Ticker

                ticker = Ticker(f"eval @ step {step}", len(self.task_rows), "answers")
                done = [0]

                def answered(n: int) -> None:
                    done[0] += n
                    ticker.update(done[0])

                task = evaluate_task(self.model, self.tokenizer, self.task_rows,
                                     self.cfg.max_new_tokens, bs, on_batch=answered,
                                     schema=self.schema if with_schema else None)
                samples = task.pop("samples")
                result.update(task)
                result["samples"] = samples
            result["eval_time_s"] = round(time.perf_counter() - t0, 1)
            result["eval_cpu_s"] = round(time.process_time() - cpu0, 1)
            line = _eval_line(step, result)
            if "schema" in result:
                k = result["schema"]
                line += (f"; with the JSON schema: exact match {k['exact_match']:.1%}, valid "
                         f"{k['valid_json_unconstrained']:.1%} -> {k['valid_json']:.1%}")
            self.ddp.print(line + f" ({result['eval_time_s']}s)")
            metrics.log({"step": step, **{k: v for k, v in result.items() if k != "samples"}},
                        kind="eval")
        self.ddp.barrier()
        return result


    def base(self, metrics, key: str | None) -> dict:
        """The step-0 evaluation (the untrained base), from the cache of earlier runs with the
        same base, data and settings when there is one (``edgeqlora.eval_cache``), else run
        and kept there. ``key``: None skips the cache."""
        from . import eval_cache

        cached = eval_cache.load(key) if key and self.ddp.is_main and self.rows else None
        if cached is None:
            result = self(0, metrics)
            if key and self.ddp.is_main:
                eval_cache.store(key, result)
            return result
        result = {**cached, "cached_eval_time_s": cached.get("eval_time_s"),
                  "eval_time_s": 0.0, "eval_cpu_s": 0.0, "cached": True}
        self.ddp.print(_eval_line(0, result) + " (the untrained base: kept from an earlier run on the same base, "
                       f"data and settings, which took {result['cached_eval_time_s']}s; "
                       "EDGEQLORA_EVAL_CACHE=0 evaluates it again)")
        metrics.log({"step": 0, **{k: v for k, v in result.items() if k != "samples"}},
                    kind="eval")
        self.ddp.barrier()
        return result


def _eval_line(step: int, result: dict) -> str:
    line = f"eval @ step {step}: loss {result['eval_loss']:.4f}"
    if "exact_match" in result:
        line += (f", exact match {result['exact_match']:.1%}, "
                 f"parse rate {result['parse_rate']:.1%}")
    return line


class Metrics:
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
            f.write(json.dumps({"kind": kind, **jsonable(record)}) + "\n")
        if self.tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()


class Progress:
    """Loss, tokens/s and ETA (main process only): a rich progress bar on a terminal, else a
    plain line every ``EDGEQLORA_PROGRESS_S`` seconds (``edgeqlora.progress``)."""

    def __init__(self, total: int, done: int, enabled: bool):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        from .progress import Ticker, off_terminal

        plain = off_terminal()
        self.ticker = Ticker("train", total, "step", done, enabled=enabled and plain)

        self.progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            disable=not enabled or plain)
        self.task = self.progress.add_task("train", total=total, completed=done, loss="-",
                                           tps="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, tps: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")
        self.ticker.update(step, loss=loss, tok_s=tps)


def final_table(summary: dict, history: dict) -> None:
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
        schema = after.get("schema") or {}
        if "exact_match" in schema:
            table.add_row("with the JSON schema: exact match / valid", "",
                          f"{schema['exact_match']:.1%} / {schema['valid_json']:.1%}")
    quant = summary.get("quantization") or {}
    if quant:
        table.add_row("4-bit vs full base: top-1 / KLD",
                      f"{quant['top1']:.1%} / {quant['kld']:.3f}", "")
    table.add_row("steps / train tokens", "", f"{summary['steps']} / {summary['train_tokens']:,}")
    table.add_row("tokens/s / peak memory", "",
                  f"{summary['tokens_per_s']:,.0f} / {summary['peak_memory_mb']:,.0f} MB")
    Console().print(table)


def jsonable(obj):
    return json.loads(json.dumps(obj, default=str))

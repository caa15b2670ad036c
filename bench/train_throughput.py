"""Training throughput: edgeqlora's trainer against a plain baseline.

The baseline is what a user would write without edgeqlora: transformers ``Trainer`` + PEFT LoRA
on a bitsandbytes NF4 model, padded batches (no packing). Both train the same base, on the same
examples (the embedded IoT task, answer-only labels), with the same LoRA config, batch size,
learning rate and number of steps. Each runs in its own subprocess so peak memory is its own.

Tokens/s counts real (non-padding) tokens of the training examples divided by the time spent in
optimizer steps (model loading and evaluation excluded, for both).

``--device-quant gguf-q4_k_m`` adds our trainer on that device-aware base (the exact GGUF bytes
the export ships, ``edgeqlora.device_base``) beside ours on NF4, with the frozen weights' memory
computed for both as a GPU holds them (NF4: bitsandbytes' packed weights and scales; the device
base: ``GGMLLinear``'s packed GGML rows, or ``onnx-int4``'s MatMulNBits blocks) and each run's
measured peak.

    python bench/train_throughput.py --steps 5 --out bench-train.json
        [--device-quant gguf-q4_k_m | onnx-int4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args) -> dict:
    from edgeqlora.config import build_config
    from edgeqlora.train import train

    cfg = build_config({
        "base": args.base, "data": "embedded:iot", "max_steps": args.steps,
        "batch_size": args.batch, "max_len": args.max_len, "lr": 2e-4, "warmup_steps": 1,
        "packing": not args.no_packing, "eval_examples": 0, "quant_report_tokens": 0,
        "save_every": 0, "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.05,
        "quant": args.quant,
    })
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run")
        records = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text()
                   .splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    tokens = steps[-1]["tokens"]
    seconds = steps[-1]["elapsed_s"]
    cpu = sum(r["cpu_s"] for r in steps)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu,
            "peak_memory_mb": _peak_memory_mb(), "final_loss": steps[-1]["loss"]}


def run_baseline(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from edgeqlora.base import resolve_base
    from edgeqlora.bnb_import import quiet_bnb_import
    from edgeqlora.data import load_dataset, tokenize_dataset

    # bitsandbytes' hub kernel fails its trust check here either way; without this the baseline
    # prints that failure as a warning line. The kernels it runs are the same.
    quiet_bnb_import()
    path = resolve_base(args.base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = tokenize_dataset(tokenizer, load_dataset("embedded:iot").rows,
                                args.max_len).examples
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype),
        dtype=dtype, device_map={"": 0 if cuda else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    tokenizer.pad_token_id = pad_id
    counted = {"batches": [], "seconds": 0.0, "cpu": 0.0}
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)

    def collate(batch):
        counted["batches"].append(sum(len(ex["input_ids"]) for ex in batch))
        return collator(batch)

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            counted["seconds"] += time.perf_counter() - self.t0
            counted["cpu"] += time.process_time() - self.cpu0

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=2e-4, warmup_steps=1, lr_scheduler_type="cosine", logging_steps=1,
            save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda,
            dataloader_num_workers=0, remove_unused_columns=False,
            optim="paged_adamw_8bit" if cuda else "adamw_torch", seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=examples,
                          data_collator=collate, callbacks=[Timer()])
        out = trainer.train()
    # The dataloader may prepare a batch beyond the last step: count the trained ones only.
    counted["tokens"] = sum(counted["batches"][:args.steps])
    return {"tokens": counted["tokens"], "seconds": counted["seconds"],
            "tokens_per_s": counted["tokens"] / counted["seconds"],
            "cpu_seconds": counted["cpu"], "tokens_per_cpu_s": counted["tokens"] / counted["cpu"],
            "peak_memory_mb": _peak_memory_mb(), "final_loss": out.training_loss}


def weight_bits(base: str, quant: str) -> dict:
    """Bits per weight of the decoder's linear layers as a GPU holds them while training (the
    layers LoRA wraps; embeddings and norms stay dense in both)."""
    import torch

    from edgeqlora import qlora
    from edgeqlora.base import resolve_base

    path = resolve_base(base)
    if quant.startswith(("gguf-", "onnx-")):
        from edgeqlora.device_base import load_device_base
        from edgeqlora.ggml_torch import GGMLLinear

        model = load_device_base(path, quant, "float32", "cpu", qlora.load_base, packed=True)
        layers = [m for m in model.modules() if isinstance(m, GGMLLinear)]
        stored = sum(m.qweight.numel() for m in layers)
        weights = sum(m.in_features * m.out_features for m in layers)
    else:
        import bitsandbytes as bnb

        model = qlora.load_base(path, quant, True, "float32", "cpu")
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        stored = 0
        for m in layers:
            st = m.weight.quant_state
            stored += m.weight.data.numel() + st.absmax.numel() * st.absmax.element_size()
            if st.nested:
                stored += st.state2.absmax.numel() * st.state2.absmax.element_size()
        weights = sum(m.in_features * m.out_features for m in layers)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"layers": len(layers), "weights": weights, "bytes": stored,
            "bits_per_weight": stored * 8 / weights}


def _worker(kind: str, args, quant: str = "nf4") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--base", args.base, "--quant", quant,
           "--steps", str(args.steps), "--batch", str(args.batch), "--max-len", str(args.max_len)]
    if args.no_packing:
        cmd.append("--no-packing")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="embedded")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--no-packing", action="store_true", help="our trainer without packing")
    p.add_argument("--device-quant", default=None,
                   help="also our trainer on this device-aware base (e.g. gguf-q4_k_m)")
    p.add_argument("--quant", default="nf4", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = run_ours(args) if args.worker == "ours" else run_baseline(args)
        print(json.dumps(result))
        return 0

    import torch

    results = {"ours": _worker("ours", args), "baseline": _worker("baseline", args)}
    if args.device_quant:
        results["ours_device"] = _worker("ours", args, args.device_quant)
    ratio = results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    # On a shared machine wall time depends on the neighbours; CPU seconds measure the work.
    cpu_ratio = results["ours"]["tokens_per_cpu_s"] / results["baseline"]["tokens_per_cpu_s"]
    mem_ratio = results["ours"]["peak_memory_mb"] / results["baseline"]["peak_memory_mb"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    report = {"benchmark": "train_throughput", "device": device, "base": args.base,
              "steps": args.steps, "batch_size": args.batch, "max_len": args.max_len,
              "packing": not args.no_packing, "torch": torch.__version__, **results,
              "speedup": ratio, "speedup_per_cpu_s": cpu_ratio, "memory_ratio": mem_ratio,
              "load_average": os.getloadavg()}
    if args.device_quant:
        dev, nf4 = results["ours_device"], results["ours"]
        bits = {"nf4": weight_bits(args.base, "nf4"),
                args.device_quant: weight_bits(args.base, args.device_quant)}
        report["device_aware"] = {
            "quant": args.device_quant,
            "tokens_per_s_vs_nf4": dev["tokens_per_s"] / nf4["tokens_per_s"],
            "tokens_per_cpu_s_vs_nf4": dev["tokens_per_cpu_s"] / nf4["tokens_per_cpu_s"],
            "peak_memory_vs_nf4": dev["peak_memory_mb"] / nf4["peak_memory_mb"],
            "weight_memory": bits,
            "weight_memory_vs_nf4": bits[args.device_quant]["bytes"] / bits["nf4"]["bytes"]}

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training throughput: {device}, {args.steps} steps x {args.batch}")
    for col in ("trainer", "tokens", "seconds", "tokens/s", "tokens/CPU-s", "peak memory MB",
                "final loss"):
        table.add_column(col, justify="right" if col != "trainer" else "left")
    for name, label in (("ours", "edgeqlora"), ("ours_device", f"edgeqlora {args.device_quant}"),
                        ("baseline", "HF Trainer")):
        if name not in results:
            continue
        r = results[name]
        table.add_row(label, f"{r['tokens']:,}", f"{r['seconds']:.1f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_cpu_s']:,.1f}",
                      f"{r['peak_memory_mb']:,.0f}",
                      f"{r['final_loss']:.3f}")
    Console().print(table)
    print("edgeqlora: packing + output head on answer positions only; HF Trainer: transformers "
          "Trainer + PEFT + bitsandbytes NF4, padded batches")
    print(f"speedup {ratio:.2f}x tokens/s ({cpu_ratio:.2f}x tokens per CPU-second); "
          f"peak memory ratio {mem_ratio:.2f}")
    if args.device_quant:
        d = report["device_aware"]
        print(f"{args.device_quant} vs NF4: {d['tokens_per_s_vs_nf4']:.2f}x tokens/s "
              f"({d['tokens_per_cpu_s_vs_nf4']:.2f}x per CPU-second), peak memory "
              f"{d['peak_memory_vs_nf4']:.2f}x; linear weights as a GPU holds them "
              + ", ".join(f"{k} {v['bits_per_weight']:.2f} bits" for k, v in
                          d["weight_memory"].items())
              + f" = {d['weight_memory_vs_nf4']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

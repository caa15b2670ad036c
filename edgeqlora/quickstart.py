"""The main job: embedded model + embedded task -> QLoRA -> exports -> parity -> samples.

``edgeqlora quickstart --out DIR`` runs every stage that exists, in order, and ends with one
table: sizes (fp32 / NF4 / each export), task exact match of the base, of the trained model and
of each export, KLD and top-1 agreement against the trained model, decode tokens/s. It sizes
itself: the recipe as written on a GPU (or with ``--full``); on a CPU a short run that fits in
about 20 minutes on 2 cores and still lifts exact match far above the untrained base's.

Output: ``DIR/adapter/``, ``DIR/exports/<target>-<quant>/`` (each with its manifest),
``DIR/parity/``, ``DIR/summary.json`` (the table as data).

``device_aware`` (``--device-aware``) adds the device-aware variant: the same recipe trained
again on the exact Q4_K_M base the device runs (``quant=gguf-q4_k_m``, ``DIR/device-aware/``),
exported unmerged (that base's bytes + the LoRA, ``DIR/exports/gguf-q4_k_m-device-aware/``) and
parity-checked against its own trained model, beside the NF4 run's merged, re-quantized Q4_K_M.
``--device-aware onnx`` does the same on the ONNX int4 base (``quant=onnx-int4``,
``DIR/device-aware-onnx/``, the int4 graph + an onnxruntime adapter file), ``onnx-hqq`` on the
ONNX HQQ base (``quant=onnx-int4-hqq``), ``gguf,onnx`` both.
Each costs another training run (about 8 minutes on 2 cores at the CPU sizing).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .artifacts import prepare_output
from .errors import EdgeQloraError, InputError
from .exporters.onnx import DEFAULT_QUANT as ONNX_DEFAULT_QUANT  # light: no onnx/torch at import

# The recipe's values, cut down for a CPU: the embedded task is learnt in a few dozen steps of
# 8 examples (measured: exact match ~0 -> > 0.9 within 60 steps), and the held-out evaluation
# (greedy decoding of a 4-bit model on CPU) is the other big cost, so it uses fewer examples.
CPU_SIZING = {
    "max_steps": "80",
    "batch_size": "8",
    "warmup_steps": "5",
    "lr": "1e-3",
    "save_every": "40",
    "eval_every": "0",
    "eval_examples": "40",
    "max_new_tokens": "48",
    "quant_report_tokens": "256",
    "parity.eval_examples": "40",
    "parity.text_tokens": "512",
}

# The exports the quickstart makes, in the order of the table: (target, quant). ONNX: the
# exporter's default (chosen by bench/results/onnx_task.json), so the two never disagree.
EXPORTS = (("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_k_m"),
           ("onnx", ONNX_DEFAULT_QUANT))

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
# target -> (quant=, export name, run folder, the export's quant)
DEVICE_AWARE = {"gguf": ("gguf-q4_k_m", "gguf-q4_k_m-device-aware", "device-aware", "q4_k_m"),
                "onnx": ("onnx-int4", "onnx-int4-device-aware", "device-aware-onnx", "int4"),
                "onnx-hqq": ("onnx-int4-hqq", "onnx-int4-hqq-device-aware",
                             "device-aware-onnx-hqq", "int4-hqq")}


def device_aware_targets(device_aware: bool | str | None) -> tuple[str, ...]:
    """The device-aware variants asked for: True is the GGUF one; a string names them
    (``gguf``, ``onnx``, ``onnx-hqq``, ``gguf,onnx``); one line for anything else."""
    if not device_aware:
        return ()
    if device_aware is True:
        return ("gguf",)
    targets = tuple(dict.fromkeys(t.strip().lower() for t in str(device_aware).split(",")))
    unknown = [t for t in targets if t not in DEVICE_AWARE]
    if unknown or not targets:
        raise InputError(f"--device-aware {device_aware}: the targets are "
                         f"{', '.join(DEVICE_AWARE)} (comma-separated)")
    return targets


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def quickstart_config(recipe: str | None, overrides: list[str] | None, full: bool):
    """The recipe (default: recipes/quickstart.yaml when present), the CPU sizing unless on a GPU
    or ``full``, then the user's overrides (they always win)."""
    from .config import load_config

    if recipe is None and DEFAULT_RECIPE.is_file():
        recipe = str(DEFAULT_RECIPE)
    sizing = [] if (full or _has_cuda()) else [f"{k}={v}" for k, v in CPU_SIZING.items()]
    return load_config(recipe, sizing + list(overrides or []))


def _say(msg: str) -> None:
    print(f"quickstart: {msg}", flush=True)


def _exporter_available(target: str) -> str | None:
    """None when the target's exporter exists; else why not."""
    try:
        from .exporters import EXPORTERS
    except ImportError as exc:
        return f"exporters not importable ({exc})"
    if target not in EXPORTERS:
        return f"the {target} exporter is not built yet"
    return None


def _sizes(base_params: int | None) -> dict[str, int]:
    if not base_params:
        return {}
    # NF4 with double quantization: 4 bits a weight + an 8-bit absmax per 64 weights + an fp32
    # absmax per 256 blocks (bitsandbytes' layout); norms and embeddings stay 16-bit, so this
    # is the lower bound a 4-bit checkpoint reaches.
    return {"fp32": base_params * 4, "fp16": base_params * 2,
            "nf4": int(base_params * (0.5 + 1 / 64 + 4 / (64 * 256)))}


def stage_times(timings: dict[str, float]) -> list[tuple[str, float]]:
    """The quickstart's stage times as table rows, in the order they ran; the training stage's
    base evaluation, steps and final evaluation indented under it."""
    names = {"train_s": "training stage", "base_eval_s": "  base evaluation (untrained)",
             "train_steps_s": "  training steps", "final_eval_s": "  final evaluation",
             "parity_s": "parity", "device_aware_s": "device-aware run"}
    rows = []
    for key, seconds in timings.items():
        if key in names:
            label = names[key]
        elif key.startswith("export_") and key.endswith("_s"):
            label = "export " + key[len("export_"):-len("_s")]
        else:
            label = key.removesuffix("_s").replace("_", " ")
        rows.append((label, float(seconds)))
    return rows


def _base_eval(run: Path) -> dict[str, Any]:
    """The step-0 evaluation (the untrained base) from a run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval" and record.get("step") == 0:
            return record
    return {}


def quickstart(out: Path, recipe: str | None = None, overrides: list[str] | None = None,
               force: bool = False, full: bool = False, resume: bool = False,
               device_aware: bool | str = False) -> dict[str, Any]:
    """Run every stage; with ``resume`` an interrupted quickstart in ``out`` continues: training
    resumes from its last checkpoint (a finished one is not redone) and the later stages run
    again. ``device_aware`` adds the device-aware variants (module docstring)."""
    user_overrides = list(overrides or [])
    device_targets = device_aware_targets(device_aware)
    from .train import train

    overrides = list(overrides or []) + (["resume=true"] if resume else [])
    cfg = quickstart_config(recipe, overrides, full)
    out = Path(out)
    if resume:
        if not (out / "checkpoints").is_dir():
            raise InputError(f"cannot resume: {out} holds no quickstart checkpoints; run "
                             "without --resume")
    elif out.exists() and any(out.iterdir()):
        if not force:
            raise InputError(f"{out} already exists and is not empty; pass --force to replace it")
        if not (out / "summary.json").exists() and not (out / "adapter").exists():
            raise InputError(f"{out} does not look like a quickstart run (no summary.json or "
                             "adapter/); refusing to delete it, pick another --out")
        shutil.rmtree(out)
    prepare_output(out, force=True, what="quickstart output")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    not_built: list[str] = []

    # 1. Train (the trainer also measures the untrained base on the held-out set first).
    _say(f"training: {cfg.max_steps} steps of {cfg.batch_size} examples, quant={cfg.quant}, "
         f"lora r={cfg.lora.r} ({'full' if full or _has_cuda() else 'CPU-sized'} run)")
    t0 = time.perf_counter()
    adapter = train(cfg, out)
    timings["train_s"] = time.perf_counter() - t0
    manifest = json.loads((adapter / "manifest.json").read_text())
    metrics = manifest.get("metrics", {})
    before = metrics.get("eval_before") or _base_eval(out)
    after = metrics.get("eval_after", {})
    # The training stage's parts (the rest is loading, the quantization report, the adapter).
    for key, value in (("base_eval_s", before.get("eval_time_s")),
                       ("train_steps_s", metrics.get("train_time_s")),
                       ("final_eval_s", after.get("eval_time_s"))):
        if value is not None:
            timings[key] = float(value)

    # 2. Exports.
    exports: list[dict[str, Any]] = []
    export_dirs: dict[str, Path] = {}
    from .export import export_adapter

    for target, quant in EXPORTS:
        why = _exporter_available(target)
        name = f"{target}-{quant}"
        if why:
            if target not in {n.split(":")[0] for n in not_built}:
                not_built.append(f"{target}: {why}")
            continue
        _say(f"export {name}")
        t0 = time.perf_counter()
        try:
            # The parity gate below is the one that judges; the exporter's own verification
            # still runs (and is recorded) but does not stop the demo.
            em = export_adapter(adapter, out / "exports" / name, target=target, quant=quant,
                                merge_base=cfg.export.merge_base, force=True, keep_failed=True,
                                cfg=cfg, eval_tokens=min(cfg.export.eval_tokens, 1024))
        except EdgeQloraError as exc:
            kept = out / "exports" / name / "manifest.json"
            if not kept.is_file():
                _say(f"export {name} failed: {exc}")
                exports.append({"name": name, "target": target, "quant": quant,
                                "error": str(exc)})
                continue
            # Kept (--keep-failed): the parity report below shows what it costs.
            _say(f"export {name}: {exc}")
            em = json.loads(kept.read_text())
        timings[f"export_{name}_s"] = time.perf_counter() - t0
        export_dirs[name] = out / "exports" / name
        # The whole export dir (model file + tokenizer + template), as it ships.
        size = sum(f["size_bytes"] for f in em.get("files", {}).values())
        exports.append({"name": name, "target": target, "quant": quant,
                        "path": str(out / "exports" / name), "size_bytes": int(size),
                        "merge_base": (em.get("merge") or {}).get("merge_base"),
                        "device_aware": bool(em.get("device_aware"))})

    # 3. Parity of every export against the trained model (NF4 base + adapter, in torch).
    parity: dict[str, Any] = {}
    if export_dirs:
        from .errors import ParityError
        from .parity import run_parity

        _say(f"parity: {', '.join(export_dirs)} vs the trained model")
        t0 = time.perf_counter()
        try:
            parity = run_parity(adapter, list(export_dirs.values()), out / "parity", cfg,
                                max_new_tokens=cfg.max_new_tokens, force=True,
                                allow_failed=True)
        except ParityError as exc:
            _say(str(exc))
            parity = json.loads((out / "parity" / "parity.json").read_text())
        timings["parity_s"] = time.perf_counter() - t0
        cands = parity.get("candidates", {})
        for row in exports:
            if cands.get(row["name"]):
                row.update(_parity_figures(parity, row["name"]))
        ref = parity.get("reference", {}).get("task", {})
        parity_reference_em = ref.get("exact_match")
    else:
        parity_reference_em = None

    device_runs: list[dict[str, Any]] = []
    for target in device_targets:
        t0 = time.perf_counter()
        device_runs.append(_device_aware_variant(out, target, recipe, user_overrides, full,
                                                 resume))
        exports.append(device_runs[-1].pop("row"))
        timings["device_aware_s"] = timings.get("device_aware_s", 0.0) + \
            time.perf_counter() - t0

    # 4. Sample generations through the runtime shims, and each export's decode speed.
    samples = _samples(export_dirs)
    for row in exports:
        if row["name"] in export_dirs:
            row["decode_tokens_per_s"] = _decode_speed(export_dirs[row["name"]])

    from .base import base_fingerprint, resolve_base

    fp = base_fingerprint(resolve_base(cfg.base), cfg.base)
    summary = {
        "base": cfg.base,
        "base_exact_match": before.get("exact_match"),
        "trained_exact_match": after.get("exact_match"),
        "trained_exact_match_parity_set": parity_reference_em,
        "base_field_accuracy": before.get("field_accuracy"),
        "trained_field_accuracy": after.get("field_accuracy"),
        "eval_examples": cfg.eval_examples,
        "train": {k: metrics.get(k) for k in ("steps", "train_tokens", "tokens_per_s",
                                              "train_time_s", "peak_memory_mb")},
        "quantization_loss": metrics.get("quantization"),
        "sizes": {**_sizes(fp.get("num_parameters")),
                  "adapter": sum(f["size_bytes"] for f in manifest.get("files", {}).values())},
        "exports": exports,
        "parity_passed": parity.get("passed") if parity else None,
        "device_aware": device_runs or None,
        "samples": samples,
        "not_built": not_built,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_table(summary)
    return summary


def _device_aware_variant(out: Path, target_name: str, recipe: str | None,
                          overrides: list[str], full: bool, resume: bool) -> dict[str, Any]:
    """Train the recipe on the device's own 4-bit base (GGUF Q4_K_M or ONNX int4), export it
    unmerged, gate it against that trained model. Returns the export's table row (``row``)
    and the run's figures."""
    from .errors import ParityError
    from .export import export_adapter
    from .parity import run_parity
    from .train import train

    quant, name, folder, export_quant = DEVICE_AWARE[target_name]
    run = out / folder
    again = resume and (run / "checkpoints").is_dir()
    cfg = quickstart_config(recipe, [*overrides, f"quant={quant}", "eval_base=false",
                                     f"resume={'true' if again else 'false'}"], full)
    _say(f"device-aware: the same recipe on the {quant} base the device runs")
    adapter = train(cfg, run)
    metrics = json.loads((adapter / "manifest.json").read_text()).get("metrics", {})
    figures: dict[str, Any] = {
        "quant": quant, "export": name,
        "trained_exact_match": (metrics.get("eval_after") or {}).get("exact_match"),
        "train": {k: metrics.get(k) for k in ("steps", "tokens_per_s", "train_time_s",
                                              "peak_memory_mb")}}
    target = out / "exports" / name
    row: dict[str, Any] = {"name": name, "target": quant.split("-")[0], "quant": export_quant,
                           "device_aware": True}
    _say(f"export {name} (the trained base's bytes + the LoRA, unmerged)")
    try:
        em = export_adapter(adapter, target, force=True, keep_failed=True, cfg=cfg,
                            eval_tokens=min(cfg.export.eval_tokens, 1024))
    except EdgeQloraError as exc:
        if not (target / "manifest.json").is_file():
            _say(f"export {name} failed: {exc}")
            return {**figures, "row": {**row, "error": str(exc)}}
        _say(f"export {name}: {exc}")
        em = json.loads((target / "manifest.json").read_text())
    row.update(path=str(target), merge_base=None,
               size_bytes=int(sum(f["size_bytes"] for f in em.get("files", {}).values())))
    _say(f"parity: {name} vs its own trained model (the {quant} base + LoRA)")
    try:
        report = run_parity(adapter, [target], run / "parity", cfg, force=True,
                            max_new_tokens=cfg.max_new_tokens, allow_failed=True)
    except ParityError as exc:
        _say(str(exc))
        report = json.loads((run / "parity" / "parity.json").read_text())
    row.update(_parity_figures(report, name), reference="its own trained model",
               decode_tokens_per_s=_decode_speed(target))
    figures["trained_exact_match_parity_set"] = \
        report.get("reference", {}).get("task", {}).get("exact_match")
    return {**figures, "row": row}


def _parity_figures(report: dict[str, Any], name: str) -> dict[str, Any]:
    """One candidate's figures in a parity report, as the summary's export rows hold them."""
    c = report.get("candidates", {}).get(name) or {}
    task, everything = c.get("task", {}), c.get("all", {})
    schema = task.get("constrained") or {}
    return {"exact_match": task.get("exact_match"),
            "exact_match_schema": schema.get("exact_match"),
            "valid_json": schema.get("valid_json_unconstrained"),
            "valid_json_schema": schema.get("valid_json"),
            "kld": everything.get("mean_kld"),
            "top1": everything.get("top1"), "task_kld": task.get("mean_kld"),
            "identical_answers": task.get("identical_answers"),
            "parity_examples": task.get("examples"),
            "passed": not report.get("failures", {}).get(name)}


def _decode_speed(path: Path, new_tokens: int = 64) -> float | None:
    """Decode tokens/s of one export through its runtime shim (greedy, a held-out prompt)."""
    from . import runtimes
    from .runtimes.base import Completion

    rt = runtimes.load(path)
    try:
        prompt = rt.render_chat([{"role": "user", "content": "Describe a smart home in detail."}])
        result = Completion()
        first = None
        for _ in rt.complete(prompt, max_new_tokens=new_tokens, temperature=0.0,
                             result=result):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        # Decode rate after the first token (prefill excluded).
        n = result.completion_tokens - 1
        return round(n / (end - first), 1) if first and n > 0 and end > first else None
    finally:
        rt.close()


def _samples(export_dirs: dict[str, Path], n: int = 3) -> list[dict[str, Any]]:
    """Answers to a few held-out commands, through the smallest export's runtime."""
    if not export_dirs:
        return []
    from . import runtimes
    from .data import load_dataset

    rows = load_dataset("embedded:iot:eval").rows[:n]
    name, path = min(export_dirs.items(), key=lambda kv: _dir_size(kv[1]))
    rt = runtimes.load(path)
    try:
        out = []
        for row in rows:
            prompt = [m for m in row["messages"] if m["role"] != "assistant"]
            text = rt.chat(prompt, max_new_tokens=64, temperature=0.0)
            out.append({"export": name, "command": prompt[-1]["content"], "answer": text.strip(),
                        "expected": row["messages"][-1]["content"]})
        return out
    finally:
        rt.close()


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "mb":
        return f"{value / 1e6:,.1f} MB"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Wide enough for the table even when stdout is not a terminal (make demo | tee ...).
    console = Console(width=None if Console().is_terminal else 120)
    table = Table(title="edgeqlora quickstart")
    for col in ("model", "size", "exact match", "with schema", "KLD vs trained",
                "top-1 vs trained", "identical answers", "decode tok/s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    sizes = summary.get("sizes", {})
    table.add_row("base (fp32)", _fmt(sizes.get("fp32"), "mb"),
                  _fmt(summary.get("base_exact_match"), "pct"), "", "", "", "", "")
    table.add_row("trained (NF4 + LoRA)", ">= " + _fmt(sizes.get("nf4"), "mb"),
                  _fmt(summary.get("trained_exact_match"), "pct"), "", "reference", "", "",
                  "")
    runs = {d.get("export"): d for d in summary.get("device_aware") or []}
    for row in summary.get("exports", []):
        device = runs.get(row["name"]) if row.get("device_aware") else None
        if device:
            table.add_row(f"trained ({device['quant']} base + LoRA)", "",
                          _fmt(device.get("trained_exact_match"), "pct"), "",
                          "reference for the row below", "", "", "")
        if "error" in row:
            table.add_row(row["name"], "failed", "-", "-", "-", "-", "-", "-")
            continue
        table.add_row(row["name"], _fmt(row.get("size_bytes"), "mb"),
                      _fmt(row.get("exact_match"), "pct"),
                      _fmt(row.get("exact_match_schema"), "pct"), _fmt(row.get("kld")),
                      _fmt(row.get("top1"), "pct"), _fmt(row.get("identical_answers")),
                      _fmt(row.get("decode_tokens_per_s")))
    console.print(table)
    times = stage_times(summary.get("timings_s") or {})
    if times:
        stages = Table(title="where the time went")
        stages.add_column("stage")
        stages.add_column("seconds", justify="right")
        for name, seconds in times:
            stages.add_row(name, f"{seconds:,.1f}")
        stages.add_row("total", f"{summary.get('total_s') or 0:,.1f}")
        console.print(stages)
    for s in summary.get("samples", []):
        console.print(f"[bold]{s['command']}[/bold] -> {s['answer']}  ({s['export']})")
    for what in summary.get("not_built", []):
        console.print(f"not built yet: {what}")
    console.print(f"total {summary.get('total_s')} s; details in summary.json")

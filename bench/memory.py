"""Memory savings: parameter count, bytes per format, and resident memory in each runtime.

For a trained adapter and any number of its exports, one table:

- the base model's parameter count and its weight bytes in fp32, fp16 and bitsandbytes NF4 as
  QLoRA loads it (4-bit weights in blocks of 64; with double quantization each block's absmax
  is itself quantized to 8 bits with an fp32 scale per 256 blocks; embeddings, norms and
  anything else not quantized kept in fp32, as ``edgeqlora.qlora.load_base`` does). NF4 is
  computed from the checkpoint's tensor shapes *and* measured as the bytes of every tensor of
  the model loaded in torch (weights, quantization state, buffers); both are reported;
- the LoRA adapter (parameters, fp32 bytes, file size);
- the trained model in torch (NF4 base + adapter, ``edgeqlora.qlora.load_trained``): the
  reference point, with its measured RSS;
- each export: model file bytes on disk, bits per base parameter, and the measured RSS of its
  runtime (``edgeqlora.devices.measure.measure_rss``: a fresh process, the backend imported
  before the baseline, load, decode ``--fill`` prompt tokens + 8 generated).

Every RSS figure is measured in its own fresh process and given as growth over that process's
baseline (interpreter + the runtime's libraries, already imported): "loaded" right after loading,
"peak" the high-water mark (VmHWM) after generating, which includes transients of the load.
Linux only (``/proc/self/status``). No timings: they would depend on the machine's load.

    python bench/memory.py ADAPTER_DIR [EXPORT_DIR_OR_GGUF ...] [--context 512] [--fill 64]
                           [--threads 1] [--no-torch] [--out bench/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

MiB = 2**20
BLOCK = 64           # bitsandbytes 4-bit block size (the manifest records it)
NESTED_BLOCK = 256   # bitsandbytes double quantization: absmax blocks of 256, 8-bit codes
NF4_CODE = 16        # fp32 entries of the NF4 code table, one per quantized layer
NESTED_CODE = 256    # fp32 entries of the 8-bit dynamic code for the absmax, one per layer


def _safetensors_shapes(files: list[Path]) -> dict[str, tuple[list[int], str]]:
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="np") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                out[name] = (list(sl.get_shape()), sl.get_dtype())
    return out


def _quantized(name: str, shape: list[int]) -> bool:
    """Which weights bitsandbytes replaces with 4-bit layers: every nn.Linear but the output
    head (transformers keeps lm_head unquantized). In a Llama-family checkpoint those are the
    2-D ``*_proj.weight`` tensors; embeddings and norms stay as they are."""
    return len(shape) == 2 and name.endswith("_proj.weight") and "lm_head" not in name


def nf4_bytes(numel: int, block: int = BLOCK, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one 4-bit weight of ``numel`` elements (see module doc)."""
    blocks = math.ceil(numel / block)
    packed = math.ceil(numel / 2) + NF4_CODE * 4
    if not double_quant:
        return packed + blocks * 4  # fp32 absmax per block
    # uint8 absmax per block + fp32 scale per nested block + its code table + fp32 offset
    return packed + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + NESTED_CODE * 4 + 4


def base_sizes(base_dir: Path, block: int, double_quant: bool) -> dict[str, Any]:
    shapes = _safetensors_shapes(sorted(base_dir.glob("*.safetensors")))
    params = quantized = 0
    nf4 = 0
    for name, (shape, _) in shapes.items():
        n = math.prod(shape)
        params += n
        if _quantized(name, shape):
            quantized += n
            nf4 += nf4_bytes(n, block, double_quant)
        else:
            nf4 += n * 4  # kept in fp32
    return {"params": params, "quantized_params": quantized, "fp32_bytes": params * 4,
            "fp16_bytes": params * 2, "nf4_bytes": nf4,
            "nf4_quantized_tensors": sum(_quantized(k, s) for k, (s, _) in shapes.items())}


def adapter_sizes(adapter_dir: Path) -> dict[str, Any]:
    files = sorted(adapter_dir.glob("adapter_model*.safetensors"))
    shapes = _safetensors_shapes(files)
    params = sum(math.prod(s) for s, _ in shapes.values())
    return {"params": params, "fp32_bytes": params * 4,
            "file_bytes": sum(f.stat().st_size for f in files)}


def _base_dir(manifest: dict[str, Any]) -> Path:
    # As load_trained: the recorded path, or the spec resolved again on this machine.
    from edgeqlora.base import resolve_base

    base = manifest.get("base", {})
    path = Path(base.get("path", ""))
    return path if (path / "config.json").is_file() else resolve_base(base.get("spec",
                                                                               "embedded"))


def _tensor_bytes(model) -> int:
    """Bytes of every distinct tensor the model holds: parameters, buffers and, for 4-bit
    layers, the quantization state (absmax, codes, nested state), counted once each."""
    import bitsandbytes as bnb

    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if t is None:
            return
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state is not None:
            qs = m.weight.quant_state
            for t in (qs.absmax, qs.code, qs.offset):
                add(t)
            if qs.state2 is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    return total


def mapped_rss(suffix: str) -> int:
    """Resident bytes of this process's mappings of files ending in ``suffix`` (/proc smaps)."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                current = len(head) >= 6 and head[-1].endswith(suffix)
            elif current and head and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def torch_worker(adapter_dir: str, fill: int, threads: int) -> dict[str, Any]:
    """Load the trained model exactly as trained and generate, reporting memory (this process
    must be fresh: ``main`` runs it with --worker)."""
    from edgeqlora.bnb_import import quiet_bnb_import

    quiet_bnb_import()  # before the baseline: library, not model (and no hub kernels)
    import peft  # noqa: F401
    import torch
    import transformers

    from edgeqlora import qlora
    from edgeqlora.artifacts import read_manifest
    from edgeqlora.devices.measure import GENERATED, FILLER, process_memory

    torch.set_num_threads(threads)
    before = process_memory()
    model = qlora.load_trained(adapter_dir, device="cpu")
    loaded = process_memory()
    tok = transformers.AutoTokenizer.from_pretrained(_base_dir(read_manifest(adapter_dir)))
    ids = tok(FILLER * (fill // 10 + 2), return_tensors="pt")["input_ids"][:, :fill]
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                       max_new_tokens=GENERATED, do_sample=False)
    after = process_memory()
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"tensor_bytes": _tensor_bytes(model), "lora_params": lora,
            "prompt_tokens": int(ids.shape[1]), "base_rss": before["VmRSS"],
            "loaded_rss": loaded["VmRSS"], "peak_rss": after["VmHWM"],
            "delta_loaded": loaded["VmRSS"] - before["VmRSS"],
            "delta_rss": after["VmHWM"] - before["VmRSS"],
            "delta_anon": after["RssAnon"] - before["RssAnon"],
            "delta_file": after["RssFile"] - before["RssFile"],
            # Tensors kept in the checkpoint's dtype (fp32 embeddings, norms) can stay views
            # of transformers' memory map of the safetensors file: resident, but file-backed.
            "checkpoint_mapped": mapped_rss(".safetensors")}


def measure_torch(adapter_dir: Path, fill: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, str(adapter_dir), "--worker", "--fill", str(fill),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"torch measurement failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_files(path: Path) -> tuple[str, int, int]:
    """(label, bytes of the model and adapter files, bytes of the whole export)."""
    from edgeqlora.artifacts import read_manifest
    from edgeqlora.runtimes import model_files

    if path.is_file():
        return "gguf", path.stat().st_size, path.stat().st_size
    manifest = read_manifest(path, "export")
    model, adapter = model_files(path, manifest, manifest["target"])
    # ONNX keeps its weights in external data files named after the model (model.onnx.data).
    weights = [p for p in path.iterdir() if p.name.startswith(model.name)]
    if adapter is not None:
        weights.append(adapter)
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    label = f"{manifest['target']} {manifest.get('quant', '?')}" + (
        " + adapter" if adapter is not None else "")
    return label, sum(p.stat().st_size for p in weights), total


def _mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", type=Path, help="adapter directory written by 'edgeqlora train'")
    p.add_argument("exports", type=Path, nargs="*", help="export directories or .gguf files")
    p.add_argument("--context", type=int, default=512, help="runtime context size (n_ctx)")
    p.add_argument("--fill", type=int, default=64, help="prompt tokens decoded before measuring")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-torch", action="store_true",
                   help="skip loading the trained model in torch (computed NF4 size only)")
    p.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(torch_worker(str(args.adapter), args.fill, args.threads)))
        return 0
    if not Path("/proc/self/status").is_file():
        print("measuring RSS needs Linux (/proc/self/status)", file=sys.stderr)
        return 2

    from edgeqlora.artifacts import read_manifest
    from edgeqlora.devices.measure import measure_rss

    manifest = read_manifest(args.adapter, "adapter")
    quant = manifest.get("quant", {})
    block = int(quant.get("block_size") or BLOCK)
    double = bool(quant.get("double_quant", True))
    base = base_sizes(_base_dir(manifest), block, double)
    lora = adapter_sizes(args.adapter)
    rows: list[dict[str, Any]] = [
        {"name": "base fp32", "kind": "computed", "params": base["params"],
         "bytes": base["fp32_bytes"]},
        {"name": "base fp16", "kind": "computed", "params": base["params"],
         "bytes": base["fp16_bytes"]},
        {"name": f"base NF4{' double-quant' if double else ''}", "kind": "computed",
         "params": base["params"], "bytes": base["nf4_bytes"]},
        {"name": "LoRA adapter fp32", "kind": "computed", "params": lora["params"],
         "bytes": lora["fp32_bytes"], "disk_bytes": lora["file_bytes"]},
    ]
    if not args.no_torch:
        print("measuring the trained model in torch ...", file=sys.stderr)
        t = measure_torch(args.adapter, args.fill, args.threads)
        rows.append({"name": "trained: NF4 base + LoRA (torch)", "kind": "measured",
                     "params": base["params"] + t["lora_params"], "bytes": t["tensor_bytes"],
                     "disk_bytes": lora["file_bytes"], "rss_loaded": t["delta_loaded"],
                     "rss_peak": t["delta_rss"], "process_peak": t["peak_rss"],
                     "rss_anon": t["delta_anon"], "rss_file": t["delta_file"],
                     "rss_checkpoint_mapped": t["checkpoint_mapped"]})
    for path in args.exports:
        print(f"measuring {path} ...", file=sys.stderr)
        label, weights, total = export_files(path)
        m = measure_rss(path, args.context, args.fill, args.threads)
        rows.append({"name": f"{path.name} ({label})", "kind": "measured",
                     "runtime": m["runtime"], "params": base["params"], "bytes": weights,
                     "disk_bytes": total, "rss_loaded": m["loaded_rss"] - m["base_rss"],
                     "rss_peak": m["delta_rss"], "process_peak": m["peak_rss"],
                     "rss_anon": m["delta_anon"], "rss_file": m["delta_file"]})
    for r in rows:
        r["bits_per_param"] = r["bytes"] * 8 / r["params"]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Memory: {manifest.get('base', {}).get('spec', 'base')} "
                        f"({base['params'] / 1e6:.1f}M parameters, "
                        f"{base['quantized_params'] / 1e6:.1f}M of them in 4-bit layers)")
    for col in ("format", "weights MiB", "bits/param", "on disk MiB", "RSS loaded MiB",
                "RSS peak MiB", "anon / file MiB", "process peak MiB"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for r in rows:
        table.add_row(r["name"], _mib(r["bytes"]), f"{r['bits_per_param']:.2f}",
                      _mib(r.get("disk_bytes")), _mib(r.get("rss_loaded")),
                      _mib(r.get("rss_peak")),
                      f"{_mib(r['rss_anon'])} / {_mib(r['rss_file'])}" if "rss_anon" in r
                      else "-", _mib(r.get("process_peak")))
    Console().print(table)
    if not args.no_torch:
        print(f"NF4 base: computed from shapes {_mib(base['nf4_bytes'])} MiB; the trained model's "
              f"tensors in torch {_mib(t['tensor_bytes'])} MiB (base + LoRA "
              f"{_mib(lora['fp32_bytes'])} MiB); of its RSS, {_mib(t['checkpoint_mapped'])} "
              "MiB are pages of the base checkpoint that transformers keeps memory-mapped")
    print(f"RSS: growth over a fresh process with the runtime's libraries imported; context "
          f"{args.context}, {args.fill} prompt tokens + 8 generated, {args.threads} thread(s)")

    result = {"adapter": args.adapter.name, "base": manifest.get("base", {}).get("spec"),
              "base_sizes": base, "adapter_sizes": lora,
              "quant": {"block_size": block, "double_quant": double},
              "settings": {"context": args.context, "fill": args.fill, "threads": args.threads},
              "rows": rows,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from edgeqlora.errors import EdgeQloraError

    try:
        sys.exit(main())
    except EdgeQloraError as exc:  # a user mistake (wrong directory...): one line, as the CLI
        print(f"bench/memory.py: error: {exc}", file=sys.stderr)
        sys.exit(2)

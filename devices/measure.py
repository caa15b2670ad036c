"""Measure the resident memory of the runtime shim, to check the fit model against reality.

``python -m edgeqlora.devices.measure MODEL --context N --fill T`` loads MODEL (an export dir of
any target, or a .gguf) through ``edgeqlora.runtimes.load`` in this process, decodes a prompt of
``T`` tokens plus a few generated ones, and prints JSON: the process RSS before loading (after
the runtime's imports), the peak RSS (VmHWM) after generating, and the delta. Run it in a fresh
interpreter (``measure_rss`` does) so that no earlier allocation hides in the numbers. Linux
only: it reads ``/proc/self/status``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeqlora.errors import DeviceError

GENERATED = 8
# Plain English that tokenizes to ~1 token per word: repeated up to the requested fill.
FILLER = ("The kitchen light is on and the heating in the living room is set to twenty "
           "degrees while the front door stays locked. ")


# Per export target: the modules its runtime loads, imported before the baseline so that their
# code and libraries count as process base, not as the model's memory.
BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "gguf": ("edgeqlora.runtimes.gguf", "llama_cpp"),
    "onnx": ("edgeqlora.runtimes.onnx", "onnxruntime", "tokenizers"),
}


def export_target(model: str | Path) -> str:
    """The runtime target of MODEL as ``runtimes.load`` decides it: the manifest's ``target``
    for an export dir, the magic bytes for a bare file."""
    from edgeqlora.artifacts import read_manifest
    from edgeqlora.runtimes.gguf import is_gguf

    p = Path(model)
    if p.is_dir():
        target = read_manifest(p).get("target")
        if target not in BACKEND_MODULES:
            raise DeviceError(f"{p}: export target {target!r} has no memory measurement; known: "
                              f"{', '.join(sorted(BACKEND_MODULES))}")
        return target
    if is_gguf(p):
        return "gguf"
    raise DeviceError(f"{p} is neither an export directory nor a GGUF file")


def process_memory() -> dict[str, int]:
    """This process's VmRSS, VmHWM (peak RSS), RssAnon and RssFile in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _measure(model: str, context: int, fill: int, threads: int) -> dict[str, Any]:
    from edgeqlora import runtimes

    target = export_target(model)
    for name in BACKEND_MODULES[target]:
        importlib.import_module(name)

    before = process_memory()
    rt = runtimes.load(model, n_ctx=context, n_threads=threads)
    loaded = process_memory()
    ids = rt.tokenize(FILLER * (fill // 10 + 2))[:fill]
    rt.generate(ids, max_new_tokens=min(GENERATED, context - len(ids)))
    after = process_memory()
    rt.close()
    return {"model": model, "runtime": target, "context": context, "prompt_tokens": len(ids),
            "generated_tokens": GENERATED, "base_rss": before["VmRSS"],
            "loaded_rss": loaded["VmRSS"], "peak_rss": after["VmHWM"],
            "delta_rss": after["VmHWM"] - before["VmRSS"],
            "delta_anon": after["RssAnon"] - before["RssAnon"],
            "delta_file": after["RssFile"] - before["RssFile"]}


def measure_rss(model: str | Path, context: int, fill: int, threads: int = 1,
                timeout: float = 600) -> dict[str, Any]:
    """Run the measurement in a fresh Python process and return its JSON."""
    cmd = [sys.executable, "-m", "edgeqlora.devices.measure", str(model), "--context",
           str(context), "--fill", str(fill), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise DeviceError(f"measuring {model} failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeqlora.devices.measure",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--fill", type=int, default=64, help="prompt tokens to decode")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not Path("/proc/self/status").is_file():
        print("measuring RSS needs Linux (/proc/self/status)", file=sys.stderr)
        return 2
    print(json.dumps(_measure(args.model, args.context, args.fill, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

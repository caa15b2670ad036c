"""``edgeqlora quickstart``: the embedded model and task, trained, exported, parity-checked, demo."""

from __future__ import annotations

from pathlib import Path

from ._common import add_config_args, add_threads_arg, split_recipe

HELP = "embedded model + task: train, export, parity, demo"


def add_arguments(p) -> None:
    add_threads_arg(p)
    add_config_args(p)
    p.add_argument("--out", default="runs/quickstart", help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--full", action="store_true",
                   help="the full-size run even on CPU (default: sized to the machine)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted quickstart in --out from its last checkpoint")
    p.add_argument("--device-aware", nargs="?", const="gguf", default=None,
                   metavar="TARGETS",
                   help="also train on the exact 4-bit base the device runs and ship that "
                        "base + the LoRA unmerged, beside the merged re-quantized exports: "
                        "gguf (Q4_K_M, the default), onnx (int4), onnx-hqq (int4-hqq) or "
                        "gguf,onnx (another training run each)")


def run(args) -> int:
    from ..quickstart import quickstart

    recipe, overrides = split_recipe(args.recipe_and_overrides)
    quickstart(Path(args.out), recipe=recipe, overrides=overrides, force=args.force,
               full=args.full, resume=args.resume, device_aware=args.device_aware)
    return 0

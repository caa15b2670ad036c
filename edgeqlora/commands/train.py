"""``edgeqlora train [RECIPE.yaml] [key=value ...] [--out DIR]``: QLoRA fine-tuning -> adapter/."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ._common import add_config_args, add_threads_arg, load_cfg

HELP = "QLoRA fine-tuning: base model + data -> adapter/"


def add_arguments(p) -> None:
    add_threads_arg(p)
    add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default runs/<timestamp>)")


def run(args) -> int:
    from ..train import train

    cfg = load_cfg(args)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    adapter = train(cfg, out)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        print(f"adapter written to {adapter}")
    return 0

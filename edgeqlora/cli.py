"""The ``edgeqlora`` command line: a table of subcommands over the library API.

Each command parses its arguments, calls one library function and prints a short result. Errors
meant for users (EdgeQloraError) print one line on stderr and exit non-zero (2 for usage and
input errors); ``--debug`` shows the traceback. Heavy libraries are imported inside the command
that needs them, so ``edgeqlora --help`` and the device-side commands stay torch-free.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import EdgeQloraError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe_and_overrides", nargs="*", metavar="[RECIPE.yaml] [key=value ...]",
                   help="an optional YAML recipe, then key=value overrides (they win)")


def _split_recipe(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _load_cfg(args):
    from .config import load_config

    recipe, overrides = _split_recipe(args.recipe_and_overrides)
    return load_config(recipe, overrides)


# ---------------------------------------------------------------------------------------------
# config


def _add_config(sub):
    p = sub.add_parser("config", help="show the resolved config")
    s = p.add_subparsers(dest="config_cmd", required=True)
    show = s.add_parser("show", help="print the config after recipe and overrides")
    _add_config_args(show)
    p.set_defaults(func=_cmd_config)


def _cmd_config(args) -> int:
    from .config import to_yaml

    print(to_yaml(_load_cfg(args)), end="")
    return 0


# ---------------------------------------------------------------------------------------------
# train


def _add_train(sub):
    p = sub.add_parser("train", help="QLoRA fine-tuning: base model + data -> adapter/")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default runs/<timestamp>)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .train import train

    cfg = _load_cfg(args)
    out = Path(args.out) if args.out else _default_run_dir()
    adapter = train(cfg, out)
    print(f"adapter written to {adapter}")
    return 0


def _default_run_dir() -> Path:
    import time

    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------------
# quickstart


def _add_quickstart(sub):
    p = sub.add_parser("quickstart", help="embedded model + task: train, export, parity, demo")
    _add_config_args(p)
    p.add_argument("--out", default="runs/quickstart", help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--full", action="store_true",
                   help="the full-size run even on CPU (default: sized to the machine)")
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(args) -> int:
    from .quickstart import quickstart

    recipe, overrides = _split_recipe(args.recipe_and_overrides)
    quickstart(Path(args.out), recipe=recipe, overrides=overrides, force=args.force,
               full=args.full)
    return 0


# ---------------------------------------------------------------------------------------------
# stages that land in later issues: named here so the command names are final


def _not_built(name: str, issue: str):
    def handler(args) -> int:
        raise EdgeQloraError(f"'edgeqlora {name}' is not built yet (see the {issue} issue)")

    return handler


def _add_pending(sub, name: str, help_text: str, issue: str):
    p = sub.add_parser(name, help=f"{help_text} (not built yet)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_not_built(name, issue))


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeqlora",
        description="Fine-tune a small LLM with QLoRA, export it to GGUF or ONNX int4, run it "
                    "on a device, with parity proof.",
    )
    parser.add_argument("--version", action="version", version=f"edgeqlora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_quickstart(sub)
    _add_train(sub)
    _add_pending(sub, "export", "merge and export an adapter to GGUF or ONNX", "GGUF export")
    _add_pending(sub, "parity", "compare exports with the trained model", "parity")
    _add_pending(sub, "run", "generate with an export through its runtime", "runtimes")
    _add_pending(sub, "serve", "OpenAI-compatible HTTP server over an export", "runtimes")
    _add_pending(sub, "devices", "device profiles and the fit check", "devices")
    _add_pending(sub, "bench", "run the benchmarks in bench/", "benchmarks")
    _add_config(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgeQloraError as exc:
        if args.debug:
            raise
        print(f"edgeqlora {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"edgeqlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

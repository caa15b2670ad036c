"""The ``edgeqlora`` command line: a table of subcommands over the library API.

``COMMANDS`` maps each command name to its module in ``edgeqlora.commands``; a module parses its
arguments, calls one library function and prints a short result (see
``edgeqlora/commands/__init__.py``). Only the module of the command being run is imported, and
heavy libraries load inside its ``run``, so ``edgeqlora --help`` and a device's ``edgeqlora run``
stay torch-free and fast.

Errors meant for users (EdgeQloraError) print one line on stderr and exit with the error's code
(2 for usage and input errors, 1 for a failed gate); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import EdgeQloraError

COMMANDS = {
    "quickstart": "edgeqlora.commands.quickstart",
    "train": "edgeqlora.commands.train",
    "export": "edgeqlora.commands.export",
    "parity": "edgeqlora.commands.parity",
    "run": "edgeqlora.commands.run",
    "serve": "edgeqlora.commands.serve",
    "devices": "edgeqlora.commands.devices",
    "bundle": "edgeqlora.commands.bundle",
    "bench": "edgeqlora.commands.bench",
    "config": "edgeqlora.commands.config",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only``, that command's arguments alone are filled in and the
    other commands stay bare names, so that their modules are not imported."""
    parser = argparse.ArgumentParser(
        prog="edgeqlora",
        description="Fine-tune a small LLM with QLoRA, export it to GGUF or ONNX int4, run it "
                    "on a device, with parity proof.",
    )
    parser.add_argument("--version", action="version", version=f"edgeqlora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _command_index(argv: list[str]) -> int | None:
    """Where the command name is in ``argv``: the first word that is not a top-level flag (the
    top-level flags take no value). None when there is none, it is not a known command, or
    top-level help comes first (that lists every command, so the full parser prints it)."""
    for i, word in enumerate(argv):
        if word == "-h" or word.startswith("--h"):
            return None
        if not word.startswith("-"):
            return i if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    i = _command_index(argv)
    only = None if i is None else argv[i]
    if only is not None:
        module = importlib.import_module(COMMANDS[only])
        normalize = getattr(module, "normalize_argv", None)
        if normalize is not None:
            argv = argv[:i + 1] + normalize(argv[i + 1:])
    # No known command (--help, --version, a typo): the full parser prints the list or the error.
    args = build_parser(only).parse_args(argv)
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

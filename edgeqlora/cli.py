"""The ``edgeqlora`` command line: a table of subcommands over the library API.

``COMMANDS`` maps each command name to its module in ``edgeqlora.commands``; a module parses its
arguments, calls one library function and prints a short result (see
``edgeqlora/commands/__init__.py``). Only the module of the command being run is imported, and
heavy libraries load inside its ``run``, so ``edgeqlora --help`` and a device's ``edgeqlora run``
stay torch-free and fast.

Errors meant for users (EdgeQloraError) print one line on stderr and exit with the error's code
(2 for usage and input errors, 1 for a failed gate); ``--debug`` shows the traceback instead.
Anything else still prints one line: a filesystem error names the path (exit 2; a full disk says
so), anything unforeseen names its type and points to ``--debug`` (exit 1). SIGTERM unwinds
like Ctrl-C, so every command's cleanup runs (exit 143).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys
import threading

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
    parser.command_parsers = {}  # name -> its parser, so that its errors print its own usage
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
        parser.command_parsers[name] = p
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, except that a recipe or ``key=value`` words may also come after the
    options (``export ADAPTER --target onnx recipe.yaml lr=1``): argparse hands back positional
    words that follow an option once the positionals are filled, so they join the recipe list in
    the order typed. Anything else left over is the command's own usage error, not the top-level
    one."""
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    if hasattr(args, "recipe_and_overrides") and not any(w.startswith("-") for w in extra):
        args.recipe_and_overrides = list(args.recipe_and_overrides) + extra
        return args
    own = parser.command_parsers.get(getattr(args, "command", None), parser)
    own.error("unrecognized arguments: " + " ".join(extra))  # exits 2
    return args


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
    args = parse(build_parser(only), argv)
    if not sys.stderr.isatty():
        _no_library_progress_bars()
    previous = _catch_sigterm()
    try:
        if getattr(args, "threads", None) is not None:
            from . import threads

            threads.set_override(args.threads)  # every stage's torch, llama.cpp, onnxruntime
        return int(args.func(args) or 0)
    except EdgeQloraError as exc:
        if args.debug:
            raise
        print(f"edgeqlora {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        terminated = isinstance(exc, _Terminated)
        print(f"edgeqlora {args.command}: {'terminated' if terminated else 'interrupted'}",
              file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # the last resort: still one line, never a traceback
        if args.debug:
            raise
        message, code = _unforeseen(exc)
        print(f"edgeqlora {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _no_library_progress_bars() -> None:
    """No transformers / huggingface_hub progress bars ("Loading weights") in a log or a pipe:
    there, stderr carries the one-line error and our own messages."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers = sys.modules.get("transformers")
    if transformers is not None:  # already imported (tests, the Python API): tell it directly
        transformers.utils.logging.disable_progress_bar()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup (``finally``, atomic writes) runs."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _catch_sigterm():
    """Turn SIGTERM into ``_Terminated`` while a command runs (train installs its own handler
    for its loop, which saves a checkpoint, and restores this one). Returns the handler to put
    back, or None when nothing was changed (not the main thread, or a handler already set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    current = signal.getsignal(signal.SIGTERM)
    if current is not signal.SIG_DFL:
        return None
    signal.signal(signal.SIGTERM, _on_sigterm)
    return current


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _unforeseen(exc: Exception) -> tuple[str, int]:
    """(message, exit code) for an exception no stage turned into an EdgeQloraError."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "disk full; free space and run the command again", 2
        where = exc.filename if exc.filename is not None else ""
        what = exc.strerror or _one_line(exc)
        return (f"{where}: {what}" if where else what), 2
    if isinstance(exc, MemoryError):
        return "out of memory; close other programs or use a smaller model or batch", 1
    return (f"unexpected {type(exc).__name__}: {_one_line(exc)[:300]} (a bug in edgeqlora: "
            "run again with --debug for the traceback and report it)"), 1


if __name__ == "__main__":
    sys.exit(main())

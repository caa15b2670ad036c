"""Argument groups and helpers that more than one command shares."""

from __future__ import annotations

import argparse
import math
import sys


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe_and_overrides", nargs="*", metavar="[RECIPE.yaml] [key=value ...]",
                   help="an optional YAML recipe, then key=value overrides (they win)")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch, llama.cpp and onnxruntime (default: the cores "
                        "other processes leave free, looked at again as the run goes; "
                        "EDGEQLORA_THREADS does the same)")


def split_recipe(items: list[str]) -> tuple[str | None, list[str]]:
    """``[RECIPE.yaml] key=value ...`` -> (recipe or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def load_cfg(args):
    from ..config import load_config

    recipe, overrides = split_recipe(args.recipe_and_overrides)
    return load_config(recipe, overrides)


def show_progress() -> bool:
    """Progress bars only for a person watching: not in a log file or a pipe. (Off a terminal
    the long stages print a plain line every ``EDGEQLORA_PROGRESS_S`` seconds instead:
    ``progress.Ticker`` and the parity gate's printer decide that themselves.)"""
    return sys.stderr.isatty()


def add_runtime_args(p: argparse.ArgumentParser, prompt_cache: bool = False) -> None:
    """The flags every command that loads an export shares. ``prompt_cache``: reusing the KV
    cache of a shared prompt prefix is this command's default (``serve``: requests share a
    system prompt), with ``--no-prompt-cache`` to turn it off."""
    p.add_argument("export", help="an export directory (manifest.json) or a .gguf file")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the free cores but never the last one; "
                        "EDGEQLORA_THREADS does the same)")
    p.add_argument("--n-ctx", type=int, default=None, help="context window in tokens "
                   "(default 2048)")
    p.add_argument("--lora", default=None, metavar="ADAPTER",
                   help="a LoRA adapter to apply on the base at load time: a GGUF LoRA for a "
                        "GGUF base, an onnxruntime adapter file for an ONNX base exported with "
                        "LoRA inputs")
    p.add_argument("--lora-scale", type=float, default=None,
                   help="GGUF only: the adapter's strength (default 1.0)")
    if prompt_cache:
        p.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                       help="evaluate every prompt from scratch (default: reuse the KV cache of "
                            "the prefix a request shares with the previous one, e.g. the "
                            "system prompt; answers may then differ in the last digits of "
                            "their logits with what ran before them)")
    else:
        p.add_argument("--prompt-cache", action="store_true",
                       help="keep the KV cache of the last request and reuse its shared "
                            "prefix (a system prompt is evaluated once); faster, but an answer "
                            "may then differ in the last digits of its logits with what ran "
                            "before it")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking every file of the export against the sha256 its "
                        "manifest records (sizes are still checked)")
    add_allow_failed(p)


def add_allow_failed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-failed", action="store_true",
                   help="use an export whose manifest records a failed verification or parity "
                        "gate (one kept with 'export --keep-failed'); refused otherwise")


def warn_failed_export(path) -> None:
    """One stderr line when ``--allow-failed`` lets a failed export through, so that what it
    answers (often nothing at all, from a NaN model) is not taken for the trained model's."""
    from pathlib import Path

    from ..artifacts import export_failures, read_manifest
    from ..errors import EdgeQloraError

    if not Path(path).is_dir():
        return
    try:
        problems = export_failures(read_manifest(path))
    except EdgeQloraError:
        return  # loading it says what is wrong
    if problems:
        print(f"warning: export {path}: {'; '.join(problems)}; using it anyway "
              "(--allow-failed)", file=sys.stderr)


def load_runtime(args):
    """The export in ``args.export`` loaded through its runtime (torch-free); flags left unset
    fall back to the runtime's own defaults."""
    from ..errors import InputError
    from ..runtimes import load

    kwargs = {}
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads} must be >= 1 (leave it out for the default)")
    if args.threads is not None:
        kwargs["n_threads"] = args.threads
    if args.n_ctx is not None:
        kwargs["n_ctx"] = args.n_ctx
    if args.lora is not None:
        kwargs["lora_path"] = args.lora
    if args.lora_scale is not None:
        if not math.isfinite(args.lora_scale):
            raise InputError(f"--lora-scale {args.lora_scale} must be a finite number")
        kwargs["lora_scale"] = args.lora_scale
    if getattr(args, "prompt_cache", False):
        kwargs["prompt_cache"] = True
    if args.allow_failed:
        warn_failed_export(args.export)
    runtime = load(args.export, verify=not args.no_verify, allow_failed=args.allow_failed,
                   **kwargs)
    if args.lora_scale is not None and getattr(runtime, "lora_path", None) is None:
        runtime.close()
        raise InputError(f"--lora-scale {args.lora_scale}: {args.export} runs no LoRA adapter "
                         "(pass --lora ADAPTER, or load an --adapter-only export)")
    return runtime

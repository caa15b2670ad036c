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

    import os

    cfg = _load_cfg(args)
    out = Path(args.out) if args.out else _default_run_dir()
    adapter = train(cfg, out)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
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
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted quickstart in --out from its last checkpoint")
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(args) -> int:
    from .quickstart import quickstart

    recipe, overrides = _split_recipe(args.recipe_and_overrides)
    quickstart(Path(args.out), recipe=recipe, overrides=overrides, force=args.force,
               full=args.full, resume=args.resume)
    return 0


# ---------------------------------------------------------------------------------------------
# run / serve: the device side, torch-free (edgeqlora.runtimes)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("export", help="an export directory (manifest.json) or a .gguf file")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all cores but one; EDGEQLORA_THREADS overrides)")
    p.add_argument("--n-ctx", type=int, default=None, help="context window in tokens "
                   "(default 2048)")
    p.add_argument("--lora", default=None, metavar="ADAPTER",
                   help="a LoRA adapter to apply on the base at load time: a GGUF LoRA for a "
                        "GGUF base, an onnxruntime adapter file for an ONNX base exported with "
                        "LoRA inputs")
    p.add_argument("--lora-scale", type=float, default=None,
                   help="GGUF only: the adapter's strength (default 1.0)")


def _load_runtime(args):
    from .runtimes import load

    kwargs = {}
    if args.threads is not None:
        kwargs["n_threads"] = args.threads
    if args.n_ctx is not None:
        kwargs["n_ctx"] = args.n_ctx
    if args.lora is not None:
        kwargs["lora_path"] = args.lora
    if args.lora_scale is not None:
        kwargs["lora_scale"] = args.lora_scale
    return load(args.export, **kwargs)


def _add_run(sub):
    p = sub.add_parser("run", help="generate with an export through its runtime (streams)")
    _add_runtime_args(p)
    p.add_argument("--prompt", default=None,
                   help="the prompt (default: read stdin; with --chat and a terminal, an "
                        "interactive chat)")
    p.add_argument("--chat", action="store_true",
                   help="treat the prompt as a user message and apply the model's chat template")
    p.add_argument("--system", default=None, help="system message (implies --chat)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed on stderr")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    import time

    from .errors import InputError
    from .runtimes.base import Completion, check_sampling

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    check_sampling(**sampling)  # fail on a bad flag before loading the model
    chat = args.chat or args.system is not None
    interactive = args.prompt is None and chat and sys.stdin.isatty()
    prompt = args.prompt
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        raise InputError("the prompt is empty; pass --prompt TEXT or pipe text on stdin")
    rt = _load_runtime(args)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def answer(ids) -> str:
        result = Completion()
        start = time.perf_counter()
        for piece in rt.complete(ids, result=result, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.stats:
            dt = time.perf_counter() - start
            print(f"[{result.prompt_tokens} prompt + {result.completion_tokens} generated "
                  f"tokens in {dt:.2f} s, {result.completion_tokens / max(dt, 1e-9):.1f} tok/s, "
                  f"finish: {result.finish_reason}]", file=sys.stderr)
        return result.text

    try:
        if not interactive:
            if chat:
                answer(rt.chat_ids(history + [{"role": "user", "content": prompt}]))
            else:
                answer(prompt)
            return 0
        print("edgeqlora chat: an empty line or Ctrl-D ends it", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": answer(rt.chat_ids(history))})
        return 0
    finally:
        rt.close()


def _add_serve(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over an export, with a web "
                                     "chat page at /")
    _add_runtime_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-id", default=None, help="model name in /v1/models (default: "
                   "the export's name)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from .runtimes.serve import create_app, serve

    rt = _load_runtime(args)
    try:
        model_id = args.model_id or Path(args.export).resolve().name
        create_app(rt, model_id, args.max_body_bytes, args.max_tokens)  # check the limits first
        print(f"serving {args.export} as '{model_id}' on http://{args.host}:{args.port}/ "
              "(OpenAI API under /v1)", file=sys.stderr)
        serve(rt, host=args.host, port=args.port, model_id=model_id,
              max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens)
    finally:
        rt.close()
    return 0


# ---------------------------------------------------------------------------------------------
# export


def _add_export(sub):
    p = sub.add_parser("export", help="merge an adapter and export it (GGUF or ONNX), "
                                      "verified and parity-gated")
    p.add_argument("adapter", help="adapter directory written by 'edgeqlora train'")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="export directory to write")
    p.add_argument("--target", default=None, help="export target (default export.target: gguf)")
    p.add_argument("--quant", default=None,
                   help="quant type (default: export.quant for gguf, q4_k_m; int4-gptq for "
                        "onnx; with --device: chosen for the device); gguf: f32 f16 bf16 q8_0 "
                        "q4_0 q4_k_m q5_k_m q6_k q3_k_m; onnx: int4-gptq int4-gptq-q8head "
                        "int4-hqq int4-hqq-q8head int4-q8head int4 int4-kquant "
                        "int4-kquant-last int8 fp16 fp32 nf4-exact")
    p.add_argument("--device", default=None,
                   help="a device profile name (see 'edgeqlora devices list') or a .toml "
                        "file: export the highest-precision quant that fits it and passes the "
                        "parity gate (with --quant: that quant, refused if it does not fit); "
                        "the choice and why go in the manifest")
    p.add_argument("--context", type=int, default=None,
                   help="with --device: context window in tokens the memory is sized for "
                        "(default 2048)")
    p.add_argument("--merge-base", default=None, choices=("auto", "original", "dequantized"),
                   help="weights the adapter is merged into (default export.merge_base: auto)")
    p.add_argument("--adapter-only", action="store_true",
                   help="write a base GGUF plus a LoRA adapter GGUF instead of a merged model")
    p.add_argument("--adapter-quant", default="q8_0", help="adapter GGUF type: f32 f16 q8_0")
    p.add_argument("--min-top1", type=float, default=None,
                   help="verification: minimum top-1 agreement with the merged model")
    p.add_argument("--max-kld", type=float, default=None,
                   help="verification: maximum mean KL divergence from the merged model")
    p.add_argument("--no-parity", action="store_true",
                   help="skip the parity gate against the trained model (recorded in the "
                        "manifest)")
    p.add_argument("--block-size", type=int, default=None, help="onnx int4/int8: block size")
    p.add_argument("--accuracy-level", type=int, default=None,
                   help="onnx: MatMulNBits accuracy level (4 = int8 activations)")
    p.add_argument("--asymmetric", action="store_true", help="onnx: asymmetric int4")
    p.add_argument("--context-length", type=int, default=None,
                   help="onnx: context length (onnxruntime-genai max_length)")
    p.add_argument("--calibration-data", default=None, metavar="SPEC",
                   help="onnx int4-gptq*: data to calibrate on (default: the data the adapter "
                        "was trained on, from its manifest)")
    p.add_argument("--calibration-rows", type=int, default=None,
                   help="onnx int4-gptq*: calibration conversations (default 64)")
    p.add_argument("--imatrix", default=None, metavar="none|auto|PATH",
                   help="gguf k-quants/q4_0: quantize with an importance matrix from the "
                        "adapter's training data (auto) or calibration rows in PATH "
                        "(default export.imatrix: none)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out; keep an export that fails verification")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .exporters import export

    cfg = _load_cfg(args)
    target = args.target or cfg.export.target
    # export.quant names a GGUF type; other targets use their own default unless asked. With
    # --device the quant is the device's choice unless --quant names one.
    quant = args.quant or (cfg.export.quant if target == cfg.export.target and not args.device
                           else None)
    if args.device is None and args.context is not None:
        from .errors import ConfigError

        raise ConfigError("--context sizes the memory for --device; pass --device too (the "
                          "ONNX runtime's own context is --context-length)")
    options = {k: v for k, v in (("block_size", args.block_size),
                                 ("accuracy_level", args.accuracy_level),
                                 ("context_length", args.context_length),
                                 ("calibration_data", args.calibration_data),
                                 ("calibration_rows", args.calibration_rows)) if v is not None}
    if args.asymmetric:
        options["symmetric"] = False
    if (args.imatrix or cfg.export.imatrix).strip().lower() != "none":
        options["imatrix"] = args.imatrix or cfg.export.imatrix
    manifest = export(target, Path(args.adapter), Path(args.out), quant=quant,
                      merge_base=args.merge_base or cfg.export.merge_base,
                      adapter_only=args.adapter_only, adapter_quant=args.adapter_quant,
                      force=args.force, eval_tokens=cfg.export.eval_tokens, cfg=cfg,
                      thresholds={"min_top1": args.min_top1, "max_kld": args.max_kld},
                      progress=sys.stderr.isatty(), parity=not args.no_parity,
                      device=args.device,
                      context=2048 if args.context is None else args.context, **options)
    merge, check = manifest.get("merge", {}), manifest.get("verification", {})
    klds = ", ".join(f"{k} {v:.4f}" for k, v in merge.get("kld", {}).items())
    mix = ", ".join(f"{k}x{v}" for k, v in sorted((manifest.get("quant_mix") or {}).items()))
    rows = [("export", str(args.out)), ("target / quant", f"{target} / {manifest['quant']}"),
            ("tensor types", mix),
            ("merge base", str(merge.get("merge_base", "none (unmerged)"))
             + (f" (KLD vs trained: {klds})" if klds else "")),
            ("verification", "passed" if check.get("passed") else
             "FAILED (kept with --force): " + "; ".join(check.get("problems", [])))]
    gate = manifest.get("parity")
    if isinstance(gate, dict):
        m = (gate.get("metrics") or {})
        rows.append(("parity vs trained", ("passed" if gate.get("passed") else "FAILED (kept "
                     "with --force): " + ", ".join(gate.get("failures") or []))
                     + "; " + ", ".join(f"{k} {v:.4g}" for k, v in _flat_metrics(m).items())))
    else:
        rows.append(("parity vs trained", str(gate)))
    if "top1" in check:
        rows.append(("vs merged model", f"top-1 {check['top1']:.3f}, KLD {check['kld']:.5f} "
                                        f"on {check['tokens']} held-out tokens"))
        tok = check.get("tokenization", {})
        rows.append(("tokenization", f"{tok.get('identical')}/{tok.get('texts')} texts identical"))
    else:
        rows.append(("runtime check", check.get("runtime", "")))
    size = sum(f["size_bytes"] for f in manifest["files"].values())
    rows.append(("size", f"{size / 2**20:.1f} MiB"))
    dev = manifest.get("device")
    if dev:
        rows.append(("device", f"{dev['name']}: {dev['verdict']}, {dev['total_bytes'] / 2**20:.0f}"
                               f" MiB resident predicted of {dev['usable_bytes'] / 2**20:.0f} MiB "
                               f"usable at context {dev['context']}"))
        rows.append(("why", dev["reason"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _flat_metrics(m: dict) -> dict[str, float]:
    """The headline numbers of one parity candidate, whatever nesting the report uses."""
    out = {}
    for section in ("text", "task"):
        for key in ("mean_kld", "top1", "exact_match"):
            v = (m.get(section) or {}).get(key) if isinstance(m.get(section), dict) else None
            if isinstance(v, (int, float)):
                out[f"{section} {key}"] = float(v)
    return out


# ---------------------------------------------------------------------------------------------
# parity


def _add_parity(sub):
    p = sub.add_parser("parity", help="compare exports with the trained model; exit 1 if one "
                                      "is beyond the config's parity thresholds")
    _add_config_args(p)
    p.add_argument("--reference", required=True, metavar="ADAPTER_DIR",
                   help="the trained adapter (the reference is NF4 base + adapter, in torch)")
    p.add_argument("--candidate", action="append", required=True, metavar="EXPORT",
                   help="an export directory or .gguf file (repeatable)")
    p.add_argument("--out", required=True, help="directory for parity.json, parity.md, "
                   "parity.png")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--examples", type=int, default=None,
                   help="held-out task examples (default: parity.eval_examples)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="tokens of the shipped English text (default: parity.text_tokens)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy answer length (default: max_new_tokens of the config)")
    p.add_argument("--threads", type=int, default=None, help="runtime CPU threads")
    p.set_defaults(func=_cmd_parity)


def _cmd_parity(args) -> int:
    from .errors import ParityError
    from .parity import run_parity

    cfg = _load_cfg(args)
    try:
        report = run_parity(args.reference, args.candidate, args.out, cfg,
                            examples=args.examples, text_tokens=args.text_tokens,
                            max_new_tokens=args.max_new_tokens or cfg.max_new_tokens,
                            n_threads=args.threads, force=args.force)
    except ParityError:
        print((Path(args.out) / "parity.md").read_text(), end="")
        raise
    print((Path(args.out) / "parity.md").read_text(), end="")
    print(f"parity passed for {len(report['candidates'])} candidate(s); report in {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# devices / bundle: device profiles, the fit check and verified bundles (edgeqlora.devices)


def _add_devices(sub):
    p = sub.add_parser("devices", help="device profiles and the fit check")
    s = p.add_subparsers(dest="devices_cmd", required=True)
    s.add_parser("list", help="the known device profiles")
    fit = s.add_parser("fit", help="predicted memory, decode speed and a verdict for an "
                                   "export on each device")
    fit.add_argument("export", help="an export directory or a .gguf file")
    fit.add_argument("--device", default="all",
                     help="a profile name, a path to a .toml profile, 'host' (this "
                          "machine) or 'all' (default)")
    fit.add_argument("--context", type=int, default=2048,
                     help="context window in tokens the memory is sized for (default 2048)")
    fit.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_devices)


def _cmd_devices(args) -> int:
    import json

    from .devices.fit import MiB, fit, model_facts
    from .devices.profiles import load_profiles

    def _print_table(rows) -> None:
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(f"{str(c):<{w}}" for c, w in zip(row, widths)).rstrip())

    if args.devices_cmd == "list":
        rows = [("device", "title", "usable RAM", "bandwidth", "cores/threads", "features",
                 "runtimes")]
        for pr in load_profiles("all"):
            rows.append((pr.name, pr.title, f"{pr.usable_mb} MiB", f"{pr.bandwidth_gbs:g} GB/s",
                         f"{pr.cores}/{pr.threads}", ",".join(pr.features),
                         ",".join(pr.runtimes)))
        _print_table(rows)
        return 0
    facts = model_facts(args.export)
    results = [fit(facts, pr, args.context) for pr in load_profiles(args.device)]
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    print(f"{args.export}: {facts.target} {facts.quant or ''}, {facts.n_params / 1e6:.0f}M "
          f"params, {facts.file_bytes / MiB:.1f} MiB on disk, context {args.context}")
    rows = [("device", "weights", "KV cache", "runtime", "predicted", "usable", "decode",
             "verdict")]
    for r in results:
        weights = (r.weights_bytes + r.repacked_bytes) / MiB
        speed = f"~{r.decode_tok_s:.0f} tok/s" if r.decode_tok_s else "-"
        rows.append((r.device, f"{weights:.0f} MiB", f"{r.kv_bytes / MiB:.0f} MiB",
                     f"{r.runtime_bytes / MiB:.0f} MiB", f"{r.total_bytes / MiB:.0f} MiB",
                     f"{r.usable_bytes / MiB:.0f} MiB", speed, r.verdict))
    _print_table(rows)
    for r in results:
        for note in r.notes:
            print(f"note ({r.device}): {note}")
    return 0


def _add_bundle(sub):
    p = sub.add_parser("bundle", help="pack an export for a device into a verified .tar.gz "
                                      "('bundle verify FILE' checks one, 'bundle unpack FILE "
                                      "DIR' verifies and extracts)",
                       usage="edgeqlora bundle EXPORT --device NAME --out FILE.tar.gz "
                             "[--context N] [--force]\n"
                             "       edgeqlora bundle verify FILE\n"
                             "       edgeqlora bundle unpack FILE DIR")
    p.add_argument("args", nargs="+", metavar="ARG",
                   help="an export directory; or 'verify FILE' (a bundle or an unpacked "
                        "bundle folder); or 'unpack FILE DIR'")
    p.add_argument("--device", default=None, help="profile name or path to a .toml profile")
    p.add_argument("--out", default=None, help="the .tar.gz to write")
    p.add_argument("--context", type=int, default=2048,
                   help="context window the bundle is fitted and started with (default 2048)")
    p.add_argument("--force", action="store_true",
                   help="bundle even if the export does not fit; replace an existing --out")
    p.set_defaults(func=_cmd_bundle)


def _cmd_bundle(args) -> int:
    from .devices.bundle import create_bundle, describe, unpack_bundle, verify_bundle
    from .errors import InputError

    first, rest = args.args[0], args.args[1:]
    if first == "verify":
        if len(rest) != 1:
            raise InputError("usage: edgeqlora bundle verify FILE")
        manifest = verify_bundle(rest[0])
        print(f"{rest[0]}: OK ({describe(manifest)})")
        return 0
    if first == "unpack":
        if len(rest) != 2:
            raise InputError("usage: edgeqlora bundle unpack FILE DIR")
        folder = unpack_bundle(rest[0], rest[1])
        print(f"verified and unpacked to {folder}; start it with {folder}/run.sh")
        return 0
    if rest:
        raise InputError(f"unexpected arguments {rest}; usage: edgeqlora bundle EXPORT "
                         "--device NAME --out FILE.tar.gz")
    if not args.device or not args.out:
        raise InputError("edgeqlora bundle EXPORT needs --device NAME and --out FILE.tar.gz")
    manifest = create_bundle(first, args.device, args.out, context=args.context,
                             force=args.force)
    fit = manifest["fit"]
    print(f"wrote {args.out}: {describe(manifest)}; predicted {fit['total_bytes'] / 2**20:.0f} "
          f"MiB of {fit['usable_bytes'] / 2**20:.0f} MiB usable ({fit['verdict']})")
    return 0


# ---------------------------------------------------------------------------------------------
# bench: the scripts in the repository's bench/ folder


BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def _bench_scripts() -> dict[str, Path]:
    if not BENCH_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(BENCH_DIR.glob("*.py")) if not p.stem.startswith("_")}


def _add_bench(sub):
    p = sub.add_parser("bench", help="run a benchmark from bench/ (prints a table, writes JSON)")
    p.add_argument("name", help="benchmark name (e.g. runtime, export, onnx, train_throughput)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import subprocess

    scripts = _bench_scripts()
    if not scripts:
        raise EdgeQloraError(f"no benchmarks found: they live in the repository's bench/ folder "
                             f"({BENCH_DIR}); run edgeqlora from a source checkout")
    if args.name not in scripts:
        raise EdgeQloraError(f"unknown benchmark {args.name!r}; available: "
                             f"{', '.join(scripts)}")
    return subprocess.call([sys.executable, str(scripts[args.name]), *args.rest])


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
    _add_export(sub)
    _add_parity(sub)
    _add_run(sub)
    _add_serve(sub)
    _add_devices(sub)
    _add_bundle(sub)
    _add_bench(sub)
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

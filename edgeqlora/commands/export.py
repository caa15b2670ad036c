"""``edgeqlora export ADAPTER --out DIR``: merge an adapter and export it, verified and
parity-gated (``edgeqlora.export.export_adapter``), then print a short summary table."""

from __future__ import annotations

from pathlib import Path

from ..config import MERGE_BASES
from ._common import add_config_args, add_threads_arg, load_cfg, show_progress

HELP = "merge an adapter and export it (GGUF or ONNX), verified and parity-gated"


def add_arguments(p) -> None:
    add_threads_arg(p)
    p.add_argument("adapter", help="adapter directory written by 'edgeqlora train'")
    add_config_args(p)
    p.add_argument("--out", required=True, help="export directory to write")
    p.add_argument("--target", default=None, help="export target (default export.target: gguf)")
    p.add_argument("--quant", default=None,
                   help="quant type (default: export.quant for gguf, q4_k_m; int4-gptq for "
                        "onnx; with --device: chosen for the device); gguf: f32 f16 bf16 q8_0 "
                        "q4_0 q4_1 q4_k_m q5_k_m q6_k q3_k_m; onnx: int4-gptq int4-gptq-q8head "
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
    p.add_argument("--merge-base", default=None, choices=MERGE_BASES,
                   help="weights the adapter is merged into (default export.merge_base: auto, "
                        "the ones it was trained against)")
    p.add_argument("--adapter-only", action="store_true",
                   help="write a base GGUF plus a LoRA adapter GGUF instead of a merged model")
    p.add_argument("--adapter-quant", default=None,
                   help="adapter GGUF type: f32 f16 q8_0 (default q8_0; a device-aware "
                        "adapter: its own precision)")
    p.add_argument("--merge", action="store_true",
                   help="a device-aware adapter (quant=gguf-*): merge it into its trained base "
                        "and re-quantize, to another target or quant (the parity gate says "
                        "what that costs) instead of shipping the trained base + LoRA")
    p.add_argument("--min-top1", type=float, default=None,
                   help="verification: minimum top-1 agreement with the reference (the trained "
                        "model; the merged one for --merge-base original/best)")
    p.add_argument("--max-kld", type=float, default=None,
                   help="verification: maximum mean KL divergence from that reference")
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
    p.add_argument("--calibration-general", type=float, default=None, metavar="SHARE",
                   help="GPTQ and imatrix: the share of calibration tokens from general "
                        "English text mixed into the task rows (default 0.25 for the gguf "
                        "imatrix, 0.1 for onnx GPTQ; 0 = task rows only)")
    p.add_argument("--imatrix", default=None, metavar="none|auto|PATH",
                   help="gguf k-quants/q4_0: quantize with an importance matrix from the "
                        "adapter's training data (auto) or calibration rows in PATH "
                        "(default export.imatrix: none)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out, once the new export has passed every check "
                        "(a failing one leaves it untouched)")
    p.add_argument("--keep-failed", action="store_true",
                   help="keep an export that fails verification or the parity gate, for "
                        "inspection (exit 1; its manifest says so and run, serve, bundle, "
                        "parity and devices fit refuse it without --allow-failed)")


def run(args) -> int:
    from ..errors import ConfigError
    from ..export import export_adapter

    from ..device_base import device_target
    from ..export import adapter_quant_record

    cfg = load_cfg(args)
    trained_for = None if args.merge else device_target(adapter_quant_record(args.adapter))
    target = args.target or (trained_for[0] if trained_for else cfg.export.target)
    # export.quant names a GGUF type; other targets use their own default unless asked. With
    # --device the quant is the device's choice unless --quant names one; a device-aware
    # adapter's is the one it was trained on.
    quant = args.quant or (cfg.export.quant if target == cfg.export.target and not args.device
                           and not trained_for else None)
    if args.device is None and args.context is not None:
        raise ConfigError("--context sizes the memory for --device; pass --device too (the "
                          "ONNX runtime's own context is --context-length)")
    options = {k: v for k, v in (("block_size", args.block_size),
                                 ("accuracy_level", args.accuracy_level),
                                 ("context_length", args.context_length),
                                 ("calibration_data", args.calibration_data),
                                 ("calibration_rows", args.calibration_rows),
                                 ("calibration_general", args.calibration_general))
               if v is not None}
    if args.asymmetric:
        options["symmetric"] = False
    if (args.imatrix or cfg.export.imatrix).strip().lower() != "none":
        options["imatrix"] = args.imatrix or cfg.export.imatrix
    manifest = export_adapter(Path(args.adapter), Path(args.out), target=target, quant=quant,
                              merge_base=args.merge_base or cfg.export.merge_base,
                              adapter_only=args.adapter_only, adapter_quant=args.adapter_quant,
                              merge=args.merge,
                              force=args.force, keep_failed=args.keep_failed,
                              eval_tokens=cfg.export.eval_tokens, cfg=cfg,
                              thresholds={"min_top1": args.min_top1, "max_kld": args.max_kld},
                              progress=show_progress(), parity=not args.no_parity,
                              device=args.device,
                              context=2048 if args.context is None else args.context, **options)
    rows = summary_rows(manifest, target, str(args.out))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def summary_rows(manifest: dict, target: str, out: str) -> list[tuple[str, str]]:
    """The export's summary table (label, value) from its manifest."""
    merge, check = manifest.get("merge") or {}, manifest.get("verification", {})
    klds = ", ".join(f"{k} {v:.4f}" for k, v in merge.get("kld", {}).items())
    mix = ", ".join(f"{k}x{v}" for k, v in sorted((manifest.get("quant_mix") or {}).items()))
    rows = [("export", out), ("target / quant", f"{target} / {manifest['quant']}"),
            ("tensor types", mix),
            ("merge base", str(merge.get("merge_base", "none: the trained base + LoRA, unmerged"
                                           if manifest.get("device_aware") else
                                           "none (unmerged)"))
             + (f" (KLD vs trained: {klds})" if klds else "")),
            ("verification", "passed" if check.get("passed") else
             "FAILED (kept with --keep-failed): " + "; ".join(check.get("problems", [])))]
    gate = manifest.get("parity")
    if isinstance(gate, dict):
        m = (gate.get("metrics") or {})
        rows.append(("parity vs trained", ("passed" if gate.get("passed") else "FAILED (kept "
                     "with --keep-failed): " + ", ".join(gate.get("failures") or []))
                     + "; " + ", ".join(f"{k} {v:.4g}" for k, v in _flat_metrics(m).items())))
    else:
        rows.append(("parity vs trained", str(gate)))
    if "top1" in check:
        rows.append((f"vs {check.get('reference', 'reference')}", f"top-1 {check['top1']:.3f}, KLD {check['kld']:.5f} "
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
    return rows


def _flat_metrics(m: dict) -> dict[str, float]:
    """The headline numbers of one parity candidate, whatever nesting the report uses."""
    out = {}
    for section in ("text", "task"):
        for key in ("mean_kld", "top1", "exact_match"):
            v = (m.get(section) or {}).get(key) if isinstance(m.get(section), dict) else None
            if isinstance(v, (int, float)):
                out[f"{section} {key}"] = float(v)
    return out

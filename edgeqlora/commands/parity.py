"""``edgeqlora parity --reference ADAPTER --candidate EXPORT ... --out DIR``: exports against the
trained model; exit 1 (ParityError) when one is beyond the config's thresholds."""

from __future__ import annotations

from pathlib import Path

from ._common import add_allow_failed, add_config_args, load_cfg, show_progress

HELP = ("compare exports with the trained model; exit 1 if one is beyond the config's parity "
        "thresholds")


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--reference", required=True, metavar="ADAPTER_DIR",
                   help="the trained adapter (the reference is NF4 base + adapter, in torch)")
    p.add_argument("--candidate", action="append", required=True, metavar="EXPORT",
                   help="an export directory or .gguf file (repeatable)")
    p.add_argument("--out", required=True, help="directory for parity.json, parity.md, "
                   "parity.png")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_allow_failed(p)
    p.add_argument("--examples", type=int, default=None,
                   help="held-out task examples (default: parity.eval_examples)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="tokens of the shipped English text (default: parity.text_tokens)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy answer length (default: max_new_tokens of the config)")
    p.add_argument("--threads", type=int, default=None, help="runtime CPU threads")


def run(args) -> int:
    from ..errors import ParityError
    from ..parity import run_parity

    cfg = load_cfg(args)
    try:
        report = run_parity(args.reference, args.candidate, args.out, cfg,
                            examples=args.examples, text_tokens=args.text_tokens,
                            max_new_tokens=args.max_new_tokens or cfg.max_new_tokens,
                            n_threads=args.threads, force=args.force,
                            allow_failed=args.allow_failed, progress=show_progress())
    except ParityError:
        # The report says which metric failed by how much; the error line follows it.
        print((Path(args.out) / "parity.md").read_text(), end="")
        raise
    print((Path(args.out) / "parity.md").read_text(), end="")
    print(f"parity passed for {len(report['candidates'])} candidate(s); report in {args.out}")
    return 0

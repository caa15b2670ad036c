"""``edgeqlora devices list`` and ``edgeqlora devices fit EXPORT``: device profiles and the fit
check (predicted memory, decode speed, a verdict), torch-free (``edgeqlora.devices``)."""

from __future__ import annotations

import json

HELP = "device profiles and the fit check"


def add_arguments(p) -> None:
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
    fit.add_argument("--allow-failed", action="store_true",
                     help="fit an export whose manifest records a failed verification or "
                          "parity gate (refused otherwise)")


def run(args) -> int:
    return _list() if args.devices_cmd == "list" else _fit(args)


def _list() -> int:
    from ..devices.profiles import load_profiles

    rows = [("device", "title", "usable RAM", "bandwidth", "cores/threads", "features",
             "runtimes")]
    for pr in load_profiles("all"):
        rows.append((pr.name, pr.title, f"{pr.usable_mb} MiB", f"{pr.bandwidth_gbs:g} GB/s",
                     f"{pr.cores}/{pr.threads}", ",".join(pr.features), ",".join(pr.runtimes)))
    _print_table(rows)
    return 0


def _fit(args) -> int:
    from ..devices.fit import MiB, fit, model_facts
    from ..devices.profiles import load_profiles

    profiles = load_profiles(args.device)  # a bad profile fails before the model is read
    facts = model_facts(args.export, allow_failed=args.allow_failed)
    results = [fit(facts, pr, args.context) for pr in profiles]
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


def _print_table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(f"{str(c):<{w}}" for c, w in zip(row, widths)).rstrip())

"""``edgeqlora bundle``: a verified .tar.gz of an export for one device (``edgeqlora.devices``).

    edgeqlora bundle [create] EXPORT --device NAME --out FILE.tar.gz [--context N] [--force]
        [--ignore-fit]
    edgeqlora bundle verify FILE
    edgeqlora bundle unpack FILE DIR

``create`` may be left out: ``bundle EXPORT ...`` was the command's first form and the device
READMEs use it, so ``normalize_argv`` puts the word back before argparse sees it.
"""

from __future__ import annotations

from ..errors import InputError
from ._common import add_allow_failed

HELP = ("pack an export for a device into a verified .tar.gz ('bundle verify FILE' checks one, "
        "'bundle unpack FILE DIR' verifies and extracts)")
USAGE = ("edgeqlora bundle [create] EXPORT --device NAME --out FILE.tar.gz [--context N] "
         "[--force] [--ignore-fit]\n"
         "       edgeqlora bundle verify FILE\n"
         "       edgeqlora bundle unpack FILE DIR")
ACTIONS = ("create", "verify", "unpack")


def normalize_argv(rest: list[str]) -> list[str]:
    """The arguments after ``bundle``, with an implied ``create`` made explicit."""
    if not rest or rest[0] in ACTIONS or rest[0] in ("-h", "--help"):
        return rest
    return ["create", *rest]


def add_arguments(p) -> None:
    p.usage = USAGE
    p.epilog = "'edgeqlora bundle create --help' lists the options of a bundle's creation"
    # prog given: argparse would otherwise build the actions' prog from the three-line usage.
    s = p.add_subparsers(dest="bundle_cmd", required=True, metavar="{create,verify,unpack}",
                         prog=p.prog)
    create = s.add_parser("create", help="pack EXPORT for --device into --out (the default "
                                         "action: 'bundle EXPORT ...' means 'bundle create "
                                         "EXPORT ...')")
    create.add_argument("export", metavar="EXPORT", help="an export directory")
    create.add_argument("--device", default=None, help="profile name or path to a .toml profile")
    create.add_argument("--out", default=None, help="the .tar.gz to write")
    create.add_argument("--context", type=int, default=2048,
                        help="context window the bundle is fitted and started with "
                             "(default 2048)")
    create.add_argument("--force", action="store_true", help="replace an existing --out")
    create.add_argument("--ignore-fit", action="store_true",
                        help="bundle even if the export does not fit the device (the bundle "
                             "records the verdict)")
    add_allow_failed(create)
    verify = s.add_parser("verify", help="check a bundle's files against its manifest")
    verify.add_argument("file", metavar="FILE", help="a bundle or an unpacked bundle folder")
    unpack = s.add_parser("unpack", help="verify a bundle and extract it")
    unpack.add_argument("file", metavar="FILE", help="the bundle (.tar.gz)")
    unpack.add_argument("dir", metavar="DIR", help="the folder to extract into")


def run(args) -> int:
    from ..devices.bundle import create_bundle, describe, unpack_bundle, verify_bundle

    if args.bundle_cmd == "verify":
        manifest = verify_bundle(args.file)
        ok = "files OK" if manifest.get("export_failures") else "OK"
        print(f"{args.file}: {ok} ({describe(manifest)})")
        return 0
    if args.bundle_cmd == "unpack":
        folder = unpack_bundle(args.file, args.dir)
        print(f"verified and unpacked to {folder}; start it with {folder}/run.sh")
        return 0
    # Checked here, not with argparse's required=True: a missing flag is a one-line InputError
    # like every other bad input, returned as exit code 2 rather than a usage dump.
    if not args.device or not args.out:
        raise InputError("edgeqlora bundle EXPORT needs --device NAME and --out FILE.tar.gz")
    manifest = create_bundle(args.export, args.device, args.out, context=args.context,
                             force=args.force, allow_failed=args.allow_failed,
                             ignore_fit=args.ignore_fit)
    fit = manifest["fit"]
    print(f"wrote {args.out}: {describe(manifest)}; predicted {fit['total_bytes'] / 2**20:.0f} "
          f"MiB of {fit['usable_bytes'] / 2**20:.0f} MiB usable ({fit['verdict']})")
    return 0

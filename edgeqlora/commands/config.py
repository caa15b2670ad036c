"""``edgeqlora config show [RECIPE.yaml] [key=value ...]``: the config after recipe and overrides."""

from __future__ import annotations

from ._common import add_config_args, load_cfg

HELP = "show the resolved config"


def add_arguments(p) -> None:
    s = p.add_subparsers(dest="config_cmd", required=True)
    show = s.add_parser("show", help="print the config after recipe and overrides")
    add_config_args(show)


def run(args) -> int:
    from ..config import to_yaml

    print(to_yaml(load_cfg(args)), end="")
    return 0

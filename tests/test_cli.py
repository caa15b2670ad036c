"""The CLI contract: final command names, one-line errors, exit codes, --debug tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeqlora import __version__
from edgeqlora.cli import build_parser, main, parse

COMMANDS = ("quickstart", "train", "export", "parity", "run", "serve", "devices", "bench",
            "config")


def test_command_names_are_final():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_config_show_suggests_closest_key(capsys):
    code = main(["config", "show", "recipes/quickstart.yaml", "lora.rnk=8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "lora.r" in err and len(err.strip().splitlines()) == 1


def test_config_show_prints_resolved(capsys):
    assert main(["config", "show", "recipes/quickstart.yaml", "lora.r=4"]) == 0
    out = capsys.readouterr().out
    assert "r: 4" in out


def test_train_nonexistent_base_one_line_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "edgeqlora", "train", "base=/nonexistent", "max_steps=1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "/nonexistent" in lines[0]
    assert "Traceback" not in proc.stderr


def test_debug_shows_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "edgeqlora", "--debug", "config", "show", "lora.rnk=8"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_bench_unknown_name_lists_available(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    err = capsys.readouterr().err
    assert "no-such-bench" in err and "runtime" in err


def test_every_command_module_is_in_the_table():
    from pathlib import Path

    import edgeqlora.commands
    from edgeqlora.cli import COMMANDS

    folder = Path(edgeqlora.commands.__file__).parent
    modules = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")}
    assert modules == set(COMMANDS)
    assert all(COMMANDS[name] == f"edgeqlora.commands.{name}" for name in modules)


def test_a_command_imports_only_its_own_module():
    code = (
        "import sys\nfrom edgeqlora.cli import main\n"
        "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('edgeqlora.commands.'))\n"
        "assert loaded == ['edgeqlora.commands._common', 'edgeqlora.commands.run'], loaded\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_bundle_without_action_means_create():
    from edgeqlora.commands.bundle import normalize_argv

    assert normalize_argv(["exp", "--device", "pi4"]) == ["create", "exp", "--device", "pi4"]
    assert normalize_argv(["--device", "pi4", "exp"])[0] == "create"
    assert normalize_argv(["verify", "f.tar.gz"]) == ["verify", "f.tar.gz"]
    assert normalize_argv(["--help"]) == ["--help"]
    assert normalize_argv([]) == []


def test_bundle_missing_device_is_one_line(capsys, tmp_path):
    assert main(["bundle", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device NAME and --out" in err


def test_recipe_and_overrides_may_follow_the_options():
    argv = ["export", "runs/a/adapter", "recipes/quickstart.yaml", "lora.r=4", "--target", "onnx",
            "parity.text_tokens=512", "--keep-failed", "seed=3", "--out", "runs/x"]
    args = parse(build_parser("export"), argv)
    assert args.adapter == "runs/a/adapter" and args.target == "onnx" and args.out == "runs/x"
    assert args.keep_failed is True
    # in the order typed, so later overrides still win
    assert args.recipe_and_overrides == ["recipes/quickstart.yaml", "lora.r=4",
                                         "parity.text_tokens=512", "seed=3"]
    args = parse(build_parser("train"), ["train", "--out", "runs/t", "recipes/quickstart.yaml",
                                         "--threads", "1", "max_steps=2"])
    assert args.recipe_and_overrides == ["recipes/quickstart.yaml", "max_steps=2"]


def test_an_unknown_option_gets_the_commands_usage_not_the_top_level_one(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(build_parser("export"), ["export", "runs/a/adapter", "--out", "x", "--frobnicate"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: edgeqlora export" in err
    assert "unrecognized arguments: --frobnicate" in err
    assert "COMMAND" not in err

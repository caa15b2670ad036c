"""Config: defaults < recipe file < key=value overrides; every problem reported at once."""

from __future__ import annotations

import re

import pytest

from edgeqlora.config import Config, build_config, load_config, to_yaml, valid_keys
from edgeqlora.errors import ConfigError


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == Config()
    assert "lora.r" in valid_keys() and "export.quant" in valid_keys()


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 30\nlora:\n  r: 4\n  alpha: 8\nquant: int8\n")
    cfg = load_config(recipe, ["lora.r=16", "packing=false", "lr=1e-3"])
    assert cfg.max_steps == 30          # from the file
    assert cfg.lora.r == 16             # the command line wins over the file
    assert cfg.lora.alpha == 8.0
    assert cfg.quant == "int8"
    assert cfg.packing is False
    assert cfg.lr == pytest.approx(1e-3)


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lora.rnk=8"])
    assert "lora.rnk" in str(err.value) and "lora.r" in str(err.value)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["max_steps=abc", "lora.r=0", "quant=nf3", "packing=maybe"])
    problems = err.value.problems
    assert len(problems) == 2  # type errors are reported before range checks run
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lora.r=0", "quant=nf3", "max_steps=-1"])
    assert len(err.value.problems) == 3
    text = str(err.value)
    assert "lora.r=0" in text and "nf3" in text and "max_steps" in text


def test_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1, 2\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(binary)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["max_steps"])


def test_yaml_round_trip(tmp_path):
    cfg = build_config({"lora.r": 8, "max_steps": 12, "export.quant": "q8_0"})
    path = tmp_path / "cfg.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert any(r.name == "quickstart.yaml" for r in recipes)
    for recipe in recipes:
        load_config(recipe)


@pytest.mark.parametrize("override", ["lr=nan", "lr=inf", "parity.max_kld=nan",
                                      "parity.max_p99_kld=inf", "lora.alpha=nan"])
def test_non_finite_numbers_are_refused(override):
    """``lr=nan`` used to pass ``lr <= 0``; a NaN gate threshold decides nothing."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}=(nan|inf) must be a finite number"):
        load_config(None, [override])

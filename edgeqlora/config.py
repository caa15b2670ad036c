"""Config as data: a frozen dataclass tree, YAML recipes and ``key=value`` overrides.

Precedence: command line over the recipe file over the defaults below. Every problem (unknown
key, value of the wrong type, value out of range) is collected and reported together in one
ConfigError; an unknown key names the closest valid one (``lora.rnk`` -> ``lora.r``).

Config objects do not travel into numeric code: the stage that needs values unpacks them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

QUANT_CHOICES = ("nf4", "fp4", "int8", "none", "gguf-q4_0", "gguf-q4_1", "gguf-q4_k_m",
                 "gguf-q5_k_m", "gguf-q6_k", "gguf-q8_0", "onnx-int4",
                 "onnx-int4-q8head", "onnx-int4-hqq")
TARGET_PRESETS = ("all-linear", "attention")
MERGE_BASES = ("auto", "original", "dequantized", "best")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # "all-linear", "attention" (q, k, v, o), or a comma separated list of module names.
    target: str = "all-linear"
    rslora: bool = False
    dora: bool = False


@dataclass(frozen=True)
class ExportConfig:
    target: str = "gguf"
    quant: str = "q4_k_m"
    merge_base: str = "auto"
    # Tokens of held-out data used to measure merge bases and verify exports.
    eval_tokens: int = 2048
    # GGUF K-quants/Q4_0: importance matrix from "none", "auto" (the adapter's training data) or
    # a path to calibration rows (exporters/gguf/imatrix.py).
    imatrix: str = "none"


@dataclass(frozen=True)
class ParityConfig:
    """Thresholds of the parity gate (candidate export vs the trained model)."""

    # Each evaluation set (task answers, general text) is judged on its own against these.
    max_kld: float = 0.5
    # The tail a mean hides: measured p99 0.02-0.03 for device-aware Q4_K_M and Q8_0, 0.25-0.48
    # for merged re-quantized Q4_K_M on the quickstart; 2 nats is far beyond any kept export.
    max_p99_kld: float = 2.0
    min_top1: float = 0.80
    max_ppl_ratio: float = 1.25
    # Task exact match of the export over the trained model's (goal: q8_0 >= 0.995, q4_k_m >=
    # 0.98); the gate default leaves room for a one-answer swing on a small held-out sample.
    min_exact_match_ratio: float = 0.90
    eval_examples: int = 50
    text_tokens: int = 1024


@dataclass(frozen=True)
class Config:
    # What to train on.
    base: str = "embedded"
    data: str = "embedded:iot"
    eval_data: str = ""
    # The JSON Schema of the answers (a .json file; the embedded task has its own; "none" for
    # none): the adapter and every export carry it, run/serve constrain decoding to it.
    schema: str = ""
    # 4-bit base (bitsandbytes): nf4 | fp4, or int8 / none to compare; or the exact base a device
    # runs (device-aware QLoRA, edgeqlora.device_base): gguf-q4_k_m, gguf-q4_0, gguf-q8_0, ...
    quant: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    # Optimisation.
    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 256
    packing: bool = True
    # Packed rows hold the batch's common unlabelled prefix (a system prompt) once.
    share_prefix: bool = True
    grad_checkpointing: bool = False
    seed: int = 0
    # Checkpoints and evaluation.
    save_every: int = 50
    eval_every: int = 0
    eval_examples: int = 100
    # Evaluate the untrained base before training (the "before" figure; minutes of greedy
    # decoding of a rambling model on CPU).
    eval_base: bool = True
    eval_batch_size: int = 16
    max_new_tokens: int = 64
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = False
    # Checkpoints kept under out/checkpoints (older ones are deleted; 0 keeps all).
    keep_checkpoints: int = 2
    # Held-out tokens on which the quantized base is compared with the 16/32-bit one at the start
    # of a run (top-1 agreement, KLD); 0 skips the check.
    quant_report_tokens: int = 512
    lora: LoraConfig = field(default_factory=LoraConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)


def _non_finite(obj, prefix: str = "") -> list[str]:
    """Every float setting that is NaN or infinite: ``lr=nan`` would pass ``lr <= 0``, and a NaN
    threshold would pass or fail every comparison silently."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _non_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"{prefix}{f.name}={value} must be a finite number")
    return out


def _validate(cfg: Config) -> list[str]:
    problems = _non_finite(cfg)
    if cfg.quant not in QUANT_CHOICES:
        problems.append(f"quant={cfg.quant!r} is not one of {', '.join(QUANT_CHOICES)}")
    if cfg.lora.r <= 0:
        problems.append(f"lora.r={cfg.lora.r} must be a positive integer (try 8 or 16)")
    if cfg.lora.alpha <= 0:
        problems.append(f"lora.alpha={cfg.lora.alpha} must be positive")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        problems.append(f"lora.dropout={cfg.lora.dropout} must be in [0, 1)")
    if not cfg.lora.target.strip():
        problems.append("lora.target is empty; use all-linear, attention or a list of module names")
    for name in ("max_steps", "batch_size", "grad_accum", "max_len", "eval_batch_size",
                 "max_new_tokens"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name}={getattr(cfg, name)} must be a positive integer")
    for name in ("save_every", "eval_every", "warmup_steps", "eval_examples",
                 "keep_checkpoints", "quant_report_tokens"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name}={getattr(cfg, name)} must be >= 0")
    if cfg.lr <= 0:
        problems.append(f"lr={cfg.lr} must be positive")
    if cfg.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"compute_dtype={cfg.compute_dtype!r} is not one of auto, float32, "
                        "bfloat16, float16")
    if cfg.export.merge_base not in MERGE_BASES:
        problems.append(f"export.merge_base={cfg.export.merge_base!r} is not one of "
                        f"{', '.join(MERGE_BASES)}")
    return problems


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls=Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key the config accepts, mapped to its type."""
    keys = {}
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.update(valid_keys(tp, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = tp
    return keys


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ValueError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}={value!r} is not a boolean (use true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        try:
            as_float = float(str(value))
        except ValueError:
            raise ValueError(f"{key}={value!r} is not an integer") from None
        if not as_float.is_integer():
            raise ValueError(f"{key}={value!r} is not an integer")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return "" if value is None else str(value)
    raise ValueError(f"{key}: unsupported type {tp}")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    flat = {}
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _closest(key: str, candidates) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{match[0]}'?"
    return f"; valid keys: {', '.join(sorted(candidates))}"


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["lora.r=16", "max_steps=200"]`` -> {"lora.r": "16", "max_steps": "200"}."""
    out, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not key=value")
            continue
        out[key.strip()] = value.strip()
    if problems:
        raise ConfigError(problems)
    return out


def read_recipe(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {p} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {p} must be a mapping of keys to values, found "
                          f"{type(data).__name__}")
    return _flatten(data)


def build_config(values: dict[str, Any] | None = None, base: Config | None = None) -> Config:
    """Apply flat dotted ``values`` on top of ``base`` (defaults) and validate everything."""
    keys = valid_keys()
    problems = []
    nested: dict[str, dict[str, Any]] = {}
    for key, raw in (values or {}).items():
        if key not in keys:
            problems.append(f"unknown config key '{key}'{_closest(key, keys)}")
            continue
        try:
            value = _coerce(key, raw, keys[key])
        except ValueError as exc:
            problems.append(str(exc))
            continue
        section, _, leaf = key.rpartition(".")
        nested.setdefault(section, {})[leaf] = value
    if problems:
        raise ConfigError(problems)
    cfg = base or Config()
    for section, changes in nested.items():
        if section:
            sub = dataclasses.replace(getattr(cfg, section), **changes)
            cfg = dataclasses.replace(cfg, **{section: sub})
        else:
            cfg = dataclasses.replace(cfg, **changes)
    problems = _validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the recipe file, then ``key=value`` overrides (the command line wins)."""
    values: dict[str, Any] = {}
    problems = []
    if recipe:
        try:
            values.update(read_recipe(recipe))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if overrides:
        try:
            values.update(parse_overrides(overrides))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return build_config(values)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def env_number(name: str, cast: type, minimum: float, default: Any = None,
               what: str = "a number") -> Any:
    """The environment variable ``name`` as ``cast`` (int or float), ``default`` when unset or
    empty; one-line ``InputError`` when it is not a finite number or is below ``minimum``."""
    import os

    from .errors import InputError

    env = os.environ.get(name, "").strip()
    if not env:
        return default
    try:
        value = cast(env)
    except ValueError:
        raise InputError(f"{name}={env!r} is not {what}") from None
    if not math.isfinite(value):
        raise InputError(f"{name}={env!r} must be a finite number")
    if value < minimum:
        raise InputError(f"{name}={value} must be >= {minimum}")
    return value

"""The GGUF exporter's options, verification thresholds and calibration request: what the
export stage asks before any slow work (``check_options``, ``calibration_request``,
``default_thresholds``)."""

from __future__ import annotations

import difflib
from typing import Any

from edgeqlora.errors import ConfigError
from edgeqlora.heldout import GENERAL_SHARE, check_rows, check_share

from .imatrix import DEFAULT_ROWS, IMATRIX_QUANTS, MAX_LEN, NONE, check_imatrix

# imatrix: none | auto (the adapter's training data) | a data spec of calibration rows;
# imatrix_rows: how many of them; calibration_general: the share of the importance matrix's
# tokens from general English (heldout.CALIBRATION_TEXT); name: the file stem of a full-model
# export.
# identity: the general.* keys (export_inputs.identity), from the export stage.
DEFAULT_OPTIONS = {"imatrix": NONE, "imatrix_rows": DEFAULT_ROWS,
                   "calibration_general": GENERAL_SHARE, "name": "model", "identity": None}

# Verification thresholds (GGUF in llama.cpp vs the merged model in fp32 torch, held-out tokens).
# From measurements on SmolLM2-135M (the table: Q8_0 0.96 / 0.006, Q4_K_M 0.85 / 0.10,
# Q4_0 0.66 / 0.36 against fp32) with headroom; a file below them is broken, not just lossy.
VERIFY_THRESHOLDS = {
    "f32": {"min_top1": 0.99, "max_kld": 0.002},
    "f16": {"min_top1": 0.98, "max_kld": 0.01},
    "bf16": {"min_top1": 0.95, "max_kld": 0.03},
    "q8_0": {"min_top1": 0.93, "max_kld": 0.03},
    "q6_k": {"min_top1": 0.90, "max_kld": 0.06},
    "q5_k_m": {"min_top1": 0.85, "max_kld": 0.12},
    "q4_k_m": {"min_top1": 0.75, "max_kld": 0.25},
    "q4_0": {"min_top1": 0.55, "max_kld": 0.6},
    "q4_1": {"min_top1": 0.6, "max_kld": 0.5},  # a little finer than Q4_0 (a min per block)
    "q3_k_m": {"min_top1": 0.55, "max_kld": 0.6},
}


def default_thresholds(quant: str) -> dict[str, float]:
    return dict(VERIFY_THRESHOLDS[quant])


def check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` with the defaults filled in and normalised (``imatrix`` through
    ``check_imatrix``: a missing path is an InputError here). Unknown keys and bad values are
    one ConfigError naming them all."""
    options = dict(options or {})
    problems = []
    for key in sorted(set(options) - set(DEFAULT_OPTIONS)):
        match = difflib.get_close_matches(key, list(DEFAULT_OPTIONS), n=1, cutoff=0.5)
        hint = f"did you mean '{match[0]}'? " if match else ""
        problems.append(f"unknown GGUF export option '{key}' ({hint}valid: "
                        f"{', '.join(DEFAULT_OPTIONS)})")
    out = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items()
                                 if k in DEFAULT_OPTIONS and v is not None}}
    try:
        check_rows(out["imatrix_rows"], "imatrix_rows")
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        check_share(out["calibration_general"], "calibration_general")
    except ConfigError as exc:
        problems.append(str(exc))
    name = out["name"]
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
        problems.append(f"name={name!r} must be a plain file stem (no '/', not hidden)")
    if problems:
        raise ConfigError("; ".join(problems))
    out["imatrix"] = check_imatrix(out["imatrix"])
    return out


def calibration_request(quant: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The calibration rows ``quant`` needs with these options, for the export stage to make
    (``heldout.calibration_sequences``) and pass to ``write_export`` as ``calibration``; None
    when none are needed (``imatrix=none``, or a type that uses no importance matrix:
    ``write_export`` records why)."""
    opts = check_options(options)
    if opts["imatrix"] == NONE or quant.strip().lower() not in IMATRIX_QUANTS:
        return None
    return {"spec": opts["imatrix"], "rows": opts["imatrix_rows"], "max_len": MAX_LEN,
            "general": opts["calibration_general"], "what": "imatrix calibration data"}


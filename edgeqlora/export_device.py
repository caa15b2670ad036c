"""Choosing an export's quant for a device (``edgeqlora export --device pi-zero-2w``).

Part of the export stage (``edgeqlora.export`` calls it). The candidates (``DEVICE_CANDIDATES``,
best first, or the one ``--quant`` asked for) get a footprint predicted from the base's shapes
before anything is written: the exporter's own ``predict`` (built from the plan its writer
uses), turned into a fit by ``devices.fit``. Those that cannot fit are never exported; the rest
are tried in order of precision, and this module keeps the record of every attempt and the
one-line errors for when none is shipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError, DeviceError, MissingDependencyError, ParityError

MiB = 2**20

# What ``--device`` chooses from, best first. It starts at 8 bits: decode on a CPU is
# bandwidth-bound, so 16-bit weights halve the speed for a difference the parity gate does not
# see (SmolLM2-135M: Q8_0 KLD 0.006 against fp32). Ask for f16 / fp16 with --quant.
DEVICE_CANDIDATES = {
    "gguf": ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m"),
    "onnx": ("int8", "int4-gptq-q8head", "int4-gptq"),
}


class Rejected(Exception):
    """A quant tried under ``--device`` that is not shipped; the next candidate is tried."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(record["why"])
        self.record = record


def attempt(quant: str, predicted, outcome: str, why: str, **extra: Any) -> dict[str, Any]:
    return {"quant": quant, "outcome": outcome, "why": why,
            "predicted_bytes": predicted.total_bytes if predicted else None,
            "predicted_verdict": predicted.verdict if predicted else None, **extra}


def candidates_for(exporter, target: str, device, quant: str | None, adapter_only: bool
                   ) -> tuple[Any, list[str], list[dict[str, Any]]]:
    """The profile, the quants to consider (best first) and those left out (with why)."""
    from .devices.profiles import DeviceProfile, load_profile

    profile = device if isinstance(device, DeviceProfile) else load_profile(device)
    if target not in profile.runtimes:
        raise DeviceError(f"{profile.name} has no {target} runtime (it has: "
                          f"{', '.join(profile.runtimes)}); export with --target "
                          f"{profile.runtimes[0]}")
    if quant is not None:
        return profile, [exporter.check_quant(quant, adapter_only)], []
    candidates, left_out = [], []
    for q in DEVICE_CANDIDATES[target]:
        try:
            candidates.append(exporter.check_quant(q, adapter_only))
        except (ConfigError, MissingDependencyError) as exc:
            left_out.append(attempt(q, None, "not available", str(exc)))
    if not candidates:
        raise MissingDependencyError(f"no {target} quant can be exported here: " + "; ".join(
            f"{t['quant']}: {t['why']}" for t in left_out))
    return profile, candidates, left_out


def plan(base_dir: Path, target: str, candidates: list[str], profile, context: int,
         options: dict[str, Any], tried: list[dict[str, Any]], explicit: bool | str, out_dir: Path
         ) -> list[tuple[str, Any]]:
    """(quant, predicted FitResult) to try, best first; the quants predicted not to fit go
    into ``tried``. Nothing left -> DeviceError before anything is written.

    Precision decides the order, "fits" and "tight" alike. ``pick_quant`` puts the 15 % margin
    first because it chooses among exports whose quality nobody measured; here the parity gate
    measures it, and the tighter choice is said in the reason and the manifest."""
    from .artifacts import read_json
    from .devices.fit import fit, predict_facts
    from .errors import InputError
    from .merge import tensor_specs

    config = read_json(base_dir / "config.json", InputError)
    shapes = {name: shape for _, name, shape, _ in tensor_specs(base_dir)}

    def predict(q: str):
        return fit(predict_facts(config, shapes, target, q, path=f"{target} {q}",
                                 tokenizer_dir=base_dir, **options), profile, context)

    predicted = {q: predict(q) for q in candidates}
    fitting = [q for q in candidates if predicted[q].verdict in ("fits", "tight")]
    for q in candidates:
        if q not in fitting:
            r = predicted[q]
            tried.append(attempt(q, r, "not exported", f"predicted {r.total_bytes / MiB:.0f} "
                                 f"MiB > {profile.usable_mb} MiB usable"))
    where = f"{profile.name} ({profile.usable_mb} MiB usable) at context {context}"
    if not fitting and isinstance(explicit, str):  # a device-aware adapter's own base
        q, r = candidates[0], predicted[candidates[0]]
        raise DeviceError(f"{q} ({explicit}) does not fit {where}: {r.total_bytes / MiB:.0f} "
                          f"MiB predicted ({parts(r)}); train the adapter on a smaller device "
                          "base (quant=gguf-q4_0) or pass --merge to let --device choose a "
                          f"quant; nothing was written to {out_dir}")
    if not fitting and explicit:
        q, r = candidates[0], predicted[candidates[0]]
        others = {o: predict(o) for o in DEVICE_CANDIDATES.get(target, ()) if o != q}
        ok = [o for o, ro in others.items() if ro.verdict in ("fits", "tight")]
        hint = (f"{ok[0]} is predicted to fit ({others[ok[0]].total_bytes / MiB:.0f} MiB); "
                "drop --quant to let --device choose") if ok else \
            "no quant is predicted to fit; try a shorter --context or a smaller base model"
        raise DeviceError(f"--quant {q} does not fit {where}: {r.total_bytes / MiB:.0f} MiB "
                          f"predicted ({parts(r)}); {hint}; nothing was written to {out_dir}")
    if not fitting:
        q = min(candidates, key=lambda c: predicted[c].total_bytes)
        r = predicted[q]
        raise DeviceError(f"no {target} quant fits {where}: the smallest footprint is {q} at "
                          f"{r.total_bytes / MiB:.0f} MiB predicted ({parts(r)}); try a shorter "
                          f"--context, a smaller base model or a bigger device; nothing was "
                          f"written to {out_dir}")
    return [(q, predicted[q]) for q in fitting]


def parts(r) -> str:
    return (f"weights {r.weights_bytes / MiB:.0f} MiB + repacked {r.repacked_bytes / MiB:.0f} "
            f"+ KV cache {r.kv_bytes / MiB:.0f} + runtime {r.runtime_bytes / MiB:.0f}")


def check_real_fit(export_dir: Path, quant: str, profile, context: int, predicted):
    """The fit of the written files (cheap, so before the gate); a misfit is Rejected."""
    from .devices.fit import fit, model_facts

    real = fit(model_facts(export_dir), profile, context)
    if real.verdict not in ("fits", "tight"):
        raise Rejected(attempt(quant, predicted, real.verdict,
                               f"{real.total_bytes / MiB:.0f} MiB for the written files > "
                               f"{profile.usable_mb} MiB usable", total_bytes=real.total_bytes))
    return real


def record(target: str, quant: str, profile, context: int, predicted, real, parity: bool,
           explicit: bool | str, tried: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """The manifest's ``device`` section for the quant that is shipped."""
    how = "fits" if real.verdict == "fits" else "fits (without the 15 % margin)"
    gated = "passes the parity gate" if parity else "passes verification (parity gate not run)"
    predicted_mib = f"{predicted.total_bytes / MiB:.0f} MiB" if predicted else "no prediction"
    what = f"{quant} ({explicit})" if isinstance(explicit, str) else \
        f"{quant} (asked for with --quant)" if explicit else \
        f"{quant} is the highest-precision {target} quant that"
    reason = (f"{what} {how} {profile.name} and {gated}: {real.total_bytes / MiB:.0f} MiB for "
              f"the written files ({predicted_mib} predicted before export) of "
              f"{profile.usable_mb} MiB usable at context {context}")
    if tried:
        reason += "; not chosen: " + "; ".join(f"{t['quant']} {t['outcome']} ({t['why']})"
                                               for t in tried)
    chosen = attempt(quant, predicted, "chosen", f"{real.verdict}: "
                     f"{real.total_bytes / MiB:.0f} MiB for the written files; {gated}",
                     total_bytes=real.total_bytes)
    return {"name": profile.name, "title": profile.title, "profile": profile.source,
            "context": context, "usable_bytes": profile.usable_bytes,
            "verdict": real.verdict, "predicted_bytes": predicted.total_bytes
            if predicted else None, "total_bytes": real.total_bytes,
            # the fit of the files as shipped (measured in the temporary directory)
            "fit": {**real.to_dict(), "model": str(out_dir)},
            "reason": reason, "tried": [*tried, chosen]}


def none_passed(target: str, profile, context: int, tried: list[dict[str, Any]],
                out_dir: Path) -> None:
    """Every candidate lost: say why for each one, as a ParityError when quality was the
    reason for any of them, else as a DeviceError naming the smallest footprint found."""
    listing = "; ".join(f"{t['quant']} {t['outcome']} ({t['why']})" for t in tried)
    if any(t["outcome"] in ("failed the parity gate", "failed verification") for t in tried):
        raise ParityError(f"no {target} quant that fits {profile.name} passes the gate: "
                          f"{listing}; nothing was written to {out_dir} (loosen the parity.* "
                          "thresholds, or train a better adapter)")
    sized = [(t.get("total_bytes") or t["predicted_bytes"], t["quant"]) for t in tried
             if t.get("total_bytes") or t["predicted_bytes"]]
    smallest = (f"; the smallest footprint found is {min(sized)[1]} at "
                f"{min(sized)[0] / MiB:.0f} MiB") if sized else ""
    raise DeviceError(f"no {target} quant fits {profile.name} ({profile.usable_mb} MiB usable) "
                      f"at context {context}{smallest}: {listing}; nothing was written to "
                      f"{out_dir}")

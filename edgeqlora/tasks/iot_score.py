"""Scoring the IoT task: parse a model's answer into an action and compare it with the target
(exact match, per-field accuracy, parse rate), following the canonical convention that
``edgeqlora.tasks.iot`` documents."""

from __future__ import annotations

import json
from typing import Any

FIELDS = ("device", "room", "action", "value", "unit", "time")


def parse_action(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (code fences, prose around it are fine), or None.

    Keys whose value is ``null`` are dropped: the canonical form omits keys that do not apply.
    """
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            return {k: v for k, v in obj.items() if v is not None}
        start = text.find("{", start + 1)
    return None


def _same(a: Any, b: Any) -> bool:
    # bool is an int in Python: true must not count as 1.
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def score(predictions: list[str], targets: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact match, per-field accuracy and parse rate of model outputs against targets.

    * ``exact_match``: the parsed object equals the target (same keys, same values; an int and
      the equal float count as equal, "40" and 40 do not);
    * ``field_accuracy[f]``: the parsed object agrees with the target on field ``f``, where
      "absent in both" agrees; an unparseable output is wrong on every field;
    * ``parse_rate``: share of outputs that contain a JSON object.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    n = len(targets)
    if n == 0:
        return {"n": 0, "exact_match": 0.0, "parse_rate": 0.0,
                "field_accuracy": {f: 0.0 for f in FIELDS}}
    exact = parsed_n = 0
    field_hits = {f: 0 for f in FIELDS}
    missing = object()
    for text, target in zip(predictions, targets):
        parsed = parse_action(text)
        if parsed is None:
            continue
        parsed_n += 1
        if parsed.keys() == target.keys() and all(_same(parsed[k], target[k]) for k in target):
            exact += 1
        for f in FIELDS:
            a, b = parsed.get(f, missing), target.get(f, missing)
            if (a is missing and b is missing) or (a is not missing and b is not missing
                                                   and _same(a, b)):
                field_hits[f] += 1
    return {"n": n, "exact_match": exact / n, "parse_rate": parsed_n / n,
            "field_accuracy": {f: field_hits[f] / n for f in FIELDS}}

"""The embedded task: smart-home / IoT commands -> one compact JSON action.

A user types a command such as "could you dim the kitchen lights to forty percent at 7:30 am"
and the model must answer with exactly one JSON object::

  {"device":"light","room":"kitchen","action":"set_brightness","value":40,"unit":"%","time":"07:30"}

This is what small on-device models are really asked to do (a voice assistant or a hub turning
free text into a call to a device API), it is scored exactly, and a 135M base model does it
badly before training: SmolLM2-135M-Instruct (Q4_1 GGUF, llama.cpp, greedy) answered 0 of the
first 60 held-out commands exactly and wrote a JSON object for only 2 of them (prose, Python
code, refusals instead).

Canonical convention (what the targets contain, and what ``score`` compares):

* keys, always in this order: ``device, room, action, value, unit, time``;
* a key that does not apply is **omitted** (never ``null``): no room was named -> no ``room``;
  ``parse_action`` drops ``null`` values so a model that writes them is not penalised twice;
* ``device``, ``room``, ``action`` are snake_case identifiers from the tables below;
* ``value`` is an integer (brightness, volume, position in percent; temperature; fan speed 1-5;
  channel; watering minutes) or a lower-case word (colour, thermostat mode);
* ``unit`` comes with the value: ``"%"`` for brightness, volume and blind position (also when the
  user says just "to 40"), ``"C"``/``"F"`` for temperatures (celsius unless the user says
  fahrenheit), ``"min"`` for watering durations; fan speed, channel, colour and mode have none;
* ``time`` is ``"HH:MM"`` (24 h) for a clock time ("at half past seven in the evening" ->
  ``"19:30"``) and ``"+HH:MM"`` for a delay ("in 10 minutes" -> ``"+00:10"``). Word times always
  say morning/evening/am/pm, so every command has exactly one correct answer.

The dataset is generated from a seed with ``random.Random(seed)`` (same seed -> same bytes).
The held-out split is built to measure generalisation, not memorisation: some phrasing templates
(``TEMPLATES`` entries marked ``eval_only``), some device x room pairs and some values
(percentages ending in 3 or 7) never occur in training; the rest of the held-out rows are new
sentences from training templates. No held-out user text occurs in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# The vocabulary and phrasing (iot_phrasing) and the scoring (iot_score) are importable from here,
# where callers have always found them.
from .iot_phrasing import (COLORS, DEVICE_ROOMS, DEVICES, MODES, PREFIXES, ROOMS,  # noqa: F401
                           SUFFIXES, TEMPLATES, Template, number_words, render, rooms_for)
from .iot_score import FIELDS, parse_action, score  # noqa: F401

# Short on purpose: a 135M model trained on CPU pays for every token of it in every example.
# (20 tokens with the SmolLM2 tokenizer; keys that do not apply are omitted, training teaches it.)
SYSTEM_PROMPT = "Convert the command to a JSON action (device, room, action, value, unit, time)."


def _held_pairs(seed: int) -> set[tuple[str, str]]:
    """About one in eight device x room pairs, chosen from the seed, never seen in training."""
    rng = random.Random(f"iot-held-pairs-{seed}")
    pairs = sorted((d, r) for d, rooms in DEVICE_ROOMS.items() for r in rooms if r is not None)
    held = set()
    for device in DEVICE_ROOMS:
        own = [p for p in pairs if p[0] == device]
        if len(own) >= 3:  # keep at least two rooms of every device in training
            held.add(rng.choice(own))
    return held


def make_row(target: dict[str, Any], text: str, meta: dict[str, Any] | None = None) -> dict:
    row = {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": text},
            {"role": "assistant", "content": to_json(target)},
        ],
        "target": target,
    }
    if meta is not None:
        row["meta"] = meta
    return row


def to_json(action: dict[str, Any]) -> str:
    """The canonical compact JSON of an action: fixed key order, no spaces."""
    ordered = {k: action[k] for k in FIELDS if k in action}
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of one action, built from the tables (what ``run``/``serve`` constrain
    decoding to): the canonical key order, every enum the task knows, no other keys.

    It accepts every target the generator writes (tested) and nothing that ``score`` could not
    count as an action; it does not encode which value goes with which action (a schema that
    did would be a ``oneOf`` per action, longer than the model's answer)."""
    actions = sorted({t.action for t in TEMPLATES})
    words = sorted(set(COLORS) | set(MODES))
    return {
        "title": "iot_action",
        "type": "object",
        "properties": {
            "device": {"enum": list(DEVICES)},
            "room": {"enum": list(ROOMS)},
            "action": {"enum": actions},
            "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000},
                                {"enum": words}]},
            "unit": {"enum": ["%", "C", "F", "min"]},
            "time": {"type": "string", "pattern": r"^\+?([01][0-9]|2[0-3]):[0-5][0-9]$"},
        },
        "required": ["device", "action"],
        "additionalProperties": False,
        # Compact, as the targets are written (to_json): no whitespace between tokens.
        "x-guidance": {"whitespace_flexible": False},
    }


def generate(seed: int = 0, n_train: int = 2000,
             n_eval: int = 200) -> tuple[list[dict], list[dict]]:
    """The train and held-out splits, deterministic in ``seed``.

    Each row is ``{"messages": [system, user, assistant], "target": dict, "meta": {...}}`` where
    the assistant content is ``to_json(target)``. ``meta`` says how the row was made:
    ``template`` (index into ``TEMPLATES``) and, for held-out rows, ``holdout``: "template"
    (a phrasing never used in training), "combo" (a device x room pair never in training),
    "value" (a percentage ending in 3 or 7, never in training) or "iid" (a new sentence from
    training templates and combinations). User texts are unique within and across splits.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train={n_train} and n_eval={n_eval} must be >= 0")
    rng = random.Random(seed)
    held_pairs = _held_pairs(seed)
    train_tpls = [i for i, t in enumerate(TEMPLATES) if not t.eval_only]
    eval_tpls = [i for i, t in enumerate(TEMPLATES) if t.eval_only]
    percent_tpls = [i for i in train_tpls
                    if TEMPLATES[i].action in ("set_brightness", "set_volume", "set_position")]
    seen: set[str] = set()

    def draw(tpl_ids: list[int], pair_ok, held_value: bool, kind: str | None):
        for _ in range(1000):
            ti = rng.choice(tpl_ids)
            tpl = TEMPLATES[ti]
            device = rng.choice(tpl.devices)
            rooms = [r for r in rooms_for(tpl, device) if pair_ok(device, r)]
            if not rooms:
                continue
            room = rng.choice(rooms)
            target, text = render(rng, tpl, device, room, held_value)
            if text in seen:
                continue
            seen.add(text)
            meta = {"template": ti} if kind is None else {"template": ti, "holdout": kind}
            return make_row(target, text, meta)
        raise RuntimeError("could not draw a new unique command; the phrasing space is exhausted")

    def seen_pair(d, r):
        return (d, r) not in held_pairs

    train = [draw(train_tpls, seen_pair, False, None) for _ in range(n_train)]
    eval_rows = []
    for i in range(n_eval):
        kind = ("template", "combo", "value", "iid")[i % 4]
        if kind == "template":
            row = draw(eval_tpls, seen_pair, False, kind)
        elif kind == "combo":
            row = draw(train_tpls, lambda d, r: (d, r) in held_pairs, False, kind)
        elif kind == "value":
            row = draw(percent_tpls, seen_pair, True, kind)
        else:
            row = draw(train_tpls, seen_pair, False, kind)
        eval_rows.append(row)
    return train, eval_rows


def to_jsonl(rows: list[dict]) -> str:
    """Rows as JSON Lines text (stable: same rows -> same bytes)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_jsonl(rows), encoding="utf-8")
    return path


def write_dataset(out_dir: str | Path, seed: int = 0, n_train: int = 2000,
                  n_eval: int = 200) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of the task into ``out_dir``."""
    train, eval_rows = generate(seed, n_train, n_eval)
    out = Path(out_dir)
    return write_jsonl(train, out / "train.jsonl"), write_jsonl(eval_rows, out / "eval.jsonl")

"""How the IoT task's commands are said: devices, rooms, phrasing templates, and the ways
people say values and times.

``render`` turns (template, device, room) into a (target action, user sentence) pair, drawing
every choice from the caller's ``random.Random``, so the same seed gives the same sentences.
``edgeqlora.tasks.iot`` decides which templates, pairs and values each split may use.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

# Canonical id -> the ways people say it.
DEVICES = {
    "light": ["light", "lights", "lamp", "ceiling light"],
    "thermostat": ["thermostat", "heating", "climate control"],
    "fan": ["fan", "ceiling fan"],
    "blinds": ["blinds", "shades", "shutters", "curtains"],
    "lock": ["lock", "smart lock"],
    "speaker": ["speaker", "smart speaker", "music"],
    "tv": ["tv", "TV", "television"],
    "plug": ["plug", "smart plug", "socket", "outlet"],
    "coffee_maker": ["coffee maker", "coffee machine"],
    "vacuum": ["vacuum", "robot vacuum", "hoover"],
    "sprinkler": ["sprinkler", "sprinklers", "garden watering"],
    "oven": ["oven"],
}
ROOMS = {
    "living_room": ["living room", "lounge"],
    "kitchen": ["kitchen"],
    "bedroom": ["bedroom", "master bedroom"],
    "bathroom": ["bathroom"],
    "office": ["office", "study"],
    "kids_room": ["kids room", "children's room", "nursery"],
    "dining_room": ["dining room"],
    "hallway": ["hallway", "hall", "corridor"],
    "garage": ["garage"],
    "garden": ["garden", "backyard"],
    "front_door": ["front door"],
    "back_door": ["back door"],
}
# Where each device exists; None = the command may name no room at all.
DEVICE_ROOMS = {
    "light": ["living_room", "kitchen", "bedroom", "bathroom", "office", "kids_room",
              "dining_room", "hallway", "garage", "garden"],
    "thermostat": [None, "living_room", "bedroom", "office", "kids_room", "bathroom"],
    "fan": ["living_room", "bedroom", "office", "kids_room", "kitchen"],
    "blinds": ["living_room", "bedroom", "office", "kitchen", "kids_room", "dining_room"],
    "lock": ["front_door", "back_door", "garage"],
    "speaker": [None, "living_room", "kitchen", "bedroom", "office", "bathroom"],
    "tv": [None, "living_room", "bedroom", "kids_room"],
    "plug": ["living_room", "kitchen", "office", "garage", "bedroom"],
    "coffee_maker": [None, "kitchen"],
    "vacuum": [None, "living_room", "kitchen", "bedroom", "hallway", "office", "dining_room"],
    "sprinkler": [None, "garden"],
    "oven": [None, "kitchen"],
}
COLORS = ["red", "blue", "green", "warm white", "purple", "orange", "yellow", "pink"]
MODES = ["heat", "cool", "auto", "eco"]

# Slots: {dev} device phrase, {room} room phrase (with "the"/"in the" written in the template),
# {val} value phrase. "{loc}" expands to " in the <room>" or "" when no room is named, so one
# template serves both. A leading "!" marks a statement that takes no "please"/"could you".


@dataclass(frozen=True)
class Template:
    action: str
    devices: tuple[str, ...]
    text: str
    eval_only: bool = False


def _t(action, devices, *texts, held=()):
    return [Template(action, tuple(devices), t, eval_only=(i in held)) for i, t in enumerate(texts)]


_ON_OFF_DEVICES = ("light", "fan", "tv", "plug", "speaker", "thermostat", "coffee_maker")
TEMPLATES: list[Template] = [
    *_t("turn_on", _ON_OFF_DEVICES,
        "turn on the {dev}{loc}", "switch on the {dev}{loc}", "turn the {dev}{loc} on",
        "power up the {dev}{loc}", "!I want the {dev}{loc} on", "start the {dev}{loc}",
        "get the {dev}{loc} going", held=(6,)),
    *_t("turn_off", _ON_OFF_DEVICES + ("sprinkler", "oven"),
        "turn off the {dev}{loc}", "switch off the {dev}{loc}", "turn the {dev}{loc} off",
        "shut off the {dev}{loc}", "!the {dev}{loc} should be off", "kill the {dev}{loc}",
        "cut the power to the {dev}{loc}", held=(6,)),
    *_t("set_brightness", ("light",),
        "set the {dev}{loc} to {val}", "dim the {dev}{loc} to {val}",
        "set the brightness of the {dev}{loc} to {val}", "change the {dev}{loc} to {val}",
        "make the {dev}{loc} {val} bright", "!{room} {dev} at {val}",
        "adjust the {dev}{loc} so it is at {val} brightness", held=(6,)),
    *_t("set_color", ("light",),
        "make the {dev}{loc} {val}", "change the {dev}{loc} to {val}",
        "set the {dev}{loc} colour to {val}", "turn the {dev}{loc} {val}",
        "switch the {dev}{loc} over to a {val} colour", held=(4,)),
    *_t("set_temperature", ("thermostat", "oven"),
        "set the {dev}{loc} to {val}", "change the {dev}{loc} to {val}",
        "!I want it at {val} on the {dev}{loc}", "put the {dev}{loc} on {val}",
        "bring the {dev}{loc} up to {val}", held=(4,)),
    *_t("set_temperature", ("thermostat",),
        "heat the {room_or_house} to {val}", "set the temperature{loc} to {val}",
        "!it's cold, make the {room_or_house} {val}", held=(2,)),
    *_t("set_mode", ("thermostat",),
        "set the {dev}{loc} to {val} mode", "switch the {dev}{loc} to {val}",
        "put the {dev}{loc} in {val} mode", "use {val} mode on the {dev}{loc}", held=(3,)),
    *_t("set_speed", ("fan",),
        "set the {dev}{loc} to speed {val}", "set the {dev}{loc} speed to {val}",
        "put the {dev}{loc} on level {val}", "run the {dev}{loc} at speed {val}",
        "crank the {dev}{loc} to setting {val}", held=(4,)),
    *_t("open", ("blinds",),
        "open the {dev}{loc}", "raise the {dev}{loc}", "pull up the {dev}{loc}",
        "let some light in through the {dev}{loc}", held=(3,)),
    *_t("close", ("blinds",),
        "close the {dev}{loc}", "lower the {dev}{loc}", "shut the {dev}{loc}",
        "draw the {dev}{loc} all the way down", held=(3,)),
    *_t("set_position", ("blinds",),
        "set the {dev}{loc} to {val}", "open the {dev}{loc} to {val}",
        "move the {dev}{loc} to {val}", "put the {dev}{loc} at {val} open", held=(3,)),
    *_t("lock", ("lock",),
        "lock the {room}", "lock the {room} {dev}", "make sure the {room} is locked",
        "secure the {room}", held=(3,)),
    *_t("unlock", ("lock",),
        "unlock the {room}", "unlock the {room} {dev}", "open the {room} {dev}",
        "release the {room} {dev}", held=(3,)),
    *_t("set_volume", ("speaker", "tv"),
        "set the {dev}{loc} volume to {val}", "turn the {dev}{loc} volume to {val}",
        "change the volume of the {dev}{loc} to {val}", "put the {dev}{loc} at {val} volume",
        "make the {dev}{loc} play at {val} volume", held=(4,)),
    *_t("set_channel", ("tv",),
        "switch the {dev}{loc} to channel {val}", "put channel {val} on the {dev}{loc}",
        "change the {dev}{loc} to channel {val}", "tune the {dev}{loc} to channel {val}",
        held=(3,)),
    *_t("start", ("vacuum",),
        "start the {dev}{loc}", "run the {dev}{loc}", "vacuum the {room_or_house}",
        "send the {dev} to clean the {room_or_house}", held=(3,)),
    *_t("stop", ("vacuum",),
        "stop the {dev}{loc}", "pause the {dev}{loc}", "send the {dev}{loc} back to its dock",
        held=(2,)),
    *_t("water", ("sprinkler",),
        "water the {room_or_garden} for {val}", "run the {dev}{loc} for {val}",
        "turn on the {dev}{loc} for {val}", "give the {room_or_garden} {val} of water",
        held=(3,)),
]

PREFIXES = ["", "", "", "please ", "could you ", "can you ", "hey, ", "hey home, ",
            "I'd like you to ", "would you "]
SUFFIXES = ["", "", "", " please", ", thanks", ", thank you", " now"]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0..999 in English words ("forty-two", "two hundred fifty")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")


def _num(rng: random.Random, n: int) -> str:
    return number_words(n) if rng.random() < 0.35 else str(n)


def _percent_value(rng: random.Random, held: bool) -> int:
    """Training percentages never end in 3 or 7; the 'value' held-out rows always do."""
    if held:
        return rng.randrange(0, 10) * 10 + rng.choice((3, 7))
    while True:
        v = rng.choice((rng.randrange(1, 21) * 5, rng.randrange(1, 100)))
        if v % 10 not in (3, 7):
            return v


def _value(rng: random.Random, action: str, device: str, held_value: bool):
    """(value, unit, phrase) for an action, or (None, None, '') when it takes none."""
    if action in ("set_brightness", "set_volume", "set_position"):
        v = _percent_value(rng, held_value)
        phrase = rng.choice([f"{v}%", f"{v} percent", f"{number_words(v)} percent", f"{v}"])
        return v, "%", phrase
    if action == "set_color":
        c = rng.choice(COLORS)
        return c, None, c
    if action == "set_mode":
        m = rng.choice(MODES)
        return m, None, m
    if action == "set_temperature":
        if device == "oven":
            v = rng.randrange(15, 26) * 10
            return v, "C", rng.choice([f"{v} degrees", f"{v}°C", f"{v} degrees celsius"])
        if rng.random() < 0.25:
            v = rng.randrange(60, 81)
            return v, "F", rng.choice([f"{v}°F", f"{_num(rng, v)} degrees fahrenheit",
                                       f"{v} F"])
        v = rng.randrange(16, 29)
        return v, "C", rng.choice([f"{_num(rng, v)} degrees", f"{v}°C", f"{v} C",
                                   f"{_num(rng, v)} degrees celsius", f"{v}°"])
    if action == "set_speed":
        v = rng.randrange(1, 6)
        return v, None, _num(rng, v)
    if action == "set_channel":
        v = rng.choice((rng.randrange(1, 60), rng.randrange(100, 1000)))
        return v, None, _num(rng, v) if v < 100 else str(v)
    if action == "water":
        v = rng.choice((5, 10, 15, 20, 25, 30, 45, 60, 90))
        return v, "min", rng.choice([f"{_num(rng, v)} minutes", f"{v} min", f"{v} minutes"])
    return None, None, ""


_HALF_DAY_WORDS = {0: ["in the morning", "am"], 1: ["in the evening", "pm"]}


def _clock_phrase(rng: random.Random, hour: int, minute: int) -> str:
    """One way to say hour:minute (24 h) that is never ambiguous between am and pm."""
    if (hour, minute) == (12, 0) and rng.random() < 0.5:
        return "at noon"
    if (hour, minute) == (0, 0) and rng.random() < 0.5:
        return "at midnight"
    h12 = hour % 12 or 12
    if 12 <= hour < 18:
        half = rng.choice(["in the afternoon", "pm"])
    else:
        half = rng.choice(_HALF_DAY_WORDS[hour >= 12])
    style = rng.randrange(4)
    if hour == 0 or (hour, minute) == (23, 45):
        style = rng.randrange(2)  # "twelve ... in the morning" for midnight misleads; use digits
    if style == 0:
        return f"at {hour:02d}:{minute:02d}"
    if style == 1:
        ampm = "am" if hour < 12 else "pm"
        return f"at {h12}:{minute:02d} {ampm}" if minute else f"at {h12} {ampm}"
    if minute == 30:
        return f"at half past {number_words(h12)} {half}"
    if minute == 15:
        return f"at quarter past {number_words(h12)} {half}"
    if minute == 45:
        nxt = (hour + 1) % 24
        # "quarter to one in the afternoon" is 12:45: the half of day follows the spoken hour.
        nhalf = ("in the afternoon" if 12 <= nxt < 18 else _HALF_DAY_WORDS[nxt >= 12][0])
        return f"at quarter to {number_words(nxt % 12 or 12)} {nhalf}"
    if minute == 0:
        return f"at {number_words(h12)} o'clock {half}"
    return f"at {h12}:{minute:02d} {'am' if hour < 12 else 'pm'}"


def _time(rng: random.Random) -> tuple[str, str]:
    """(canonical time, phrase): 'HH:MM' for clock times, '+HH:MM' for delays."""
    if rng.random() < 0.3:
        minutes = rng.choice((5, 10, 15, 20, 30, 45, 60, 90, 120, 180))
        if minutes == 30 and rng.random() < 0.5:
            phrase = "in half an hour"
        elif minutes == 60 and rng.random() < 0.5:
            phrase = rng.choice(["in an hour", "in one hour"])
        elif minutes in (120, 180) and rng.random() < 0.5:
            phrase = f"in {_num(rng, minutes // 60)} hours"
        else:
            phrase = f"in {_num(rng, minutes) if minutes < 60 else minutes} minutes"
        return f"+{minutes // 60:02d}:{minutes % 60:02d}", phrase
    hour = rng.randrange(24)
    minute = rng.choice((0, 0, 15, 30, 45, 5, 10, 20, 40, 50))
    return f"{hour:02d}:{minute:02d}", _clock_phrase(rng, hour, minute)


def _pick(rng: random.Random, options: list[str]) -> str:
    return rng.choice(options)


def render(rng: random.Random, tpl: Template, device: str, room: str | None,
            held_value: bool) -> tuple[dict[str, Any], str]:
    action = "turn_on" if tpl.action == "water" else tpl.action
    value, unit, val_phrase = _value(rng, tpl.action, device, held_value)
    room_phrase = _pick(rng, ROOMS[room]) if room else ""
    slots = {
        "dev": _pick(rng, DEVICES[device]),
        "room": room_phrase,
        "loc": f" in the {room_phrase}" if room else "",
        "room_or_house": room_phrase if room else rng.choice(["house", "home", "whole house"]),
        "room_or_garden": room_phrase if room else "lawn",
        "val": val_phrase,
    }
    text = tpl.text.lstrip("!").format(**slots)
    target: dict[str, Any] = {"device": device}
    if room:
        target["room"] = room
    target["action"] = action
    if value is not None:
        target["value"] = value
    if unit is not None:
        target["unit"] = unit
    if rng.random() < 0.3:
        canonical, phrase = _time(rng)
        target["time"] = canonical
        if rng.random() < 0.3:
            text = f"{phrase[0].upper()}{phrase[1:]}, {text}"
        else:
            text = f"{text} {phrase}"
    if not tpl.text.startswith("!") and not text[0].isupper():
        prefix = _pick(rng, PREFIXES)
        # No "please ... please", and no "now" on a scheduled command.
        suffixes = [s for s in SUFFIXES if not ("please" in prefix and "please" in s)
                    and not ("time" in target and s == " now")]
        text = prefix + text + _pick(rng, suffixes)
    text = text[0].upper() + text[1:] if rng.random() < 0.7 else text
    text += rng.choice(["", "", ".", "!", "?" if text.lower().startswith(("could", "can",
                                                                          "would")) else "."])
    return target, text


def rooms_for(tpl: Template, device: str) -> list[str | None]:
    rooms = list(DEVICE_ROOMS[device])
    # Templates that name the room without a "{loc}" fallback need a room.
    if "{room}" in tpl.text and "{loc}" not in tpl.text:
        rooms = [r for r in rooms if r is not None]
    return rooms

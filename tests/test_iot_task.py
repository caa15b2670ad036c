"""The embedded IoT task: determinism, well-formed rows, a held-out split that really holds
things out, time/value semantics checked by an independent parser, and the metrics."""

from __future__ import annotations

import json
import re

import pytest

from edgeqlora.tasks import iot


@pytest.fixture(scope="module")
def splits():
    return iot.generate(seed=0)


def _user(row):
    return row["messages"][1]["content"]


def test_same_seed_same_bytes_other_seed_other_data():
    a_train, a_eval = iot.generate(seed=3, n_train=300, n_eval=40)
    b_train, b_eval = iot.generate(seed=3, n_train=300, n_eval=40)
    assert iot.to_jsonl(a_train) == iot.to_jsonl(b_train)
    assert iot.to_jsonl(a_eval) == iot.to_jsonl(b_eval)
    c_train, _ = iot.generate(seed=4, n_train=300, n_eval=40)
    assert iot.to_jsonl(c_train) != iot.to_jsonl(a_train)


def test_sizes_and_row_shape(splits):
    train, eval_rows = splits
    assert len(train) == 2000 and len(eval_rows) == 200
    time_re = re.compile(r"^\+?([01]\d|2[0-3]):[0-5]\d$")
    for row in train + eval_rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == iot.SYSTEM_PROMPT
        target = row["target"]
        answer = row["messages"][2]["content"]
        # Canonical: compact, fixed key order, keys that do not apply omitted (never null).
        assert answer == json.dumps(target, separators=(",", ":"), ensure_ascii=False)
        assert list(target) == [f for f in iot.FIELDS if f in target]
        assert None not in target.values()
        assert target["device"] in iot.DEVICES and target["action"]
        assert iot.parse_action(answer) == target
        if "room" in target:
            assert target["room"] in iot.DEVICE_ROOMS[target["device"]]
        if "unit" in target:
            assert "value" in target and target["unit"] in ("%", "C", "F", "min")
        if "value" in target:
            assert isinstance(target["value"], (int, str)) and not isinstance(target["value"], bool)
        if "time" in target:
            assert time_re.match(target["time"]), target["time"]


def test_user_texts_unique_and_no_eval_text_in_train(splits):
    train, eval_rows = splits
    train_texts = {_user(r) for r in train}
    assert len(train_texts) == len(train)
    assert not train_texts & {_user(r) for r in eval_rows}


def _template_regex(tpl: iot.Template) -> re.Pattern:
    # Literal words of the template, slots as wildcards; any politeness or time around it.
    parts = re.split(r"\{\w+\}", tpl.text.lstrip("!"))
    body = r".+?".join(re.escape(p) for p in parts)
    return re.compile(rf"^.*?{body}.*$", re.IGNORECASE)


def test_held_out_phrasings_never_in_training(splits):
    """Checked on the text itself, not on the generator's bookkeeping: no training sentence
    fits a held-out template, and many held-out sentences fit one."""
    train, eval_rows = splits
    held = [t for t in iot.TEMPLATES if t.eval_only]
    assert len(held) >= 15
    held_res = [_template_regex(t) for t in held]
    for text in map(_user, train):
        assert not any(r.match(text) for r in held_res), text
    matching = [r for r in eval_rows if any(rx.match(_user(r)) for rx in held_res)]
    assert len(matching) >= 40


def test_held_out_combinations_never_in_training(splits):
    train, eval_rows = splits
    train_pairs = {(r["target"]["device"], r["target"].get("room")) for r in train}
    eval_pairs = {(r["target"]["device"], r["target"].get("room")) for r in eval_rows}
    assert len(eval_pairs - train_pairs) >= 5

    def triple(r):
        t = r["target"]
        return t["device"], t.get("room"), t["action"], t.get("value")

    train_triples = set(map(triple, train))
    unseen = [r for r in eval_rows if triple(r) not in train_triples]
    assert len(unseen) >= 80

    percent = ("set_brightness", "set_volume", "set_position")
    train_values = {r["target"]["value"] for r in train if r["target"]["action"] in percent}
    eval_values = {r["target"]["value"] for r in eval_rows if r["target"]["action"] in percent}
    assert len(eval_values - train_values) >= 10
    # ...while most held-out rows stay inside the training vocabulary of devices and actions.
    assert {r["target"]["action"] for r in eval_rows} <= {r["target"]["action"] for r in train}


_WORD_NUM = {iot.number_words(n): n for n in range(0, 1000)}


def _phrase_number(text: str) -> int:
    return int(text) if text.isdigit() else _WORD_NUM[text]


def _expected_time(text: str) -> str | None:
    """An independent reading of the time phrases the generator writes."""
    t = text.lower()
    m = re.search(r"in ((?:[\w-]+)) (minutes|hours)\b", t)
    if m and (m.group(1).isdigit() or m.group(1) in _WORD_NUM):
        n = _phrase_number(m.group(1)) * (60 if m.group(2) == "hours" else 1)
        return f"+{n // 60:02d}:{n % 60:02d}"
    if "in half an hour" in t:
        return "+00:30"
    if re.search(r"in (an|one) hour\b", t):
        return "+01:00"
    if "at noon" in t:
        return "12:00"
    if "at midnight" in t:
        return "00:00"
    half_re = r"(in the morning|am|in the afternoon|in the evening|pm)"

    def h24(h12: int, half: str) -> int:
        return h12 % 12 + (12 if half in ("pm", "in the afternoon", "in the evening") else 0)

    if m := re.search(r"at (\d{1,2}):(\d\d) (am|pm)\b", t):
        return f"{h24(int(m.group(1)), m.group(3)):02d}:{m.group(2)}"
    if m := re.search(r"at (\d{1,2}) (am|pm)\b", t):
        return f"{h24(int(m.group(1)), m.group(2)):02d}:00"
    if m := re.search(r"at (\d\d):(\d\d)\b", t):
        return f"{m.group(1)}:{m.group(2)}"
    if m := re.search(rf"at half past ([\w-]+) {half_re}", t):
        return f"{h24(_WORD_NUM[m.group(1)], m.group(2)):02d}:30"
    if m := re.search(rf"at quarter past ([\w-]+) {half_re}", t):
        return f"{h24(_WORD_NUM[m.group(1)], m.group(2)):02d}:15"
    if m := re.search(rf"at quarter to ([\w-]+) {half_re}", t):
        return f"{(h24(_WORD_NUM[m.group(1)], m.group(2)) - 1) % 24:02d}:45"
    if m := re.search(rf"at ([\w-]+) o'clock {half_re}", t):
        return f"{h24(_WORD_NUM[m.group(1)], m.group(2)):02d}:00"
    return None


def test_times_and_percentages_mean_what_they_say(splits):
    train, eval_rows = splits
    checked = percents = 0
    for row in train + eval_rows:
        text, target = _user(row), row["target"]
        expected = _expected_time(text)
        assert expected == target.get("time"), (text, target)
        checked += expected is not None
        numbers = re.findall(r"\b(\d+|one hundred|[a-z]+(?:-[a-z]+)?)(?:%| percent\b)", text)
        if numbers:
            assert target.get("unit") == "%", (text, target)
            assert _phrase_number(numbers[-1]) == target["value"], (text, target)
            percents += 1
    assert checked > 400  # about 30% of the rows carry a time
    assert percents > 200


def test_parse_action_is_robust():
    assert iot.parse_action('{"device":"fan","action":"turn_on"}') == {
        "device": "fan", "action": "turn_on"}
    fenced = 'Sure! ```json\n{"device": "tv", "value": 5, "room": null}\n``` done'
    assert iot.parse_action(fenced) == {"device": "tv", "value": 5}
    assert iot.parse_action('{broken {"device":"lock"} {"device":"fan"}') == {"device": "lock"}
    assert iot.parse_action('[1, 2] then {"a": {"b": 1}}') == {"a": {"b": 1}}
    assert iot.parse_action("turn on the light") is None
    assert iot.parse_action('{"device": "light"') is None
    assert iot.parse_action(None) is None


def test_score_exact_field_and_parse_rate():
    targets = [
        {"device": "light", "room": "kitchen", "action": "set_brightness", "value": 40,
         "unit": "%"},
        {"device": "lock", "room": "front_door", "action": "lock"},
        {"device": "fan", "action": "turn_on", "time": "07:30"},
        {"device": "tv", "action": "set_channel", "value": 5},
    ]
    predictions = [
        iot.to_json(targets[0]),
        '{"device":"lock","room":"back_door","action":"lock"}',  # wrong room
        "I cannot do that",  # unparseable
        '{"device":"tv","action":"set_channel","value":"5"}',  # "5" is not 5
    ]
    s = iot.score(predictions, targets)
    assert s["n"] == 4
    assert s["exact_match"] == pytest.approx(1 / 4)
    assert s["parse_rate"] == pytest.approx(3 / 4)
    fa = s["field_accuracy"]
    assert fa["device"] == pytest.approx(3 / 4)
    assert fa["room"] == pytest.approx(2 / 4)  # right, wrong, unparsed, both absent
    assert fa["value"] == pytest.approx(2 / 4)  # right, both absent, unparsed, "5"
    assert fa["time"] == pytest.approx(3 / 4)
    assert iot.score([iot.to_json(t) for t in targets], targets)["exact_match"] == 1.0
    extra = iot.score(['{"device":"fan","action":"turn_on","time":"07:30","x":1}'], targets[2:3])
    assert extra["exact_match"] == 0.0 and extra["field_accuracy"]["time"] == 1.0
    assert iot.score(['{"device":"tv","action":"set_channel","value":true}'],
                     [{"device": "tv", "action": "set_channel", "value": 1}])["exact_match"] == 0
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        iot.score(["{}", "{}"], targets[:1])


def test_write_dataset_round_trips(tmp_path):
    train_path, eval_path = iot.write_dataset(tmp_path / "iot", seed=1, n_train=50, n_eval=10)
    train, eval_rows = iot.generate(seed=1, n_train=50, n_eval=10)
    assert [json.loads(x) for x in train_path.read_text().splitlines()] == train
    assert [json.loads(x) for x in eval_path.read_text().splitlines()] == eval_rows
    first = train_path.read_bytes()
    iot.write_dataset(tmp_path / "iot", seed=1, n_train=50, n_eval=10)
    assert train_path.read_bytes() == first

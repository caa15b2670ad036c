"""Calibration rows (``heldout.calibration_sequences``): general English mixed into the task rows
for GPTQ and the importance matrix alike, its share recorded, and bad shares refused."""

from __future__ import annotations

import pytest


def test_general_text_is_mixed_in_at_the_share_asked(tokenizer):
    from edgeqlora.heldout import CALIBRATION_TEXT, calibration_sequences

    task, plain = calibration_sequences(tokenizer, "embedded:iot", 16, 256)
    mixed, record = calibration_sequences(tokenizer, "embedded:iot", 16, 256, general=0.25)
    assert "general" not in plain and plain["rows"] == len(task) == 16
    assert mixed[:16] == task  # the task rows first, as before
    extra = mixed[16:]
    g = record["general"]
    assert g["rows"] == len(extra) > 0 and g["tokens"] == sum(map(len, extra))
    assert record["tokens"] == plain["tokens"] and record["rows"] == 16
    assert g["share"] == pytest.approx(0.25, abs=0.01)
    assert g["text"] == CALIBRATION_TEXT.name and len(g["sha256"]) == 64
    assert all(2 <= len(s) <= 256 for s in extra)
    text = tokenizer.decode(extra[0])
    assert text.startswith("Notes from a Workshop") and "<|im_start|>" not in text
    assert record["ids_sha256"] != plain["ids_sha256"]


def test_more_general_text_than_the_file_holds_repeats_it(tokenizer):
    from edgeqlora.heldout import calibration_sequences

    _, record = calibration_sequences(tokenizer, "embedded:iot", 64, 256, general=0.9)
    g = record["general"]
    assert g["tokens"] > 4 * len(tokenizer(open_text())["input_ids"])
    assert g["share"] == pytest.approx(0.9, abs=0.01)


def test_general_text_that_gives_no_chunk_ends_instead_of_spinning(tokenizer):
    """A tokenizer that turns the whole text into one id, or sequences capped at one token,
    cannot give a 2-token chunk: nothing is mixed in, and it returns at once."""
    from edgeqlora.heldout import general_sequences

    def one_id(text, add_special_tokens=False):
        return {"input_ids": [7]}

    assert general_sequences(one_id, 1000, 256) == []
    assert general_sequences(tokenizer, 1000, 1) == []
    seqs = general_sequences(tokenizer, 1000, 256)
    assert 990 <= sum(map(len, seqs)) <= 1000 and all(len(s) <= 256 for s in seqs)


def open_text() -> str:
    from edgeqlora.heldout import CALIBRATION_TEXT

    return CALIBRATION_TEXT.read_text(encoding="utf-8")


def test_the_calibration_text_is_not_the_parity_gates_text():
    """The gate's general set must stay unseen by the quantizers it judges."""
    from edgeqlora.parity import ENGLISH_TEXT

    gate = ENGLISH_TEXT.read_text(encoding="utf-8")
    sentences = [s.strip() for s in open_text().replace("\n", " ").split(".") if len(s) > 30]
    assert sentences and not any(s in gate for s in sentences)


@pytest.mark.parametrize("share", [1.0, -0.1, 0.95, True, "a lot", float("nan")])
def test_a_bad_share_is_refused_by_both_exporters(share):
    from edgeqlora.errors import ConfigError
    from edgeqlora.exporters import gguf as G
    from edgeqlora.exporters.onnx import recipes as R

    with pytest.raises(ConfigError, match="calibration_general=.* from 0"):
        G.calibration_request("q4_k_m", {"imatrix": "embedded:iot",
                                         "calibration_general": share})
    with pytest.raises(ConfigError, match="calibration_general=.* from 0"):
        R.calibration_request("int4-gptq", {"calibration_general": share})


def test_the_requests_carry_the_share():
    from edgeqlora.exporters import gguf as G
    from edgeqlora.exporters.onnx import recipes as R
    from edgeqlora.heldout import GENERAL_SHARE

    assert G.calibration_request("q4_k_m", {"imatrix": "embedded:iot"})["general"] == \
        GENERAL_SHARE
    assert R.calibration_request("int4-gptq", {"calibration_general": 0})["general"] == 0
    # GPTQ's own default: lower, since it trades the task for the language (recipes.py)
    assert R.calibration_request("int4-gptq", {})["general"] == R.GPTQ_GENERAL_SHARE == 0.1

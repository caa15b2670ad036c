"""User data: every format loads, every bad input is a clear error or a counted skip, labels
cover exactly the assistant turns, and packing gives the same loss as padding."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from edgeqlora import data
from edgeqlora.errors import DataError, InputError
from edgeqlora.tasks import iot

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris."}]}
MULTI = {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello there"},
                      {"role": "user", "content": "and 2+2?"},
                      {"role": "assistant", "content": "4, of course"}]}
PROMPT = {"prompt": "Say yes", "completion": "yes", "system": "Obey."}
CONV_PROMPT = {"prompt": [{"role": "user", "content": "Say no"}],
               "completion": [{"role": "assistant", "content": "no"}]}
TEXT = {"text": "Plain text for language modelling."}


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# loading


def test_jsonl_formats_normalise_to_messages_or_text(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [CHAT, MULTI, PROMPT, CONV_PROMPT, TEXT, ""])
    loaded = data.load_dataset(path)
    assert loaded.skipped == {} and len(loaded) == 5
    assert loaded[0] == CHAT and loaded[1] == MULTI
    assert loaded[2] == {"messages": [{"role": "system", "content": "Obey."},
                                      {"role": "user", "content": "Say yes"},
                                      {"role": "assistant", "content": "yes"}]}
    assert loaded[3] == {"messages": CONV_PROMPT["prompt"] + CONV_PROMPT["completion"]}
    assert loaded[4] == TEXT
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.sha256 == data.dataset_sha256(path)
    assert loaded.source == str(path)


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([CHAT, TEXT]))
    assert data.load_dataset(path).rows == [CHAT, TEXT]


def test_embedded_splits():
    train = data.load_dataset("embedded:iot")
    held = data.load_dataset("embedded:iot:eval")
    expected_train, expected_eval = iot.generate(seed=0)
    assert len(train) == len(expected_train) and len(held) == len(expected_eval)
    assert train[0]["messages"] == expected_train[0]["messages"]
    assert held[0]["target"] == expected_eval[0]["target"]  # kept for scoring
    assert train.sha256 == data.dataset_sha256("embedded:iot") != held.sha256
    assert train.sha256 == hashlib.sha256(iot.to_jsonl(expected_train).encode()).hexdigest()
    # Generated once per process, handed out as fresh rows: a caller's change stays its own.
    from edgeqlora import rows

    first = rows._embedded_split("embedded:iot:eval", 0)
    assert first == expected_eval
    first[0]["messages"][1]["content"] = "changed"
    assert rows._embedded_split("embedded:iot:eval", 0) == expected_eval


def test_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    # Mixed shapes in one table: Arrow gives every row every column, None where absent.
    # (from_list takes its columns from the first row only, hence the explicit None columns.)
    columns = dict.fromkeys(["messages", "text", "prompt", "completion", "system"])
    table = [{**columns, **row} for row in (CHAT, TEXT, PROMPT)]
    datasets.Dataset.from_list(table).save_to_disk(str(tmp_path / "ds"))
    loaded = data.load_dataset(tmp_path / "ds")
    assert loaded.skipped == {}
    assert loaded.rows[0] == CHAT and loaded.rows[1] == TEXT
    assert loaded.rows[2]["messages"][-1] == {"role": "assistant", "content": "yes"}
    assert len(loaded.sha256) == 64 and loaded.sha256 == data.dataset_sha256(tmp_path / "ds")

    datasets.DatasetDict({"train": datasets.Dataset.from_list([CHAT]),
                          "test": datasets.Dataset.from_list([TEXT])}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert data.load_dataset(tmp_path / "dd").rows == [CHAT]
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([CHAT])}
                         ).save_to_disk(str(tmp_path / "nov"))
    with pytest.raises(DataError, match="without a 'train' split.*validation"):
        data.load_dataset(tmp_path / "nov")


# bad inputs

BAD_ROWS = {
    "invalid_json": "{not json",
    "not_an_object": [1, 2],
    "unknown_row_format": {"question": "q", "answer": "a"},
    "messages_not_a_list": {"messages": "hi"},
    "bad_message": {"messages": [{"role": "user"}]},
    "bad_role": {"messages": [{"role": "tool", "content": "x"},
                              {"role": "assistant", "content": "y"}]},
    "content_not_text": {"messages": [{"role": "user", "content": ["x"]},
                                      {"role": "assistant", "content": "y"}]},
    "empty_content": {"messages": [{"role": "user", "content": "  "},
                                   {"role": "assistant", "content": "y"}]},
    "system_not_first": {"messages": [{"role": "user", "content": "x"},
                                      {"role": "system", "content": "s"},
                                      {"role": "assistant", "content": "y"}]},
    "no_assistant_turn": {"messages": [{"role": "user", "content": "x"}]},
    "empty_prompt": {"prompt": "", "completion": "y"},
    "empty_completion": {"prompt": "x"},
    "empty_text": {"text": ""},
}


def test_each_bad_row_is_counted_by_reason(tmp_path):
    lines = [CHAT] + [json.dumps(v) if not isinstance(v, str) else v for v in BAD_ROWS.values()]
    path = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    loaded = data.load_dataset(path)
    assert loaded.rows == [CHAT]
    assert loaded.skipped == {reason: 1 for reason in sorted(BAD_ROWS)}
    assert loaded.n_skipped == len(BAD_ROWS)
    # Each reason points at its line (line 1 is the good row).
    for lineno, reason in enumerate(BAD_ROWS, start=2):
        assert loaded.skip_examples[reason].startswith(f"{path} line {lineno}:")
    assert "skipped 13" in loaded.summary()


def test_no_usable_rows_names_file_and_reasons(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ["{oops", json.dumps({"text": ""}),
                                                 json.dumps({"text": "  "})])
    with pytest.raises(DataError) as err:
        data.load_dataset(path)
    msg = str(err.value)
    assert str(path) in msg and "invalid_json x1" in msg and "empty_text x2" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=f"{empty} has no rows"):
        data.load_dataset(empty)


def test_path_and_format_errors(tmp_path):
    with pytest.raises(InputError, match="nope.jsonl does not exist"):
        data.load_dataset(tmp_path / "nope.jsonl")
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="unknown dataset format '.csv'"):
        data.load_dataset(csv)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="not one written by datasets.Dataset.save_to_disk"):
        data.load_dataset(tmp_path / "plain_dir")
    with pytest.raises(InputError, match="unknown embedded dataset 'embedded:chess'"):
        data.load_dataset("embedded:chess")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        data.load_dataset(latin)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        data.load_dataset(broken)


# tokenization


def _label_runs(tokenizer, ex):
    """Decoded runs of consecutive supervised tokens."""
    runs, current = [], []
    for tok, label in zip(ex["input_ids"], ex["labels"]):
        if label == data.IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == tok
            current.append(tok)
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("row", [CHAT, MULTI, iot.generate(n_train=1, n_eval=0)[0][0]])
def test_labels_cover_exactly_the_assistant_turns(tokenizer, row):
    ex = data.tokenize_example(tokenizer, row, max_len=256)
    eot = tokenizer.eos_token  # <|im_end|> for SmolLM2
    answers = [m["content"] + eot for m in row["messages"] if m["role"] == "assistant"]
    assert _label_runs(tokenizer, ex) == answers
    # The ids are the template's own tokens: what apply_chat_template(tokenize=True) gives.
    assert ex["input_ids"] == list(tokenizer.apply_chat_template(
        row["messages"], tokenize=True, return_dict=False))


def test_labels_when_template_rewrites_earlier_turns(tokenizer):
    """A template that is not prefix-stable (here: a trailer only after the last message)
    falls back to locating the assistant content in the rendered text."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (tokenizer.chat_template.rstrip()
                         + "{% if not add_generation_prompt %}<|endoftext|>{% endif %}")
    ex = data.tokenize_example(tok, MULTI, max_len=256)
    assert _label_runs(tok, ex) == ["hello there" + tok.eos_token, "4, of course" + tok.eos_token]


def test_text_rows_supervise_everything_and_truncate(tokenizer):
    ex = data.tokenize_example(tokenizer, TEXT, max_len=256)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tokenizer.eos_token_id
    assert "truncated" not in ex
    short = data.tokenize_example(tokenizer, TEXT, max_len=4)
    assert len(short["input_ids"]) == 4 and short["truncated"] is True


def test_too_long_rows_are_dropped_and_counted(tokenizer):
    full = data.tokenize_example(tokenizer, CHAT, max_len=10_000)
    n = len(full["input_ids"])
    last = max(i for i, label in enumerate(full["labels"]) if label != data.IGNORE_INDEX)
    assert last < n - 1  # the template's trailing newline is not supervised
    kept = data.tokenize_example(tokenizer, CHAT, max_len=last + 1)
    assert kept["labels"] == full["labels"][: last + 1]
    assert data.tokenize_example(tokenizer, CHAT, max_len=last) is None

    result = data.tokenize_dataset(tokenizer, [CHAT, TEXT, MULTI], max_len=last)
    assert result.dropped_too_long >= 1 and len(result.examples) + result.dropped_too_long == 3
    assert result.truncated == (len(data.tokenize_example(tokenizer, TEXT, 10_000)["input_ids"])
                                > last)
    with pytest.raises(DataError, match="longer than max_len=3"):
        data.tokenize_dataset(tokenizer, [CHAT, MULTI], max_len=3)


# packing


def test_pack_layout():
    examples = [{"input_ids": list(range(100 + i, 100 + i + n)), "labels": [7] * n}
                for i, n in enumerate([5, 9, 3, 8, 2, 10])]
    packed = data.pack(examples, max_len=12)
    assert all(len(p["input_ids"]) <= 12 for p in packed)
    assert [p["lengths"] for p in packed] == [[5, 3, 2], [9], [8], [10]]
    first = packed[0]
    assert first["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert first["input_ids"] == examples[0]["input_ids"] + examples[2]["input_ids"] + \
        examples[4]["input_ids"]
    # Each example's first label is masked: it would be predicted from the previous example.
    assert first["labels"] == [-100, 7, 7, 7, 7, -100, 7, 7, -100, 7]
    with pytest.raises(ValueError, match="13 tokens > max_len=12"):
        data.pack([{"input_ids": [1] * 13, "labels": [1] * 13}], max_len=12)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tokenizer, tiny_model_dir, impl):
    """Packed examples must not see each other: the mean token loss over a packed batch equals
    the mean over the same examples padded one per row.

    Tolerance 1e-5 on a loss of ~10.8 (ln of the 49k vocabulary): both sides compute the same
    fp32 sums, only with different sequence lengths, so the kernels' reduction order may differ
    by a few float32 ulps per layer (~1e-6 relative); measured difference here is 0.0. Packing
    without restarting positions (the negative control) moves the loss by ~7e-3.
    """
    import torch
    from transformers import AutoModelForCausalLM

    train, _ = iot.generate(seed=5, n_train=7, n_eval=0)
    rows = train + [MULTI, TEXT]
    examples = data.tokenize_dataset(tokenizer, rows, max_len=256).examples
    packed = data.pack(examples, max_len=256)
    assert len(packed) >= 2 and max(len(p["lengths"]) for p in packed) >= 3
    pad = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        unpacked = model(**data.collate(examples, pad), use_cache=False).loss.item()
        batch = data.collate_packed(packed, pad)
        packed_loss = model(**batch, use_cache=False).loss.item()
        leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(
            batch["input_ids"]))
        leaky_loss = model(**leaky, use_cache=False).loss.item()
    assert packed_loss == pytest.approx(unpacked, abs=1e-5)
    assert abs(leaky_loss - unpacked) > 1e-4  # the test can tell packed from leaking


def test_shared_prefix_length_stops_before_the_first_target():
    def ex(ids, first_label):
        return {"input_ids": ids, "labels": [-100] * first_label + ids[first_label:]}

    a, b = ex([1, 2, 3, 4, 5, 6, 7], 5), ex([1, 2, 3, 4, 9, 9], 4)
    # Common prefix 4 tokens, but b's token 4 is a target: it must be predicted from position
    # 3, which would be shared, so the prefix stops one token before b's first target.
    assert data.shared_prefix_length([a, b]) == 3
    assert data.shared_prefix_length([a, ex([1, 2, 8, 4, 5, 6], 5)]) == 2
    assert data.shared_prefix_length([a]) == 0  # nothing to share with one example
    rows = data.pack_shared_prefix([a, b, ex([1, 2, 3, 7, 7, 7], 4)], 3, row_len=12)
    assert [r["lengths"] for r in rows] == [[4, 3], [3]]
    first = rows[0]
    assert first["input_ids"] == [1, 2, 3, 4, 5, 6, 7, 4, 9, 9]
    assert first["position_ids"] == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5]
    assert first["segments"] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert first["labels"] == [-100, -100, -100, -100, -100, 6, 7, -100, 9, 9]
    batch = data.collate_shared_prefix(rows, pad_id=0)
    mask = batch["attention_mask"][0, 0]
    assert mask[8].tolist() == [True] * 3 + [False] * 4 + [True] * 2 + [False]  # prefix + own
    assert mask[5].tolist() == [True] * 6 + [False] * 4
    assert batch["attention_mask"][1, 0, 9].tolist() == [False] * 6 + [True] * 4  # padding only
    with pytest.raises(ValueError, match="does not start with the shared prefix"):
        data.pack_shared_prefix([a, ex([9, 2, 3, 4, 5], 4)], 3, row_len=12)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_prefix_loss_and_grads_equal_unpacked(tokenizer, tiny_model_dir, impl):
    """A shared system prompt computed once per row gives the same loss and gradients as every
    example padded in its own row. Tolerance 1e-5 as for packing (measured: 0.0 for the loss);
    the negative control (suffixes attending to each other) moves the loss by more than 1e-4."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeqlora.qlora import token_loss

    train, _ = iot.generate(seed=5, n_train=7, n_eval=0)
    examples = data.tokenize_dataset(tokenizer, train, max_len=256).examples
    prefix = data.shared_prefix_length(examples)
    assert prefix >= 20  # the task's system prompt
    rows = data.pack_shared_prefix(examples, prefix, row_len=256)
    assert max(len(r["lengths"]) for r in rows) >= 3
    pad = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl,
                                                 dtype=torch.float32)
    model.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    grads = []
    losses = []
    for batch in (data.collate(examples, pad), data.collate_shared_prefix(rows, pad)):
        loss_sum, n = token_loss(model, batch)
        (loss_sum / n).backward()
        losses.append(loss_sum.item() / n)
        grads.append(model.model.layers[0].mlp.down_proj.weight.grad.clone())
        model.zero_grad()
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert torch.allclose(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    leaky = data.collate_shared_prefix(rows, pad)
    leaky["attention_mask"] = torch.ones_like(leaky["attention_mask"]).tril()
    with torch.no_grad():
        leak_sum, n = token_loss(model, leaky)
    assert abs(leak_sum.item() / n - losses[0]) > 1e-4  # the test can tell shared from leaking


def test_collate_pads_right_with_masked_labels():
    batch = data.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                          {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    packed = data.collate_packed([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7],
                                   "position_ids": [0, 1, 0]},
                                  {"input_ids": [8], "labels": [-100], "position_ids": [0]}], 0)
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert "attention_mask" not in packed


def test_labels_when_eos_is_not_the_end_of_turn_token(tokenizer):
    """A base model's eos (<|endoftext|>) is not the template's end-of-turn (<|im_end|>): the
    turn is supervised up to its end-of-turn text, the template's trailing newline is not."""
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "<|endoftext|>"
    ex = data.tokenize_example(tok, MULTI, max_len=256)
    assert _label_runs(tok, ex) == ["hello there<|im_end|>", "4, of course<|im_end|>"]


def test_a_dataset_is_tokenized_in_batches_row_for_row(tokenizer):
    """tokenize_dataset encodes many rows per tokenizer call (chunks of 1,024): each example is
    what that row alone gives, in the rows' order, across a chunk boundary and with chat and
    text rows mixed; the chat ids are apply_chat_template's."""
    train, _ = iot.generate(0, 1030, 0)
    rows = [*train[:1020], TEXT, MULTI, *train[1020:], CHAT, TEXT]
    got = data.tokenize_dataset(tokenizer, rows, max_len=256).examples
    assert len(got) == len(rows)
    for row, ex in zip(rows, got):
        alone = data.tokenize_example(tokenizer, row, max_len=256)
        alone.pop("truncated", None)
        assert ex == alone
        if "messages" in row:
            assert ex["input_ids"] == list(tokenizer.apply_chat_template(
                row["messages"], tokenize=True, return_dict=False))

"""User data: load, normalise, tokenize with the model's own chat template.

``load_dataset(spec)`` accepts

* ``embedded:iot`` (training split of the embedded task) and ``embedded:iot:eval`` (held-out);
* a JSON Lines file (``.jsonl``, ``.ndjson``, ``.json``; a ``.json`` file may also hold one JSON
  array of rows) whose rows are any of
  - chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
    with at least one assistant turn (loss on every assistant turn);
  - prompt/completion: ``{"prompt": "...", "completion": "...", "system": "..." (optional)}``,
    or the conversational form where both are lists of messages;
  - plain text: ``{"text": "..."}`` (language modelling, loss on every token);
* a directory written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` gives its
  ``train`` split) with rows of the same shapes.

Rows are normalised to ``{"messages": [...]}`` or ``{"text": "..."}`` (a ``target`` field, as
the embedded task has, is kept). A row that cannot be used is never dropped silently: it is
counted by reason in ``LoadedData.skipped`` with the first place it happened in
``LoadedData.skip_examples``. A source with no usable row is a ``DataError``.

``tokenize_example`` renders a chat row with the tokenizer's own chat template
(``apply_chat_template``), so training sees exactly the tokens the exported model will see, and
supervises only the assistant turns: each assistant turn's content and its end-of-turn token.

Torch-free (part of the core every folder may use): the exporters' calibration rows and the
held-out sets (``edgeqlora.heldout``) are read with it too. Packing and batching for training
are ``edgeqlora.data``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError, InputError

ROLES = ("system", "user", "assistant")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
EMBEDDED = {"embedded:iot": "train", "embedded:iot:train": "train", "embedded:iot:eval": "eval"}
IGNORE_INDEX = -100  # the label torch's cross-entropy (and transformers' loss) ignores


@dataclass
class LoadedData:
    """Normalised rows of one source and what was skipped, by reason."""

    rows: list[dict[str, Any]]
    skipped: dict[str, int]
    sha256: str
    source: str
    # First occurrence of each skip reason ("line 7: ..."), for messages and reports.
    skip_examples: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = f"{self.source}: {len(self.rows)} rows"
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            text += f", skipped {self.n_skipped} ({reasons})"
        return text


@functools.lru_cache(maxsize=8)
def _embedded_jsonl(spec: str, seed: int) -> str:
    """An embedded split as its JSON Lines text, generated once per process (an export or a
    run asks for the held-out split several times)."""
    from .tasks import iot

    train, eval_rows = iot.generate(seed=seed)
    return iot.to_jsonl(train if EMBEDDED[spec] == "train" else eval_rows)


def _embedded_split(spec: str, seed: int) -> list[dict[str, Any]]:
    """A fresh copy of the split's rows (callers may change them)."""
    return [json.loads(line) for line in _embedded_jsonl(spec, seed).split("\n") if line]


def check_spec(spec: str | Path) -> tuple[str, Path | None]:
    text = str(spec)
    if text.startswith("embedded:"):
        if text not in EMBEDDED:
            raise InputError(f"unknown embedded dataset {text!r}; valid: {', '.join(EMBEDDED)}")
        return text, None
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(f"dataset {path} does not exist (give a .jsonl file, a directory "
                         "written by datasets' save_to_disk, or embedded:iot)")
    if path.is_dir():
        if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                or (path / "state.json").is_file()):
            raise DataError(f"{path} is a directory but not one written by "
                            "datasets.Dataset.save_to_disk (no dataset_info.json, "
                            "dataset_dict.json or state.json); give a .jsonl file or such a "
                            "directory")
    elif path.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError(f"{path}: unknown dataset format {path.suffix or '(no suffix)'!r}; "
                        f"use JSON Lines ({', '.join(JSONL_SUFFIXES)}) or a directory written "
                        "by datasets.Dataset.save_to_disk")
    return text, path


def dataset_sha256(spec: str | Path, seed: int = 0) -> str:
    """sha256 of a dataset source's content, as recorded in the adapter manifest.

    A file: its bytes. A ``save_to_disk`` directory: every file's relative path and bytes, in
    sorted order. An embedded split: its JSON Lines text (``iot.to_jsonl``), which is
    deterministic in the seed.
    """
    text, path = check_spec(spec)
    if path is None:
        return hashlib.sha256(_embedded_jsonl(text, seed).encode()).hexdigest()
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


class _Skips:
    def __init__(self):
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, f"{where}: {detail}")


def _message_problem(messages: Any) -> tuple[str, str] | None:
    """(reason, detail) if ``messages`` is not a usable chat, else None."""
    if not isinstance(messages, list) or not messages:
        return "messages_not_a_list", "'messages' must be a non-empty list of {role, content}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return "bad_message", f"messages[{i}] is not an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return "bad_role", f"messages[{i}] has role {m['role']!r}; use one of {ROLES}"
        if not isinstance(m["content"], str):
            return "content_not_text", f"messages[{i}] content is {type(m['content']).__name__}"
        if not m["content"].strip():
            return "empty_content", f"messages[{i}] ({m['role']}) has empty content"
        if m["role"] == "system" and i != 0:
            return "system_not_first", f"messages[{i}] is a system message after the start"
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn", "no assistant message to learn from"
    return None


def normalize_row(obj: Any) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """One raw row -> (``{"messages": [...]}`` or ``{"text": ...}``, None) or (None, problem).

    ``problem`` is (reason, detail); reasons are the keys of ``LoadedData.skipped``.
    """
    if not isinstance(obj, dict):
        return None, ("not_an_object", f"row is a {type(obj).__name__}, not an object")
    # A saved datasets table gives every row every column, None where a row had none.
    obj = {k: v for k, v in obj.items() if v is not None}
    if "messages" in obj:
        messages = obj["messages"]
    elif "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = prompt + completion
        else:
            for key, value in (("prompt", prompt), ("completion", completion)):
                if not isinstance(value, str) or not value.strip():
                    return None, (f"empty_{key}", f"'{key}' is missing, empty or not a string")
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": completion}]
            system = obj.get("system")
            if isinstance(system, str) and system.strip():
                messages.insert(0, {"role": "system", "content": system})
    elif "text" in obj:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            return None, ("empty_text", "'text' is empty or not a string")
        return {"text": text}, None
    else:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        return None, ("unknown_row_format", f"keys {keys}; expected 'messages', "
                      "'prompt'+'completion' or 'text'")
    problem = _message_problem(messages)
    if problem:
        return None, problem
    row: dict[str, Any] = {"messages": [{"role": m["role"], "content": m["content"]}
                                        for m in messages]}
    if "target" in obj:
        row["target"] = obj["target"]
    return row, None


# A JSON Lines row longer than this is skipped unparsed: 1 MiB of text is ~250k tokens, past any
# training length, and parsing and tokenizing a 20 MB line cost gigabytes of memory.
MAX_LINE_BYTES = 1 << 20


def _raw_rows_jsonl(path: Path, skips: _Skips) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8") from None
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DataError(f"{path} is not valid JSON ({exc})") from None
        for i, obj in enumerate(data):
            size = len(json.dumps(obj, ensure_ascii=False).encode("utf-8"))
            if size > MAX_LINE_BYTES:  # the JSON Lines cap, before any tokenization
                skips.add("line_too_long", f"{path} row {i}",
                          f"{size} bytes (the limit is {MAX_LINE_BYTES}; longer than any "
                          "training row)")
                continue
            yield f"{path} row {i}", obj
        return
    # Streamed line by line: memory is one line, never the whole file.
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if len(raw) > MAX_LINE_BYTES:
                skips.add("line_too_long", f"{path} line {lineno}",
                          f"{len(raw)} bytes (the limit is {MAX_LINE_BYTES}; longer than any "
                          "training row)")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} is not UTF-8 text (line {lineno}: {exc}); save it as "
                                "UTF-8 JSON Lines") from None
            if not line.strip():
                continue  # blank lines separate nothing in JSON Lines; not a row
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                skips.add("invalid_json", f"{path} line {lineno}",
                          str(exc) if not isinstance(exc, RecursionError) else "nested too deep")
                continue
            yield f"{path} line {lineno}", obj


def _raw_rows_disk(path: Path) -> Iterator[tuple[str, Any]]:
    from .errors import require

    datasets = require("datasets", "train", f"reading the dataset directory {path}")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a damaged directory
        raise DataError(f"{path} could not be read by datasets.load_from_disk: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path} holds a DatasetDict without a 'train' split (splits: "
                            f"{', '.join(ds)}); save the split you want with save_to_disk")
        ds = ds["train"]
    for i, obj in enumerate(ds):
        yield f"{path} row {i}", obj


def load_dataset(spec: str | Path, seed: int = 0) -> LoadedData:
    """Load ``spec`` (see the module docstring) into normalised rows plus a skip report.

    Raises ``InputError`` for a path that does not exist or an unknown embedded name,
    ``DataError`` for an unknown format or a source without one usable row (the message names
    the source and every skip reason with its first occurrence).
    """
    text, path = check_spec(spec)
    skips = _Skips()
    if path is None:
        raw: Iterator[tuple[str, Any]] = ((f"{text} row {i}", r)
                                          for i, r in enumerate(_embedded_split(text, seed)))
    elif path.is_dir():
        raw = _raw_rows_disk(path)
    else:
        raw = _raw_rows_jsonl(path, skips)
    rows = []
    for where, obj in raw:
        row, problem = normalize_row(obj)
        if problem:
            skips.add(problem[0], where, problem[1])
        else:
            rows.append(row)
    source = text if path is None else str(path)
    if not rows:
        if skips.counts:
            detail = "; ".join(f"{k} x{v} (first: {skips.examples[k]})"
                               for k, v in sorted(skips.counts.items()))
            raise DataError(f"{source} has no usable rows: {detail}")
        raise DataError(f"{source} has no rows")
    return LoadedData(rows=rows, skipped=dict(sorted(skips.counts.items())),
                      sha256=dataset_sha256(spec, seed), source=source,
                      skip_examples=dict(sorted(skips.examples.items())))


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        # transformers raises a ValueError from deep inside; the user needs to know which file.
        where = getattr(tokenizer, "name_or_path", "") or "the base model"
        raise InputError(f"{where}: the tokenizer has no chat template (no chat_template.jinja, "
                         "no chat_template in tokenizer_config.json), so chat rows cannot be "
                         "rendered; add the model's chat template there, or train on "
                         'plain-text rows ({"text": ...})')
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict[str, str]]
                         ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A span runs from the first character after the assistant header to the end of the turn's
    end-of-turn token (``tokenizer.eos_token``, e.g. ``<|im_end|>``): what the model must
    generate, stop token included. Spans are found by rendering prefixes of the conversation
    (``messages[:i]`` with the generation prompt, ``messages[:i+1]`` without), which works for
    any template that renders a conversation as the concatenation of its turns. For a template
    that rewrites earlier turns (some drop past reasoning) the assistant content is located in
    the full text instead.
    """
    full = _render(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        # The last turn's prefix is the whole conversation: rendered once.
        upto = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
        if i and full.startswith(head) and full.startswith(upto) and len(head) < len(upto):
            start, end = len(head), len(upto)
            # Drop what the template writes after the end-of-turn token (a newline): the model
            # stops at that token, so nothing after it is ever generated.
            cut = full.rfind(eos, start, end) if eos else -1
            if cut != -1:
                end = cut + len(eos)
            else:  # the template ends turns with another token: at least drop trailing space
                end = start + len(full[start:end].rstrip())
        else:
            start = full.find(m["content"], cursor)
            if start == -1:
                raise DataError("the chat template does not render an assistant message's "
                                f"content verbatim (message {i}); cannot find what to train on")
            end = start + len(m["content"])
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


def tokenize_example(tokenizer, row: dict[str, Any], max_len: int) -> dict[str, Any] | None:
    """One normalised row -> ``{"input_ids": [...], "labels": [...]}`` (plain int lists).

    Chat rows: rendered with the tokenizer's chat template and tokenized without extra special
    tokens (the template writes them, as ``apply_chat_template(tokenize=True)`` does); labels
    are ``-100`` except on assistant turns (content + end-of-turn token). A token that straddles
    a span boundary counts as inside. If the last supervised token does not fit in ``max_len``
    the row is dropped (returns None: a cut answer would teach the model to stop mid-answer);
    unsupervised tokens after it are cut silently.

    Text rows: tokenized with the tokenizer's special tokens plus the end-of-sequence token,
    loss on every token; longer than ``max_len`` -> truncated, and the result has
    ``"truncated": True``.
    """
    return _tokenized([row], tokenizer, max_len)[0]


def _tokenized(rows, tokenizer, max_len: int) -> list[dict[str, Any] | None]:
    """``tokenize_example`` of each row, the texts of each kind encoded in one tokenizer call
    (the same ids and offsets as one call per text, without the per-call overhead)."""
    chat = [i for i, row in enumerate(rows) if "text" not in row]
    if chat and not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer; edgeqlora needs "
                        "character offsets to find the assistant tokens (use tokenizer.json)")
    out: list[dict[str, Any] | None] = [None] * len(rows)
    text = [i for i, row in enumerate(rows) if "text" in row]
    if text:
        enc = tokenizer([rows[i]["text"] for i in text], add_special_tokens=True)["input_ids"]
        for i, ids in zip(text, enc):
            out[i] = _text_example(list(ids), tokenizer.eos_token_id, max_len)
    if chat:
        rendered = [assistant_char_spans(tokenizer, rows[i]["messages"]) for i in chat]
        enc = tokenizer([full for full, _ in rendered], add_special_tokens=False,
                        return_offsets_mapping=True)
        for k, i in enumerate(chat):
            out[i] = _chat_example(list(enc["input_ids"][k]), enc["offset_mapping"][k],
                                   rendered[k][1], max_len)
    return out


def _text_example(ids: list[int], eos_id: int | None, max_len: int) -> dict[str, Any]:
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
    out: dict[str, Any] = {"input_ids": ids[:max_len], "labels": ids[:max_len]}
    if len(ids) > max_len:
        out["truncated"] = True
    return out


def _chat_example(ids: list[int], offsets, spans: list[tuple[int, int]],
                  max_len: int) -> dict[str, Any] | None:
    labels = [IGNORE_INDEX] * len(ids)
    last = -1
    for j, (s, e) in enumerate(offsets):
        if any(s < b and e > a for a, b in spans):
            labels[j] = ids[j]
            last = j
    if last == -1:
        raise DataError("no token falls inside an assistant turn; the chat template or the "
                        "tokenizer's offsets are unusual")
    if last >= max_len:
        return None
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


@dataclass
class TokenizedData:
    examples: list[dict[str, Any]]
    dropped_too_long: int  # chat rows whose answer would not fit in max_len
    truncated: int  # text rows cut to max_len

    def summary(self, max_len: int) -> str:
        return (f"{len(self.examples)} examples; {self.dropped_too_long} dropped (answer beyond "
                f"max_len={max_len}); {self.truncated} text rows truncated")


def tokenize_dataset(tokenizer, rows, max_len: int) -> TokenizedData:
    """``tokenize_example`` over rows, counting dropped and truncated ones.

    Raises ``DataError`` if every row is dropped (the message suggests a larger max_len).
    """
    examples, dropped, truncated = [], 0, 0
    rows = list(rows)
    # In chunks: one tokenizer call per chunk, the encodings of a large dataset never all held.
    chunks = (_tokenized(rows[i:i + 1024], tokenizer, max_len) for i in range(0, len(rows), 1024))
    for ex in (ex for chunk in chunks for ex in chunk):
        if ex is None:
            dropped += 1
            continue
        truncated += bool(ex.pop("truncated", False))
        examples.append(ex)
    if not examples:
        raise DataError(f"all {dropped} rows are longer than max_len={max_len} tokens; "
                        "raise max_len")
    return TokenizedData(examples, dropped, truncated)

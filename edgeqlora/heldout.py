"""Held-out and calibration rows: what every measurement and every calibrated quantizer reads.

Torch-free (part of the core): the tokenizer is passed in, any object with Hugging Face's
``apply_chat_template`` / ``__call__`` interface.

- ``heldout_conversations`` / ``heldout_sequences``: conversations the adapter was not trained
  on (the first of the held-out split), and their token ids (chat template applied as in
  training). Export verification and the parity gate's logits measure on them.
- ``sample_rows`` / ``heldout_examples``: the fixed sample of held-out examples the trainer
  scores its greedy answers on; the parity gate scores the same rows, so the two exact-match
  figures are of the same commands.
- ``verification_texts``: held-out prompts as the device renders them plus ``TOKENIZER_PROBES``,
  texts whose tokenization must survive an export byte for byte.
- ``calibration_sequences``: the one way calibration rows are made, for the GGUF importance
  matrix and ONNX GPTQ alike: the first rows of a data spec tokenized exactly as the trainer
  tokenizes them (``rows.tokenize_dataset``: chat rows through the chat template, plain-text rows
  as text), with a record for the manifest, and a share of general English text mixed in
  (``CALIBRATION_TEXT``) so a quantizer calibrated on a narrow task keeps the language too.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, InputError

# Text whose tokenization must survive the export byte for byte, besides the held-out prompts:
# digits, whitespace runs, unicode, special tokens in text.
TOKENIZER_PROBES = (
    "Set the thermostat to 21.5 degrees at 07:45, then 1234567 and 3.14159.",
    "  leading spaces\tand\ttabs\n\nnew lines  ",
    "ünïcødé — «quotes» 😀 中文 русский",
    "<|im_start|>user\nturn on the lamp<|im_end|>\n<|im_start|>assistant\n",
)
EMBEDDED_EVAL = "embedded:iot:eval"


def training_data_spec(manifest: dict[str, Any]) -> str:
    """The data spec an adapter was trained on, as its manifest records it ("" if none)."""
    config = manifest.get("config") or {}
    return str((manifest.get("data") or {}).get("spec") or config.get("data") or "")


def _heldout_spec(manifest: dict[str, Any]) -> str:
    """The config's ``eval_data``, else the embedded task's held-out split for embedded data,
    else the embedded held-out split as generic text (any text the model was not trained on
    measures agreement)."""
    config = manifest.get("config") or {}
    data_spec = training_data_spec(manifest)
    spec = config.get("eval_data") or (EMBEDDED_EVAL if data_spec.startswith("embedded:")
                                       or not data_spec else "")
    return spec or EMBEDDED_EVAL


def heldout_conversations(manifest: dict[str, Any], n: int = 64) -> list[list[dict]]:
    """The first ``n`` held-out chat conversations for the data the adapter was trained on."""
    from .rows import load_dataset

    rows = [r for r in load_dataset(_heldout_spec(manifest)).rows if r.get("messages")]
    return [r["messages"] for r in rows[:n]]


def sample_rows(rows: list, n: int) -> list:
    """A fixed sample of ``n`` of ``rows`` (the same every run, spread over the split, so a mix
    of its kinds), in their order: the rows the trainer scores and the parity gate scores."""
    if len(rows) <= n:
        return list(rows)
    return [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), n))]


def heldout_examples(manifest: dict[str, Any], n: int) -> list[list[dict]]:
    """The held-out conversations the trainer scored its greedy answers on (``sample_rows`` of
    the held-out split), for the parity gate to score the same commands."""
    from .rows import load_dataset

    rows = sample_rows(load_dataset(_heldout_spec(manifest)).rows, n)
    return [r["messages"] for r in rows if r.get("messages")]


def chat_ids(tokenizer, messages: list[dict], **kwargs: Any) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (a plain list, whatever
    the tokenizer class returns)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def heldout_sequences(manifest: dict[str, Any], tokenizer, n_tokens: int = 2048,
                      max_len: int = 256) -> list[list[int]]:
    """Token id sequences (one per held-out conversation, chat template applied as in training)
    totalling about ``n_tokens``."""
    seqs, total = [], 0
    for messages in heldout_conversations(manifest, n=max(8, n_tokens // 32)):
        ids = chat_ids(tokenizer, messages)[:max_len]
        if len(ids) < 2:
            continue
        seqs.append(ids)
        total += len(ids)
        if total >= n_tokens:
            break
    if not seqs:
        raise InputError("no held-out text to measure with (the held-out split is empty)")
    return seqs


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """A held-out conversation as the device will see it: the chat template up to the answer."""
    prompt = [m for m in messages if m.get("role") != "assistant"]
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def verification_texts(manifest: dict[str, Any], tokenizer, n: int = 16) -> list[str]:
    """The texts an export's tokenizer must tokenize exactly as the trained model's."""
    return [prompt_text(tokenizer, m) for m in heldout_conversations(manifest, n)] + \
        list(TOKENIZER_PROBES)


def check_rows(rows: Any, what: str = "calibration rows") -> int:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"{what}={rows!r} must be an integer >= 1")
    return rows


# General English mixed into every calibration set (``calibration_sequences(general=...)``): the
# project's own prose, not the parity gate's text (``parity.ENGLISH_TEXT``), so the gate's general
# set stays unseen by the quantizers it judges. GPTQ calibrated on the task's rows alone kept the
# task and lost the language (quickstart: text top-1 0.46, KLD 1.10 against the trained model).
CALIBRATION_TEXT = Path(__file__).with_name("assets") / "calibration.txt"
# The default share of calibration tokens taken from CALIBRATION_TEXT.
GENERAL_SHARE = 0.25


def check_share(share: Any, what: str) -> float:
    """A general-text share: a number from 0 (task rows only) to 0.9."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 0.9:
        raise ConfigError(f"{what}={share!r} must be a number from 0 (task rows only) to 0.9 "
                          "(the share of calibration tokens from general English text)")
    return float(share)


def general_sequences(tokenizer, n_tokens: int, max_len: int) -> list[list[int]]:
    """About ``n_tokens`` ids of ``CALIBRATION_TEXT`` (plain text, no chat template), cut into
    sequences of at most ``max_len``; the text repeats if more is asked for than it holds."""
    ids = list(tokenizer(CALIBRATION_TEXT.read_text(encoding="utf-8"),
                         add_special_tokens=False)["input_ids"])
    out: list[list[int]] = []
    if len(ids) < 2 or max_len < 2:  # no chunk could ever be taken: nothing to mix in
        return out
    while n_tokens >= 2:
        for i in range(0, len(ids), max_len):
            chunk = ids[i:i + min(max_len, n_tokens)]
            if len(chunk) >= 2:
                out.append(chunk)
                n_tokens -= len(chunk)
            if n_tokens < 2:
                break
    return out


def calibration_sequences(tokenizer, spec: str | Path, rows: int, max_len: int,
                          what: str = "calibration data",
                          general: float = 0.0) -> tuple[list[list[int]], dict[str, Any]]:
    """Token ids of the first ``rows`` usable rows of the data spec ``spec``, tokenized as in
    training (each cut at ``max_len``), then general English (``general_sequences``) for a
    ``general`` share of all the tokens; and a record for the manifest: spec, rows, tokens,
    sha256 of the ids, the dataset's own sha256 (the one the adapter manifest has) and the
    general text's share, tokens and sha256.

    Bad or empty data is one line naming ``what`` and the source."""
    from .rows import dataset_sha256, load_dataset, tokenize_dataset

    check_rows(rows, f"{what} rows")
    try:
        data = load_dataset(spec)
        # Rows longer than max_len are cut, as tokenize_dataset cuts (never dropped here).
        examples = tokenize_dataset(tokenizer, data.rows[:rows], max_len).examples
    except DataError as exc:
        raise DataError(f"{what} {spec}: {exc}") from None
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None
    seqs = [list(ex["input_ids"]) for ex in examples if len(ex["input_ids"]) >= 2]
    if not seqs:
        raise DataError(f"{what} {spec}: no row gives 2+ tokens ({len(data.rows)} rows read)")
    task_tokens = sum(len(s) for s in seqs)
    share = check_share(general, f"{what}: general share")
    extra = general_sequences(tokenizer, round(task_tokens * share / (1 - share)), max_len)
    general_tokens = sum(len(s) for s in extra)
    seqs += extra
    digest = hashlib.sha256(json.dumps(seqs, separators=(",", ":")).encode()).hexdigest()
    record = {"data": str(spec), "data_sha256": dataset_sha256(spec),
              "rows": len(seqs) - len(extra), "tokens": task_tokens, "max_len": max_len,
              "ids_sha256": digest}
    if extra:
        record["general"] = {
            "text": CALIBRATION_TEXT.name, "rows": len(extra), "tokens": general_tokens,
            "share": round(general_tokens / (task_tokens + general_tokens), 4),
            "sha256": hashlib.sha256(CALIBRATION_TEXT.read_bytes()).hexdigest()}
    return seqs, record


class VerifySet:
    """What an exporter verifies its files against (built by the export stage, plain data):

    - ``sequences``: held-out token id sequences;
    - ``keeps``: per sequence, the positions that count (``metrics.distinct_positions``);
    - ``logits(i)``: the reference model's logits ``[len(sequences[i]), vocab]`` (float32
      numpy) on sequence ``i``, computed when first asked for and then kept;
    - ``texts`` and ``text_ids(text, add_special_tokens)``: texts whose tokenization must
      match, and the reference tokenizer's ids for them;
    - ``label``: what the reference is ("merged model", "trained model (NF4 + LoRA)").
    """

    def __init__(self, sequences: list[list[int]], logits, texts: list[str], text_ids,
                 label: str = "merged model"):
        from .metrics import distinct_positions

        self.sequences, self.texts, self.label = sequences, list(texts), label
        self.keeps = distinct_positions(sequences)
        self._logits, self._cache, self.text_ids = logits, {}, text_ids

    def preload(self, logits: list) -> None:
        """Reference logits already computed for every sequence, in order."""
        self._cache.update(enumerate(logits))

    def logits(self, i: int):
        if i not in self._cache:
            self._cache[i] = self._logits(self.sequences[i])
        return self._cache[i]

    def agreement(self, candidate_logits) -> dict[str, float]:
        """Top-1 and mean KL of ``candidate_logits(i)`` against the reference over every
        sequence's distinct positions, one sequence at a time."""
        from .metrics import Agreement

        acc = Agreement()
        for i, keep in enumerate(self.keeps):
            acc.add(self.logits(i)[keep], candidate_logits(i)[keep])
        return acc.result()

"""Training batches: pack tokenized examples and collate them into torch tensors.

Rows are read and tokenized by ``edgeqlora.rows`` (torch-free; its names are re-exported here
for the trainer and old callers).

``pack`` concatenates examples into sequences of at most ``max_len`` tokens whose
``position_ids`` restart at 0 for each example; transformers (5.x, ``sdpa`` and ``eager``)
turns restarting ``position_ids`` with no ``attention_mask`` into a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``), so packed examples never attend to each other,
provided the model is called with ``use_cache=False`` (see ``collate_packed``).
``tests/test_data.py`` proves the loss is the same packed and unpacked.

``pack_shared_prefix`` goes one step further for the common case of a batch whose examples all
start with the same unlabelled tokens (a fixed system prompt: 28 of the embedded task's ~72
tokens per example): each packed row holds that prefix once, followed by every example's own
suffix; a 4D attention mask lets each suffix attend to the prefix and to itself only, and its
position ids continue from the prefix's. Every labelled token is predicted from the same context
as unpacked, so the loss is the same (tested), for fewer positions computed.

Typical use (what the trainer does)::

    loaded = load_dataset(cfg.data)                        # rows + skip report + sha256
    tok = tokenize_dataset(tokenizer, loaded.rows, cfg.max_len)
    seqs = pack(shuffled(tok.examples), cfg.max_len)       # or keep tok.examples unpacked
    batch = collate_packed(seqs[:8], pad_id)               # or collate(examples, pad_id)
    loss = model(**batch, use_cache=False).loss
"""

from __future__ import annotations

from typing import Any

from .rows import (EMBEDDED, IGNORE_INDEX, JSONL_SUFFIXES, ROLES, LoadedData,  # noqa: F401
                   TokenizedData, assistant_char_spans, dataset_sha256, load_dataset,
                   normalize_row, tokenize_dataset, tokenize_example)


def pack(examples: list[dict[str, Any]], max_len: int) -> list[dict[str, Any]]:
    """Concatenate examples into sequences of at most ``max_len`` tokens.

    First fit in the given order (shuffle before packing; order is otherwise kept). Each output
    has ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 at every example, which is
    what makes transformers mask attention between examples) and ``lengths``. The first label
    of every example is set to -100: unpacked it is never a target (labels are shifted), packed
    it would make the previous example's last token predict it.
    """
    bins: list[dict[str, Any]] = []
    for k, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > max_len:
            raise ValueError(f"example {k} has {n} tokens > max_len={max_len}; tokenize with "
                             "the same max_len")
        if n == 0:
            continue
        target = next((b for b in bins if len(b["input_ids"]) + n <= max_len), None)
        if target is None:
            target = {"input_ids": [], "labels": [], "position_ids": [], "lengths": []}
            bins.append(target)
        target["input_ids"] += ex["input_ids"]
        target["labels"] += [IGNORE_INDEX] + list(ex["labels"][1:])
        target["position_ids"] += list(range(n))
        target["lengths"].append(n)
    return bins


def shared_prefix_length(examples: list[dict[str, Any]]) -> int:
    """How many leading tokens every example shares that no label depends on.

    The prefix must end before the first labelled token of every example, one token early: the
    token right after the prefix is predicted from the prefix's last position, which a shared
    prefix has only once, so that token must not be a target."""
    if len(examples) < 2:
        return 0
    first = examples[0]["input_ids"]
    common = len(first)
    for ex in examples[1:]:
        ids = ex["input_ids"]
        limit, k = min(common, len(ids)), 0
        while k < limit and ids[k] == first[k]:
            k += 1
        common = k
    first_label = min(next((i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX),
                           len(ex["labels"])) for ex in examples)
    return max(0, min(common, first_label - 1))


def pack_shared_prefix(examples: list[dict[str, Any]], prefix_len: int,
                       row_len: int) -> list[dict[str, Any]]:
    """Rows of at most ``row_len`` tokens: the ``prefix_len`` tokens every example starts with,
    once, then the examples' remaining tokens (first fit, in order).

    Each row has ``input_ids``, ``labels``, ``position_ids`` (the prefix's 0..P-1, then P, P+1, ...
    for every suffix, as if it followed the prefix alone) and ``segments`` (0 for the prefix,
    1, 2, ... for the suffixes), from which ``collate_shared_prefix`` builds the attention mask.
    """
    if prefix_len <= 0:
        raise ValueError("pack_shared_prefix needs a shared prefix; use pack()")
    prefix = list(examples[0]["input_ids"][:prefix_len])
    rows: list[dict[str, Any]] = []
    for k, ex in enumerate(examples):
        if ex["input_ids"][:prefix_len] != prefix:
            raise ValueError(f"example {k} does not start with the shared prefix")
        suffix = list(ex["input_ids"][prefix_len:])
        n = len(suffix)
        if prefix_len + n > row_len:
            raise ValueError(f"example {k} has {prefix_len + n} tokens > row_len={row_len}")
        row = next((r for r in rows if len(r["input_ids"]) + n <= row_len), None)
        if row is None:
            row = {"input_ids": list(prefix), "labels": [IGNORE_INDEX] * prefix_len,
                   "position_ids": list(range(prefix_len)), "segments": [0] * prefix_len,
                   "lengths": []}
            rows.append(row)
        row["lengths"].append(n)
        row["input_ids"] += suffix
        # The suffix's first token would be predicted from the previous suffix's last position.
        row["labels"] += [IGNORE_INDEX] + list(ex["labels"][prefix_len + 1:])
        row["position_ids"] += list(range(prefix_len, prefix_len + n))
        row["segments"] += [len(row["lengths"])] * n
    return rows


def collate_shared_prefix(rows: list[dict[str, Any]], pad_id: int):
    """Shared-prefix rows -> ``input_ids``, ``labels``, ``position_ids`` and a boolean 4D
    ``attention_mask`` (rows, 1, T, T), True where a query may attend a key: causal, and within
    its own segment or to the prefix. Right padding is a segment of its own (it attends to
    itself, so no softmax row is empty; its labels are -100). Call the model with
    ``use_cache=False``; transformers passes a 4D mask to the attention as it is."""
    import torch

    batch = collate_packed(rows, pad_id)
    width = batch["input_ids"].shape[1]
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        seg[i, :len(r["segments"])] = torch.tensor(r["segments"])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    q, k = seg[:, :, None], seg[:, None, :]
    mask = causal & ((q == k) | ((k == 0) & (q > 0)))
    return {**batch, "attention_mask": mask[:, None]}


def collate(batch: list[dict[str, Any]], pad_id: int):
    """Padded (unpacked) batch -> tensors ``input_ids``, ``labels``, ``attention_mask``.

    Right padding; padded labels are -100.
    """
    import torch

    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(batch: list[dict[str, Any]], pad_id: int):
    """Packed batch -> tensors ``input_ids``, ``labels``, ``position_ids`` (no attention_mask).

    Call the model with these, no ``attention_mask`` and **``use_cache=False``**: transformers
    derives the per-example mask from ``position_ids`` only when there is neither a 2D mask nor
    a cache, and a model whose config says ``use_cache=True`` (most checkpoints) builds a cache
    even in train mode, in which case examples silently attend to each other (measured with
    transformers 5.23: the loss changes by ~7e-3 on a tiny random Llama). Padding at the end of
    a row gets positions restarting at 0, so it forms its own segment (labels -100).
    """
    import torch

    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        pos[i, :n] = torch.tensor(ex["position_ids"])
        pos[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}

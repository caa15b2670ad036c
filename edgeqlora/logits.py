"""Logits of a torch model over many token sequences, in batches (the export stage's and the
merge-base measurement's reference runs).

Sequences of similar length are batched, right-padded with an attention mask, and a prefix
every sequence of a batch shares is run once with its KV cache repeated for the batch.
"""

from __future__ import annotations

from . import threads


def forward_logits(model, sequences: list[list[int]], max_batch_tokens: int = 2048,
                   rows=None) -> list:
    """Logits (float32 numpy ``[len(seq), vocab]``, or only ``rows[i]`` of them) of each token
    sequence, computed in batches of similar lengths, right-padded with an attention mask.

    A padded position is never attended to by a real one (it comes after it), so each real
    position's logits are those of the sequence alone up to float rounding; batches make the
    CPU matmuls wider. A prefix every sequence of a batch shares (held-out examples share the
    system prompt: 28 of the embedded task's ~72 tokens) is run once and its KV cache repeated
    for the batch, so only the rest is computed per sequence."""
    import torch

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list = [None] * len(sequences)
    device = next(model.parameters()).device
    start = 0
    while start < len(order):
        width = len(sequences[order[start]])
        end = start + 1
        while end < len(order) and len(sequences[order[end]]) * (end - start + 1) \
                <= max(max_batch_tokens, width):
            end += 1
        batch = [list(sequences[i]) for i in order[start:end]]
        threads.adapt()
        with torch.no_grad():
            logits = _batch_logits(model, batch, device)
        for r, i in enumerate(order[start:end]):
            out[i] = logits[r] if rows is None else logits[r][rows[i]]
        start = end
    return out


def _shared_prefix(batch: list[list[int]]) -> int:
    """Tokens every sequence of ``batch`` starts with, leaving each at least one of its own."""
    n = min(len(s) for s in batch) - 1
    first = batch[0]
    for k in range(max(n, 0)):
        if any(s[k] != first[k] for s in batch):
            return k
    return max(n, 0)


def _batch_logits(model, batch: list[list[int]], device) -> list:
    import numpy as np
    import torch

    prefix = _shared_prefix(batch) if len(batch) > 1 else 0
    head, past = None, None
    if prefix >= 8:  # below that the extra forward costs more than it saves
        run = model(input_ids=torch.tensor([batch[0][:prefix]], device=device), use_cache=True)
        head = run.logits[0].float().cpu().numpy()
        # transformers 5.2x renamed the KV cache ``cache`` (in and out) and warns on the old name.
        key = "cache" if "cache" in run else "past_key_values"
        past = run[key]
        past.batch_repeat_interleave(len(batch))
    else:
        prefix = 0
    width = max(len(s) for s in batch)
    ids = torch.zeros((len(batch), width - prefix), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, s in enumerate(batch):
        ids[r, :len(s) - prefix] = torch.tensor(s[prefix:])
        mask[r, :len(s)] = 1
    kwargs = {key: past, "use_cache": True} if past is not None else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
    out = []
    for r, s in enumerate(batch):
        tail = logits[r, :len(s) - prefix].float().cpu().numpy()
        out.append(tail if head is None else np.concatenate([head, tail]))
    return out

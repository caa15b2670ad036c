"""Evaluation during and after training: held-out loss, and for the embedded IoT task exact match
and per-field accuracy of batched greedy decoding.

Generation runs the model in eval mode without grad, which is exactly what triggers bitsandbytes'
CPU repack of 4-bit weights (see ``edgeqlora.qlora``): every entry point here guards the model
first, so training can go on after an eval pass.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to (not including) the last assistant turn: what the model sees."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return messages[:last]


def greedy_generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                    batch_size: int = 16, on_batch: Callable[[int], None] | None = None
                    ) -> list[str]:
    """Greedy completions of ``conversations`` (chat messages ending before the answer), in
    batches, left-padded; prompts are sorted by length so a batch wastes little padding."""
    from .qlora import dequantized_weights, guard_cpu_4bit

    guard_cpu_4bit(model)
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
               for c in conversations]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) \
        else None
    if eos is None:
        eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with dequantized_weights(model):
            _generate_batches(model, tokenizer, encoded, order, outputs, pad_id, eos,
                              max_new_tokens, batch_size, device, on_batch)
    finally:
        model.train(was_training)
    return outputs


def _generate_batches(model, tokenizer, encoded, order, outputs, pad_id, eos, max_new_tokens,
                      batch_size, device, on_batch) -> None:
    import torch

    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i])
            ids[row, width - n:] = torch.tensor(encoded[i])
            mask[row, width - n:] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=eos)
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
        if on_batch:
            on_batch(len(idx))


def eval_loss(model, batches: Iterable[dict]) -> dict[str, float]:
    """Mean next-token loss over the labelled (answer) tokens of ``batches``."""
    import torch

    from .qlora import dequantized_weights, guard_cpu_4bit, token_loss

    guard_cpu_4bit(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), dequantized_weights(model):
            for batch in batches:
                loss_sum, n = token_loss(model, batch)
                total += float(loss_sum)
                count += n
    finally:
        model.train(was_training)
    return {"eval_loss": total / max(count, 1), "eval_tokens": count}


def evaluate_task(model, tokenizer, rows: list[dict], max_new_tokens: int = 64,
                  batch_size: int = 16, on_batch: Callable[[int], None] | None = None
                  ) -> dict[str, Any]:
    """Exact match and per-field accuracy on IoT rows (those with a ``target``), plus a few
    sample outputs for the log."""
    from .tasks.iot import score

    conversations = [prompt_messages(r) for r in rows]
    outputs = greedy_generate(model, tokenizer, conversations, max_new_tokens, batch_size,
                              on_batch=on_batch)
    result = score(outputs, [r["target"] for r in rows])
    result["samples"] = [{"prompt": c[-1]["content"], "output": o}
                         for c, o in zip(conversations[:3], outputs[:3])]
    return result

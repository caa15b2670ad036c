"""Evaluation during and after training: held-out loss, and for the embedded IoT task exact match
and per-field accuracy of batched greedy decoding.

Generation runs the model in eval mode without grad, which is exactly what triggers bitsandbytes'
CPU repack of 4-bit weights (see ``edgeqlora.qlora``): every entry point here guards the model
first, so training can go on after an eval pass.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from . import threads
from .errors import ConfigError, EdgeQloraError


def check_schema(schema: dict | None) -> None:
    """Refuse a schema llguidance cannot compile before training starts (the final evaluation
    and every export's runtime compile it); nothing to check without llguidance."""
    if schema is None:
        return
    try:
        import llguidance
    except ImportError:
        return
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"schema: the JSON schema is not usable: {exc}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ConfigError("schema: the JSON schema is not usable: " + " ".join(problem.split()))


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to (not including) the last assistant turn: what the model sees."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return messages[:last]


def greedy_generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                    batch_size: int = 16, on_batch: Callable[[int], None] | None = None,
                    grammar: Any = None, stop_when_scored: bool = False) -> list[str]:
    """Greedy completions of ``conversations`` (chat messages ending before the answer), in
    batches, left-padded; prompts are sorted by length so a batch wastes little padding.
    ``grammar`` (``SchemaGrammar``) constrains every answer to its JSON schema.
    ``stop_when_scored``: a row stops once the first ``{`` of its answer has closed into a JSON
    object (``_Scored``): what ``tasks.iot.score`` reads is then fixed, so the tokens after it
    (an untrained model rambles on to ``max_new_tokens``) cannot change a figure."""
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
                              max_new_tokens, batch_size, device, on_batch, grammar,
                              stop_when_scored)
    finally:
        model.train(was_training)
    return outputs


def _generate_batches(model, tokenizer, encoded, order, outputs, pad_id, eos, max_new_tokens,
                      batch_size, device, on_batch, grammar=None, stop_when_scored=False) -> None:
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    for start in range(0, len(order), batch_size):
        threads.adapt()
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i])
            ids[row, width - n:] = torch.tensor(encoded[i])
            mask[row, width - n:] = 1
        extra = {} if grammar is None else {"logits_processor": LogitsProcessorList(
            [grammar.processor(len(idx), width, eos)])}
        scored = _Scored(tokenizer, width, len(idx)) if stop_when_scored else None
        if scored is not None:
            extra["stopping_criteria"] = StoppingCriteriaList([scored])
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=eos, **extra)
        for row, i in enumerate(idx):
            end = gen.shape[1] if scored is None or scored.at[row] is None else scored.at[row]
            outputs[i] = tokenizer.decode(gen[row, width:end], skip_special_tokens=True)
        if on_batch:
            on_batch(len(idx))


class _Scored:
    """A ``generate`` stopping rule: a row is done once the first ``{`` of its answer has closed
    into a JSON value. ``tasks.iot.parse_action`` reads the first ``{`` that decodes, and a
    value that decodes from the first ``{`` of a text decodes the same whatever follows it, so
    the score of the row is fixed from there. ``at[row]``: the length the row stopped at (what
    comes after is padding)."""

    def __init__(self, tokenizer, width: int, rows: int):
        import json

        self.tokenizer, self.width = tokenizer, width
        self.decoder = json.JSONDecoder()
        self.at: list[int | None] = [None] * rows

    def __call__(self, input_ids, scores, **kwargs):
        import json

        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in range(input_ids.shape[0]):
            if self.at[row] is not None:
                done[row] = True
                continue
            if not self._closes(int(input_ids[row, -1])):
                continue
            text = self.tokenizer.decode(input_ids[row, self.width:], skip_special_tokens=True)
            start = text.find("{")
            if start < 0:
                continue
            try:
                self.decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                continue
            self.at[row] = input_ids.shape[1]
            done[row] = True
        return done

    def _closes(self, token: int) -> bool:
        """Whether ``token``'s text has a ``}``: only then can a value have just closed."""
        cache = self.__dict__.setdefault("_close_cache", {})
        if token not in cache:
            cache[token] = "}" in self.tokenizer.decode([token])
        return cache[token]


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
                threads.adapt()
                loss_sum, n = token_loss(model, batch)
                total += float(loss_sum)
                count += n
    finally:
        model.train(was_training)
    return {"eval_loss": total / max(count, 1), "eval_tokens": count}


def evaluate_task(model, tokenizer, rows: list[dict], max_new_tokens: int = 64,
                  batch_size: int = 16, on_batch: Callable[[int], None] | None = None,
                  schema: dict | None = None) -> dict[str, Any]:
    """Exact match and per-field accuracy on IoT rows (those with a ``target``), plus a few
    sample outputs for the log. With ``schema``, also ``schema``: exact match and valid-JSON
    rate with the answers constrained to it (only the answers its grammar does not accept are
    decoded again: the others are what constrained decoding writes), beside the valid-JSON
    rate without. Without ``schema`` a row stops once its JSON object has closed
    (``stop_when_scored``); with it every row runs to its end, since the valid-JSON rate without
    the schema reads the whole answer."""
    from .tasks.iot import score

    conversations = [prompt_messages(r) for r in rows]
    targets = [r["target"] for r in rows]
    outputs = greedy_generate(model, tokenizer, conversations, max_new_tokens, batch_size,
                              on_batch=on_batch, stop_when_scored=schema is None)
    result = score(outputs, targets)
    result["samples"] = [{"prompt": c[-1]["content"], "output": o}
                         for c, o in zip(conversations[:3], outputs[:3])]
    if schema is not None and rows:
        try:
            grammar = SchemaGrammar(schema, tokenizer, model)
        except EdgeQloraError as exc:  # never lose a finished run over the extra figure
            result["schema"] = {"error": str(exc)}
            return result
        valid = [grammar.accepts(o) for o in outputs]
        again = [i for i, ok in enumerate(valid) if not ok]
        fixed = greedy_generate(model, tokenizer, [conversations[i] for i in again],
                                max_new_tokens, batch_size, grammar=grammar) if again else []
        constrained = list(outputs)
        for i, text in zip(again, fixed):
            constrained[i] = text
        result["schema"] = {"exact_match": score(constrained, targets)["exact_match"],
                            "valid_json": sum(map(grammar.accepts, constrained)) / len(rows),
                            "valid_json_unconstrained": sum(valid) / len(rows),
                            "redecoded": len(again)}
    return result


class SchemaGrammar:
    """A JSON schema compiled for a Hugging Face tokenizer, and the ``generate`` logits
    processor that applies it with the runtimes' rule (``runtimes/constrain.py``): each row's
    greedy pick is kept when the grammar accepts it, else the row is masked to the allowed
    tokens; a row whose value is complete can only end."""

    def __init__(self, schema: dict, tokenizer, model):
        from .errors import require
        from .runtimes.constrain import Grammar

        require("llguidance", "train", "evaluating with a JSON schema")
        from llguidance.hf import from_tokenizer

        vocab = int(model.get_output_embeddings().weight.shape[0])
        self.tokenizer = tokenizer
        # The runtimes' compiled grammar, over the Hugging Face tokenizer's vocabulary.
        self.grammar = Grammar(schema, from_tokenizer(tokenizer, n_vocab=vocab))

    def matcher(self):
        return self.grammar.matcher()

    def accepts(self, text: str) -> bool:
        ids = self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        m = self.matcher()
        return bool(ids) and m.consume_tokens(ids) and m.is_accepting()

    def processor(self, rows: int, width: int, eos):
        return _SchemaLogits([self.matcher() for _ in range(rows)], width,
                             [eos] if isinstance(eos, int) else list(eos))


class _SchemaLogits:
    def __init__(self, matchers, width: int, eos: list[int]):
        self.matchers, self.width, self.eos = matchers, width, eos
        self.done = [False] * len(matchers)

    def __call__(self, input_ids, scores):
        import torch

        from .runtimes.constrain import allowed_mask

        step = input_ids.shape[1] - self.width
        for row, m in enumerate(self.matchers):
            if step > 0 and not self.done[row]:
                token = int(input_ids[row, -1])
                if token in self.eos:
                    self.done[row] = True
                else:
                    m.consume_token(token)
            if self.done[row]:
                continue
            if m.is_stopped():  # the value is complete: end the answer
                scores[row, :] = -torch.inf
                scores[row, self.eos[0]] = 0.0
                continue
            best = int(scores[row].argmax())
            if best in self.eos and m.is_accepting():
                continue
            if best not in self.eos and m.validate_tokens([best]) == 1:
                continue
            mask = torch.from_numpy(allowed_mask(m, scores.shape[-1])).to(scores.device)
            for e in self.eos:
                mask[e] = mask[e] or m.is_accepting()
            scores[row, ~mask] = -torch.inf
        return scores

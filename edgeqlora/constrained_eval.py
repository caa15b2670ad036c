"""Greedy answers of a runtime with and without its JSON schema: does the constraint rescue
what a 4-bit export loses? For ``edgeqlora parity`` (and the export gate's report) and
``bench/structured.py``.

The unconstrained answers stay the gate's input (the constraint must not hide a worse model);
the constrained ones are reported beside them. An answer the grammar already accepts token for
token is what constrained decoding would write too (``runtimes/constrain.py``: the model's pick
is kept whenever the grammar accepts it), so only the other answers are decoded again.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence


def accepted(grammar: Any, token_ids: Sequence[int]) -> bool:
    """Whether ``token_ids`` are one complete value of ``grammar`` (the schema's own notion of
    valid: enums, types, key order, no whitespace where the schema allows none)."""
    matcher = grammar.matcher()
    return matcher.validate_tokens(list(token_ids)) == len(token_ids) \
        and matcher.consume_tokens(list(token_ids)) and matcher.is_accepting()


def answers(runtime: Any, prompts: Sequence[Sequence[Mapping[str, Any]]], max_new_tokens: int,
            schema: Any = None, progress: Callable[[int], None] | None = None
            ) -> dict[str, Any]:
    """Greedy answers to ``prompts`` (chat messages): ``free`` always; with a schema also
    ``constrained`` and, for both, which answers the schema accepts (``valid_*``)."""
    from .runtimes.base import Completion

    grammar = runtime.grammar(schema) if schema is not None else None
    out: dict[str, Any] = {"free": [], "constrained": [], "valid_free": [],
                           "valid_constrained": [], "redecoded": 0}
    for i, messages in enumerate(prompts):
        if progress is not None:
            progress(i)
        if grammar is None:
            out["free"].append(runtime.chat(list(messages), max_new_tokens=max_new_tokens,
                                            temperature=0.0).strip())
            continue
        ids = runtime.chat_ids(list(messages), add_generation_prompt=True)
        result = Completion()
        text = "".join(runtime.complete(ids, max_new_tokens=max_new_tokens, temperature=0.0,
                                        result=result)).strip()
        out["free"].append(text)
        ok = result.finish_reason == "stop" and accepted(grammar, result.token_ids)
        out["valid_free"].append(ok)
        if not ok:
            out["redecoded"] += 1
            result = Completion()
            text = "".join(runtime.complete(ids, max_new_tokens=max_new_tokens,
                                            temperature=0.0, json_schema=grammar,
                                            result=result)).strip()
        out["constrained"].append(text)
        out["valid_constrained"].append(result.finish_reason == "stop"
                                        and accepted(grammar, result.token_ids))
    return out

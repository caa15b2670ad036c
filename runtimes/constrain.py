"""JSON-Schema-constrained decoding, the same in every runtime: llguidance computes which tokens
may come next, the shared sampler picks among them.

Why llguidance and not llama.cpp's GBNF grammar for GGUF: one engine for both runtimes gives the
same grammar semantics (the same schema accepts the same outputs, token for token), llguidance
is what llama.cpp itself and onnxruntime-genai use for JSON Schema, it covers more of the JSON
Schema spec than llama-cpp-python's schema-to-GBNF converter, and its masks take ~50 us for a
128k vocabulary. ``bench/structured.py`` measures the overhead of both ways on GGUF.

The loop (``Runtime._constrained_stream``): take the backend's next-token logits and the token
the unconstrained sampler would pick; when the grammar accepts that token, it is the answer.
Only when the grammar refuses it is llguidance's mask computed and the pick made among the
allowed tokens. Two consequences, both wanted: an answer the model writes validly on its own is
never changed by the constraint (the "constrained exact match >= unconstrained" goal), and the
mask's cost is paid only at the few steps where the model strays. (llguidance's mask allows
only the canonical tokenization of bytes the grammar forces, e.g. ``":"`` but not ``":`` after
a key whose value must be a string, while it accepts any tokenization when a token is consumed;
taking the model's own pick when it is accepted keeps the model on the tokens it chose.) Once
the value is complete (the matcher is stopped) generation ends with finish reason "stop".

Torch-free; llguidance is imported only when a schema is used.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from edgeqlora.errors import InputError, require

# A JSON Schema that any single JSON object satisfies: OpenAI's response_format json_object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _llguidance():
    return require("llguidance", "gguf", "JSON-Schema-constrained decoding")


class Grammar:
    """One compiled schema for one vocabulary; ``matcher()`` gives a fresh matcher per request.

    ``tokenizer`` is an ``llguidance.LLTokenizer`` (each runtime builds and caches its own).
    Raises InputError when the schema does not compile (an unknown type, a bad pattern, a
    ``$ref`` to nowhere) or when its first token cannot be produced by this vocabulary.
    """

    def __init__(self, schema: Mapping[str, Any], tokenizer: Any):
        llg = _llguidance()
        self.schema = dict(schema)
        try:
            self.grammar = llg.LLMatcher.grammar_from_json_schema(self.schema)
        except (ValueError, TypeError) as exc:
            raise InputError(f"the JSON schema is not usable: {_one_line(exc)}") from None
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.vocab_size)
        probe = self.matcher()
        if probe.is_error():
            raise InputError(f"the JSON schema is not usable: {_one_line(probe.get_error())}")
        mask = np.frombuffer(probe.compute_bitmask(), dtype=np.uint8)
        if probe.is_error() or not mask.any():
            reason = _one_line(probe.get_error()) or "no token of the vocabulary can start it"
            raise InputError(f"the JSON schema cannot be satisfied by this model: {reason}")

    def matcher(self):
        return _llguidance().LLMatcher(self.tokenizer, self.grammar, log_level=0)


def allowed_mask(matcher: Any, vocab_size: int) -> np.ndarray:
    """Boolean ``[vocab_size]``: the tokens the matcher accepts next (ids past the tokenizer's
    own vocabulary, padding rows of the output layer, are never allowed)."""
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    mask = np.unpackbits(bits, bitorder="little").astype(bool)
    if mask.shape[0] >= vocab_size:
        return mask[:vocab_size]
    return np.concatenate([mask, np.zeros(vocab_size - mask.shape[0], dtype=bool)])


def schema_error(matcher: Any) -> str:
    return _one_line(matcher.get_error()) or "the grammar allows no token here"


def _one_line(message: Any) -> str:
    # llguidance's regex errors span lines (a caret under the pattern); ours are one line.
    return " ".join(str(message).split())

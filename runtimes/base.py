"""What every runtime shares: the interface, argument checks, text streaming with stop strings.

A backend (``gguf.py``, ``onnx.py``) subclasses :class:`Runtime` and supplies a few small
things: ``tokenize``, ``detokenize``, ``logits``, ``_token_stream`` (token ids from a prompt, the
backend's own sampler), ``_logit_steps`` (next-token logits, one step at a time, for constrained
decoding), ``_ll_tokenizer`` (its vocabulary for llguidance) and ``_piece`` / ``_is_eog`` (the
bytes of one token, end-of-generation ids). Everything users call on top of that (``generate``,
``chat``, streaming, stop strings, finish reasons, token counts, ``json_schema``) is written once
here so that all formats behave the same.

One runtime object holds one model context and is not thread-safe: a server serialises requests.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import math
import threading
from pathlib import Path
from typing import Any, Generator, Iterator, Mapping, Sequence

import numpy as np

from edgeqlora import threads
from edgeqlora.errors import InputError

from .chat_template import ChatTemplate
from edgeqlora.schema import load_schema

from .constrain import ANY_OBJECT, Grammar, allowed_mask, schema_error

# Refuse absurd requests before they reach C code: a typo like max_new_tokens=10**9 should fail
# with a message, not allocate.
MAX_NEW_TOKENS_LIMIT = 1 << 20
GRAMMAR_CACHE = 8  # compiled JSON schemas kept per runtime


def default_threads() -> int:
    """Threads for llama.cpp / onnxruntime: the free cores this process may use, never the
    last one (``edgeqlora.threads``, which has the measurements; ``EDGEQLORA_THREADS``
    overrides).

    Why not all of them: llama.cpp's worker threads meet at a spinning barrier after every op, so
    one thread preempted by another process stalls all of them. Measured on a 2-core machine with
    the 135M Q4_1 model: 2 threads decode ~120-137 tok/s when idle but ~13 tok/s as soon as
    another process holds a core, while 1 thread keeps ~118 tok/s. Decoding is memory-bandwidth
    bound, so the last core adds little even when idle.
    """
    return threads.runtime_threads()


class Cancel(threading.Event):
    """One generation's stop signal (the server's, per request: a client gone, a time budget
    spent), set from another thread. The runtime stops at its next token and, where the backend
    can, inside the native call in progress: ``set()`` also runs the hooks a runtime registered
    for the call (llama.cpp's abort flag, checked between graph nodes; onnxruntime's
    ``RunOptions.terminate``), so a long prompt batch stops within milliseconds instead of
    running to its end."""

    def __init__(self):
        super().__init__()
        self._hooks: list = []
        self._hooks_lock = threading.Lock()

    def set(self) -> None:
        super().set()
        # Under the lock: a hook never runs after ``hooked`` has removed it (it would flag the
        # runtime's next call). Hooks only set a flag.
        with self._hooks_lock:
            for hook in self._hooks:
                hook()

    @contextlib.contextmanager
    def hooked(self, hook):
        """Run ``hook`` on ``set()`` while the block runs (at once if already set)."""
        with self._hooks_lock:
            self._hooks.append(hook)
        try:
            if self.is_set():
                hook()
            yield
        finally:
            with self._hooks_lock:
                self._hooks.remove(hook)


class Interrupted(Exception):
    """Raised inside a runtime when a native call stopped because its ``Cancel`` was set."""


@dataclasses.dataclass
class Completion:
    """The result of one generation; ``finish_reason`` is "stop" (EOS or a stop string),
    "length" (max_new_tokens or the context window) or "cancelled" (its ``Cancel`` was set)."""

    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The generated ids (without the end-of-generation token); re-tokenizing ``text`` need not
    # give them back.
    token_ids: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Checked sampling settings. temperature 0 is greedy; top_k 0 and top_p 1 disable them."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def check_sampling(max_new_tokens: Any = 256, temperature: Any = 0.0, top_p: Any = 1.0,
                   top_k: Any = 0, seed: Any = None, stop: Any = None) -> Sampling:
    """Validate user-facing generation arguments; every problem is named in one InputError."""
    problems = []

    def number(name, value, kind):
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float
                                                      else int):
            problems.append(f"{name}={value!r} must be {'a number' if kind is float else 'an integer'}")
            return None
        if kind is float and not math.isfinite(value):
            problems.append(f"{name}={value!r} must be finite")
            return None
        return kind(value)

    n = number("max_new_tokens", max_new_tokens, int)
    if n is not None and not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
        problems.append(f"max_new_tokens={n} must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
    t = number("temperature", temperature, float)
    if t is not None and t < 0:
        problems.append(f"temperature={t} must be >= 0 (0 = greedy)")
    p = number("top_p", top_p, float)
    if p is not None and not 0 < p <= 1:
        problems.append(f"top_p={p} must be in (0, 1]")
    k = number("top_k", top_k, int)
    if k is not None and k < 0:
        problems.append(f"top_k={k} must be >= 0 (0 = off)")
    if seed is not None:
        s = number("seed", seed, int)
        if s is not None and not 0 <= s < 2**32:
            problems.append(f"seed={s} must be in [0, 2**32)")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        problems.append(f"stop={stop!r} must be a string or a list of strings")
        stops = ()
    if any(s == "" for s in stops):
        problems.append("stop strings must not be empty")
    if problems:
        raise InputError("; ".join(problems))
    return Sampling(max_new_tokens=n, temperature=t, top_p=p, top_k=k,
                    seed=None if seed is None else int(seed), stop=stops)


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token from next-token ``logits``: argmax at temperature 0, else top-k, top-p and a
    draw (HF's order: temperature, top-k, top-p). Masked tokens are ``-inf``."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < x.shape[-1]:
        kth = np.partition(x, -sampling.top_k)[-sampling.top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        # Keep the smallest set whose mass reaches top_p (always at least one token).
        keep = order[: int(np.searchsorted(cum, sampling.top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(p.shape[-1], p=p))


class StopStream:
    """Turn a stream of token bytes into text pieces, cutting at the first stop string.

    Bytes go through an incremental UTF-8 decoder, so a character split over two tokens is
    emitted whole. Text that could be the start of a stop string is held back until it is clear
    it is not one, so a streamed answer never shows part of a stop string and always equals the
    non-streamed one.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False

    def _holdback(self, text: str) -> int:
        # Longest suffix of text that is a proper prefix of some stop string.
        best = 0
        for s in self.stop:
            for i in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:i]):
                    best = i
                    break
        return best

    def feed(self, data: bytes) -> str:
        """Text that is safe to emit after ``data``; sets ``stopped`` at a stop string."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(data)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._holdback(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back text once generation has ended without a stop string."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text


class Runtime:
    """One loaded export. Subclasses set ``name``, ``path``, ``vocab_size``, ``n_ctx``,
    ``chat_template`` and implement the backend methods below."""

    name = "base"
    path: Path
    vocab_size: int
    n_ctx: int
    chat_template: ChatTemplate | None = None
    # The JSON Schema of the model's answers when its export carries one (``runtimes.load``);
    # run/serve use it by default. generate()/chat() never apply it unasked.
    json_schema: dict[str, Any] | None = None

    # backend methods

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special=True`` turns control-token text into those tokens
        (as HF tokenizers do). No BOS/EOS is added."""
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        """Text of ``ids``; special tokens are dropped unless ``special=True``."""
        raise NotImplementedError

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position: float32 ``[len(token_ids), vocab_size]``."""
        raise NotImplementedError

    def _token_stream(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[int]:
        raise NotImplementedError

    def _logit_steps(self, prompt_ids: list[int]) -> Generator[np.ndarray, int, None]:
        """Yield the next-token logits ``[vocab_size]`` after the prompt; ``send(token)`` appends
        that token and yields the logits after it."""
        raise NotImplementedError

    def _ll_tokenizer(self) -> Any:
        """This model's vocabulary as an ``llguidance.LLTokenizer`` (built once, then cached)."""
        raise NotImplementedError

    def _piece(self, token: int) -> bytes:
        raise NotImplementedError

    def _is_eog(self, token: int) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # shared

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_ids(self, token_ids: Any, what: str = "token_ids") -> list[int]:
        if isinstance(token_ids, np.ndarray):
            token_ids = token_ids.tolist()
        if not isinstance(token_ids, (list, tuple)) or not token_ids:
            raise InputError(f"{what} must be a non-empty list of token ids")
        ids = []
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise InputError(f"{what} holds {t!r}, not an integer token id")
            if not 0 <= int(t) < self.vocab_size:
                raise InputError(f"{what} holds token id {int(t)}, outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            ids.append(int(t))
        if len(ids) > self.n_ctx:
            raise InputError(f"{what} has {len(ids)} tokens, more than the context window "
                             f"n_ctx={self.n_ctx}; load the export with a larger n_ctx")
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt string of ``messages`` under the model's own chat template."""
        if self.chat_template is None:
            raise InputError(f"{self.path} has no chat template (GGUF key "
                             "tokenizer.chat_template or chat_template.jinja); use generate() "
                             "with a plain prompt")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                         **kwargs)

    def chat_ids(self, messages: Sequence[Mapping[str, Any]],
                 add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat, as ``apply_chat_template(tokenize=True)`` gives."""
        return self.tokenize(self.render_chat(messages, add_generation_prompt, **kwargs),
                             special=True)

    def grammar(self, json_schema: Any) -> Grammar:
        """The compiled grammar of ``json_schema`` (a mapping, a JSON string, a file path, or
        ``"json_object"`` for any one object) for this model's vocabulary; the last few are
        cached, a server compiles each request's schema once."""
        if isinstance(json_schema, Grammar):
            return json_schema
        schema = ANY_OBJECT if json_schema == "json_object" else load_schema(json_schema)
        key = json.dumps(schema, sort_keys=True)
        cache = self.__dict__.setdefault("_grammars", {})
        grammar = cache.pop(key, None)
        if grammar is None:
            grammar = Grammar(schema, self._ll_tokenizer())
        cache[key] = grammar
        while len(cache) > GRAMMAR_CACHE:
            cache.pop(next(iter(cache)))
        return grammar

    def complete(self, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 result: Completion | None = None, json_schema: Any = None,
                 cancel: Cancel | None = None) -> Iterator[str]:
        """Stream text pieces; fills ``result`` (finish reason, token counts) as it goes.

        ``json_schema`` (see :meth:`grammar`) constrains the text to one JSON value the schema
        accepts (``constrain.py``); the text ends when the value is complete. ``cancel`` ends it
        early, prompt included (finish reason "cancelled")."""
        sampling = check_sampling(max_new_tokens, temperature, top_p, top_k, seed, stop)
        grammar = None if json_schema is None else self.grammar(json_schema)
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty")
            ids = self.tokenize(prompt, special=True)
        else:
            ids = self.check_ids(prompt, "prompt")
        if len(ids) >= self.n_ctx:
            raise InputError(f"the prompt has {len(ids)} tokens; the context window is "
                             f"n_ctx={self.n_ctx}, which leaves no room to generate")
        result = result if result is not None else Completion()
        result.prompt_tokens = len(ids)
        return self._complete(ids, sampling, result, grammar, cancel)

    def _interruptible(self, cancel: Cancel):
        """A context in which ``cancel.set()`` also stops the backend's native call in
        progress, raising ``Interrupted`` out of it; the default stops between tokens only."""
        return contextlib.nullcontext()

    def _complete(self, ids: list[int], sampling: Sampling, result: Completion,
                  grammar: Grammar | None = None, cancel: Cancel | None = None
                  ) -> Iterator[str]:
        budget = min(sampling.max_new_tokens, self.n_ctx - len(ids))
        stream = StopStream(sampling.stop)
        result.finish_reason = "length"
        result.token_ids = []
        pieces = []
        matcher = None
        if grammar is None:
            tokens = self._token_stream(ids, sampling)
        else:
            matcher = grammar.matcher()
            tokens = self._constrained_stream(ids, sampling, matcher)
        try:
            with self._interruptible(cancel) if cancel is not None else \
                    contextlib.nullcontext():
                for n, token in enumerate(tokens):
                    if self._is_eog(token):
                        result.finish_reason = "stop"
                        break
                    result.completion_tokens = n + 1
                    result.token_ids.append(int(token))
                    text = stream.feed(self._piece(token))
                    if text:
                        pieces.append(text)
                        yield text
                    if stream.stopped:
                        result.finish_reason = "stop"
                        break
                    if cancel is not None and cancel.is_set():
                        result.finish_reason = "cancelled"
                        break
                    if n + 1 >= budget:
                        break
            if matcher is not None and matcher.is_stopped():
                result.finish_reason = "stop"  # the JSON value is complete
        except Interrupted:
            result.finish_reason = "cancelled"
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        tail = stream.flush()
        if tail:
            pieces.append(tail)
            yield tail
        result.text = "".join(pieces)

    def _constrained_stream(self, ids: list[int], sampling: Sampling,
                            matcher: Any) -> Iterator[int]:
        """Tokens the matcher accepts: the unconstrained pick when the grammar accepts it, else
        the pick among the mask's tokens (``constrain.py`` says why). Ends when the matcher is
        stopped."""
        rng = np.random.default_rng(sampling.seed)
        steps = self._logit_steps(ids)
        try:
            logits = next(steps)
            while True:
                token = sample(logits, sampling, rng)
                if matcher.try_consume_tokens([token]) != 1:
                    mask = allowed_mask(matcher, logits.shape[-1])
                    if not mask.any():
                        raise InputError(f"constrained decoding is stuck: {schema_error(matcher)}")
                    token = sample(np.where(mask, logits, -np.inf), sampling, rng)
                    if not matcher.consume_token(token):
                        raise InputError(f"constrained decoding failed: {schema_error(matcher)}")
                yield token
                if matcher.is_stopped():
                    return
                logits = steps.send(token)
        except StopIteration:  # the context window is full
            return
        finally:
            steps.close()

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stream: bool = False, json_schema: Any = None):
        """Continue ``prompt`` (text, tokenized with special tokens, or token ids).

        Returns the generated text, or with ``stream=True`` an iterator of text pieces whose
        concatenation is that text. Greedy by default; with ``temperature > 0`` the same
        ``seed`` gives the same text. ``json_schema``: see :meth:`complete`.
        """
        pieces = self.complete(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                               json_schema=json_schema)
        return pieces if stream else "".join(pieces)

    def chat(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop: str | Sequence[str] | None = None,
             stream: bool = False, json_schema: Any = None):
        """Apply the model's chat template (with the assistant prompt) and generate the reply."""
        prompt_ids = self.chat_ids(messages, add_generation_prompt=True)
        return self.generate(prompt_ids, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             stop=stop, stream=stream, json_schema=json_schema)

    def info(self) -> dict[str, Any]:
        """What a status page or a manifest shows about this runtime."""
        return {"runtime": self.name, "path": str(self.path), "vocab_size": self.vocab_size,
                "n_ctx": self.n_ctx, "chat_template": self.chat_template is not None,
                "json_schema": self.json_schema is not None}

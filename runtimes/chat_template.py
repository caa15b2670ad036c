"""Chat templates rendered exactly as Hugging Face transformers renders them, without transformers.

A model's chat template is a Jinja program shipped with its tokenizer (``tokenizer_config.json`` /
``chat_template.jinja``) or in the GGUF metadata (``tokenizer.chat_template``). A runtime must
turn ``messages`` into the same prompt string the model saw in training, or the export answers
differently from the trained model for reasons that have nothing to do with quantization.

This mirrors ``transformers.utils.chat_template_utils`` (transformers 5.x) by hand because the
device side may not import transformers:

- an ``ImmutableSandboxedEnvironment`` with ``trim_blocks=True, lstrip_blocks=True`` and the
  ``loopcontrols`` extension; a ``{% generation %}`` block renders its body (transformers uses it
  only to track assistant tokens for training masks);
- the globals ``raise_exception``, ``strftime_now``, a restricted ``dict`` and a ``namespace``
  that refuses underscore names, and a ``tojson`` filter that does not HTML-escape;
- messages whose keys hold ``None`` lose those keys (OpenAI clients send ``content: null``);
- the tokenizer's named special tokens (``bos_token``, ``eos_token``, ...) are template variables,
  as ``apply_chat_template`` passes ``special_tokens_map``; extra keyword arguments win over them.

``tests/test_chat_template.py`` checks the rendered strings and token ids against
``tokenizer.apply_chat_template`` on many conversations.

A template is a program from the export's files, so rendering has a budget (beyond
transformers): ``RENDER_SECONDS`` of wall time, checked on every line of template code that runs
(a loop that never ends, or nested ``range`` loops, is stopped), ``RENDER_CHARS`` of output, and
``*`` / ``**`` that would build a string, list or number beyond that size are refused before
they allocate. Each is an InputError naming the template.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from datetime import datetime
from typing import Any, Iterable, Mapping

import numpy as np

from edgeqlora.errors import InputError

# The named special tokens transformers puts into ``special_tokens_map`` (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
RENDER_SECONDS = 2.0  # a real template renders in milliseconds
RENDER_CHARS = 4 << 20  # far beyond any context window


class _OverBudget(Exception):
    """Raised inside a render that ran past its budget."""


def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # transformers' AssistantTracker without the tracking: same syntax, same output.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
                lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers overrides it, so do we.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # Only calling and fromkeys: no attribute access a template could use to break out.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Refuse dunder / private names, as transformers does, to keep CPython internals out.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a "
                    f"namespace, got {name!r}")

    class BudgetedEnvironment(ImmutableSandboxedEnvironment):
        # Products that would allocate past the output budget are refused before they run.
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            def size(x):
                return len(x) if isinstance(x, (str, bytes, list, tuple)) else None

            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if size(seq) is not None and isinstance(n, int) \
                            and size(seq) * max(n, 0) > RENDER_CHARS:
                        raise _OverBudget(f"a product of {size(seq)} x {n} items")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                    and abs(left) > 1 and right > 64:
                raise _OverBudget(f"{left} ** {right}")
            return super().call_binop(context, operator, left, right)

    env = BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types (transformers' ``_plain_template_data``)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        # np.bool_(False) would otherwise become a truthy placeholder string.
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate an OpenAI-style message list; InputError names the bad message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} "
                         f"objects, got {type(messages).__name__}"
                         + (" (empty)" if isinstance(messages, (list, tuple)) else ""))
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"messages[{i}] must be an object with 'role' and 'content', got "
                             f"{type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InputError(f"messages[{i}] has no 'role' (expected system, user or assistant)")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InputError(f"messages[{i}]['content'] must be a string, got "
                             f"{type(content).__name__}")
        # apply_chat_template drops None-valued keys: templates handle a missing key, not None.
        out.append({k: v for k, v in message.items() if v is not None})
    return out


class ChatTemplate:
    """A compiled chat template plus the special-token variables it may read."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None,
                 origin: str = "chat template"):
        import jinja2

        if not isinstance(source, str) or not source.strip():
            raise InputError(f"{origin} is empty; the export has no chat template to apply "
                             "(use generate() with a plain prompt instead of chat())")
        self.source = source
        self.origin = origin
        self.special_tokens = {k: str(v) for k, v in (special_tokens or {}).items()
                               if k in SPECIAL_TOKEN_NAMES and v is not None}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise InputError(f"{origin} is not a valid Jinja template: {exc.message} "
                             f"(line {exc.lineno})") from None

    def render(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, documents: list[dict] | None = None,
               **kwargs: Any) -> str:
        """The prompt string ``tokenizer.apply_chat_template(..., tokenize=False)`` returns."""
        import jinja2

        chat = _plain(check_messages(list(messages) if not isinstance(messages, list)
                                     else messages))
        variables = {**self.special_tokens, **_plain(kwargs)}
        pieces, size = [], 0
        try:
            with _time_budget(RENDER_SECONDS):
                # generate() yields what render() joins: the output is counted as it grows.
                for piece in self._template.generate(
                        messages=chat, tools=_plain(tools), documents=_plain(documents),
                        add_generation_prompt=add_generation_prompt, **variables):
                    size += len(piece)
                    if size > RENDER_CHARS:
                        raise _OverBudget(f"more than {RENDER_CHARS} characters of output")
                    pieces.append(piece)
        except _OverBudget as exc:
            raise InputError(f"{self.origin} ran past its rendering budget ({exc}; the limits "
                             f"are {RENDER_SECONDS:g} s and {RENDER_CHARS} characters): the "
                             "template loops without end or builds huge strings, so it is "
                             "not used") from None
        except jinja2.TemplateError as exc:
            # raise_exception() in a template is how models reject a conversation shape
            # (e.g. roles not alternating); it is the user's input that is wrong.
            raise InputError(f"{self.origin} rejected the conversation: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError,
                ZeroDivisionError, OverflowError, RecursionError) as exc:
            # A template that fails at run time on this conversation (a bad filter argument,
            # 1/0): one line naming it, never a traceback.
            raise InputError(f"{self.origin} failed on this conversation "
                             f"({type(exc).__name__}: {exc})") from None
        return "".join(pieces)


@contextlib.contextmanager
def _time_budget(seconds: float):
    """Stop template code that runs past ``seconds``: a trace function on this thread checks
    the clock on every line executed in compiled template code (file name ``<template>``) and
    nowhere else, so a normal render costs a few hundred checks. Hand-written because Jinja
    has no execution limit; the previous trace function (a debugger, coverage) is restored."""
    deadline = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if event == "line" and time.monotonic() > deadline:
            raise _OverBudget(f"more than {seconds:g} s")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)

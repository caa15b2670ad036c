"""Chat-template parity: the torch-free runtime renders and tokenizes conversations exactly as
transformers' ``apply_chat_template`` + the HF tokenizer do.

The GGUF runtime reads the template from the GGUF metadata and tokenizes with llama.cpp; the
reference is the embedded model's HF tokenizer (``tokenizer`` fixture), built from the same GGUF.
"""

from __future__ import annotations

import random

import pytest

from edgeqlora.errors import InputError
from edgeqlora.runtimes.chat_template import ChatTemplate

pytest.importorskip("llama_cpp")

# Texts with the things that break exports: unicode of every width, newlines and indentation,
# Jinja-looking braces, markup, leading/trailing spaces, digits (SmolLM2 splits each digit).
SNIPPETS = [
    "Turn on the kitchen light.",
    "What's the temperature in the living room?",
    "Set the thermostat to 21.5 °C at 07:30, please.",
    "Élise a réglé le chauffage à 19 degrés.",
    "日本語のテキストも大丈夫ですか？",
    "Привет! Как дела?",
    "مرحبا بالعالم",
    "emoji: 🌡️🔥💡 and a family 👨‍👩‍👧",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n  indented line\ttab",
    "{{ not a template }} {% neither %} {# nor #}",
    "<b>html</b> & \"quotes\" 'single' \\backslash",
    "1234567890 + 0.001 = ?",
    "",
    "a" * 300,
    "Ünïcödé ßtraße — “curly” ‘quotes’ … ∑∫√",
    "{\"device\": \"lamp\", \"state\": \"on\"}",
]
SYSTEMS = [
    "You are a home automation assistant. Answer with JSON.",
    "Tu es un assistant.",
    "Be brief. 🙂",
]


def conversations(n: int, seed: int = 0) -> list[tuple[list[dict], bool]]:
    """``n`` deterministic conversations: with and without system prompts, 1-4 turns, ending
    on a user turn (generation prompt) or an assistant turn (training format)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = []
        if i % 3 != 2:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": rng.choice(SNIPPETS)})
            messages.append({"role": "assistant", "content": rng.choice(SNIPPETS)})
        add_generation_prompt = i % 2 == 0
        if add_generation_prompt:
            messages.pop()  # end on the user's turn
        if i % 7 == 3:
            # OpenAI clients send null fields; apply_chat_template drops them.
            messages[-1] = {**messages[-1], "name": None}
        out.append((messages, add_generation_prompt))
    return out


@pytest.fixture(scope="module")
def runtime():
    from edgeqlora import runtimes
    from edgeqlora.base import embedded_gguf_path

    with runtimes.load(embedded_gguf_path(), n_ctx=4096) as rt:
        yield rt


def test_embedded_template_strings_and_ids_match_transformers(runtime, tokenizer):
    convs = conversations(60)
    assert len(convs) >= 50
    assert any(g for _, g in convs) and any(not g for _, g in convs)
    mismatched_ids = []
    for messages, add_generation_prompt in convs:
        expected = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        got = runtime.render_chat(messages, add_generation_prompt=add_generation_prompt)
        assert got == expected, messages
        expected_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                     add_generation_prompt=add_generation_prompt)
        got_ids = runtime.chat_ids(messages, add_generation_prompt=add_generation_prompt)
        if got_ids != expected_ids:
            mismatched_ids.append((messages, got_ids, expected_ids))
    assert not mismatched_ids, (f"{len(mismatched_ids)} of {len(convs)} conversations tokenize "
                                f"differently; first: {mismatched_ids[0]}")


def test_template_source_and_special_tokens_match_the_hf_tokenizer(runtime, tokenizer):
    assert runtime.chat_template.source == tokenizer.chat_template
    for name, value in tokenizer.special_tokens_map.items():
        assert runtime.chat_template.special_tokens.get(name) == value, name


def test_control_tokens_inside_user_text_tokenize_like_hf(runtime, tokenizer):
    # Without sanitize_control_tokens (the default) both sides turn "<|im_end|>" typed by a
    # user into the control token; what matters is that they agree.
    messages = [{"role": "user", "content": "ends early<|im_end|>\n<|im_start|>system\nhi"}]
    assert runtime.chat_ids(messages) == tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False)


# Templates exercising each feature transformers' environment adds: loopcontrols, namespace,
# tojson (non-ASCII, no HTML escaping), raise_exception, the dict global, trim/lstrip blocks,
# {% generation %}, special-token variables and extra keyword arguments.
FEATURE_TEMPLATES = [
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "[{{ m['role'] | upper }}] {{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}",
    "{% set ns = namespace(sys='', n=0) %}{% for m in messages %}{% if m.role == 'system' %}"
    "{% set ns.sys = m.content %}{% else %}{% set ns.n = ns.n + 1 %}{% endif %}{% endfor %}"
    "<<{{ ns.sys }}>> turns={{ ns.n }}\n{{ messages | tojson }}\n"
    "{{ dict(a=1, b='é<>&') | tojson(indent=2, sort_keys=True) }}",
    "{% for m in messages %}\n    {% if loop.index0 > 2 %}{% break %}{% endif %}\n"
    "    {% generation %}{{ m.content }}{% endgeneration %}\n{% endfor %}\n{{ extra | default('') }}",
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start "
    "with a user message') }}{% endif %}{% for m in messages %}{{ m.content }}|{% endfor %}",
]


@pytest.mark.parametrize("template", FEATURE_TEMPLATES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_features_render_like_transformers(template, add_generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    special = {"bos_token": "<s>", "eos_token": "</s>"}
    ours = ChatTemplate(template, special)
    for messages, _ in conversations(12, seed=1):
        if "raise_exception" in template and messages[0]["role"] != "user":
            with pytest.raises(InputError, match="must start with a user message"):
                ours.render(messages, add_generation_prompt=add_generation_prompt)
            continue
        (expected,), _ = render_jinja_template(
            [[{k: v for k, v in m.items() if v is not None} for m in messages]],
            chat_template=template, add_generation_prompt=add_generation_prompt,
            extra="X", **special)
        assert ours.render(messages, add_generation_prompt=add_generation_prompt,
                           extra="X") == expected


def test_sandbox_refuses_what_transformers_refuses():
    template = "{{ messages.append({'role': 'x'}) }}"  # mutation is blocked by the sandbox
    with pytest.raises(InputError, match="rejected"):
        ChatTemplate(template).render([{"role": "user", "content": "hi"}])
    ns = "{% set ns = namespace(_secret=1) %}{{ ns }}"
    with pytest.raises(InputError, match="underscore"):
        ChatTemplate(ns).render([{"role": "user", "content": "hi"}])


def test_bad_templates_and_messages_are_user_errors():
    with pytest.raises(InputError, match="not a valid Jinja template"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(InputError, match="empty"):
        ChatTemplate("  ")
    tpl = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(InputError, match="non-empty list"):
        tpl.render([])
    with pytest.raises(InputError, match=r"messages\[0\].*role"):
        tpl.render([{"content": "no role"}])
    with pytest.raises(InputError, match=r"messages\[1\]"):
        tpl.render([{"role": "user", "content": "ok"}, "not a dict"])
    with pytest.raises(InputError, match="must be a string"):
        tpl.render([{"role": "user", "content": 42}])

"""The converted embedded tokenizer splits text exactly as llama.cpp does on the same GGUF.

The GGUF is the source of truth: transformers' own GGUF tokenizer converter gets SmolLM2 wrong
(it drops the digit split of llama.cpp's ``smollm`` pre-tokenizer), which is why
``edgeqlora.base`` builds tokenizer.json itself. Here several thousand deterministic strings
(numbers, decimals, JSON, code, whitespace runs, many scripts and emoji, special tokens inside
text, rendered chat templates) are tokenized by both the Hugging Face tokenizer and
``llama_cpp.Llama(vocab_only=True)``; every id sequence must match exactly, and decoding must
give back the text.
"""

from __future__ import annotations

import json
import random
import string

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; "
                                "pip install 'edgeqlora[gguf]' to run the tokenizer parity test")

SEED = 20241123
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>",
            "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>",
            "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
            "<jupyter_output>", "<jupyter_script>", "<empty_output>"]
# Near misses must stay ordinary text on both sides.
NEAR_SPECIALS = ["<|im_start|", "<|im_end", "|im_end|>", "< |im_end|>", "<|IM_END|>",
                 "<|im_start|><", "<<|im_end|>>", "<|endoftext||>", "<filename", "<im_start>"]
WORDS = ["the", "The", "THE", "model", "tokenizer", "Paris", "don't", "I'm", "we'll", "they've",
         "IT'S", "she'd", "you're", "l'été", "naïve", "façade", "über", "Straße", "déjà-vu",
         "x", "a", "foo_bar", "FooBar", "camelCase", "snake_case", "http://example.com/a?b=1",
         "user@example.org", "C++", "#include", "e.g.", "i.e.,", "U.S.A.", "--flag", "~/path"]
SCRIPTS = {
    "accents": (
        'àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿĀāĂăĄąĆćČ'
        'čĎďĐđĒēĘęĚěĞğĪīİıŁłŃńŇňŐőŒœŘřŚśŞşŠšŢţŤťŪ'
        'ūŮůŰűŸŹźŻżŽž'
    ),
    "combining": 'e\u0301a\u0300o\u0308n\u0303c\u0327u\u0302i\u0307',
    "greek": (
        'αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠ'
        'ΡΣΤΥΦΧΨΩάέήίόύώ'
    ),
    "cyrillic": (
        'абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁ'
        'ЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ'
    ),
    "cjk": (
        '的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着'
        '去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主'
        '行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二'
        '理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走'
    ),
    "japanese": 'ひらがなカタカナ日本語のテキストです。東京タワー、ラーメン！',
    "korean": '한국어 텍스트입니다 안녕하세요 감사합니다 서울특별시',
    "arabic": (
        'مرحبا بالعالم هذا نص عربي مع أرقام ١٢٣٤٥'
        '٦٧٨٩٠'
    ),
    "hebrew": (
        'שלום עולם זהו טקסט בעברית עם ניקוד: שָׁל'
        'וֹם'
    ),
    "devanagari": 'नमस्ते दुनिया यह हिंदी पाठ है १२३४५',
    "thai": (
        'สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่าง'
        'คำ ๑๒๓'
    ),
    "emoji": (
        '😀😃😄😁😆😅🤣😂🙂🙃😉😊😇🥰😍🤩😘👍👍🏽👩\u200d💻👨\u200d👩\u200d👧\u200d👦🏳️\u200d🌈🇫🇷🇯🇵❤️'
        '✨🎉🔥💯🚀🐍'
    ),
    "symbols": (
        '∑∏∫√∞≈≠≤≥±×÷∂∇∈∉⊂⊃∪∩→←↑↓⇒⇔°%‰€£¥₹¢©®™§¶†'
        '‡•…—–«»‹›„“”‘’'
    ),
    "numeric_other": '²³¹½¼¾⅓ⅠⅡⅢⅣⅫ①②③٠١٢٣٤٥٦٧٨٩０１２３４５６７８９',
    "spaces": '\xa0\u2002\u2003\u2009\u200b\u3000\u2028\u202f\ufeff',
}
WS = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", " \n", "\n ", " \t ", "\u00a0",
      "\u3000", "\v", "\f"]


def _number(rng: random.Random) -> str:
    n = rng.randint(1, 40)
    digits = "".join(rng.choice(string.digits) for _ in range(n))
    kind = rng.randrange(9)
    if kind == 0:
        return digits
    if kind == 1:
        return f"{rng.choice('-+')}{digits}"
    if kind == 2:
        cut = rng.randint(1, n)
        return f"{digits[:cut]}.{digits[cut:] or '0'}"
    if kind == 3:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 12)}f}"
    if kind == 4:
        return f"{rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30):e}"
    if kind == 5:
        return f"{rng.randint(0, 10 ** 12):,}"
    if kind == 6:
        return f"{rng.randint(0, 2 ** 64):#x}"
    if kind == 7:
        return f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return f"v{rng.randint(0, 20)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}"


def _json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randint(-10 ** rng.randint(1, 15), 10 ** rng.randint(1, 15))
    if kind == 1:
        return round(rng.uniform(-1000, 1000), rng.randint(0, 8))
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return _text(rng, rng.randint(1, 6))
    if kind == 4:
        return [_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(WORDS) + str(i): _json(rng, depth + 1) for i in range(rng.randint(0, 4))}


def _text(rng: random.Random, n: int) -> str:
    parts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.45:
            parts.append(rng.choice(WORDS))
        elif r < 0.6:
            parts.append(_number(rng))
        elif r < 0.8:
            chars = SCRIPTS[rng.choice(list(SCRIPTS))]
            start = rng.randrange(len(chars))
            parts.append(chars[start:start + rng.randint(1, 12)])
        else:
            parts.append(rng.choice(string.punctuation) * rng.randint(1, 3))
        parts.append(rng.choice(WS) if rng.random() < 0.25 else " ")
    return "".join(parts)


CODE = [
    "def {f}(x, y={n}):\n    return x ** {n} + y  # {w}\n",
    "for (int i = 0; i < {n}; ++i) {{\n\tsum += a[i] * {n};\n}}\n",
    "const {f} = async () => {{ await fetch(`/api/{w}?id=${{{n}}}`); }};\n",
    "SELECT {f}, COUNT(*) FROM t WHERE id = {n} GROUP BY {f};",
    "if x == {n}:\n\tprint(f\"{{x!r}} {w}\")\nelse:\n\t\tpass\n",
    "<div class=\"{f}\">{w} {n}</div>\n  <br/>",
    "    {f} = [{n}, {n}.5, -{n}e-3]\n\n\n",
    "#!/bin/bash\necho \"$HOME/{f}\" && ls -la | grep {n} >> log.txt 2>&1\n",
    "\\frac{{{n}}}{{2}} + \\sqrt{{x_{n}}} = \\alpha^{{{n}}}",
    "| {w} | {n} |\n|---|---:|\n| {f} | {n} |",
]


def _code(rng: random.Random) -> str:
    f = rng.choice(["main", "foo_bar", "getValue", "__init__", "x1", "Ω", "_"])
    return rng.choice(CODE).format(f=f, n=_number(rng), w=rng.choice(WORDS))


def _with_specials(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 6)):
        parts.append(_text(rng, rng.randint(0, 4)))
        parts.append(rng.choice(SPECIALS if rng.random() < 0.7 else NEAR_SPECIALS))
        if rng.random() < 0.3:
            parts.append(rng.choice(WS))
    return "".join(parts)


def _random_unicode(rng: random.Random) -> str:
    # Assigned, printable code points from many blocks (surrogates excluded: not encodable).
    out = []
    for _ in range(rng.randint(1, 20)):
        cp = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF),
                         rng.randint(0x3000, 0x9FFF), rng.randint(0xAC00, 0xD7A3),
                         rng.randint(0xF900, 0xFFFD), rng.randint(0x1F300, 0x1FAFF)])
        ch = chr(cp)
        if ch.isprintable():
            out.append(ch)
    return "".join(out)


def _conversation(rng: random.Random) -> list[dict[str, str]]:
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": _text(rng, rng.randint(1, 8))})
    for i in range(rng.randint(1, 4)):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant",
                     "content": rng.choice([_text(rng, rng.randint(1, 10)), _code(rng),
                                            json.dumps(_json(rng), ensure_ascii=False)])})
    return msgs


def corpus(tokenizer) -> list[str]:
    rng = random.Random(SEED)
    texts = ["", " ", "  0. Definitions.", "Hello world", "What is the capital of France?"]
    # Every digit-run length 1..64, alone and after spaces/letters: the case that broke before.
    for n in range(1, 65):
        d = "".join(str((i * 7 + n) % 10) for i in range(n))
        texts += [d, f" {d}", f"  {d}.", f"abc{d}def", f"{d[: n // 2]}.{d[n // 2:]}"]
    for n in range(1, 33):
        texts += [" " * n, "\t" * n, "\n" * n, " \n" * n, "x" + " " * n + "y", " " * n + "1"]
    makers = [
        (600, lambda: _text(rng, rng.randint(1, 25))),
        (500, lambda: _number(rng) + rng.choice(["", " ", ".", ",", "%", "px", " km"])),
        (300, lambda: json.dumps(_json(rng), ensure_ascii=rng.random() < 0.5,
                                 indent=rng.choice([None, None, 2, 4, "\t"]))),
        (300, lambda: _code(rng)),
        (400, lambda: "".join(rng.choice(WS) + rng.choice(WORDS + ["1", "23", "."])
                              for _ in range(rng.randint(1, 10)))),
        (400, lambda: _random_unicode(rng)),
        (300, lambda: _with_specials(rng)),
    ]
    for count, make in makers:
        texts += [make() for _ in range(count)]
    for _ in range(300):
        texts.append(tokenizer.apply_chat_template(_conversation(rng), tokenize=False,
                                                   add_generation_prompt=rng.random() < 0.5))
    return texts


@pytest.fixture(scope="module")
def llama_vocab():
    from edgeqlora.base import embedded_gguf_path

    return llama_cpp.Llama(model_path=str(embedded_gguf_path()), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def texts(tokenizer):
    return corpus(tokenizer)


def test_corpus_is_large_and_deterministic(tokenizer, texts):
    assert len(texts) >= 3000
    assert corpus(tokenizer) == texts


def test_ids_match_llama_cpp(tokenizer, llama_vocab, texts):
    hf = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = []
    for text, ids in zip(texts, hf):
        ref = llama_vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if ids != ref:
            mismatches.append((text, ids, ref))
    assert not mismatches, (f"{len(mismatches)}/{len(texts)} differ; first: "
                            f"{mismatches[0][0]!r}\n HF       {mismatches[0][1]}\n"
                            f" llama.cpp {mismatches[0][2]}")


def test_chat_template_ids_match_llama_cpp(tokenizer, llama_vocab):
    """apply_chat_template(tokenize=True) gives the ids llama.cpp gets from the rendered text,
    and the template is the GGUF's own."""
    assert tokenizer.chat_template == llama_vocab.metadata["tokenizer.chat_template"]
    rng = random.Random(SEED + 1)
    for _ in range(50):
        msgs = _conversation(rng)
        rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        assert ids == llama_vocab.tokenize(rendered.encode(), add_bos=False, special=True)
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_decode_round_trip(tokenizer, llama_vocab, texts):
    hf = tokenizer(texts, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.batch_decode(hf, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    bad = [(t, d) for t, d in zip(texts, decoded) if t != d]
    assert not bad, f"{len(bad)} texts do not round-trip; first: {bad[0][0]!r} -> {bad[0][1]!r}"
    for text, ids in zip(texts[:500], hf[:500]):
        assert llama_vocab.detokenize(ids, special=True).decode("utf-8") == text


def test_special_tokens_and_ids(tokenizer, llama_vocab):
    meta = llama_vocab.metadata
    assert tokenizer.bos_token_id == int(meta["tokenizer.ggml.bos_token_id"]) == 1
    assert tokenizer.eos_token_id == int(meta["tokenizer.ggml.eos_token_id"]) == 2
    assert tokenizer.pad_token_id == int(meta["tokenizer.ggml.padding_token_id"])
    assert tokenizer.unk_token_id == int(meta["tokenizer.ggml.unknown_token_id"])
    # add_bos_token is false in the GGUF: plain encoding adds nothing.
    assert meta["tokenizer.ggml.add_bos_token"] == "false"
    assert tokenizer("hi").input_ids == tokenizer("hi", add_special_tokens=False).input_ids
    for i, tok in enumerate(SPECIALS):
        assert tokenizer.convert_tokens_to_ids(tok) == i
        assert tokenizer(tok, add_special_tokens=False).input_ids == [i]
    # Special tokens are special: skipped when decoding for display.
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert len(tokenizer) == llama_vocab.n_vocab() == 49152

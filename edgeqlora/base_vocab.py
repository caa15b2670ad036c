"""The tokenizer of a GPT-2-style BPE GGUF rebuilt as a Hugging Face tokenizer that splits text as
llama.cpp does on that file (the embedded SmolLM2 and ``base=FILE.gguf``; ``base`` converts the
weights, ``base_gguf`` checks the result against llama.cpp).

Hand-written: llama.cpp's converter goes the other way (checkpoint -> GGUF) and transformers'
GGUF tokenizer loader does not reproduce these pre-tokenizers (SmolLM2's digit split is lost).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

# GGUF token types (gguf.TokenType) the added tokens come from.
_CONTROL = 3
_USER_DEFINED = 4

# The split regexes of the pre-tokenizers the converter rebuilds besides ``smollm``: the
# Hugging Face originals (Qwen2/Qwen3's and Llama 3's tokenizer.json), of which llama.cpp runs
# hand-adapted equivalents for ``qwen2`` and ``llama-bpe`` (src/llama-vocab.cpp quotes them).
_SPLIT_REGEX = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
GGUF_PRE_TOKENIZERS = ("smollm", *_SPLIT_REGEX)


def _pre_tokenizer(pre: str):
    """The ``tokenizers`` pre-tokenizer that splits text as llama.cpp's ``pre`` does. ``smollm``:
    llama.cpp runs ``\\p{N}`` (each digit alone), then the GPT-2 regex, which is
    ``Digits(individual_digits=True)`` then ``ByteLevel(use_regex=True)``; the others: their
    Split regex (isolated), then bytes to unicode with no regex of its own, as their
    tokenizer.json files say."""
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def write_tokenizer_from_gguf(gguf_path: Path, out: Path, f: dict[str, Any]
                              ) -> dict[str, Any]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja from the GGUF vocab.

    Built with the ``tokenizers`` library from the GGUF's tokens and merges so that it splits
    text exactly as llama.cpp does for the file's pre-tokenizer (``GGUF_PRE_TOKENIZERS``:
    ``_pre_tokenizer``); a BOS the file asks for is added by the post-processor, as llama.cpp
    adds it. ``base_gguf`` checks the result against llama.cpp on the same file.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    model_kind, pre = f.get("tokenizer.ggml.model"), f.get("tokenizer.ggml.pre")
    if model_kind != "gpt2" or pre not in GGUF_PRE_TOKENIZERS:
        # Each pre-tokenizer needs its own regex mapping, checked against llama.cpp.
        raise InputError(f"{gguf_path} has tokenizer model {model_kind!r} / pre-tokenizer "
                         f"{pre!r}; the converter handles 'gpt2' with "
                         + ", ".join(repr(p) for p in GGUF_PRE_TOKENIZERS))
    tokens = list(f["tokenizer.ggml.tokens"])
    types = list(f["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise InputError(f"{gguf_path} has duplicate tokens in tokenizer.ggml.tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=False))
    tok.normalizer = None
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    # llama.cpp matches CONTROL and USER_DEFINED tokens in text before BPE (with special=True);
    # added tokens do the same here. CONTROL ones are special (skipped when decoding).
    added = [AddedToken(tokens[i], special=(types[i] == _CONTROL), normalized=False,
                        lstrip=False, rstrip=False, single_word=False)
             for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)]
    tok.add_tokens(added)

    def token_of(key: str) -> str | None:
        idx = f.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None else None

    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False))
    if add_eos or (add_bos and token_of("bos") is None):
        raise InputError(f"{gguf_path} asks for " + ("an EOS after every text" if add_eos else
                         "a BOS but names no BOS token") + "; the converter does not handle "
                         "that")
    if add_bos:  # as Llama 3's tokenizer.json: the bytes, then the BOS in front
        bos, bos_id = token_of("bos"), int(f["tokenizer.ggml.bos_token_id"])
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, bos_id)])])
    chat_template = f.get("tokenizer.chat_template")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token_of("bos"), eos_token=token_of("eos"), unk_token=token_of("unknown"),
        pad_token=token_of("padding"), model_max_length=8192, clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(out)
    # transformers 5 records the generic "TokenizersBackend" class, which loads tokenizer.json
    # as written. Do not change it to "GPT2Tokenizer": that class rebuilds a plain GPT-2
    # pre-tokenizer and silently loses the digit split. Reload to prove the file round-trips.
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out).backend_tokenizer
    if json.loads(reloaded.to_str())["pre_tokenizer"] != json.loads(tok.to_str())["pre_tokenizer"]:
        raise InputError(f"the tokenizer written to {out} does not reload with the {pre} "
                         "pre-tokenizer (transformers changed it); cannot convert")
    return {
        "source": "gguf",
        "pre_tokenizer": pre,
        "vocab_size": len(tokens),
        "num_merges": len(merges),
        "special_tokens": [t.content for t in added if t.special],
        "bos_token": token_of("bos"), "eos_token": token_of("eos"),
        "pad_token": token_of("padding"), "unk_token": token_of("unknown"),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "chat_template": bool(chat_template),
    }

"""The second embedded base, Gemma 3 270M (``embedded:gemma3-270m``), installed on request only.

Fast tests need nothing installed: the missing-package error and the names of the embedded
models. The slow ones convert the real GGUF once (about 50 s on two cores, cached in
``$EDGEQLORA_HOME``) and check it against llama.cpp on the original Q4_K_M file: tokenizer ids on
the corpus of ``test_tokenizer_parity`` plus Gemma's own special tokens, logits, the config and
the weights; they skip, naming the install command, when the Gemma packages are absent.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest

from edgeqlora import base, base_gemma
from edgeqlora.errors import InputError

INSTALL = "make gemma3 (or pip install 'edgeqlora[gemma3]')"
GEMMA_SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<start_of_turn>",
                  "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<unused0>", "<unused17>",
                  "[multimodal]", "<table>", "</td>", "<h1>", "<code>", "<0x41>"]
NEAR_SPECIALS = ["<start_of_turn", "end_of_turn>", "<END_OF_TURN>", "< bos>", "<unused>",
                 "<<eos>>", "<start_of_turn><", "<tablex>"]


def test_missing_package_is_one_line_naming_the_install(monkeypatch):
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, base_gemma.GEMMA3_PACKAGE, None)
    with pytest.raises(InputError) as info:
        base.resolve_base("embedded:gemma3-270m")
    msg = str(info.value)
    assert "\n" not in msg
    assert "make gemma3" in msg and "pip install 'edgeqlora[gemma3]'" in msg
    assert "Gemma's terms" in msg


def test_unknown_embedded_name_lists_the_valid_ones():
    with pytest.raises(InputError, match=r"unknown embedded model 'llama'.*embedded:smollm2.*"
                                         r"embedded:gemma3-270m"):
        base.resolve_base("embedded:llama")


def test_embedded_names_smollm2(monkeypatch, tmp_path):
    monkeypatch.setattr(base, "ensure_embedded", lambda: tmp_path)
    assert base.resolve_base("embedded") == tmp_path
    assert base.resolve_base("embedded:smollm2") == tmp_path


@pytest.fixture(scope="module")
def gemma_dir():
    if importlib.util.find_spec(base_gemma.GEMMA3_PACKAGE) is None:
        pytest.skip(f"Gemma 3 270M is installed on request only: {INSTALL}")
    return base.resolve_base("embedded:gemma3-270m")


@pytest.fixture(scope="module")
def gguf_path(gemma_dir):
    return base_gemma.gemma3_gguf_path()


@pytest.fixture(scope="module")
def gemma_tok(gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_dir)


@pytest.fixture(scope="module")
def gemma_vocab(gguf_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; "
                                    "pip install 'edgeqlora[gguf]'")
    return llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)


def gemma_corpus(tok) -> list[str]:
    """The SmolLM2 parity corpus (rendered through Gemma's chat template) plus Gemma's own
    special tokens, HTML and whitespace-run tokens, inside text and as near misses."""
    import random

    from test_tokenizer_parity import SEED, WS, _text, corpus

    rng = random.Random(SEED + 7)
    texts = corpus(tok)
    for n in range(1, 70):  # runs longer than the longest whitespace tokens (31 spaces)
        texts += [" " * n, "\n" * n, "\t" * n, f"a{' ' * n}b", f"<td>{' ' * n}</td>"]
    for _ in range(400):
        parts = []
        for _ in range(rng.randint(1, 5)):
            parts.append(_text(rng, rng.randint(0, 4)))
            parts.append(rng.choice(GEMMA_SPECIALS if rng.random() < 0.7 else NEAR_SPECIALS))
            if rng.random() < 0.3:
                parts.append(rng.choice(WS))
        texts.append("".join(parts))
    return texts


@pytest.mark.slow
def test_tokenizer_matches_llama_cpp(gemma_tok, gemma_vocab):
    """0 mismatches (measured: 0 of 4,362 strings; transformers' own GGUF tokenizer got 3 of
    the 3,621 strings of the SmolLM2 corpus wrong: the runs of 32 spaces)."""
    texts = gemma_corpus(gemma_tok)
    assert len(texts) >= 3000
    hf = gemma_tok(texts, add_special_tokens=False)["input_ids"]
    bad = [(t, ids, ref) for t, ids in zip(texts, hf)
           if ids != (ref := gemma_vocab.tokenize(t.encode("utf-8"), add_bos=False,
                                                   special=True))]
    assert not bad, (f"{len(bad)}/{len(texts)} differ; first: {bad[0][0]!r}\n HF       "
                     f"{bad[0][1]}\n llama.cpp {bad[0][2]}")
    # add_bos_token is true in the GGUF: both sides prepend <bos> (id 2) by default.
    with_bos = gemma_tok(texts[:300])["input_ids"]
    assert all(ids == gemma_vocab.tokenize(t.encode("utf-8"), add_bos=True, special=True)
               for t, ids in zip(texts[:300], with_bos))
    decoded = gemma_tok.batch_decode(hf, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    assert [t for t, d in zip(texts, decoded) if t != d] == []
    for text, ids in zip(texts[:300], hf[:300]):
        assert gemma_vocab.detokenize(ids, special=True).decode("utf-8") == text


@pytest.mark.slow
def test_special_tokens_and_chat_template(gemma_dir, gemma_tok, gemma_vocab):
    meta = gemma_vocab.metadata
    assert (gemma_tok.bos_token_id, gemma_tok.eos_token_id, gemma_tok.pad_token_id) == (
        int(meta["tokenizer.ggml.bos_token_id"]), int(meta["tokenizer.ggml.eos_token_id"]),
        int(meta["tokenizer.ggml.padding_token_id"])) == (2, 1, 0)
    assert len(gemma_tok) == gemma_vocab.n_vocab() == 262_144
    assert gemma_tok.convert_tokens_to_ids("<end_of_turn>") == 106
    gen = json.loads((gemma_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106]
    assert gemma_tok.chat_template == base_gemma.CHAT_TEMPLATE.read_text(encoding="utf-8")
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi  there "},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Capital of France?"}]
    rendered = gemma_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # Gemma 3's format: the system prompt opens the first user turn; contents are trimmed.
    assert rendered == ("<bos><start_of_turn>user\nBe brief.\n\nHi  there<end_of_turn>\n"
                        "<start_of_turn>model\nHello.<end_of_turn>\n"
                        "<start_of_turn>user\nCapital of France?<end_of_turn>\n"
                        "<start_of_turn>model\n")
    ids = gemma_tok.apply_chat_template(msgs, add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert ids == gemma_vocab.tokenize(rendered.encode(), add_bos=False, special=True)
    assert ids.count(2) == 1  # one <bos>: the template's, none added by encoding


@pytest.mark.slow
def test_config_matches_what_llama_cpp_reads(gemma_dir, gemma_vocab):
    meta = gemma_vocab.metadata
    cfg = json.loads((gemma_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert "quantization_config" not in cfg
    for key, gguf_key in [("hidden_size", "embedding_length"), ("num_hidden_layers", "block_count"),
                          ("intermediate_size", "feed_forward_length"),
                          ("num_attention_heads", "attention.head_count"),
                          ("num_key_value_heads", "attention.head_count_kv"),
                          ("head_dim", "attention.key_length"),
                          ("sliding_window", "attention.sliding_window"),
                          ("max_position_embeddings", "context_length")]:
        assert cfg[key] == int(meta[f"gemma3.{gguf_key}"]), key
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == float(
        meta["gemma3.rope.freq_base"]) == 1e6
    # Not in the GGUF; llama.cpp's fixed values for gemma3 (base_gemma._LLAMA_CPP_DEFAULTS).
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert cfg["query_pre_attn_scalar"] == 256 and cfg["final_logit_softcapping"] is None
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    manifest = json.loads((gemma_dir / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == base_gemma._package().EXPECTED_SHA256
    assert manifest["num_parameters"] == 268_098_176
    assert base_gemma.verify_gemma3_cache() == []


@pytest.mark.slow
def test_weights_are_exact_dequantized_gguf(gemma_dir, gguf_path):
    """Saved fp32 tensors equal gguf-py's dequantization bit for bit (the first tensor of each
    quant type: Q8_0, Q5_0, Q4_K, Q6_K, F32 norms), and the norms are the GGUF's minus 1."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    reader = gguf.GGUFReader(str(gguf_path))
    first = {}
    for t in reader.tensors:
        first.setdefault(t.tensor_type.name, t)
    assert set(first) == {"Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32"}
    with safe_open(str(gemma_dir / "model.safetensors"), "np") as f:
        for t in first.values():
            ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if t.name.endswith("norm.weight"):
                ref = ref - np.float32(1.0)
            got = f.get_tensor(base_gemma._hf_name(t.name))
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, ref.reshape(got.shape), err_msg=t.name)


@pytest.mark.slow
def test_logits_match_llama_cpp(gemma_dir, gemma_tok, gguf_path):
    """The fp32 checkpoint computes what llama.cpp computes from the Q4_K_M GGUF.

    The HF weights are exactly the dequantized GGUF weights; llama.cpp multiplies them with
    activations quantized to 8 bits (Q8_0/Q8_K) in its quantized dot products. Measured on
    this 51-token text: mean KL 0.009 nats (max 0.10 at one position), top-1 agreement 96%.
    A swapped tensor or a wrong norm offset gives KL of several nats. Limits: about 5x / 10
    points of margin.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    text = ("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
            "12 + 345 = 357. Water boils at 100 degrees Celsius.")
    ids = gemma_tok(text).input_ids
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, logits_all=True, n_threads=2,
                          verbose=False)
    try:
        llm.eval(ids)
        ref = np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    p = torch.log_softmax(torch.from_numpy(ref), -1)
    q = torch.log_softmax(torch.from_numpy(got), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    assert kl < 0.05 and top1 >= 0.85, f"KL {kl:.4f}, top-1 agreement {top1:.3f}"


@pytest.mark.slow
def test_greedy_completion_names_paris(gemma_dir, gemma_tok):
    """Greedy continuation of the pretrained model. For "The capital of France is" alone both
    this checkpoint and llama.cpp continue " the capital of the country of France. It is the
    largest city in France..." (no Paris within 40 tokens, in either), so the prompt ends with
    "the city of"; both then answer " Paris."."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    enc = gemma_tok("The capital of France is the city of", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = gemma_tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_cache_is_reused(gemma_dir):
    weights = gemma_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert base.resolve_base("embedded:gemma3-270m") == gemma_dir
    assert time.perf_counter() - start < 2.0
    assert weights.stat().st_mtime_ns == mtime
    fp = base.base_fingerprint(gemma_dir, spec="embedded:gemma3-270m")
    assert fp["model_type"] == "gemma3_text" and fp["num_parameters"] == 268_098_176

"""The metadata of a model GGUF: what the exporter takes (architecture table, ``check_model``),
the hyperparameters, and the vocabulary, following llama.cpp's ``convert_hf_to_gguf.py``.

- Architectures: llama and mistral (written as ``llama``, Q/K RoPE-permuted), qwen2 (not
  permuted); RoPE scaling none or linear. Anything else is refused before any work.
- Vocabulary: BPE ("gpt2") tokens by id, added special tokens as CONTROL, other added tokens
  USER_DEFINED; merges, bos/eos/pad ids and the chat template through ``gguf.SpecialVocab``; the
  pre-tokenizer name from llama.cpp's fingerprint table (``pretokenizers``): an unknown
  tokenizer is refused rather than guessed; ``add_bos_token`` from what the HF tokenizer does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edgeqlora.errors import InputError

# HF architecture -> (gguf MODEL_ARCH member name, apply llama's Q/K RoPE permutation)
ARCHS = {"LlamaForCausalLM": ("LLAMA", True), "MistralForCausalLM": ("LLAMA", True),
         "Qwen2ForCausalLM": ("QWEN2", False)}


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json``'s contents with a nested ``text_config`` lifted to the top."""
    return {**cfg, **cfg.get("text_config", {})}


def read_config(model_dir: Path) -> dict[str, Any]:
    return text_config(json.loads((Path(model_dir) / "config.json").read_text()))


def model_arch(cfg: dict[str, Any]):
    """(gguf.MODEL_ARCH, permute_qk) for a model config, or an error listing what works."""
    import gguf

    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHS:
        raise InputError(f"architecture {arch} (model_type {cfg.get('model_type')!r}) is not "
                         f"supported by the GGUF exporter; supported: {', '.join(ARCHS)}")
    name, permute = ARCHS[arch]
    return getattr(gguf.MODEL_ARCH, name), permute


def check_model(model_dir: str | Path, lora_keys: list[str] | None = None) -> None:
    """Refuse, before any work, what this exporter cannot write: the architecture, RoPE
    scaling, and (adapter-only) LoRA on the embedding or output head."""
    import gguf

    cfg = read_config(Path(model_dir))
    model_arch(cfg)
    add_hparams(gguf.GGUFWriter(None, "llama"), cfg, 0, "check")
    for key in lora_keys or ():
        check_lora_key(key)


def check_lora_key(key: str) -> None:
    if "embed_tokens" in key or "lm_head" in key:
        raise InputError(f"the adapter changes {key}; llama.cpp adapters on the embedding / "
                         "output head are not supported (with tied embeddings one tensor "
                         "serves both); export the merged model instead (no --adapter-only)")


def _rope_theta(cfg: dict[str, Any]) -> float | None:
    params = cfg.get("rope_parameters") or {}
    return params.get("rope_theta", cfg.get("rope_theta"))


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any]:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    return {"type": kind, "factor": params.get("factor")}


def file_type(quant: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1, "q4_k_m": F.MOSTLY_Q4_K_M, "q5_k_m": F.MOSTLY_Q5_K_M,
            "q6_k": F.MOSTLY_Q6_K, "q3_k_m": F.MOSTLY_Q3_K_M}[quant]


def add_hparams(w, cfg: dict[str, Any], file_type: int, name: str) -> None:
    import gguf

    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads", n_head))
    if (theta := _rope_theta(cfg)) is not None:
        w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if cfg.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    scaling = _rope_scaling(cfg)
    if scaling["type"] == "linear" and scaling["factor"]:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling["type"] not in ("default", None):
        # llama3 / yarn / longrope need extra tensors or keys this exporter does not write.
        raise InputError(f"rope scaling type {scaling['type']!r} is not supported by the GGUF "
                         "exporter (supported: none, linear)")
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def load_tokenizer(model_dir: Path):
    """The checkpoint's ``tokenizer.json`` in Hugging Face ``tokenizers``, without transformers:
    the GGUF needs only the vocabulary, the merges and what the post-processor adds, and
    importing transformers cost ~3 s of a ~5 s conversion of the 135M model (measured). The
    export is still checked against the reference tokenizer (``verify.tokenization_parity``),
    which is what training used."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{model_dir} has no tokenizer.json; the GGUF exporter handles BPE "
                         "tokenizers saved by Hugging Face tokenizers (SentencePiece-only "
                         "tokenizer.model is not supported)")
    try:
        tok = Tokenizer.from_file(str(path))
        model_type = json.loads(path.read_text(encoding="utf-8"))["model"]["type"]
    except Exception as exc:  # tokenizers raises bare Exceptions on malformed files
        raise InputError(f"{path} is not a readable tokenizer file: {exc}") from None
    if model_type != "BPE":
        raise InputError(f"{path} is a {model_type} tokenizer; the GGUF exporter supports BPE "
                         "tokenizers")
    return tok


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, found the way its converter does:
    the sha256 of the ids of a fixed probe text (special tokens added, as transformers'
    ``encode``), looked up in llama.cpp's table."""
    from .pretokenizers import CHKTXT, PRE_TOKENIZER_HASHES

    digest = hashlib.sha256(str(tokenizer.encode(CHKTXT).ids).encode()).hexdigest()
    name = PRE_TOKENIZER_HASHES.get(digest)
    if name is None:
        raise InputError(
            f"the tokenizer's pre-tokenizer is not one llama.cpp knows (probe hash "
            f"{digest[:16]}...); a guessed one would tokenize differently on device. Supported: "
            f"the BPE tokenizers in llama.cpp's convert_hf_to_gguf.py table (e.g. smollm, "
            f"llama-bpe, qwen2)")
    return name


def vocab_entries(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF token types, as llama.cpp's ``get_vocab_base``."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    if max(reverse) >= vocab_size:
        raise InputError(f"tokenizer has id {max(reverse)} but the model's vocab_size is "
                         f"{vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if i in added:
            special = added[i].special or (tok.startswith("<|") and tok.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types


def _special_id(tokenizer, tok_cfg: dict[str, Any], which: str) -> int | None:
    value = tok_cfg.get(f"{which}_token")
    if isinstance(value, dict):
        value = value.get("content")
    return tokenizer.token_to_id(value) if isinstance(value, str) else None


def adds_bos(tokenizer, tok_cfg: dict[str, Any]) -> bool:
    """Whether the tokenizer prepends BOS (its post-processor): what the model saw in training."""
    bos = _special_id(tokenizer, tok_cfg, "bos")
    ids = tokenizer.encode("a").ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


def adds_eos(tokenizer, tok_cfg: dict[str, Any]) -> bool:
    eos = _special_id(tokenizer, tok_cfg, "eos")
    ids = tokenizer.encode("a").ids
    return eos is not None and len(ids) > 1 and ids[-1] == eos


def add_vocab(w, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """The tokenizer of ``model_dir`` (its HF files) into the writer ``w``; returns what the
    manifest records about it."""
    import gguf

    tok = load_tokenizer(model_dir)
    tok_cfg_path = Path(model_dir) / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    pre = pre_tokenizer_name(tok)
    tokens, types = vocab_entries(tok, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    # gguf's SpecialVocab reads the special ids, merges and chat template (tokenizer_config.json
    # or chat_template.jinja) from the files, as llama.cpp's converter does.
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise InputError(f"{model_dir}/tokenizer.json has no BPE merges")
    bos = adds_bos(tok, tok_cfg)
    special.add_special_token["bos"] = bos
    special.add_special_token.setdefault("eos", adds_eos(tok, tok_cfg))
    if tok_cfg.get("add_prefix_space") is not None:  # as llama.cpp's LlamaModel.set_vocab
        w.add_add_space_prefix(bool(tok_cfg["add_prefix_space"]))
    special.add_to_gguf(w, quiet=True)
    return {"pre_tokenizer": pre, "tokens": len(tokens), "merges": len(special.merges),
            "control_tokens": int(sum(t == gguf.TokenType.CONTROL for t in types)),
            "add_bos_token": bos, "special_token_ids": dict(special.special_token_ids),
            "chat_template": bool(special.chat_template)}

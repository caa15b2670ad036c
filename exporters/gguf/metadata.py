"""The metadata of a model GGUF: what the exporter takes (architecture table, ``check_model``),
the hyperparameters, and the vocabulary, following llama.cpp's ``convert_hf_to_gguf.py``.

- Architectures: llama and mistral (written as ``llama``, Q/K RoPE-permuted), qwen2, qwen3,
  gemma2, gemma3 (text) and phi3 (not permuted: llama.cpp runs them with NeoX RoPE); RoPE
  scaling none, linear or llama3 (a ``rope_freqs`` tensor, ``plan``). Gemma's norms are stored
  as ``1 + w`` (its RMSNorm adds the 1 at run time, llama.cpp's does not). What llama.cpp
  hard-codes for a family (Gemma 3's five sliding layers per global one and their RoPE base,
  the attention scale) is checked against the config, and a config that differs is refused,
  as is anything else, before any work.
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
         "Qwen2ForCausalLM": ("QWEN2", False), "Qwen3ForCausalLM": ("QWEN3", False),
         "Gemma2ForCausalLM": ("GEMMA2", False), "Gemma3ForCausalLM": ("GEMMA3", False),
         "Phi3ForCausalLM": ("PHI3", False)}
# Families whose RMSNorm multiplies by (1 + w): convert_hf_to_gguf.py writes w + 1.
SHIFTED_NORMS = ("GEMMA2", "GEMMA3")


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


def rope_parameters(cfg: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE settings of ``layer_type``'s layers (Gemma 3 keeps one set per layer type)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    params.setdefault("rope_theta", cfg.get("rope_theta"))
    return params


def _rope_theta(cfg: dict[str, Any]) -> float | None:
    return rope_parameters(cfg).get("rope_theta")


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any]:
    params = rope_parameters(cfg)
    kind = params.get("rope_type") or params.get("type") or "default"
    return {"type": kind, "factor": params.get("factor")}


def llama3_rope_factors(cfg: dict[str, Any]):
    """Llama 3's per-frequency RoPE divisors (the ``rope_freqs`` tensor llama.cpp applies), as
    transformers' ``_compute_llama3_parameters`` and llama.cpp's converter compute them."""
    import math

    import numpy as np

    p = rope_parameters(cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (float(p["rope_theta"]) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                / head_dim))
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), \
        float(p["high_freq_factor"])
    old = float(p["original_max_position_embeddings"])
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def file_type(quant: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1, "q4_k_m": F.MOSTLY_Q4_K_M, "q5_k_m": F.MOSTLY_Q5_K_M,
            "q6_k": F.MOSTLY_Q6_K, "q3_k_m": F.MOSTLY_Q3_K_M}[quant]


def add_identity(w, identity: dict[str, Any]) -> None:
    """``general.*``: what the file is (``edgeqlora.export_inputs.identity``)."""
    w.add_name(identity["name"])
    for key, add in (("basename", w.add_basename), ("size_label", w.add_size_label),
                     ("finetune", w.add_finetune), ("license", w.add_license)):
        if identity.get(key):
            add(str(identity[key]))
    base = identity.get("base_model") or {}
    if base.get("name"):
        w.add_base_model_count(1)
        w.add_base_model_name(0, base["name"])
        if base.get("organization"):
            w.add_base_model_organization(0, base["organization"])
        if base.get("repo_url"):
            w.add_base_model_repo_url(0, base["repo_url"])


def add_hparams(w, cfg: dict[str, Any], file_type: int, name: str,
                identity: dict[str, Any] | None = None) -> None:
    import gguf

    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    if identity:
        add_identity(w, identity)
    else:
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
    # Phi-3.5/4-mini rotate only part of each head (partial_rotary_factor), as the converter.
    rotary = rope_parameters(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    w.add_rope_dimension_count(int((rotary or 1.0) * head_dim))
    scaling = _rope_scaling(cfg)
    arch, _ = model_arch(cfg)
    if scaling["type"] == "linear" and scaling["factor"]:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling["type"] == "llama3" and arch.name == "LLAMA":
        pass  # the rope_freqs tensor carries it (plan.tensor_plan); no key, as the converter
    elif scaling["type"] not in ("default", None):
        # yarn / longrope need extra tensors or keys this exporter does not write.
        raise InputError(f"rope scaling type {scaling['type']!r} is not supported by the GGUF "
                         "exporter for this architecture (supported: none, linear; llama3 for "
                         "Llama)")
    family_hparams(w, cfg, arch.name, head_dim)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# llama.cpp's 27B Gemmas (46 and 62 layers) scale attention by hidden / heads, every other
# Gemma by head_dim (llama-model.cpp, f_attention_scale).
_GEMMA_27B_LAYERS = {"GEMMA2": 46, "GEMMA3": 62}


def family_hparams(w, cfg: dict[str, Any], arch: str, head_dim: int) -> None:
    """The keys one family needs beyond Llama's, and a refusal for the settings llama.cpp
    hard-codes differently (it would run another model than the checkpoint)."""
    def refuse(what: str) -> None:
        raise InputError(f"{cfg.get('architectures', ['?'])[0]}: {what}; llama.cpp cannot run "
                         "this configuration as trained, so the GGUF exporter refuses it")

    n_layers = cfg["num_hidden_layers"]
    if arch in _GEMMA_27B_LAYERS:
        scalar = cfg.get("query_pre_attn_scalar", head_dim)
        want = cfg["hidden_size"] // cfg["num_attention_heads"] \
            if n_layers == _GEMMA_27B_LAYERS[arch] else head_dim
        if scalar != want:
            refuse(f"query_pre_attn_scalar is {scalar}, llama.cpp scales attention by {want}")
        layer_types = cfg.get("layer_types") or []
        # llama.cpp's swa pattern: Gemma 2 every other layer from the first, Gemma 3 five of six.
        period = 2 if arch == "GEMMA2" else 6
        want_types = ["sliding_attention" if i % period < period - 1 else "full_attention"
                      for i in range(n_layers)]
        if layer_types and layer_types != want_types:
            refuse(f"layer_types {layer_types} differ from llama.cpp's pattern (one global "
                   f"layer in {period})")
        if cfg.get("sliding_window"):
            w.add_sliding_window(int(cfg["sliding_window"]))
    if arch == "GEMMA2":
        caps = cfg.get("attn_logit_softcapping"), cfg.get("final_logit_softcapping")
        if None in caps:
            refuse("soft-capping is off, and llama.cpp's Gemma 2 always soft-caps")
        w.add_attn_logit_softcapping(float(caps[0]))
        w.add_final_logit_softcapping(float(caps[1]))
    if arch == "GEMMA3":
        if cfg.get("attn_logit_softcapping") is not None:
            refuse("attention soft-capping is set, and llama.cpp's Gemma 3 has none")
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        local = rope_parameters(cfg, "sliding_attention")
        theta = local.get("rope_theta", cfg.get("rope_local_base_freq"))
        if float(theta or 10000.0) != 10000.0 or \
                (local.get("rope_type") or "default") != "default":
            refuse(f"the sliding layers' RoPE is {local}, llama.cpp's Gemma 3 uses base 10000 "
                   "unscaled")
    if arch == "PHI3":
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))


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


# Beside a checkpoint converted from a GGUF (the embedded Gemma 3, a base=FILE.gguf): that
# GGUF's tokenizer and identity keys, as JSON (gguf's reader parses a 262k-entry vocabulary in
# Python for ~30 s; JSON loads it in well under one). A SentencePiece vocabulary (tokens, scores,
# types) cannot be rebuilt from tokenizer.json, so the export writes it back verbatim: the
# device then tokenizes exactly as llama.cpp did on the original file.
SOURCE_METADATA = "source_metadata.json"
_SOURCE_KEYS = ("tokenizer.", "general.basename", "general.size_label", "general.license",
                "general.tags")


def write_source_metadata(src: Path, dst: Path) -> list[str]:
    """``SOURCE_METADATA`` of the GGUF ``src`` at ``dst``: key -> its GGUF value type, element
    type (arrays) and value. Returns the keys kept."""
    import gguf

    from edgeqlora.runtimes.gguf_header import read_gguf_header

    types: dict[str, tuple] = {}
    # GGUFReader took 13 s on Gemma 3's 262k-entry vocabulary; this 0.4 s (same JSON, measured).
    fields, _ = read_gguf_header(src, whole_arrays=True, types=types)
    entries = {}
    for key, value in fields.items():
        if not key.startswith(_SOURCE_KEYS):
            continue
        vtype, sub = types[key]
        entries[key] = {"type": gguf.GGUFValueType(vtype).name,
                        "sub_type": gguf.GGUFValueType(sub).name if sub is not None else None,
                        "value": value}
    Path(dst).write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return list(entries)


def read_source_metadata(path: Path) -> dict[str, dict[str, Any]]:
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(entries, dict) or not isinstance(
                entries["tokenizer.ggml.tokens"]["value"], list):
            raise ValueError("no tokenizer.ggml.tokens list")
        return entries
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a readable GGUF vocabulary ({exc}); convert the base "
                         "again") from None


def _copy_fields(entries: dict[str, dict[str, Any]], w) -> None:
    import gguf

    for key, e in entries.items():
        if any(key in kv for kv in w.kv_data):
            continue  # what the export already says of itself wins
        sub = gguf.GGUFValueType[e["sub_type"]] if e.get("sub_type") else None
        w.add_key_value(key, e["value"], gguf.GGUFValueType[e["type"]], sub_type=sub)


def _add_source_vocab(w, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    entries = read_source_metadata(Path(model_dir) / SOURCE_METADATA)
    n_tokens = len(entries["tokenizer.ggml.tokens"]["value"])
    if n_tokens != vocab_size:
        raise InputError(f"{Path(model_dir) / SOURCE_METADATA} has {n_tokens} tokens but the "
                         f"model's vocab_size is {vocab_size}")
    _copy_fields(entries, w)
    template = Path(model_dir) / "chat_template.jinja"
    if template.is_file():  # the source GGUF has none; the checkpoint's own is what trained
        w.add_chat_template(template.read_text(encoding="utf-8"))

    def value(key: str):
        return (entries.get(key) or {}).get("value")

    return {"source": SOURCE_METADATA, "tokenizer_model": value("tokenizer.ggml.model"),
            "pre_tokenizer": value("tokenizer.ggml.pre"), "tokens": n_tokens,
            "add_bos_token": bool(value("tokenizer.ggml.add_bos_token")),
            "chat_template": template.is_file()}


_vocab_calls: dict[tuple, tuple[list, dict[str, Any]]] = {}


class _Recorder:
    """Stands for the GGUFWriter while the vocabulary goes in: forwards every ``add_*`` call and
    keeps it, so that the next writer given the same tokenizer files gets the same calls
    without reading and converting 49k tokens and merges again (~0.45 s a GGUF; an export
    writes or predicts several)."""

    def __init__(self, w):
        self._w, self.calls = w, []

    def __getattr__(self, name: str):
        attr = getattr(self._w, name)
        if not name.startswith("add_"):
            return attr

        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return attr(*args, **kwargs)

        return call


def _special_id_key(key: str) -> bool:
    """The config.json keys gguf's ``SpecialVocab`` reads: ``<type>_token_id`` and, for a
    multimodal config, ``text_config``'s. Nothing else there changes the vocabulary."""
    return key.endswith("_token_id") or key == "text_config"


def _vocab_key(model_dir: Path, vocab_size: int) -> tuple:
    from edgeqlora.artifacts import tokenizer_digest

    # The functions that compute the entries are part of the key (a test that replaces one
    # must not get another's answer).
    return (tokenizer_digest(model_dir, _special_id_key), vocab_size, load_tokenizer,
            pre_tokenizer_name, vocab_entries)


def add_vocab(w, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """The tokenizer of ``model_dir`` (its HF files, or ``SOURCE_METADATA`` where the checkpoint
    was converted from a GGUF) into the writer ``w``; returns what the manifest records. The
    writer calls are kept per content of the tokenizer files (the last four) and replayed."""
    if (Path(model_dir) / SOURCE_METADATA).is_file():
        return _add_source_vocab(w, model_dir, vocab_size)
    key = _vocab_key(Path(model_dir), vocab_size)
    if key in _vocab_calls:
        calls, info = _vocab_calls[key]
        for name, args, kwargs in calls:
            getattr(w, name)(*args, **kwargs)
        return json.loads(json.dumps(info))
    recorder = _Recorder(w)
    info = _add_hf_vocab(recorder, model_dir, vocab_size)
    while len(_vocab_calls) >= 4:
        _vocab_calls.pop(next(iter(_vocab_calls)))
    _vocab_calls[key] = (recorder.calls, json.loads(json.dumps(info)))
    return info


def _add_hf_vocab(w, model_dir: Path, vocab_size: int) -> dict[str, Any]:
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

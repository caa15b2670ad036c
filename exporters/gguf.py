"""GGUF export (llama.cpp): a merged Hugging Face checkpoint or a LoRA adapter -> ``.gguf``.

Built on the ``gguf`` package (``GGUFWriter``, ``Keys``, ``get_tensor_name_map``, ``gguf.quants``);
the layout is never hand-rolled. What this module gets right itself, following llama.cpp's
``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py``:

- the Q/K RoPE permutation for llama/mistral (HF stores rotary halves, ggml interleaved pairs;
  qwen2 is converted unpermuted);
- the vocabulary: BPE ("gpt2") tokens by id, added special tokens as CONTROL, other added tokens
  USER_DEFINED; merges, bos/eos/pad ids and the chat template through ``gguf.SpecialVocab``; the
  pre-tokenizer name from llama.cpp's fingerprint table (``gguf_pretokenizers``): an unknown
  tokenizer is refused rather than guessed; ``add_bos_token`` from what the HF tokenizer does;
- tied embeddings: no ``output.weight`` (llama.cpp reuses ``token_embd``).

Quant types F32/F16/BF16/Q8_0/Q4_0 are written directly, tensor by tensor (streaming). K-quants
(Q4_K_M, Q5_K_M, Q6_K, Q3_K_M) go through llama.cpp's own quantizer in llama-cpp-python from an
F32 GGUF; its per-tensor type mix (fallbacks for rows not divisible by 256) is read back and
reported. With ``imatrix`` (calibration rows; ``auto``: the adapter's training data) the tensors
whose type uses an importance matrix are then re-quantized with one (``gguf_imatrix``). ``verify``
re-opens the file, runs it in llama.cpp and compares logits and tokenization with the reference
checkpoint in torch.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from edgeqlora.errors import (ConfigError, ExportError, InputError, MissingDependencyError)

log = logging.getLogger(__name__)

DIRECT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
# name -> llama_cpp ftype constant
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
            "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M"}
QUANTS = DIRECT_QUANTS + tuple(K_QUANTS)
DEFAULT_QUANT = "q4_k_m"
ADAPTER_QUANTS = ("f32", "f16", "q8_0")
LLAMA_CPP_INSTALL = "pip install 'edgeqlora[gguf]'  (or: pip install llama-cpp-python)"
# HF architecture -> (gguf MODEL_ARCH member name, apply llama's Q/K RoPE permutation)
ARCHS = {"LlamaForCausalLM": ("LLAMA", True), "MistralForCausalLM": ("LLAMA", True),
         "Qwen2ForCausalLM": ("QWEN2", False)}

# Verification thresholds (GGUF in llama.cpp vs the merged model in fp32 torch, held-out tokens).
# From measurements on SmolLM2-135M (the table: Q8_0 0.96 / 0.006, Q4_K_M 0.85 / 0.10,
# Q4_0 0.66 / 0.36 against fp32) with headroom; a file below them is broken, not just lossy.
VERIFY_THRESHOLDS = {
    "f32": {"min_top1": 0.99, "max_kld": 0.002},
    "f16": {"min_top1": 0.98, "max_kld": 0.01},
    "bf16": {"min_top1": 0.95, "max_kld": 0.03},
    "q8_0": {"min_top1": 0.93, "max_kld": 0.03},
    "q6_k": {"min_top1": 0.90, "max_kld": 0.06},
    "q5_k_m": {"min_top1": 0.85, "max_kld": 0.12},
    "q4_k_m": {"min_top1": 0.75, "max_kld": 0.25},
    "q4_0": {"min_top1": 0.55, "max_kld": 0.6},
    "q3_k_m": {"min_top1": 0.55, "max_kld": 0.6},
}


def has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def check_quant(quant: str, adapter_only: bool = False) -> str:
    """Normalise and validate ``quant`` before any work starts."""
    q = quant.strip().lower()
    if q not in QUANTS:
        raise ConfigError(f"quant={quant!r} is not a GGUF quant type; valid: {', '.join(QUANTS)}")
    if q in K_QUANTS and not has_llama_cpp():
        raise MissingDependencyError(
            f"quant={q} (a K-quant) needs llama.cpp's quantizer from llama-cpp-python, which is "
            f"not installed: {LLAMA_CPP_INSTALL}; or pick one written without it: "
            f"{', '.join(DIRECT_QUANTS)}")
    return q


def check_adapter_quant(quant: str) -> str:
    q = quant.strip().lower()
    if q not in ADAPTER_QUANTS:
        raise ConfigError(f"adapter quant={quant!r} is not one of {', '.join(ADAPTER_QUANTS)}")
    return q


def read_config(model_dir: Path) -> dict[str, Any]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return {**cfg, **cfg.get("text_config", {})}


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
        _check_lora_key(key)


def _check_lora_key(key: str) -> None:
    if "embed_tokens" in key or "lm_head" in key:
        raise InputError(f"the adapter changes {key}; llama.cpp adapters on the embedding / "
                         "output head are not supported (with tied embeddings one tensor "
                         "serves both); export the merged model instead (no --adapter-only)")


def permute_qk(w, n_head: int, n_head_kv: int | None):
    """llama.cpp's ``LlamaModel.permute``: HF's rotate-half layout -> ggml's interleaved pairs
    (rows of each head reordered; works on weights [out, in] and biases [out])."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------------------------------------
# Metadata: hyperparameters and vocabulary


def _rope_theta(cfg: dict[str, Any]) -> float | None:
    params = cfg.get("rope_parameters") or {}
    return params.get("rope_theta", cfg.get("rope_theta"))


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any]:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    return {"type": kind, "factor": params.get("factor")}


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
    export still checks the GGUF's tokenization against transformers' tokenizer
    (``tokenization_parity``), which is what training used."""
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
    from .gguf_pretokenizers import CHKTXT, PRE_TOKENIZER_HASHES

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


def _adds_bos(tokenizer, tok_cfg: dict[str, Any]) -> bool:
    """Whether the tokenizer prepends BOS (its post-processor): what the model saw in training."""
    bos = _special_id(tokenizer, tok_cfg, "bos")
    ids = tokenizer.encode("a").ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


def _adds_eos(tokenizer, tok_cfg: dict[str, Any]) -> bool:
    eos = _special_id(tokenizer, tok_cfg, "eos")
    ids = tokenizer.encode("a").ids
    return eos is not None and len(ids) > 1 and ids[-1] == eos


def add_vocab(w, model_dir: Path, vocab_size: int) -> dict[str, Any]:
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
    add_bos = _adds_bos(tok, tok_cfg)
    special.add_special_token["bos"] = add_bos
    special.add_special_token.setdefault("eos", _adds_eos(tok, tok_cfg))
    if tok_cfg.get("add_prefix_space") is not None:  # as llama.cpp's LlamaModel.set_vocab
        w.add_add_space_prefix(bool(tok_cfg["add_prefix_space"]))
    special.add_to_gguf(w, quiet=True)
    return {"pre_tokenizer": pre, "tokens": len(tokens), "merges": len(special.merges),
            "control_tokens": int(sum(t == gguf.TokenType.CONTROL for t in types)),
            "add_bos_token": add_bos, "special_token_ids": dict(special.special_token_ids),
            "chat_template": bool(special.chat_template)}


# ---------------------------------------------------------------------------------------------
# Writing a model GGUF (direct types), tensor by tensor


def _direct_qtype(quant: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]


def _file_type(quant: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_k_m": F.MOSTLY_Q4_K_M, "q5_k_m": F.MOSTLY_Q5_K_M,
            "q6_k": F.MOSTLY_Q6_K, "q3_k_m": F.MOSTLY_Q3_K_M}[quant]


def _choose_type(gguf_name: str, shape: list[int], quant: str, tied: bool):
    """Per-tensor type, following convert_hf_to_gguf.py: norms and 1-D tensors F32; rows that
    do not divide into the type's blocks fall back to F16 (as the converter's QuantError path)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    qtype = _direct_qtype(quant)
    if quant == "q4_0" and (gguf_name == "output.weight" or
                            (tied and gguf_name == "token_embd.weight")):
        # The output projection is the most quantization-sensitive tensor; llama.cpp's own Q4_0
        # recipe keeps it at Q6_K. Q6_K has no numpy quantizer in gguf, so Q8_0 here.
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block != 0:
        return Q.F16
    return qtype


def _encode(data, qtype):
    """numpy array in the on-disk form of ``qtype`` (gguf.quants, bit-exact with ggml)."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _nbytes(shape: list[int], qtype) -> tuple[Any, tuple[int, ...], int]:
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.float32, tuple(shape), math.prod(shape) * 4
    if qtype == Q.F16:
        return np.float16, tuple(shape), math.prod(shape) * 2
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return np.uint8, tuple(byte_shape), math.prod(byte_shape)


def plan_tensors(model_dir: Path, cfg: dict[str, Any], quant: str) -> list[dict[str, Any]]:
    """Source tensor -> GGUF name, shape, type; refuses tensors llama.cpp would not know."""
    import gguf

    from edgeqlora.merge import tensor_specs

    arch, permute = model_arch(cfg)
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    plan = []
    for path, name, shape, _ in tensor_specs(Path(model_dir)):
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd as the output when there is no output.weight
        if name.endswith(".rotary_emb.inv_freq"):
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InputError(f"{model_dir}: tensor {name} has no GGUF name for architecture "
                             f"{gguf.MODEL_ARCH_NAMES[arch]}")
        kind = "q" if name.endswith(("q_proj.weight", "q_proj.bias")) else \
            "k" if name.endswith(("k_proj.weight", "k_proj.bias")) else None
        qtype = _choose_type(new, shape, quant, tied)
        plan.append({"file": path, "src": name, "name": new, "shape": shape, "qtype": qtype,
                     "permute": kind if permute else None})
    return plan


def plan_kquant(model_dir: Path, cfg: dict[str, Any], quant: str
                ) -> list[dict[str, Any]] | None:
    """``plan_tensors`` in the order llama.cpp's quantizer writes (and counts) tensors, with
    llama.cpp's type for every tensor of the K-quant mix ``quant`` (``gguf_kquant``), marked to
    be quantized by llama.cpp's kernels; None where llama.cpp's quantizer must choose (see
    ``gguf_kquant.kquant_types``)."""
    import gguf

    from .gguf_kquant import kquant_types, llama_cpp_order

    plan = sorted(plan_tensors(model_dir, cfg, "f32"), key=llama_cpp_order)
    types = kquant_types(plan, quant, cfg["num_hidden_layers"])
    if types is None:
        return None
    for t, name in zip(plan, types):
        t["qtype"], t["ggml"] = gguf.GGMLQuantizationType[name], True
    return plan


# Rows read, converted and written at a time: peak memory is about this much (plus its converted
# copy), whatever the model's size.
STREAM_CHUNK_BYTES = 32 * 2**20


class _StreamedTensor:
    """One planned tensor as ``GGUFWriter.write_tensor_data`` takes it (it uses only ``nbytes``
    and ``tofile``), read from the safetensors file, converted and written a chunk of rows at a
    time. Hand-written because gguf's writer takes whole arrays (its lazy tensors are evaluated
    whole): a 0.8 B model's 384 MiB embedding then costs its fp32 copy, the mapped file pages and
    the converted copy at once. Every ggml type quantizes row by row, so chunks of rows give the
    same bytes as the whole tensor (tested). Q/K weights are read whole: the RoPE permutation
    moves rows within a head."""

    def __init__(self, t: dict[str, Any], heads: tuple[int, int] | None, chunk_bytes: int,
                 imatrix_row=None):
        self.t, self.heads, self.chunk_bytes = t, heads, chunk_bytes
        self.nbytes = _nbytes(t["shape"], t["qtype"])[2]
        self.imatrix_row = imatrix_row

    def _encode(self, data):
        qtype = self.t["qtype"]
        if not self.t.get("ggml") or qtype.name in ("F32", "F16"):
            return _encode(data, qtype)
        from .gguf_imatrix import quantize_rows

        # llama.cpp's own kernels (K-quant mixes): the bytes its quantizer writes.
        return quantize_rows(data.reshape(-1, data.shape[-1]), qtype, self.imatrix_row)

    def _read(self, start: int | None = None, stop: int | None = None):
        import numpy as np
        from safetensors import safe_open

        # A fresh safe_open per read: safetensors memory-maps the file, and pages read through a
        # mapping kept open stay resident (RSS would grow to the model size).
        with safe_open(str(self.t["file"]), framework="np") as f:
            if start is None:
                data = f.get_tensor(self.t["src"])
            else:
                data = f.get_slice(self.t["src"])[start:stop]
            # No copy when the checkpoint is already fp32 (the merge writes fp32).
            return np.asarray(data, dtype=np.float32)

    def tofile(self, fout) -> None:
        shape = self.t["shape"]
        if self.heads is not None or len(shape) < 2:
            data = self._read()
            if self.heads is not None:
                data = permute_qk(data, *self.heads)
            self._encode(data).tofile(fout)
            return
        rows = max(1, self.chunk_bytes // (4 * math.prod(shape[1:])))
        for start in range(0, shape[0], rows):
            stop = min(start + rows, shape[0])  # safetensors slices do not clamp
            self._encode(self._read(start, stop)).tofile(fout)


def write_model_gguf(model_dir: str | Path, path: str | Path, quant: str,
                     name: str = "edgeqlora-merged", progress: bool = False,
                     chunk_bytes: int = STREAM_CHUNK_BYTES,
                     imatrix: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model_dir`` (a Hugging Face checkpoint) as one GGUF, streaming: tensor by tensor,
    each in chunks of rows. Direct types (f32/f16/bf16/q8_0/q4_0) through gguf's numpy
    quantizers; the K-quant mixes with llama.cpp's type choice and kernels (``gguf_kquant``,
    needs llama-cpp-python), weighted by ``imatrix`` rows (``gguf_imatrix``) where given."""
    import gguf
    import numpy as np

    model_dir, path = Path(model_dir), Path(path)
    cfg = read_config(model_dir)
    arch, _ = model_arch(cfg)
    if quant in K_QUANTS:
        if not has_llama_cpp():
            raise MissingDependencyError(f"quant={quant} needs llama-cpp-python: "
                                         f"{LLAMA_CPP_INSTALL}")
        plan = plan_kquant(model_dir, cfg, quant)
        if plan is None:
            raise ConfigError(f"{model_dir}: llama.cpp's {quant} mix for this model uses a rule "
                              "the direct writer does not have; quantize an F32 GGUF with "
                              "quantize_gguf instead")
    elif quant in DIRECT_QUANTS:
        plan = plan_tensors(model_dir, cfg, quant)
    else:
        raise ConfigError(f"write_model_gguf writes {', '.join(QUANTS)}, not {quant!r}")
    from .gguf_imatrix import IMATRIX_TYPES
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    add_hparams(w, cfg, _file_type(quant), name)
    vocab = add_vocab(w, model_dir, cfg["vocab_size"])
    for t in plan:
        dtype, shape, nbytes = _nbytes(t["shape"], t["qtype"])
        w.add_tensor_info(t["name"], shape, np.dtype(dtype), nbytes,
                          raw_dtype=None if dtype is not np.uint8 else t["qtype"])
    n_head = cfg["num_attention_heads"]
    heads = {"q": (n_head, n_head), "k": (n_head, cfg.get("num_key_value_heads", n_head))}
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in _progress(plan, "writing GGUF", progress):
            row = imatrix.get(t["name"]) if imatrix and t["qtype"].name in IMATRIX_TYPES \
                else None
            w.write_tensor_data(_StreamedTensor(t, heads.get(t["permute"]), chunk_bytes, row))
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        w.close()
    return {"vocab": vocab, "tensors": len(plan), "arch": gguf.MODEL_ARCH_NAMES[arch],
            "plan": plan}


def _write_error(path: Path, exc: OSError) -> ExportError:
    if exc.errno == errno.ENOSPC:
        return ExportError(f"disk full while writing {path}; free space on that disk and run "
                           "the export again (nothing was kept)")
    return ExportError(f"cannot write {path}: {exc.strerror or exc}")


def _progress(items, what: str, enabled: bool):
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=what, transient=True)


def quantize_gguf(src: str | Path, dst: str | Path, quant: str, nthread: int = 0) -> None:
    """llama.cpp's quantizer (llama-cpp-python) from an F32/F16 GGUF to a K-quant type."""
    if quant not in K_QUANTS:
        raise ConfigError(f"quantize_gguf does {', '.join(K_QUANTS)}, not {quant!r}")
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError(f"quant={quant} needs llama-cpp-python: "
                                     f"{LLAMA_CPP_INSTALL}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    params.nthread = nthread or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    # It reports failure through its return value (and a log line), never by raising.
    if rc != 0:
        if _disk_full(Path(dst)):
            raise ExportError(f"disk full while quantizing into {dst}; free space and run the "
                              "export again (nothing was kept)")
        raise ExportError(f"llama.cpp's quantizer failed (return code {rc}) turning {src} into "
                          f"{quant}; run with --debug and check llama.cpp's log above")


def _disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path.parent)
        return st.f_bavail * st.f_frsize < 16 << 20
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# LoRA adapter GGUF (convert_lora_to_gguf.py layout)


def write_lora_gguf(deltas: dict[str, tuple[Any, Any, float]], base_dir: str | Path,
                    path: str | Path, quant: str = "q8_0", alpha: float | None = None
                    ) -> dict[str, Any]:
    """Write LoRA matrices as a llama.cpp adapter GGUF.

    ``deltas`` maps a base weight name (``model.layers.0.self_attn.q_proj.weight``) to
    ``(A [r, in], B [out, r], scale)`` with the merged delta ``scale * B @ A``. The layout is
    llama.cpp's: ``general.type=adapter``, ``adapter.type=lora``, ``adapter.lora.alpha``,
    ``<tensor>.lora_a`` = A and ``<tensor>.lora_b`` = B (ggml shapes [in, r] and [r, out]);
    for q/k the RoPE permutation applies to B's rows (the rows of B @ A). llama.cpp scales by
    ``alpha / r`` with r read from each B; any other scale (rsLoRA, per-module patterns) is folded
    into B so the product is exact.
    """
    import gguf
    import numpy as np

    base_dir, path = Path(base_dir), Path(path)
    quant = check_adapter_quant(quant)
    cfg = read_config(base_dir)
    arch, permute = model_arch(cfg)
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    for key in deltas:
        _check_lora_key(key)
    ranks = {int(a.shape[0]) for a, _, _ in deltas.values()}
    scales = {s * int(a.shape[0]) for a, _, s in deltas.values()}
    if alpha is None:
        alpha = float(next(iter(scales))) if len(scales) == 1 else float(max(ranks))
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    types: dict[str, str] = {}
    for key, (a, b, scale) in sorted(deltas.items()):
        new = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InputError(f"adapter tensor {key} has no GGUF name for this architecture")
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32) * (scale / (alpha / a.shape[0]))
        if permute and key.endswith("q_proj.weight"):
            b = permute_qk(b, n_head, n_head)
        elif permute and key.endswith("k_proj.weight"):
            b = permute_qk(b, n_head, n_kv)
        for suffix, m in ((".lora_a", a), (".lora_b", b)):
            qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[quant]
            if m.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
                qtype = Q.F16  # e.g. B's rows are r long: r=16 does not fill a Q8_0 block
            data = _encode(m, qtype)
            w.add_tensor(new + suffix, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
            types[new + suffix] = qtype.name
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        w.close()
    mix: dict[str, int] = {}
    for t in types.values():
        mix[t] = mix.get(t, 0) + 1
    return {"alpha": alpha, "ranks": sorted(ranks), "tensors": len(types), "types": mix}


# ---------------------------------------------------------------------------------------------
# Reading back and verifying


def read_back(path: str | Path) -> dict[str, Any]:
    """Tensor count, per-type counts and per-tensor (type, ggml shape) of a GGUF file."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ExportError(f"{path} cannot be read back as GGUF ({exc})") from None
    tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]}
               for t in reader.tensors}
    mix: dict[str, int] = {}
    for t in tensors.values():
        mix[t["type"]] = mix.get(t["type"], 0) + 1
    return {"tensor_count": len(tensors), "types": mix, "tensors": tensors}


def check_structure(path: Path, plan: list[dict[str, Any]] | None,
                    info: dict[str, Any] | None = None) -> list[str]:
    """Problems between what was planned and what the file holds (names, shapes, types).
    ``info``: the file's ``read_back`` when already done (GGUFReader parses every vocabulary
    string in Python: seconds for a 49k vocabulary, so the file is read once per export)."""
    info = info or read_back(path)
    if plan is None:
        return []
    problems = []
    if info["tensor_count"] != len(plan):
        problems.append(f"{info['tensor_count']} tensors in the file, {len(plan)} planned")
    for t in plan:
        got = info["tensors"].get(t["name"])
        if got is None:
            problems.append(f"{t['name']} missing")
        elif got["shape"] != list(reversed(t["shape"])):
            problems.append(f"{t['name']} has ggml shape {got['shape']}, expected "
                            f"{list(reversed(t['shape']))}")
        elif got["type"] != t["qtype"].name:
            problems.append(f"{t['name']} is {got['type']}, planned {t['qtype'].name}")
    return problems


class _Agreement:
    """Running top-1 agreement and mean KL(ref || cand), one sequence at a time, so memory stays
    at one sequence's logits rather than [all tokens, vocab] twice."""

    def __init__(self):
        self.top1 = self.kld = 0.0
        self.tokens = 0

    def add(self, ref, cand) -> None:
        import torch

        ref = torch.as_tensor(ref, dtype=torch.float64)
        cand = torch.as_tensor(cand, dtype=torch.float64)
        lr, lc = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
        self.kld += float((lr.exp() * (lr - lc)).sum(-1).sum())
        self.top1 += float((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.tokens += int(ref.shape[0])

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {"top1": self.top1 / n, "kld": self.kld / n, "tokens": self.tokens}


def _llama(model_path: Path, n_ctx: int, lora_path: Path | None = None):
    from llama_cpp import Llama

    return Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                 logits_all=True, n_ctx=max(n_ctx, 64), n_batch=max(n_ctx, 64),
                 n_threads=os.cpu_count() or 1, verbose=False, seed=0)


def _gguf_seq_logits(llm, ids: list[int]):
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def gguf_logits(model_path: Path, sequences: list[list[int]], lora_path: Path | None = None):
    """llama.cpp logits ``[tokens, vocab]`` over each sequence (fresh context per sequence)."""
    import numpy as np

    llm = _llama(model_path, max(len(s) for s in sequences) + 8, lora_path)
    try:
        return np.concatenate([_gguf_seq_logits(llm, ids) for ids in sequences])
    finally:
        llm.close()


def compare_with_torch(model_path: Path, reference_dir: Path, sequences: list[list[int]],
                       lora_path: Path | None = None) -> dict[str, float]:
    """Top-1 agreement and mean KLD of the GGUF in llama.cpp against the reference checkpoint in
    fp32 torch, sequence by sequence, over distinct contexts (``parity.distinct_positions``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeqlora.parity import distinct_positions

    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    llm = _llama(model_path, max(len(s) for s in sequences) + 8, lora_path)
    acc = _Agreement()
    try:
        with torch.no_grad():
            # A shared system prompt counts once, not once per held-out example.
            for ids, keep in zip(sequences, distinct_positions(sequences)):
                ref = model(torch.tensor([ids])).logits[0]
                acc.add(ref[torch.from_numpy(keep)], _gguf_seq_logits(llm, ids)[keep])
    finally:
        llm.close()
    return acc.result()


def tokenization_parity(model_path: Path, model_dir: Path, texts: list[str]) -> dict[str, Any]:
    """Do llama.cpp (the GGUF's vocab) and the HF tokenizer give the same ids for every text?"""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    mismatches = []
    for text in texts:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        theirs = tok(text, add_special_tokens=True)["input_ids"]
        if list(ours) != list(theirs):
            mismatches.append(text[:60])
    return {"texts": len(texts), "identical": len(texts) - len(mismatches),
            "mismatches": mismatches[:5]}


def verify(model_path: str | Path, reference_dir: str | Path, sequences: list[list[int]],
           texts: list[str], thresholds: dict[str, float], plan: list[dict] | None = None,
           lora_path: str | Path | None = None,
           readback: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a written GGUF: structure (GGUFReader), then, with llama-cpp-python, logits vs the
    reference checkpoint in torch on ``sequences`` and tokenization of ``texts``.

    Returns ``{"passed": bool, "problems": [...], "top1", "kld", "tokens", ...}``."""
    model_path = Path(model_path)
    result: dict[str, Any] = {"thresholds": dict(thresholds)}
    problems = check_structure(model_path, plan, readback)
    if lora_path is not None:
        read_back(lora_path)
    if not has_llama_cpp():
        result.update(runtime="skipped: llama-cpp-python not installed "
                              f"({LLAMA_CPP_INSTALL})")
    else:
        score = compare_with_torch(model_path, Path(reference_dir), sequences,
                                   Path(lora_path) if lora_path else None)
        result.update(score)
        result["runtime"] = "llama-cpp-python"
        if score["top1"] < thresholds["min_top1"]:
            problems.append(f"top-1 agreement {score['top1']:.3f} < {thresholds['min_top1']}")
        if score["kld"] > thresholds["max_kld"]:
            problems.append(f"mean KLD {score['kld']:.4f} > {thresholds['max_kld']}")
        result["tokenization"] = tokenization_parity(model_path, Path(reference_dir), texts)
        if result["tokenization"]["mismatches"]:
            problems.append(f"tokenization differs from the HF tokenizer on "
                            f"{len(texts) - result['tokenization']['identical']} of {len(texts)} "
                            "held-out texts")
    result["problems"] = problems
    result["passed"] = not problems
    return result


# ---------------------------------------------------------------------------------------------
# Ollama Modelfile


def modelfile(model_dir: Path, gguf_name: str, adapter_name: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF, the chat template as a Go template when it is a
    ChatML template (rendered from the HF template to find its default system prompt), and the
    stop tokens. Other templates are left to Ollama, which reads tokenizer.chat_template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lines = [f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    template = tok.chat_template or ""
    stops = []
    if "<|im_start|>" in template:
        probe = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                        add_generation_prompt=True)
        head = "<|im_start|>system\n"
        default_system = probe[len(head):probe.index("<|im_end|>")] \
            if probe.startswith(head) else ""
        lines.append('TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n'
                     '{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}'
                     '<|im_end|>\n{{ end }}<|im_start|>assistant\n"""')
        if default_system:
            lines.append(f'SYSTEM """{default_system}"""')
        stops.append("<|im_end|>")
    else:
        lines.append("# TEMPLATE: not a ChatML template; Ollama uses the GGUF's "
                     "tokenizer.chat_template")
    if tok.eos_token and tok.eos_token not in stops:
        stops.append(tok.eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The exporter interface (see edgeqlora.exporters)


def default_thresholds(quant: str) -> dict[str, float]:
    return dict(VERIFY_THRESHOLDS[quant])


def write_export(model_dir: str | Path, out_dir: str | Path, quant: str, *,
                 lora: dict[str, tuple[Any, Any, float]] | None = None,
                 adapter_quant: str = "q8_0", name: str = "model",
                 progress: bool = False, imatrix: str | None = None,
                 imatrix_source: str | None = None,
                 imatrix_rows: int | None = None) -> dict[str, Any]:
    """Write a GGUF export into ``out_dir`` (an existing, empty temporary directory).

    Full model: ``model_dir`` is the merged checkpoint -> ``<name>.<quant>.gguf``. Adapter-only
    (``lora`` given): ``model_dir`` is the unmerged base -> ``base.<quant>.gguf`` plus
    ``adapter.<adapter_quant>.gguf``. Tokenizer files, chat template and an Ollama Modelfile go
    beside them.

    ``imatrix``: ``none`` or a data spec of calibration rows (``auto`` is turned into the
    adapter's training data by ``resolve_options``): the K-quant / Q4_0 tensors are quantized
    with an importance matrix from ``imatrix_rows`` of them (``gguf_imatrix``); recorded under
    ``info["imatrix"]``. Types that do not use one (f32/f16/bf16/q8_0) get a note instead."""
    import shutil
    import tempfile

    from edgeqlora.merge import TOKENIZER_FILES

    from . import gguf_imatrix as IM

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    quant = check_quant(quant)
    source = IM.check_imatrix(imatrix)
    stem = "base" if lora is not None else name
    model_file = out_dir / f"{stem}.{quant}.gguf"
    info: dict[str, Any] = {"quant": quant, "model_file": model_file.name}
    im = None
    if source != IM.NONE and quant not in IM.IMATRIX_QUANTS:
        info["imatrix"] = {"source": imatrix_source or source, "used": False,
                           "note": f"{quant} does not use an importance matrix (llama.cpp "
                                   "ignores one for F32/F16/BF16/Q8_0); not computed"}
    elif source == IM.AUTO:
        raise ConfigError("imatrix=auto means the adapter's training data, which the export "
                          "stage resolves (edgeqlora.export.export_adapter, or "
                          "resolve_options(options, adapter_manifest)); here pass a data spec")
    elif source != IM.NONE:
        # Before any file is written: bad calibration data fails here.
        im, record = IM.build_imatrix(model_dir, source, imatrix_rows or IM.DEFAULT_ROWS,
                                      progress=progress)
        info["imatrix"] = {"source": imatrix_source or source, "used": True, **record}
    cfg = read_config(model_dir)
    one_pass = (quant in DIRECT_QUANTS and im is None) or (
        quant in K_QUANTS and has_llama_cpp() and plan_kquant(model_dir, cfg, quant) is not None)
    if one_pass:
        # One streaming pass; K-quant mixes with llama.cpp's types and kernels, the imatrix
        # applied as each tensor is quantized.
        info.update(write_model_gguf(model_dir, model_file, quant, name=stem,
                                     progress=progress, imatrix=im))
        info["writer"] = "direct"
        if im is not None:
            takes = [t["name"] for t in info["plan"] if t["qtype"].name in IM.IMATRIX_TYPES]
            info["imatrix"].update(requantized=sum(n in im for n in takes),
                                   without_imatrix=sorted(n for n in takes if n not in im))
    else:
        # llama.cpp quantizes from an F32 GGUF (exact merged weights), written beside the
        # output so a full disk shows up here and the temporary goes away with the directory.
        # The imatrix pass re-quantizes from it too. (K-quant mixes come here only where
        # gguf_kquant lacks one of llama.cpp's rules; direct types only with an imatrix.)
        info["writer"] = "llama.cpp quantizer"
        with tempfile.TemporaryDirectory(prefix=".f32-", dir=out_dir.parent) as scratch:
            f32 = Path(scratch) / "model.f32.gguf"
            info.update(write_model_gguf(model_dir, f32, "f32", name=stem, progress=progress))
            if quant in DIRECT_QUANTS:
                write_model_gguf(model_dir, model_file, quant, name=stem, progress=progress)
                info["plan"] = plan_tensors(model_dir, cfg, quant)
            else:
                quantize_gguf(f32, model_file, quant)
                info["plan"] = None
            if im is not None:
                done = IM.apply_imatrix(f32, model_file, im, progress=progress)
                info["imatrix"].update(requantized=len(done["requantized"]),
                                       without_imatrix=done["without_imatrix"])
    if lora is not None:
        adapter_quant = check_adapter_quant(adapter_quant)
        adapter_file = out_dir / f"adapter.{adapter_quant}.gguf"
        info["adapter"] = write_lora_gguf(lora, model_dir, adapter_file, adapter_quant)
        info["adapter_file"] = adapter_file.name
    back = info["readback"] = read_back(model_file)
    info["quant_mix"] = back["types"]
    info["tensor_count"] = back["tensor_count"]
    for fname in TOKENIZER_FILES + ("generation_config.json", "config.json"):
        if (model_dir / fname).is_file():
            shutil.copy(model_dir / fname, out_dir / fname)
    (out_dir / "Modelfile").write_text(modelfile(model_dir, model_file.name,
                                                 info.get("adapter_file")))
    return info


def resolve_options(options: dict[str, Any], adapter_manifest: dict[str, Any]
                    ) -> dict[str, Any]:
    """Export options that depend on the adapter, resolved before the merge (so bad input fails
    in a second): ``imatrix=auto`` -> the data spec the adapter was trained on; a path that
    does not exist is refused."""
    from . import gguf_imatrix as IM

    out = dict(options)
    source = IM.check_imatrix(out.get("imatrix"))
    if source == IM.AUTO:
        out["imatrix"] = IM.training_data_spec(adapter_manifest)
        out["imatrix_source"] = "auto (the adapter's training data)"
    elif "imatrix" in out:
        out["imatrix"] = source
    return out


def verify_export(out_dir: str | Path, info: dict[str, Any], reference_dir: str | Path,
                  sequences: list[list[int]], texts: list[str],
                  thresholds: dict[str, float]) -> dict[str, Any]:
    out_dir = Path(out_dir)
    lora = out_dir / info["adapter_file"] if info.get("adapter_file") else None
    return verify(out_dir / info["model_file"], reference_dir, sequences, texts, thresholds,
                  plan=info.get("plan"), lora_path=lora, readback=info.get("readback"))

"""The ONNX exporter's tables and its checks before any work: quant recipes, options,
verification thresholds, the calibration a quant asks for, and what checkpoints it takes.

A leaf module: every other module of the package may import it; it imports none of them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from edgeqlora.artifacts import read_json
from edgeqlora.errors import ConfigError, DataError, InputError, require
from edgeqlora.heldout import check_share

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"

# quant name -> recipe. ``bits`` of the MatMuls, the quantizer algorithm, and how the token
# embedding table is stored.
RECIPES: dict[str, dict[str, Any]] = {
    "int4": {"bits": 4, "algorithm": "rtn", "embedding": "int4"},
    "int4-kquant": {"bits": 4, "algorithm": "k_quant", "embedding": "int4"},
    "int4-q8head": {"bits": 4, "algorithm": "rtn", "embedding": "head", "head_bits": 8},
    "int4-kquant-last": {"bits": 4, "algorithm": "k_quant", "embedding": "fp16",
                         "head_bits": 8},
    # Calibrated int4 (gptq.py): GPTQ on rows of the fine-tuning data, HQQ without data. The
    # same storage as int4 / int4-q8head, better rounding.
    "int4-gptq": {"bits": 4, "algorithm": "gptq", "embedding": "int4"},
    "int4-gptq-q8head": {"bits": 4, "algorithm": "gptq", "embedding": "head", "head_bits": 8},
    "int4-hqq": {"bits": 4, "algorithm": "hqq", "embedding": "int4"},
    "int4-hqq-q8head": {"bits": 4, "algorithm": "hqq", "embedding": "head", "head_bits": 8},
    "int8": {"bits": 8, "algorithm": "rtn", "embedding": "fp16"},
    "fp16": {"bits": 16, "algorithm": None, "embedding": "fp16"},
    "fp32": {"bits": 32, "algorithm": None, "embedding": "fp32"},
}
# Quants made from the trained adapter and its unmerged base rather than from a merged
# checkpoint (nf4.py): write_export takes the LoRA deltas and the 4-bit config for them.
FROM_ADAPTER_QUANTS = ("nf4-exact",)
QUANTS = tuple(RECIPES) + FROM_ADAPTER_QUANTS
# By the numbers (bench/onnx_variants.py --task-table, bench/results/onnx_task.json: the
# quickstart adapter on SmolLM2-135M, 40 held-out task examples, the trained model's exact match
# 0.75; KLD vs the merged fp32 model): int4 (RTN) 82 MiB, KLD 0.41, exact match 0.075; int4-q8head
# 95 MiB, 0.31, 0.225; int4-kquant-last 152 MiB, 0.35, 0.40; int4-gptq 82 MiB, 0.14, 0.675 (90 %
# of the trained model's); int4-gptq-q8head 95 MiB, 0.078, 0.625; int8 200 MiB, 0.004. GPTQ on the
# fine-tuning data is the only 4-bit recipe that keeps the task, at the smallest size.
DEFAULT_QUANT = "int4-gptq"
# ``base_quant`` (the adapter's 4-bit config) and ``quantized`` (the weight names the trained
# model ran in 4 bits) are used by nf4-exact only; the export stage fills them in.
# The share of GPTQ's calibration tokens from general English (heldout.CALIBRATION_TEXT), lower
# than the GGUF imatrix's heldout.GENERAL_SHARE: GPTQ trades the task for the language as the
# share grows. Quickstart adapter (80 steps, trained 80 % exact match), int4-gptq, 40 held-out
# commands + 512 tokens of English: share 0 -> task KLD 0.085, exact match 72.5 %, text KLD
# 0.618 / top-1 56.6 %; 0.05 -> 0.116, 65 %, 0.482 / 61.9 %; 0.10 -> 0.130, 62.5 %, 0.381 /
# 63.1 %; 0.25 -> 0.128, 50 %, 0.343 / 64.1 %. 0.10 keeps most of the text's gain (its mean and
# p99 KLD within the gate) for 10 points of exact match; 0 is the task-first choice.
GPTQ_GENERAL_SHARE = 0.10
DEFAULT_OPTIONS = {"block_size": 32, "symmetric": True, "accuracy_level": 4,
                   "context_length": 2048, "calibration_data": None, "calibration_rows": 64,
                   "calibration_general": GPTQ_GENERAL_SHARE, "base_quant": None, "quantized": None}
# Recipes whose quantizer reads calibration data (``calibration_data``: a data spec).
CALIBRATED = tuple(q for q, r in RECIPES.items() if r["algorithm"] == "gptq")
# Calibration rows are cut at this many tokens (SmolLM2-chat-templated smart-home commands are
# ~70; 64 rows give ~4k tokens, more than the widest MatMul input (1536), so every Hessian is
# full rank before damping).
CALIBRATION_MAX_LEN = 256

# Decoder families whose transformers model accepts an explicit DynamicCache, which is all the
# tracing wrapper needs (graph.py): the Llama family (llama incl. Llama 3 rope scaling,
# mistral, qwen2), Qwen3 (q/k norms), Gemma 2 / Gemma 3 text (sliding-window layers, kept as
# full caches with the window in the mask; soft-capping; (1 + w) norms) and Phi-3 (fused
# qkv_proj / gate_up_proj: one MatMul each, quantized like any other). tests/
# test_onnx_families.py exports each one and checks logits and cached decoding vs transformers.
ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
         "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM")
# architecture -> onnxruntime-genai's model type (0.18 accepts each of these names). genai only
# picks its decoder class from the type; the graph carries the family's maths, and
# past_present_share_buffer false makes it feed every present back as the next past, so the
# full-length sliding-layer caches need no genai "sliding_window" settings.
GENAI_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
               "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
               "Phi3ForCausalLM": "phi3"}
# RoPE variants whose frequencies depend on the sequence length at run time: the tracer keeps
# only the branch it ran (the short factors / unscaled base of a 5-token trace), so a longer
# context would silently compute the wrong rotation.
DYNAMIC_ROPE = ("dynamic", "longrope")

# Verification thresholds vs the merged model in fp32 (top-1 agreement, mean KL). fp32 must be
# exact up to kernel rounding; fp16/int8 measured on SmolLM2-135M at KL ~1e-4 / ~0.004; int4 RTN
# on a model that small is very lossy (measured top-1 ~0.67, KL ~0.31): the bounds catch a
# broken file, not a lossy one.
VERIFY_THRESHOLDS = {
    "fp32": {"min_top1": 0.99, "max_kld": 1e-4},
    "fp16": {"min_top1": 0.97, "max_kld": 0.01},
    "int8": {"min_top1": 0.90, "max_kld": 0.05},
    "int4-kquant-last": {"min_top1": 0.55, "max_kld": 0.6},
    "int4-q8head": {"min_top1": 0.55, "max_kld": 0.6},
    "int4-kquant": {"min_top1": 0.55, "max_kld": 0.6},
    "int4": {"min_top1": 0.55, "max_kld": 0.6},
    # GPTQ measured on the quickstart adapter (SmolLM2-135M, vs the merged fp32): top-1 0.83 /
    # KLD 0.14 (int4-gptq), 0.90 / 0.078 (-q8head); ~2x margin, and still below what RTN reaches
    # (0.41 / 0.31), so a GPTQ that stopped propagating its error fails verification.
    "int4-gptq": {"min_top1": 0.7, "max_kld": 0.3},
    "int4-gptq-q8head": {"min_top1": 0.75, "max_kld": 0.2},
    "int4-hqq": {"min_top1": 0.55, "max_kld": 0.6},
    "int4-hqq-q8head": {"min_top1": 0.55, "max_kld": 0.6},
    # Against the trained model (NF4 + LoRA), not the merged one: the acceptance bound (kernel
    # accumulation order is the only difference).
    "nf4-exact": {"min_top1": 0.99, "max_kld": 1e-3},
}

GENAI_MISSING = ("onnxruntime-genai is not installed: the ONNX export is written and verified "
                 "with plain onnxruntime, but it was not test-loaded in onnxruntime-genai (its "
                 "genai_config.json is unchecked); install it with: pip install "
                 "onnxruntime-genai")


def has_genai() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def check_quant(quant: str, adapter_only: bool = False) -> str:
    """Normalise and validate ``quant`` before any work starts."""
    q = (quant or "").strip().lower()
    if q in FROM_ADAPTER_QUANTS:
        if adapter_only:
            raise ConfigError(f"quant={q} keeps the adapter inside the model; adapter-only "
                              f"ONNX exports take one of {', '.join(RECIPES)} for the base")
        require("onnx", "onnx", "ONNX export")
        require("onnxruntime", "onnx", "ONNX export")
        require("bitsandbytes", "train", f"{q} export (the NF4 codes come from bitsandbytes)")
        return q
    if q not in RECIPES:
        raise ConfigError(f"quant={quant!r} is not an ONNX quant; valid: {', '.join(QUANTS)}")
    require("onnx", "onnx", "ONNX export")
    require("onnxruntime", "onnx", "ONNX export")
    if RECIPES[q]["bits"] in (4, 8):
        # onnxruntime's MatMulNBitsQuantizer imports onnx_ir at module level.
        require("onnx_ir", "onnx", f"ONNX {q} quantization (onnxruntime's MatMulNBitsQuantizer)")
    return q


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in; unknown or out-of-range options named together in one ConfigError."""
    out = dict(DEFAULT_OPTIONS)
    problems = []
    for key, value in options.items():
        if key not in DEFAULT_OPTIONS:
            problems.append(f"unknown ONNX export option {key!r} (valid: "
                            f"{', '.join(DEFAULT_OPTIONS)})")
            continue
        if value is not None:
            out[key] = value
    bs = out["block_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
        problems.append(f"block_size={bs!r} must be a power of two >= 16 (MatMulNBits)")
    if out["accuracy_level"] not in (0, 1, 2, 3, 4):
        problems.append(f"accuracy_level={out['accuracy_level']!r} must be 0-4 (4 = int8 "
                        "activations, fastest on CPU)")
    if not isinstance(out["symmetric"], bool):
        problems.append(f"symmetric={out['symmetric']!r} must be true or false")
    ctx = out["context_length"]
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 16:
        problems.append(f"context_length={ctx!r} must be an integer >= 16")
    rows = out["calibration_rows"]
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        problems.append(f"calibration_rows={rows!r} must be an integer >= 1")
    try:
        check_share(out["calibration_general"], "calibration_general")
    except ConfigError as exc:
        problems.append(str(exc))
    if out["base_quant"] is not None and not isinstance(out["base_quant"], dict):
        problems.append(f"base_quant={out['base_quant']!r} must be the adapter's 4-bit config "
                        "(a dict: quant, block_size, double_quant, compute_dtype)")
    names = out["quantized"]
    if names is not None and (not isinstance(names, (list, tuple, set, frozenset))
                              or not all(isinstance(n, str) for n in names)):
        problems.append("quantized= must be a list of weight names (the layers the trained "
                        "model ran in 4 bits)")
    if problems:
        raise ConfigError(problems)
    return out


def check_recipe_options(quant: str, opts: dict[str, Any]) -> None:
    """Options a recipe cannot honour, refused before the slow part."""
    if quant in CALIBRATED and not opts["symmetric"]:
        raise ConfigError(f"quant={quant} writes symmetric blocks only; drop --asymmetric")


def calibration_request(quant: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """The calibration rows ``quant`` needs (the GPTQ recipes), or None. ``spec`` is
    ``calibration_data`` or ``"auto"`` (the data the adapter was fine-tuned on, which the export
    stage resolves); a data path that does not exist is refused here, before any work."""
    q = (quant or "").strip().lower()
    if q not in CALIBRATED:
        return None
    opts = check_options(options)
    check_recipe_options(q, opts)
    spec = str(opts["calibration_data"] or "auto")
    if spec != "auto":
        check_calibration_spec(spec)
    return {"spec": spec, "rows": opts["calibration_rows"], "max_len": CALIBRATION_MAX_LEN,
            "general": opts["calibration_general"], "what": "calibration data"}


def check_calibration_spec(spec: str) -> None:
    """A data spec that names nothing (a missing file, an unknown embedded set) fails here."""
    from edgeqlora.rows import check_spec

    try:
        check_spec(spec)
    except (InputError, DataError) as exc:
        raise type(exc)(f"calibration data: {exc}") from None


def default_thresholds(quant: str) -> dict[str, float]:
    return dict(VERIFY_THRESHOLDS[quant])


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint "
                         "(e.g. the output of 'edgeqlora merge')")
    cfg = read_json(path, InputError)
    return {**cfg, **cfg.get("text_config", {})}


def check_architecture(model_dir: Path) -> dict[str, Any]:
    cfg = read_config(model_dir)
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHS:
        raise InputError(f"{model_dir}: architecture {arch} (model_type "
                         f"{cfg.get('model_type')!r}) is not supported by the ONNX exporter; "
                         f"supported: {', '.join(ARCHS)}")
    rope = rope_types(cfg) & set(DYNAMIC_ROPE)
    if rope:
        raise InputError(f"{model_dir}: rope_type {sorted(rope)[0]!r} changes its frequencies "
                         "with the sequence length, which a traced ONNX graph cannot follow; "
                         "the ONNX exporter takes fixed RoPE only (default, linear, llama3, "
                         "yarn)")
    return cfg


def rope_types(cfg: dict[str, Any]) -> set[str]:
    """The RoPE types a config names (``rope_scaling``, transformers 5's ``rope_parameters``,
    whose Gemma 3 form holds one dict per layer type)."""
    found = set()
    for key in ("rope_scaling", "rope_parameters"):
        spec = cfg.get(key)
        if not isinstance(spec, dict):
            continue
        for d in [spec] + [v for v in spec.values() if isinstance(v, dict)]:
            kind = d.get("rope_type", d.get("type"))
            if isinstance(kind, str):
                found.add(kind)
    return found


def check_model(model_dir: str | Path, lora_keys: list[str] | None = None) -> None:
    """The exporter-interface check before the merge: the base's architecture, and for an
    adapter-only export that every LoRA sits on a decoder linear layer (the only ones that get
    LoRA inputs). The tokenizer is checked on the checkpoint written for the export, which may
    take it from the adapter."""
    check_architecture(Path(model_dir))
    outside = [k for k in lora_keys or () if ".layers." not in k]
    if outside:
        raise ConfigError(f"adapter-only ONNX export: LoRA on {', '.join(sorted(outside)[:3])} "
                          "has no matching linear layer in the exported graph (embedding or "
                          "output-head LoRA is not supported adapter-only); export the merged "
                          "model instead")


def check_model_dir(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's config, if the ONNX exporter can handle it; else a one-line error."""
    model_dir = Path(model_dir)
    cfg = check_architecture(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"{model_dir} has no tokenizer.json; the ONNX export ships the Hugging "
                         "Face tokenizer beside the model (copy tokenizer.json, "
                         "tokenizer_config.json and the chat template from the base model)")
    return cfg

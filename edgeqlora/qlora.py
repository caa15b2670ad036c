"""QLoRA model components: the quantized base, the LoRA adapters, and loading a trained adapter.

The recipe in ``train.py`` composes these; the merge/export and parity stages use
``load_trained`` as their reference model (the trained model exactly as it was trained).

- ``load_base``: a Hugging Face causal LM with 4-bit (NF4/FP4, bitsandbytes, double quantization),
  8-bit (LLM.int8) or unquantized weights. The compute dtype is bf16 on CUDA and fp32 on CPU, where
  bf16 matmuls are slow.
- ``attach_lora``: PEFT LoRA (rsLoRA and DoRA flags) on named target modules.
- ``load_trained``: the quantized base named by an adapter's manifest + ``PeftModel.from_pretrained``.
- ``quantization_loss``: what the quantized base loses against the full-precision one (top-1
  agreement and KL divergence of next-token distributions on held-out tokens).

The CPU repack trap (bitsandbytes 0.50, CPUs with AVX512-BF16): ``Linear4bit.forward`` in eval mode
on an input without grad repacks its weight into a CPU inference layout
(``quant_state.packing_format_for_cpu``) and from then on runs ``bitsandbytes::gemv_4bit``, which has
no autograd kernel, so every later backward through that layer is silently wrong (and the repacked
layer computes in bf16, so its logits differ too). ``guard_cpu_4bit`` turns the repack off per layer
and undoes one that already happened; every model this module returns is guarded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from .bnb_import import quiet_bnb_import
from .errors import ConfigError, InputError, ManifestError

# The attention projections, separate (most families) or fused (Phi-3's qkv_proj).
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
# Output heads are never LoRA targets (PEFT's "all-linear" leaves them out for the same reason:
# they are tied to the embeddings in small models and huge in all of them).
OUTPUT_LAYERS = ("lm_head",)
DTYPES = ("float32", "bfloat16", "float16")


def default_device():
    """CUDA (this process's GPU under torchrun) when available, else CPU."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_compute_dtype(compute_dtype: str, device) -> "Any":
    """``auto`` is bf16 on CUDA (fp16 where the GPU lacks bf16) and fp32 on CPU."""
    import torch

    device = torch.device(device)
    if compute_dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if compute_dtype not in DTYPES:
        raise ConfigError(f"compute_dtype={compute_dtype!r} is not one of auto, "
                          f"{', '.join(DTYPES)}")
    return getattr(torch, compute_dtype)


def guard_cpu_4bit(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (see the module
    docstring); undo a repack that already happened. Returns the number of 4-bit layers."""
    quiet_bnb_import(required=False)
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # Linear4bit.forward repacks only when this per-layer flag is set (it caches
            # has_avx512bf16() at construction), so clearing it keeps the autograd-safe
            # dequantize+matmul path in eval mode too. Same kernels as training: eval logits
            # equal training-mode logits.
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = (
                    _convert_weight_packed_for_cpu_inverse(module.weight.data, state))
            count += 1
    return count


@contextlib.contextmanager
def dequantized_weights(model, max_bytes: int = 2 * 2**30) -> Iterator[int]:
    """While inside, 4-bit layers on CPU use a weight dequantized once instead of at every call.

    On CPU bitsandbytes computes a 4-bit layer as ``linear(x, dequantize_4bit(W))`` forward and
    ``grad @ dequantize_4bit(W)`` backward, so every step (and, in greedy decoding, every
    generated token) dequantizes every weight again; caching the dequantized weight gives the
    same outputs (same dequantization, same ``linear``: bit-identical forward, tested) and the
    same input gradients, at the cost of holding the weights in the compute dtype. The cached
    weight is a plain tensor, not a parameter: gradients flow to the input (and so to the LoRA
    adapters around it), never into it. Skipped on GPU, where bitsandbytes has fused kernels and
    the memory is the point, and when the cache would exceed ``max_bytes``. Nesting is safe: an
    inner use leaves layers cached by an outer one alone. Yields the cached layer count.
    """
    quiet_bnb_import(required=False)
    try:
        import bitsandbytes as bnb
    except ImportError:
        yield 0
        return
    import torch.nn.functional as F

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
              and m.weight.device.type == "cpu" and m.compute_dtype is not None]
    size = sum(m.in_features * m.out_features * m.compute_dtype.itemsize for m in layers)
    if not layers or size > max_bytes:
        yield 0
        return
    guard_cpu_4bit(model)
    # A layer whose instance already has a forward is cached by an enclosing use.
    mine = [m for m in layers if "forward" not in vars(m)]

    def cached_forward(module, weight):
        def forward(x):
            inp_dtype = x.dtype
            x = x.to(module.compute_dtype)
            bias = None if module.bias is None else module.bias.to(x.dtype)
            return F.linear(x, weight, bias).to(inp_dtype)
        forward.weight = weight  # for trained_base_weights
        return forward

    for m in mine:
        weight = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        m.forward = cached_forward(m, weight.to(m.compute_dtype))
    try:
        yield len(layers)
    finally:
        for m in mine:
            del m.forward  # back to the class's forward


def trained_base_weights(model) -> dict[str, tuple[Any, Any]]:
    """Each 4-bit layer's dequantized weight and its bitsandbytes quant state, by the base
    checkpoint's tensor name (PEFT's ``base_model.model.`` and ``.base_layer`` taken off). The
    weight is the one ``dequantized_weights`` cached, when inside it, else dequantized now."""
    quiet_bnb_import()
    import bitsandbytes as bnb

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            key = name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight"
            weight = getattr(vars(m).get("forward"), "weight", None)
            if weight is None:
                weight = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            out[key] = (weight, m.weight.quant_state)
    return out


def cpu_repacked_layers(model) -> list[str]:
    """Names of 4-bit layers currently in bitsandbytes' CPU inference layout (should be none)."""
    return [name for name, module in model.named_modules()
            if getattr(getattr(getattr(module, "weight", None), "quant_state", None),
                       "packing_format_for_cpu", False)]


def _bnb_config(quant: str, double_quant: bool, dtype):
    from transformers import BitsAndBytesConfig

    if quant in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=dtype)
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(path, quant: str = "nf4", double_quant: bool = True, compute_dtype: str = "auto",
              device=None):
    """Load a local Hugging Face causal LM directory with quantized (or plain) weights.

    quant: ``nf4`` | ``fp4`` (bitsandbytes 4-bit, blocks of 64, ``double_quant`` quantizes the
    block scales too), ``int8`` (LLM.int8), ``none`` (weights in the compute dtype: plain LoRA),
    or a device base (``gguf-q4_k_m`` etc.: the exact bytes the export ships, ``device_base``).
    Non-quantized parameters (embeddings, norms) are kept in fp32 for quantized bases, as in the
    QLoRA paper. The returned model is guarded against the CPU repack trap.
    """
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"base model {path} is not a Hugging Face model directory "
                         "(no config.json); pass base=embedded or a local model directory")
    from .device_base import DEVICE_QUANTS, load_device_base

    if quant in DEVICE_QUANTS:
        return load_device_base(path, quant, compute_dtype, device, load_base)
    if quant not in ("nf4", "fp4", "int8", "none"):
        raise ConfigError(f"quant={quant!r} is not one of nf4, fp4, int8, none, "
                          f"{', '.join(DEVICE_QUANTS)}")
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_compute_dtype(compute_dtype, device)
    qconfig = _bnb_config(quant, double_quant, dtype)
    if qconfig is not None:
        quiet_bnb_import()
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per tensor group is noise; callers show theirs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                path, quantization_config=qconfig, dtype=dtype, device_map={"": device},
                trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load base model {path}: {exc}".splitlines()[0]) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if qconfig is not None:
        # QLoRA keeps what is not quantized in fp32 (norms, embeddings): bf16 norms lose the
        # small differences LoRA learns from.
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    model.requires_grad_(False)
    guard_cpu_4bit(model)
    return model


def quant_info(model, quant: str, double_quant: bool) -> dict[str, Any]:
    """The manifest's ``quant`` section, read from the loaded layers."""
    info: dict[str, Any] = {"quant": quant, "double_quant": bool(double_quant) and
                            quant in ("nf4", "fp4"), "block_size": None, "compute_dtype": None}
    quiet_bnb_import(required=False)
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    for module in model.modules():
        if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
            info["block_size"] = int(module.weight.quant_state.blocksize)
            info["compute_dtype"] = str(module.compute_dtype).replace("torch.", "")
            break
    if info["compute_dtype"] is None:
        info["compute_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    record = getattr(model, "edgeqlora_device_base", None)
    if record is not None:
        info["double_quant"] = False
        info["device"] = record
    return info


def linear_layer_names(model) -> list[str]:
    """Distinct leaf names of the model's linear layers (plain, 4-bit or 8-bit), output head
    excluded: the names LoRA can target."""
    import torch

    from .ggml_torch import GGMLLinear

    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (torch.nn.Linear, GGMLLinear)) and leaf not in OUTPUT_LAYERS and \
                ".lora_" not in name and "base_layer" != leaf:
            names.add(leaf)
    return sorted(names)


def resolve_targets(model, target: str) -> list[str]:
    """``all-linear``, ``attention`` or ``"q_proj,v_proj"`` -> explicit module names, checked
    against the model."""
    available = linear_layer_names(model)
    spec = target.strip()
    if spec == "all-linear":
        return available
    wanted = [t for t in ATTENTION_TARGETS if t in available] if spec == "attention" else \
        [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in available]
    if unknown or not wanted:
        raise ConfigError(
            f"lora.target={target!r}: no linear layer named {', '.join(unknown) or '(empty)'} in "
            f"this model; its linear layers are {', '.join(available)} (or use all-linear)")
    return wanted


def attach_lora(model, lora_cfg):
    """Wrap ``model`` in PEFT LoRA adapters from an ``edgeqlora.config.LoraConfig``.

    Only the adapters train (the base was frozen by ``load_base``). ``rslora`` scales by
    alpha/sqrt(r) instead of alpha/r; ``dora`` adds PEFT's weight-decomposed magnitude vectors
    (PEFT dequantizes 4-bit weights to compute the norm).
    """
    import warnings

    quiet_bnb_import(required=False)  # peft imports it when installed
    from peft import LoraConfig, get_peft_model

    if lora_cfg.r <= 0:
        raise ConfigError(f"lora.r={lora_cfg.r} must be a positive integer (try 8 or 16)")
    targets = resolve_targets(model, lora_cfg.target)
    peft_cfg = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=targets, use_rslora=lora_cfg.rslora, use_dora=lora_cfg.dora,
        bias="none", task_type="CAUSAL_LM",
    )
    from .device_base import is_packed

    if is_packed(model):  # a device-aware base holding packed GGML layers (GPU)
        from .ggml_torch import register_lora

        register_lora(peft_cfg)
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 property that warns about its own rename.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, peft_cfg)
    guard_cpu_4bit(peft_model)
    return peft_model


def lora_info(peft_model, lora_cfg) -> dict[str, Any]:
    """The manifest's ``lora`` section."""
    cfg = peft_model.peft_config["default"]
    return {"r": lora_cfg.r, "alpha": lora_cfg.alpha, "dropout": lora_cfg.dropout,
            "target_modules": sorted(cfg.target_modules), "rslora": lora_cfg.rslora,
            "dora": lora_cfg.dora}


def load_trained(adapter_dir, device=None):
    """The trained model exactly as trained: the quantized base named in ``adapter_dir``'s
    manifest (checked by weight hash) + the PEFT adapter, in eval mode, safe for forward passes
    (guarded against the CPU repack trap)."""
    import warnings

    quiet_bnb_import(required=False)  # peft imports it when installed
    from peft import PeftModel

    from .artifacts import check_lora_config, read_json, read_verified_manifest
    from .base import base_fingerprint, resolve_base

    adapter_dir = Path(adapter_dir)
    manifest = read_verified_manifest(adapter_dir, "adapter", "adapter")

    config = adapter_dir / "adapter_config.json"
    if config.is_file():
        check_lora_config(read_json(config), config)  # before PEFT meets it
    base = manifest.get("base", {})
    quant = manifest.get("quant", {})
    path = Path(base.get("path", ""))
    if not (path / "config.json").is_file():
        # The run may have happened on another machine: resolve the spec again.
        path = resolve_base(base.get("spec", "embedded"))
    found = base_fingerprint(path)["weights_sha256"]
    if base.get("weights_sha256") and found != base["weights_sha256"]:
        raise ManifestError(
            f"adapter {adapter_dir} was trained on a base with weights sha256 "
            f"{base['weights_sha256'][:16]}..., but {path} has {found[:16]}...; pass the same "
            "base the adapter was trained on")
    model = load_base(path, quant=quant.get("quant", "nf4"),
                      double_quant=quant.get("double_quant", True),
                      compute_dtype=_trained_dtype(quant.get("compute_dtype", "auto"), device),
                      device=device)
    if getattr(model, "edgeqlora_device_base", None) is not None:
        from .device_base import check_recorded

        check_recorded(model.edgeqlora_device_base, quant.get("device"), f"adapter {adapter_dir}")
    kwargs = {}
    from .device_base import is_packed

    if is_packed(model):
        quiet_bnb_import(required=False)  # peft imports it when installed
        from peft import LoraConfig

        from .ggml_torch import register_lora

        kwargs["config"] = register_lora(LoraConfig.from_pretrained(adapter_dir))
    with warnings.catch_warnings():
        # As in attach_lora: peft's own call of a property transformers 5 renamed.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False, **kwargs)
    guard_cpu_4bit(model)
    model.eval()
    return model


def _trained_dtype(recorded: str, device) -> str:
    """The compute dtype recorded at training time, unless that is a half type and we now run
    on CPU (bf16 matmuls there are slow and not what CPU training used)."""
    import torch

    device = torch.device(device) if device is not None else default_device()
    if recorded in DTYPES and (device.type == "cuda" or recorded == "float32"):
        return recorded
    return "auto"


def logit_agreement(ref_logits, cand_logits) -> dict[str, float]:
    """Top-1 agreement and mean KL(ref || cand) of next-token distributions, over all positions
    of two ``[..., vocab]`` logit tensors (``edgeqlora.metrics``: numpy, float64)."""
    from .metrics import Agreement

    acc = Agreement()
    acc.add(ref_logits.reshape(-1, ref_logits.shape[-1]).float().cpu().numpy(),
            cand_logits.reshape(-1, cand_logits.shape[-1]).float().cpu().numpy())
    return acc.result()


def quantization_loss(model_fp, model_q, token_ids) -> dict[str, float]:
    """Top-1 agreement and mean KLD of ``model_q`` (e.g. the NF4 base) against ``model_fp`` (the
    16/32-bit base) on ``token_ids`` (a 1-D or ``[batch, seq]`` tensor, or a list of ids)."""
    import torch

    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.numel() < 2:
        raise InputError("quantization_loss needs at least 2 tokens")
    guard_cpu_4bit(model_q)
    was = (model_fp.training, model_q.training)
    model_fp.eval()
    model_q.eval()
    with torch.no_grad():
        ref = model_fp(ids.to(model_fp.device)).logits
        cand = model_q(ids.to(model_q.device)).logits
    model_fp.train(was[0])
    model_q.train(was[1])
    return logit_agreement(ref, cand.to(ref.device))


# Architectures whose causal-LM head is exactly ``lm_head(decoder(x))`` (no logit soft-capping or
# scaling), so the loss can project only the positions that carry a label.
_PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2")


def attention_kind(model) -> str:
    """The model's attention implementation (``sdpa``, ``eager``, ``flash_attention_2``...)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(inner.config, "_attn_implementation", None) or "eager")


def supports_shared_prefix(model) -> bool:
    """Whether ``token_loss`` can take shared-prefix rows (a custom 4D attention mask): sdpa and
    eager attention take one as it is; flash attention does not."""
    return attention_kind(model) in ("sdpa", "eager")


def token_loss(model, batch) -> tuple["Any", int]:
    """Sum of next-token cross-entropy over the positions with a label (-100 = no label), and
    how many there are: ``(loss_sum, n_tokens)``.

    Answer-only training labels a fraction of the tokens (the assistant's answer), so for plain
    heads the output projection and the softmax over the vocabulary run only on those positions:
    on a 49k vocabulary that is most of the memory of a step and a good share of its time.
    ``batch`` holds ``input_ids``, ``labels`` and optionally ``attention_mask`` / ``position_ids``
    (packed rows: position ids restart per example and examples do not attend to each other;
    shared-prefix rows: a boolean 4D mask, see ``data.collate_shared_prefix``).
    """
    import torch
    import torch.nn.functional as F

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != -100
    n_tokens = int(mask.sum())
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
    mask4d = kwargs.get("attention_mask")
    if mask4d is not None and mask4d.dim() == 4 and mask4d.dtype == torch.bool \
            and attention_kind(inner) != "sdpa":
        # Shared-prefix rows carry a boolean "may attend" mask; eager attention adds its mask
        # to the scores, so it needs the additive form.
        kwargs["attention_mask"] = torch.zeros(mask4d.shape, dtype=torch.float32,
                                               device=mask4d.device).masked_fill(
            ~mask4d, torch.finfo(torch.float32).min)
    if getattr(inner.config, "model_type", None) in _PLAIN_HEAD_TYPES:
        hidden = inner.get_decoder()(input_ids=batch["input_ids"], use_cache=False,
                                     **kwargs).last_hidden_state
        logits = inner.get_output_embeddings()(hidden[:, :-1][mask])
    else:
        logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[:, :-1][mask]
    loss_sum = F.cross_entropy(logits.float(), targets[mask], reduction="sum")
    return loss_sum, n_tokens

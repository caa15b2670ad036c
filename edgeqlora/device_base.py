"""Device-aware bases: train the adapter on the exact quantized base the device will run.

``quant=gguf-q4_k_m`` (and ``gguf-q4_0``, ``gguf-q4_1``, ``gguf-q5_k_m``, ``gguf-q6_k``, ``gguf-q8_0``) quantizes
the base once with the GGUF exporter's own code (``exporters.gguf.tensor_bytes``: llama.cpp's
per-tensor type choice and ``ggml_quantize_chunk``, the function the export writes the base GGUF
with), and every weight of the training model (linear layers, embedding, output head) becomes
``gguf.quants.dequantize`` of those bytes (bit-exact with ggml's to-float; ``ggml_torch`` does the
same in torch, tested against it), moved back from llama.cpp's RoPE row order to Hugging Face's.
Norms stay F32 in the GGUF, so they are the checkpoint's own values.

The sha256 of every tensor's bytes goes into the adapter manifest (``quant.device``); the export
writes the base GGUF with the same function, checks each tensor against it, and ships the LoRA
unmerged beside it: the device then runs the trained model, up to llama.cpp's 8-bit activation
rounding in its quantized dot products.

On CPU the dequantized weights are held as plain fp32 tensors (what ``qlora.dequantized_weights``
does for NF4: faster than dequantizing at every call). On a GPU the decoder's linear layers hold
the packed bytes instead (``ggml_torch.GGMLLinear``: 4.5-8.5 bits a weight, dequantized on the
fly, bit-exact with the fp32 path), as bitsandbytes holds NF4; embeddings and norms stay dense,
as in QLoRA.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .errors import ConfigError, ManifestError

# quant= value -> (export target, the exporter's quant)
DEVICE_QUANTS = {"gguf-q4_0": ("gguf", "q4_0"), "gguf-q4_1": ("gguf", "q4_1"),
                 "gguf-q4_k_m": ("gguf", "q4_k_m"),
                 "gguf-q5_k_m": ("gguf", "q5_k_m"), "gguf-q6_k": ("gguf", "q6_k"),
                 "gguf-q8_0": ("gguf", "q8_0")}


def is_device_quant(quant: str | None) -> bool:
    return quant in DEVICE_QUANTS


def device_target(quant_record: dict[str, Any]) -> tuple[str, str] | None:
    """(target, quant) an adapter's manifest ``quant`` section was trained for, or None."""
    return DEVICE_QUANTS.get(quant_record.get("quant"))


def check_model(path: Path, quant: str) -> None:
    """The exporter must be able to write this architecture at this quant (one line if not),
    before any weight is loaded."""
    from .exporters import get_exporter

    target, q = DEVICE_QUANTS[quant]
    exporter = get_exporter(target)
    try:
        exporter.check_model(path)
    except Exception as exc:
        raise ConfigError(f"quant={quant}: {exc}".splitlines()[0]) from None
    exporter.check_quant(q)


def device_state(base_dir: Path, quant: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the dequantized weights by checkpoint tensor name as float32 torch tensors, the
    manifest record: target, quant, per-tensor GGUF name, type and sha256 of its bytes)."""
    import gguf
    import numpy as np
    import torch

    from .exporters.gguf import read_config, tensor_bytes
    from .exporters.gguf.kernels import unpermute_qk
    from .exporters.gguf.writer import rope_heads

    target, q = DEVICE_QUANTS[quant]
    heads = rope_heads(read_config(Path(base_dir)))
    state: dict[str, Any] = {}
    tensors: dict[str, dict[str, Any]] = {}
    packed: dict[str, tuple[Any, Any]] = {}
    for t, raw in tensor_bytes(base_dir, q):
        if t["src"] is None:
            continue  # made by the plan (Llama 3's rope_freqs), not a weight of the model
        qtype = t["qtype"]
        data = np.frombuffer(raw, dtype=np.uint8)
        w = gguf.quants.dequantize(data, qtype).reshape(t["shape"])
        if t.get("shift"):
            # Gemma's norms are stored as 1 + w and trained as w: (1 + w) - 1 is exact for
            # |w| < 1 (Sterbenz), so the model adds back exactly the stored value.
            w = w - np.float32(t["shift"])
        if t["permute"]:
            w = unpermute_qk(w, *heads[t["permute"]])
        if len(t["shape"]) == 2 and qtype.name not in ("F32", "F16"):
            # Whole rows of blocks move with the RoPE row order: exact.
            rows = data.reshape(t["shape"][0], -1)
            packed[t["src"]] = (unpermute_qk(rows, *heads[t["permute"]]) if t["permute"]
                                else rows, qtype)
        state[t["src"]] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
        tensors[t["src"]] = {"gguf": t["name"], "type": qtype.name,
                             "sha256": hashlib.sha256(raw).hexdigest()}
    digest = hashlib.sha256("".join(v["sha256"] for v in tensors.values()).encode())
    return state, {"target": target, "quant": q, "tensors": tensors,
                   "data_sha256": digest.hexdigest(), "packed": packed}


def apply_state(model, state: dict[str, Any]) -> int:
    """Set the model's parameters to ``state`` (tied weights once); returns how many."""
    import torch

    done = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = name.removeprefix("base_model.model.")
            if key in state:
                param.data = state[key].to(param.dtype).to(param.device)
                done += 1
    return done


def pack_linear_layers(model, packed: dict[str, tuple[Any, Any]]) -> int:
    """Replace every linear layer whose weight has packed bytes by a ``GGMLLinear`` holding
    them (on the layer's device); returns how many."""
    import numpy as np
    import torch

    from .ggml_torch import GGMLLinear

    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.weight" in packed:
            swaps.append((name, module))
    for name, module in swaps:
        rows, qtype = packed[f"{name}.weight"]
        layer = GGMLLinear.from_bytes(np.ascontiguousarray(rows), qtype, tuple(module.weight.shape),
                                      None if module.bias is None else module.bias.detach().cpu())
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                layer.to(module.weight.device))
    return len(swaps)


def load_device_base(path: Path, quant: str, compute_dtype: str, device, load_plain,
                     packed: bool | None = None):
    """The base at ``path`` with every quantized tensor replaced by the dequantization of its
    device bytes; ``load_plain`` loads the plain model (``qlora.load_base(quant="none")``).
    ``packed`` (default: on CUDA) holds the linear layers' bytes in ``GGMLLinear`` layers. The
    manifest record is left on the model as ``edgeqlora_device_base``."""
    import torch

    check_model(path, quant)
    model = load_plain(path, quant="none", compute_dtype=compute_dtype, device=device)
    state, record = device_state(path, quant)
    layers = record.pop("packed")
    apply_state(model, state)
    on_gpu = next(model.parameters()).device.type == "cuda"
    if packed if packed is not None else on_gpu:
        pack_linear_layers(model, layers)
        if on_gpu:
            torch.cuda.empty_cache()
    model.edgeqlora_device_base = record
    return model


def is_packed(model) -> bool:
    from .ggml_torch import GGMLLinear

    return any(isinstance(m, GGMLLinear) for m in model.modules())


def check_recorded(record: dict[str, Any], recorded: dict[str, Any] | None, where: str) -> None:
    """The device bytes made now must be the ones the adapter was trained on (a llama.cpp or
    gguf upgrade could change a kernel): one line naming the first tensor that differs."""
    if not recorded:
        raise ManifestError(f"{where}: the adapter's manifest has no quant.device record of the "
                            "base it was trained on; train it again with this version")
    if record["data_sha256"] == recorded.get("data_sha256"):
        return
    for name, t in record["tensors"].items():
        want = recorded.get("tensors", {}).get(name, {}).get("sha256")
        if want != t["sha256"]:
            raise ManifestError(
                f"{where}: the {record['quant']} bytes of {name} ({t['gguf']}, {t['type']}) "
                f"are not the ones the adapter was trained on (sha256 {t['sha256'][:12]}..., "
                f"recorded {str(want)[:12]}...); llama-cpp-python or gguf changed since "
                "training: install the versions in the adapter's manifest or train again")
    raise ManifestError(f"{where}: the device base has other tensors than the adapter was "
                        "trained on; train it again with this version")


def export_quant(quant_record: dict[str, Any], adapter_dir, target: str,
                 quant: str | None) -> str | None:
    """The quant an export of a device-aware adapter writes (the one it was trained on), or
    None for an adapter trained on another base. Another target or quant would re-quantize a
    merge of it: refused in one line naming both, unless the export merges (``--merge``)."""
    trained_for = device_target(quant_record)
    if trained_for is None:
        return None
    want_target, want_quant = trained_for
    if target != want_target or (quant is not None and quant != want_quant):
        raise ConfigError(
            f"adapter {adapter_dir} was trained on the {want_target} {want_quant} base "
            f"(quant={quant_record['quant']}); exporting it to {target} {quant or ''} would "
            f"re-quantize a merge: export --target {want_target} --quant {want_quant} (the "
            "trained base + the LoRA, unmerged), or pass --merge to merge and re-quantize")
    return want_quant


def lora_precision(adapter_dir: Path) -> str:
    """The adapter GGUF type that keeps the LoRA at its own precision: f32, or f16 for a
    half-precision adapter."""
    from .artifacts import safetensors_specs

    dtypes = {dtype for _, _, _, dtype in safetensors_specs(Path(adapter_dir), "adapter")}
    return "f32" if dtypes <= {"F32"} else "f16"


def check_written(model_file: Path, recorded: dict[str, Any]) -> int:
    """Every tensor of the written base GGUF must be byte-identical to the one the adapter was
    trained on (sha256 per tensor, from the adapter manifest). Returns how many were checked."""
    from .exporters.gguf import tensor_digests

    digests = tensor_digests(model_file)
    for name, t in recorded["tensors"].items():
        if digests.get(t["gguf"]) != t["sha256"]:
            raise ManifestError(
                f"the base GGUF's {t['gguf']} ({name}) is not the {t['type']} tensor the "
                f"adapter was trained on (sha256 {str(digests.get(t['gguf']))[:12]}..., trained "
                f"{t['sha256'][:12]}...); nothing was written. The base checkpoint or "
                "llama-cpp-python/gguf changed since training: restore them or train again")
    return len(recorded["tensors"])


def check_merge(quant_record: dict[str, Any], adapter_dir, target: str, quant: str,
                merge_base: str) -> None:
    """``--merge`` back into the quant a device-aware adapter was trained on, from its trained
    (dequantized) base, is refused: that base already sits on the quant's grid, and most LoRA
    deltas are smaller than half a grid step, so re-quantizing rounds them back to the base
    (measured on the quickstart: exact match 72.5 % -> 0 %, KLD 0.98 against the merge)."""
    trained_for = device_target(quant_record)
    if trained_for == (target, quant) and merge_base != "original":
        raise ConfigError(
            f"adapter {adapter_dir} was trained on the {target} {quant} base: merging it into "
            f"that base and re-quantizing to {quant} rounds most of the LoRA away (the base is "
            f"already on {quant}'s grid). Ship it unmerged (drop --merge), or merge into the "
            "original weights (--merge --merge-base original)")

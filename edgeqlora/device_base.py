"""Device-aware bases: train the adapter on the exact quantized base the device will run.

GGUF: ``quant=gguf-q4_k_m`` (and ``gguf-q4_0``, ``gguf-q4_1``, ``gguf-q5_k_m``, ``gguf-q6_k``,
``gguf-q8_0``) quantizes the base once with the GGUF exporter's own code
(``exporters.gguf.tensor_bytes``: llama.cpp's per-tensor type choice and ``ggml_quantize_chunk``,
the function the export writes the base GGUF with), and every weight of the training model (linear
layers, embedding, output head) becomes ``gguf.quants.dequantize`` of those bytes (bit-exact with
ggml's to-float; ``ggml_torch`` does the same in torch, tested against it), moved back from
llama.cpp's RoPE row order to Hugging Face's. Norms stay F32 in the GGUF, so they are the
checkpoint's own values.

The sha256 of every tensor's bytes goes into the adapter manifest (``quant.device``); the export
writes the base GGUF with the same function, checks each tensor against it, and ships the LoRA
unmerged beside it: the device then runs the trained model, up to llama.cpp's 8-bit activation
rounding in its quantized dot products.

ONNX: ``quant=onnx-int4`` (or ``onnx-int4-q8head``: the head and a tied embedding at 8 bits)
traces and quantizes the base with the ONNX exporter's own path
(``exporters.onnx.device.tensor_bytes``: onnxruntime's MatMulNBits quantizer, round to
nearest, blocks of 32, symmetric) and every linear layer, the output head and the token
embedding become the dequantization of those bytes (equal to onnxruntime's kernels, tested);
the export writes the int4 base graph the same way, checks each tensor, and ships the LoRA as
an onnxruntime adapter file beside it (the ``--adapter-only`` layout). ``quant=onnx-int4-hqq``:
the same with onnxruntime's HQQ quantizer (a scale and a float zero point a block, optimised
without data); a tied embedding keeps a 4-bit table of its own there, so the training model
gets an untied head (``untie_head``).

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
                 "gguf-q8_0": ("gguf", "q8_0"), "onnx-int4": ("onnx", "int4"),
                 "onnx-int4-q8head": ("onnx", "int4-q8head"),
                 "onnx-int4-hqq": ("onnx", "int4-hqq")}


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
    manifest record: target, quant, per-tensor name in the export's file, type and sha256 of its
    bytes, and ``packed``: the layers' bytes for ``GGMLLinear``, popped before it is recorded)."""
    target, q = DEVICE_QUANTS[quant]
    state, record = (_gguf_state if target == "gguf" else _onnx_state)(Path(base_dir), q)
    digest = hashlib.sha256("".join(v["sha256"] for v in record["tensors"].values()).encode())
    return state, {"target": target, "quant": q, **record, "data_sha256": digest.hexdigest()}


def _gguf_state(base_dir: Path, q: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import gguf
    import numpy as np
    import torch

    from .exporters.gguf import read_config, tensor_bytes
    from .exporters.gguf.kernels import unpermute_qk
    from .exporters.gguf.writer import rope_heads

    heads = rope_heads(read_config(base_dir))
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
    return state, {"tensors": tensors, "packed": packed}


def _onnx_state(base_dir: Path, q: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The int4 graph's quantized weights; norms and biases stay fp32 in the graph, so they are
    the checkpoint's own values. The linear layers' blocks are also kept packed (``NBits``) for
    ``GGMLLinear``; a head tied to the embedding stays dense, as the embedding does."""
    import numpy as np
    import torch

    from .exporters.onnx.device import dequantize, tensor_bytes
    from .ggml_torch import NBits

    weights, options = tensor_bytes(base_dir, q)
    tied = any("shared_with" in w for w in weights)
    state: dict[str, Any] = {}
    tensors: dict[str, dict[str, Any]] = {}
    packed: dict[str, tuple[Any, Any]] = {}
    for w in weights:
        state[w["src"]] = torch.from_numpy(dequantize(w["arrays"], w["bits"], w["block_size"],
                                                      w["shape"]))
        tensors[w["src"]] = {"onnx": w["node"],
                             "type": f"{w['op']} {w['bits']}-bit"
                                     f"{' + zero points' if len(w['arrays']) > 2 else ''}, "
                                     f"block {w['block_size']}",
                             "sha256": w["sha256"]}
        zero_points = len(w["arrays"]) == 3 and w["arrays"][2].dtype == np.float32  # HQQ's
        if (w["op"] == "MatMulNBits" and w["bits"] == 4 and (len(w["arrays"]) == 2 or zero_points)
                and "shared_with" not in w and not (tied and w["src"] == "lm_head.weight")):
            kind = NBits(w["block_size"], zero_points)
            packed[w["src"]] = (kind.pack(*w["arrays"][:2], w["shape"][0],
                                          *w["arrays"][2:]), kind)
    return state, {"options": options, "tensors": tensors, "packed": packed}


def apply_state(model, state: dict[str, Any]) -> int:
    """Set the model's parameters to ``state`` (tied weights once, unless the device base holds
    two different tensors for them: ``untie_head``); returns how many."""
    import torch

    untie_head(model, state)
    done = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = name.removeprefix("base_model.model.")
            if key in state:
                param.data = state[key].to(param.dtype).to(param.device)
                done += 1
    return done


def untie_head(model, state: dict[str, Any]) -> bool:
    """Give a tied model's output head a weight of its own when the device base has different
    bytes for the head and the embedding (``onnx-int4-hqq``: the HQQ head's float zero points
    cannot be read by GatherBlockQuantized, so the export keeps a 4-bit embedding table of its
    own). The config then says the weights are untied, so nothing ties them again."""
    import torch

    head = separate_head(state)
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or out is None or inp is None or out.weight is not inp.weight:
        return False
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    out.weight = torch.nn.Parameter(head.to(inp.weight.dtype).to(inp.weight.device),
                                    requires_grad=inp.weight.requires_grad)
    return True


def separate_head(state: dict[str, Any]):
    """The output head of a device base's ``state`` when it differs from the token embedding
    (``onnx-int4-hqq``; see ``untie_head``), else None."""
    import torch

    head, table = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is None or table is None or torch.equal(head, table):
        return None
    return head


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
                f"{where}: the {record['quant']} bytes of {name} ({_file_name(record, t)}, "
                f"{t['type']}) are not the ones the adapter was trained on (sha256 "
                f"{t['sha256'][:12]}..., recorded {str(want)[:12]}...); "
                f"{_KERNELS[_target(record)]} changed since training: install the versions in "
                "the adapter's manifest or train again")
    raise ManifestError(f"{where}: the device base has other tensors than the adapter was "
                        "trained on; train it again with this version")


def trained_target(quant_record: dict[str, Any], merge: bool = False) -> str:
    """The target an adapter exports to by default: the one a device-aware adapter was trained
    for (unless it is merged), gguf otherwise."""
    trained_for = None if merge else device_target(quant_record)
    return trained_for[0] if trained_for else "gguf"


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
    """The adapter file type that keeps the LoRA at its own precision: f32, or f16 for a
    half-precision adapter (GGUF; ONNX adapter files are always f32)."""
    from .artifacts import safetensors_specs

    dtypes = {dtype for _, _, _, dtype in safetensors_specs(Path(adapter_dir), "adapter")}
    return "f32" if dtypes <= {"F32"} else "f16"


# What makes a target's device bytes, named when they changed since training.
_KERNELS = {"gguf": "llama-cpp-python or gguf", "onnx": "onnxruntime, onnx or torch"}


def _target(record: dict[str, Any]) -> str:
    return record.get("target", "gguf")  # records older than ONNX device bases are GGUF's


def _file_name(record: dict[str, Any], tensor: dict[str, Any]) -> str:
    """A recorded tensor's name in the export's file (GGUF tensor, ONNX node)."""
    return tensor["gguf" if _target(record) == "gguf" else "onnx"]


def check_written(model_file: Path, recorded: dict[str, Any]) -> int:
    """Every tensor of the written base (GGUF, or the ONNX graph's quantized nodes) must be
    byte-identical to the one the adapter was trained on (sha256 per tensor, from the adapter
    manifest). Returns how many were checked."""
    target = _target(recorded)
    if target == "gguf":
        from .exporters.gguf import tensor_digests
    else:
        from .exporters.onnx.device import tensor_digests

    digests = tensor_digests(model_file)
    for name, t in recorded["tensors"].items():
        where = _file_name(recorded, t)
        if digests.get(where) != t["sha256"]:
            raise ManifestError(
                f"the base {target.upper()}'s {where} ({name}) is not the {t['type']} tensor the "
                f"adapter was trained on (sha256 {str(digests.get(where))[:12]}..., trained "
                f"{t['sha256'][:12]}...); nothing was written. The base checkpoint or "
                f"{_KERNELS[target]} changed since training: restore them or train again")
    return len(recorded["tensors"])


# MatMulNBits' accuracy level of a device-aware ONNX export, by base. int4: 0 computes in float32
# from the trained bytes, so onnxruntime runs the trained model itself (the quickstart, 50 parity
# commands: KLD 4e-11, top-1 100 %, 50/50 identical answers; 13.1 decode tokens/s on one thread
# against 22.3 at level 4, whose 8-bit activations read KLD 0.002-0.0035, top-1 95-98 %, 48/50:
# bench/results/decode_speed_onnx_device.json). int4-q8head: 4, because its 8-bit head has no
# fast float32 kernel (2.3 tokens/s at level 0). int4-hqq: 0, because onnxruntime 1.32 computes
# float zero points in float32 at any level (4.6 vs 4.8 tokens/s, KLD 9e-12 at level 4:
# bench/results/decode_speed_onnx_hqq_device.json). ``--accuracy-level`` chooses either way.
DEVICE_ACCURACY_LEVEL = {"int4": 0, "int4-q8head": 4, "int4-hqq": 0}


def export_options(quant_record: dict[str, Any], options: dict[str, Any],
                   given: dict[str, Any]) -> dict[str, Any]:
    """An ONNX device base's byte options (block size, symmetry) as trained (``quant_record``:
    the adapter manifest's ``quant``), refusing a different one asked for (``given``: what the
    caller set) in one line; its accuracy level from ``DEVICE_ACCURACY_LEVEL`` unless the
    caller set one."""
    recorded = quant_record.get("device") or {}
    trained = recorded.get("options") or {}
    for key, value in trained.items():
        if key in given and given[key] is not None and given[key] != value:
            raise ConfigError(f"the adapter was trained on the {recorded['quant']} base made "
                              f"with {key}={value}; {key}={given[key]} would ship another base "
                              f"(drop the option, or --merge to re-quantize)")
    options = {**options, **trained}
    if _target(recorded) == "onnx" and given.get("accuracy_level") is None:
        options["accuracy_level"] = DEVICE_ACCURACY_LEVEL.get(recorded.get("quant"), 4)
    return options


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

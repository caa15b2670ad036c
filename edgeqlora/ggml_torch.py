"""GGML block types in torch: dequantization bit-exact with llama.cpp's gguf-py, and a frozen
linear layer whose weight stays packed (device-aware QLoRA).

Device-aware QLoRA trains LoRA adapters over the exact GGUF-quantized weights the device will run
(e.g. the Q4_K / Q5_0 / Q6_K / Q8_0 tensors of a Q4_K_M file) instead of NF4. The trainer keeps the
packed GGML blocks on the GPU and dequantizes them on the fly, as bitsandbytes does for NF4.

- ``dequantize(data, qtype, shape)``: the float32 values of a tensor's raw GGML bytes, bit for bit
  ``gguf.quants.dequantize`` (numpy). Pure torch, vectorised over all blocks, same code on CPU and
  CUDA. Each ``_dequant_*`` below follows the ``dequantize_blocks`` of the same name in gguf-py's
  ``quants.py`` (gguf 0.19) op for op: the same float32 operations in the same order (``d * sc``
  first, then ``* q``, then ``- dm * m``), f16 scales widened to float32 where it widens them, and
  nothing torch could fuse into an FMA. Integer work (bit unpacking, offsets) is exact. Why this
  holds on any IEEE backend, CUDA included: an f16 scale has 11 significant bits and the integers
  it meets (sub-block scales, quants) at most 13 together, so every product fits float32's 24-bit
  significand, far from its subnormals, and is exact; only the final ``+ m`` / ``- dm`` rounds,
  once, correctly rounded everywhere (an FMA would give the same bits).
- ``GGMLLinear``: a frozen ``y = x W^T + b`` whose ``W`` is a uint8 buffer of GGML bytes; forward
  dequantizes into float32, casts to ``x.dtype`` and calls ``F.linear``; backward re-dequantizes
  instead of keeping the dense weight alive (like bitsandbytes' ``MatMul4Bit``).
- ``register_lora(config)``: lets PEFT's LoRA target ``GGMLLinear`` layers by ``target_modules``.
- ``NBits``: one more block type beside GGML's, for the ONNX int4 device bases (``onnx-int4``,
  ``onnx-int4-hqq``): onnxruntime's MatMulNBits 4-bit blocks, laid out here per block as the
  float32 scale (and HQQ's float32 zero point) then the packed values (low nibble first),
  dequantized as ``(q - 8) * scale`` (one rounding) or ``q * scale - zero point * scale``: the
  same float32 operations as ``exporters.onnx.device.dequantize``.

Byte order: GGUF is little-endian and so is every host we run on; the f16 fields are read by
viewing their two bytes as float16, as gguf-py does with numpy.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .errors import ConfigError

SUPPORTED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class NBits:
    """MatMulNBits' 4-bit blocks of ``block_size`` values as one GGML-like block: the float32
    scale, then (``zero_points``: HQQ's float32 zero point of the block, ``onnx-int4-hqq``) the
    values, two a byte, low nibble first; zero point 8 without one. ``4 (+ 4) + block_size / 2``
    bytes. Used as a ``qtype`` wherever one is taken."""

    def __init__(self, block_size: int = 32, zero_points: bool = False):
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"MatMulNBits block size {block_size}: a power of two >= 16")
        self.block_size = int(block_size)
        self.zero_points = bool(zero_points)
        self.head = 8 if self.zero_points else 4
        self.type_size = self.head + self.block_size // 2
        self.name = f"ONNX_Q4{'_ZP' if self.zero_points else ''}_B{self.block_size}"

    def __eq__(self, other) -> bool:
        return isinstance(other, NBits) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def pack(self, data, scales, n: int, zero_points=None) -> Any:
        """uint8 ``[n, row bytes]`` from MatMulNBits' B ``[n, blocks, block_size / 2]``, scales
        (``n * blocks`` float32) and, with ``zero_points``, HQQ's float32 zero points; numpy."""
        import numpy as np

        if (zero_points is not None) != self.zero_points:
            raise ValueError(f"{self.name} blocks {'need' if self.zero_points else 'have no'} "
                             "zero points")
        data = np.asarray(data, dtype=np.uint8).reshape(n, -1, self.block_size // 2)
        fields = [np.asarray(scales, dtype=np.float32)]
        if zero_points is not None:
            fields.append(np.asarray(zero_points, dtype=np.float32))
        fields = [np.ascontiguousarray(f.reshape(n, -1, 1)).view(np.uint8) for f in fields]
        return np.concatenate([*fields, data], axis=2).reshape(n, -1)


def _dequant_nbits(blocks: torch.Tensor, q: NBits) -> torch.Tensor:
    n = blocks.shape[0]
    scale = blocks[:, :4].contiguous().view(torch.float32)
    packed = blocks[:, q.head:]
    v = torch.stack([packed & 0x0F, torch.bitwise_right_shift(packed, 4)], dim=-1).reshape(n, -1)
    if q.zero_points:  # as onnxruntime computes HQQ's blocks: q * scale - zero point * scale
        zp = blocks[:, 4:8].contiguous().view(torch.float32)
        return v.to(torch.float32) * scale - zp * scale
    return (v.to(torch.float32) - 8.0) * scale


def _sizes(q) -> tuple[int, int]:
    """(values, bytes) of one block of ``q``."""
    import gguf

    return (q.block_size, q.type_size) if isinstance(q, NBits) else gguf.GGML_QUANT_SIZES[q]


def _qtype(qtype):
    """A ``gguf.GGMLQuantizationType`` from the type, its name ("Q4_K") or its number; an
    ``NBits`` as it is."""
    import gguf

    if isinstance(qtype, NBits):
        return qtype

    Q = gguf.GGMLQuantizationType
    try:
        q = Q[qtype.upper()] if isinstance(qtype, str) else Q(qtype)
    except (KeyError, ValueError):
        raise ValueError(f"unknown GGML type {qtype!r}; supported: "
                         f"{', '.join(SUPPORTED)}") from None
    if q.name not in SUPPORTED:
        raise ValueError(f"GGML type {q.name} has no torch dequantizer; supported: "
                         f"{', '.join(SUPPORTED)}")
    return q


def row_bytes(qtype, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` values stored as ``qtype``."""
    q = _qtype(qtype)
    block_size, type_size = _sizes(q)
    if n_per_row % block_size:
        raise ValueError(f"a {q.name} row holds a whole number of {block_size}-value blocks; "
                         f"{n_per_row} values is not one")
    return n_per_row // block_size * type_size


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 field at byte ``start`` of every block, widened to float32 ([n, 1]) as gguf-py's
    ``d.view(np.float16).astype(np.float32)`` does (exact)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _bits(x: torch.Tensor, group: int, width: int) -> torch.Tensor:
    """gguf-py's unpacking idiom ``(x.reshape((n, -1, 1, group)) >> shifts) & mask`` with shifts
    0, width, 2*width ... < 8: each byte of a ``group``-byte run gives 8 // width fields, runs of
    the same shift laid out one after another. Returns uint8 [n, -1]."""
    n = x.shape[0]
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=x.device).reshape(1, 1, -1, 1)
    fields = torch.bitwise_right_shift(x.reshape(n, -1, 1, group), shifts) & ((1 << width) - 1)
    return fields.reshape(n, -1)


def _dequant_f32(blocks):
    return blocks.contiguous().view(torch.float32)


def _dequant_f16(blocks):
    # gguf.quants.dequantize: data.view(np.float16).astype(np.float32).
    return _f16(blocks, 0)


def _dequant_bf16(blocks):
    # BF16.dequantize_blocks: (int16 -> int32) << 16, viewed as float32; integer ops keep every
    # bit pattern (NaN payloads included) exactly.
    wide = blocks.contiguous().view(torch.int16).to(torch.int32)
    return torch.bitwise_left_shift(wide, 16).view(torch.float32)


def _dequant_q4_0(blocks):
    # Q4_0.dequantize_blocks: d * (nibble - 8).
    d = _f16(blocks, 0)
    qs = _bits(blocks[:, 2:], 16, 4).to(torch.int8) - 8
    return d * qs.to(torch.float32)


def _dequant_q4_1(blocks):
    # Q4_1.dequantize_blocks: (d * nibble) + m.
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    qs = _bits(blocks[:, 4:], 16, 4).to(torch.float32)
    return (d * qs) + m


def _five_bits(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 quants: low nibbles of ``qs`` | bit i of the little-endian uint32 ``qh`` << 4
    (gguf-py shifts the uint32 by 0..31; byte j's bit k is the same bit 8j+k)."""
    return _bits(qs, 16, 4) | (_bits(qh, 1, 1) << 4)


def _dequant_q5_0(blocks):
    # Q5_0.dequantize_blocks: d * (q - 16).
    d = _f16(blocks, 0)
    qs = _five_bits(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
    return d * qs.to(torch.float32)


def _dequant_q5_1(blocks):
    # Q5_1.dequantize_blocks: (d * q) + m.
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    qs = _five_bits(blocks[:, 4:8], blocks[:, 8:]).to(torch.float32)
    return (d * qs) + m


def _dequant_q8_0(blocks):
    # Q8_0.dequantize_blocks: x * d.
    d = _f16(blocks, 0)
    x = blocks[:, 2:].view(torch.int8).to(torch.float32)
    return x * d


def _dequant_q2_k(blocks):
    # Q2_K.dequantize_blocks: (d * sc) * q - (dmin * m), 16 sub-blocks of 16.
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0xF).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * torch.bitwise_right_shift(scales, 4).to(torch.float32)).reshape(n, 16, 1)
    q = _bits(qs, 32, 2).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, 256)


def _dequant_q3_k(blocks):
    # Q3_K.dequantize_blocks: (d * (sc - 32)) * (low 2 bits - 4 where the hmask bit is 0).
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    low = _bits(scales[:, :8], 8, 4)
    high = _bits(scales[:, 8:], 4, 2)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = _bits(qs, 32, 2).reshape(n, 16, 16)
    qh = _bits(hmask, 32, 1).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, 256)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K.get_scale_min: the eight 6-bit scales and mins packed in 12 bytes."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | (torch.bitwise_right_shift(d, 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, torch.bitwise_right_shift(m_d, 4)
                    | (torch.bitwise_right_shift(m, 2) & 0x30)], dim=-1)
    return sc, mn


def _k4_scales(blocks):
    """Q4_K/Q5_K: per 32-weight sub-block, ``d * sc`` and ``dmin * m`` ([n, 8, 1] each)."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _scale_min_k4(blocks[:, 4:16])
    return ((d * sc.to(torch.float32)).reshape(n, 8, 1),
            (dmin * m.to(torch.float32)).reshape(n, 8, 1))


def _dequant_q4_k(blocks):
    # Q4_K.dequantize_blocks: (d * sc) * q - (dmin * m), 8 sub-blocks of 32.
    n, (d, dm) = blocks.shape[0], _k4_scales(blocks)
    q = _bits(blocks[:, 16:], 32, 4).reshape(n, 8, 32).to(torch.float32)
    return (d * q - dm).reshape(n, 256)


def _dequant_q5_k(blocks):
    # Q5_K.dequantize_blocks: as Q4_K with a fifth bit from qh.
    n, (d, dm) = blocks.shape[0], _k4_scales(blocks)
    ql = _bits(blocks[:, 48:], 32, 4).reshape(n, 8, 32)
    qh = _bits(blocks[:, 16:48], 32, 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, 256)


def _dequant_q6_k(blocks):
    # Q6_K.dequantize_blocks: (d * int8 scale) * (q - 32), 16 sub-blocks of 16.
    n = blocks.shape[0]
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    d = _f16(blocks, 208)
    d = (d * scales.view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    low = _bits(ql, 64, 4).reshape(n, 8, 32)
    high = _bits(qh, 32, 2).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (d * q).reshape(n, 256)


_DEQUANT = {"F32": _dequant_f32, "F16": _dequant_f16, "BF16": _dequant_bf16,
            "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1, "Q5_0": _dequant_q5_0,
            "Q5_1": _dequant_q5_1, "Q8_0": _dequant_q8_0, "Q2_K": _dequant_q2_k,
            "Q3_K": _dequant_q3_k, "Q4_K": _dequant_q4_k, "Q5_K": _dequant_q5_k,
            "Q6_K": _dequant_q6_k}


def _check_bytes(data: torch.Tensor, q, shape: tuple[int, ...]) -> None:
    if data.dtype != torch.uint8:
        raise ValueError(f"{q.name} tensor of shape {list(shape)}: expected uint8 bytes, got "
                         f"{data.dtype}")
    if not shape:
        raise ValueError(f"{q.name} tensor: a shape of at least one dimension is needed")
    expected = math.prod(shape[:-1]) * row_bytes(q, shape[-1])
    if data.numel() != expected:
        raise ValueError(f"{q.name} tensor of shape {list(shape)} takes {expected} bytes, got "
                         f"{data.numel()}")


def dequantize(data: torch.Tensor, qtype, shape) -> torch.Tensor:
    """float32 tensor of ``shape`` from ``data``, the raw GGML bytes (uint8, any shape, rows
    contiguous as on disk) of a ``qtype`` tensor (``gguf.GGMLQuantizationType`` or its name).
    Bit-identical to ``gguf.quants.dequantize`` on the same bytes; runs where ``data`` is."""
    q = _qtype(qtype)
    shape = tuple(int(s) for s in shape)
    _check_bytes(data, q, shape)
    blocks = data.reshape(-1, _sizes(q)[1])
    if isinstance(q, NBits):
        return _dequant_nbits(blocks, q).reshape(shape)
    return _DEQUANT[q.name](blocks).reshape(shape)


class _GGMLLinearFn(torch.autograd.Function):
    """``F.linear`` over a weight dequantized on the fly. Only the packed bytes are saved for
    backward, which dequantizes again: keeping the dense weight of every layer alive until backward
    would cost the memory the packing saves (bitsandbytes' MatMul4Bit does the same)."""

    @staticmethod
    def forward(ctx, x, qweight, bias, qtype, shape):
        weight = dequantize(qweight, qtype, shape).to(x.dtype)
        ctx.save_for_backward(qweight)
        ctx.qtype, ctx.shape = qtype, shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (qweight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # What autograd's linear backward computes for the input: grad @ W.
            grad_x = grad.matmul(dequantize(qweight, ctx.qtype, ctx.shape).to(grad.dtype))
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, None


class GGMLLinear(torch.nn.Module):
    """A frozen linear layer whose ``[out_features, in_features]`` weight is the packed GGML bytes
    of ``qtype`` in the uint8 buffer ``qweight`` (``[out_features, row bytes]``, one GGUF row per
    output). It moves with the module (``.to(device)``) and no dtype cast touches it.

    ``forward`` dequantizes to float32 (``dequantize``, bit-exact with llama.cpp), casts that to
    ``x.dtype`` (one rounding; in float32 the weight is exactly the device's) and calls
    ``F.linear``. Gradients reach ``x`` (and ``bias`` only if someone unfreezes it), never the
    bytes. The buffer is named ``qweight`` after PEFT's convention for packed weights (GPTQ, AWQ):
    PEFT reads its device from it to place the LoRA weights."""

    def __init__(self, qweight: torch.Tensor, qtype, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.qtype = _qtype(qtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        _check_bytes(qweight, self.qtype, (self.out_features, self.in_features))
        self.register_buffer("qweight", qweight.detach().reshape(self.out_features, -1))
        if bias is None:
            self.register_parameter("bias", None)
        else:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias of shape {list(bias.shape)} for a linear layer with "
                                 f"{self.out_features} outputs")
            self.bias = torch.nn.Parameter(bias.detach().to(torch.float32).clone(),
                                           requires_grad=False)

    @classmethod
    def from_bytes(cls, data: Any, qtype, shape, bias: Any = None) -> "GGMLLinear":
        """From the raw bytes (numpy or torch uint8) of a GGUF tensor of logical ``shape``
        ``(out_features, in_features)``, with an optional bias (numpy or torch)."""
        import numpy as np

        out_features, in_features = (int(s) for s in shape)
        if not isinstance(data, torch.Tensor):
            data = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).copy())
        if bias is not None and not isinstance(bias, torch.Tensor):
            bias = torch.from_numpy(np.asarray(bias, dtype=np.float32).copy())
        return cls(data, qtype, in_features, out_features, bias)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def bits_per_weight(self) -> float:
        return self.qweight.numel() * 8 / (self.in_features * self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``[out_features, in_features]``, on the buffer's device."""
        return dequantize(self.qweight, self.qtype, self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GGMLLinearFn.apply(x, self.qweight, self.bias, self.qtype, self.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={self.qtype.name}, bias={self.bias is not None}")


@functools.cache
def _lora_layer():
    """PEFT's own LoRA ``Linear`` (forward = base output + scaled ``B(A(dropout(x)))``, casts,
    adapters, saving), refusing what needs a dense base weight. Built on first use: peft loads
    only when LoRA is attached."""
    from .bnb_import import quiet_bnb_import

    quiet_bnb_import(required=False)  # peft imports it when installed
    from peft.tuners.lora.layer import Linear

    class GGMLLoraLinear(Linear):
        def __init__(self, base_layer, adapter_name, config, **kwargs):
            if getattr(config, "use_dora", False):
                raise ConfigError("DoRA needs the dense base weight's norm; it is not supported "
                                  "over GGML-quantized layers (use plain LoRA)")
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _get_in_out_features(self, module):
            # PEFT's hook for layer types it does not know (its fallback works but warns).
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise ConfigError("a LoRA adapter cannot be merged into GGML-packed weights; merge "
                              "it into the full-precision base (edgeqlora merge) and re-export")

        def unmerge(self) -> None:
            if self.merged:
                raise ConfigError("a LoRA adapter over GGML-packed weights was never merged")

    return GGMLLoraLinear


def register_lora(config):
    """``config`` (a ``peft.LoraConfig``) made able to target ``GGMLLinear`` layers; returns it.

    Why custom-module registration: PEFT's default dispatch wraps only ``nn.Linear`` (and a few
    other torch layers), and GGMLLinear is deliberately not one: an ``nn.Linear`` promises a dense
    ``weight`` Parameter that transformers' init, PEFT's merge and DoRA would all read or write.
    ``LoraConfig._register_custom_module`` is PEFT's documented (experimental) hook for layer types
    it does not know, it takes the LoRA layer class to use, and that class is PEFT's own Linear, so
    LoRA's math and saving stay PEFT's. The mapping is not saved with the adapter: call this again
    on the config given to ``PeftModel.from_pretrained(..., config=...)`` when loading over
    GGMLLinear layers."""
    config._register_custom_module({GGMLLinear: _lora_layer()})
    return config

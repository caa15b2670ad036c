"""The ONNX int4 device base (``quant=onnx-int4``, ``edgeqlora.device_base``): the 4-bit bytes
the int4 export ships, tensor by tensor, and their dequantization.

``tensor_bytes`` runs the exporter's own path (``write.quantized_graph``: the traced fp32
graph, then the ``int4`` or ``int4-q8head`` recipe: onnxruntime's ``MatMulNBitsQuantizer``,
round to nearest, in blocks of ``block_size`` along the input dimension, symmetric; the head
at 8 bits for ``-q8head``), so the trainer's base and the
export's base come from one function, and reads back every quantized weight: each linear
layer's ``MatMulNBits`` B / scales (/ zero points), the output head's, and the token
embedding's ``GatherBlockQuantized`` table (or, with tied weights, the head's bytes it shares).
``tensor_digests`` hashes the same initializers in a written export, for the check that the
shipped base is the trained one.

``dequantize`` is written here by hand: onnxruntime computes with these bytes but exposes no
function that returns them as floats. It follows the operators' contract (4-bit values low
nibble first along the input dimension, ``(q - zero_point) * scale`` with zero point 8 when the
node has none) and is checked bit for bit against onnxruntime's own kernels (a MatMulNBits on
the identity at accuracy level 0, a GatherBlockQuantized of every row) in
``tests/test_device_aware_onnx.py``.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path
from typing import Any

from edgeqlora.errors import ConfigError

from .recipes import DEFAULT_OPTIONS, check_model_dir, check_options

# The recipes a device base can be trained on: deterministic and data-free (GPTQ depends on
# calibration rows). int4-q8head keeps the output head (and a tied embedding, which reads its
# bytes) at 8 bits. int4-hqq: HQQ's optimised scale and float zero point per block (data-free;
# onnxruntime's HQQ quantizer runs torch on CPU and gave the same bytes at 1 and 2 threads and
# across runs; the manifest's sha256s catch any change). Its float zero points cannot be read
# by GatherBlockQuantized, so a tied embedding keeps a 4-bit table of its own (round to
# nearest) and the training model unties it from the HQQ head (``device_base.untie_head``).
DEVICE_RECIPES = ("int4", "int4-q8head", "int4-hqq")
# The options that change the bytes; the manifest records them and an export must use them.
BYTE_OPTIONS = ("block_size", "symmetric")
# The exported graph's weight nodes: /m/<module path>/MatMul_Q4 (MatMulNBits), and the token
# embedding's Gather (its own table, or the tied head's bytes: a _shared suffix).
_MATMUL = re.compile(r"^/m/(?P<module>.+)/MatMul_Q\d+$")
# Every supported family (recipes.ARCHS) keeps its token-embedding table here.
EMBEDDING = "model.embed_tokens.weight"


def _quantized_inputs(node, inits) -> list[Any]:
    """The weight initializers of a MatMulNBits / GatherBlockQuantized node (data, scales,
    zero points), in input order."""
    # MatMulNBits: A, B, scales[, zero points]; GatherBlockQuantized: data, indices, scales[, ...]
    data, rest = (1, 2) if node.op_type == "MatMulNBits" else (0, 2)
    names = [node.input[data]] + [n for n in node.input[rest:] if n and n in inits]
    return [inits[n] for n in names]


def _digest(arrays: list[Any]) -> str:
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def quantized_weights(model, embedding: str) -> list[dict[str, Any]]:
    """Every quantized weight of an int4 graph ``model`` (an onnx.ModelProto): checkpoint name,
    node, op, bits, block size, logical ``[out, in]`` shape and the arrays (an fp16 embedding
    table too: 16 bits, no blocks). ``embedding`` is
    the checkpoint name of the token-embedding table; with tied weights its entry is the head's
    (the table reads the head's bytes), marked ``shared_with``."""
    from onnx import TensorProto, numpy_helper

    from .graph import initializers

    inits = initializers(model)
    found: list[dict[str, Any]] = []
    shared = False
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits and \
                inits[node.input[0]].data_type == TensorProto.FLOAT16:
            # an fp16 table (an untied embedding under -q8head): its rounding is the device's
            table = numpy_helper.to_array(inits[node.input[0]])
            found.append({"src": embedding, "node": node.name, "op": "Gather", "bits": 16,
                          "block_size": 0, "shape": tuple(table.shape), "arrays": [table]})
            continue
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        if node.name.endswith("_shared"):  # the tied table: the head's bytes, added below
            shared = True
            continue
        a = _attrs(node)
        arrays = [numpy_helper.to_array(t) for t in _quantized_inputs(node, inits)]
        bits = int(a.get("bits", 4))
        if node.op_type == "MatMulNBits":
            m = _MATMUL.match(node.name)
            if m is None:
                raise ConfigError(f"the int4 graph has a quantized node {node.name!r} that maps "
                                  "to no checkpoint weight; this model cannot be a device base")
            src, shape = m["module"].replace("/", ".") + ".weight", (int(a["N"]), int(a["K"]))
        else:
            src, shape = embedding, (int(arrays[0].shape[0]), _row_length(arrays[0], bits))
        found.append({"src": src, "node": node.name, "op": node.op_type, "bits": bits,
                      "block_size": int(a["block_size"]), "shape": shape, "arrays": arrays})
    if shared:
        head = [w for w in found if w["src"] == "lm_head.weight"]
        if len(head) != 1:
            raise ConfigError("the int4 graph's embedding shares an output head it does not have")
        found.append({**head[0], "src": embedding, "shared_with": "lm_head.weight"})
    return found


def _row_length(data, bits: int) -> int:
    """Input length of a GatherBlockQuantized table: uint8 holds 8 / bits values a byte, the
    int4 / uint4 types (as numpy_helper unpacks them) one."""
    import numpy as np

    per_byte = 8 // bits if np.asarray(data).dtype == np.uint8 else 1
    return int(np.asarray(data).shape[1]) * per_byte


def tensor_bytes(model_dir: str | Path, quant: str = "int4",
                 options: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]],
                                                                  dict[str, Any]]:
    """(every quantized weight of ``model_dir``'s ``quant`` export, as ``quantized_weights``
    lists them with the ``sha256`` of their arrays; the options that made the bytes). The
    graph is traced and quantized as ``write_export`` does it, in a temporary folder."""
    from .write import quantized_graph

    if quant not in DEVICE_RECIPES:
        raise ConfigError(f"onnx {quant} cannot be a device base (only "
                          f"{', '.join(DEVICE_RECIPES)}: deterministic and data-free)")
    opts = check_options({k: v for k, v in (options or {}).items() if k in DEFAULT_OPTIONS})
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    with tempfile.TemporaryDirectory(prefix=".onnx-device-") as scratch:
        model, _, _, _ = quantized_graph(model_dir, Path(scratch), quant, opts)
    weights = quantized_weights(model, EMBEDDING)
    for w in weights:
        w["sha256"] = _digest(w["arrays"])
    return weights, {k: opts[k] for k in BYTE_OPTIONS}



def tensor_digests(model_file: str | Path) -> dict[str, str]:
    """{node name: sha256 of its quantized arrays} of a written export's ``model.onnx``."""
    import onnx
    from onnx import TensorProto, numpy_helper

    from .graph import initializers

    model = onnx.load(str(model_file))
    inits = initializers(model)
    digests = {n.name: _digest([numpy_helper.to_array(t) for t in _quantized_inputs(n, inits)])
               for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
               and not n.name.endswith("_shared")}  # a shared table is the head's bytes
    digests.update({n.name: _digest([numpy_helper.to_array(inits[n.input[0]])])
                    for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                    and inits[n.input[0]].data_type == TensorProto.FLOAT16})
    return digests


def dequantize(arrays: list[Any], bits: int, block_size: int, shape: tuple[int, int]):
    """The float32 ``[out, in]`` weight of one quantized node's ``arrays`` (data, scales[, zero
    points]), one output row of blocks after another: MatMulNBits' B ``[N, blocks, block
    bytes]`` and a shared table are uint8 (``8 / bits`` values a byte, low nibble first, zero
    point ``2 ** (bits - 1)`` when none is given); a GatherBlockQuantized table of its own is an
    int4 / uint4 tensor, one value an element (numpy_helper unpacks it), zero point 0 / given.
    Zero points are packed like the data (uint8; the weight is ``(q - zero point) * scale``,
    the subtraction exact) or, from HQQ, one float per block: then ``q * scale - zero point *
    scale``, two products and a difference, each rounded, as onnxruntime's kernels compute it
    (``(q - zero point) * scale`` differs in the last bit for most of them)."""
    import numpy as np

    n, k = shape
    data = np.asarray(arrays[0])
    if data.dtype == np.float16:  # an fp16 table: widening is exact
        return np.ascontiguousarray(data.astype(np.float32).reshape(n, k))
    blocks = -(-k // block_size)
    packed = data.dtype == np.uint8
    if packed:
        data = data.reshape(n, -1)
        if bits == 4:
            q = np.empty((n, data.shape[1] * 2), dtype=np.uint8)
            q[:, 0::2], q[:, 1::2] = data & 0x0F, data >> 4
        elif bits == 8:
            q = data
        else:
            raise ConfigError(f"{bits}-bit weights are not a device base")
    else:
        q = data.reshape(n, -1).astype(np.int16)
    pad = blocks * block_size - q.shape[1]
    if pad > 0:
        q = np.pad(q, ((0, 0), (0, pad)))
    q = q[:, :blocks * block_size].reshape(n, blocks, block_size).astype(np.float32)
    scales = np.asarray(arrays[1], dtype=np.float32).reshape(n, blocks)
    if len(arrays) > 2 and np.asarray(arrays[2]).dtype == np.float32:  # HQQ
        zp = np.asarray(arrays[2]).reshape(n, blocks)[..., None]
        w = q * scales[..., None] - zp * scales[..., None]
        return np.ascontiguousarray(w.reshape(n, blocks * block_size)[:, :k], dtype=np.float32)
    if len(arrays) > 2:
        zp = np.asarray(arrays[2])
        if zp.dtype == np.uint8 and bits == 4:
            zp = zp.reshape(n, -1)
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
        zp = zp.reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        zp = np.full((n, blocks), 2 ** (bits - 1) if packed else 0, dtype=np.float32)
    w = (q - zp[..., None]) * scales[..., None]
    return np.ascontiguousarray(w.reshape(n, blocks * block_size)[:, :k], dtype=np.float32)

"""Calibrated int4 for the ONNX exporter: GPTQ on calibration sequences, and HQQ (data-free).

Round-to-nearest int4 loses a lot on a 135M model (KLD ~0.4 vs fp32 on SmolLM2-135M). Two
onnxruntime algorithms do better at the same size:

- **GPTQ** (Frantar et al. 2022; onnxruntime's ``neural_compressor.weight_only.gptq``): each
  weight column is rounded in turn and its rounding error is pushed onto the columns not yet
  rounded, weighted by the inverse Hessian ``H = 2 X^T X`` of that MatMul's inputs ``X``. The
  inputs come from **calibration sequences: rows of the data the adapter was fine-tuned on**,
  tokenized exactly as in training (never the held-out split, which measures it); the export
  stage makes them with ``edgeqlora.heldout.calibration_sequences`` and passes them in.
- **HQQ** (half-quadratic quantization, onnxruntime's ``HQQWeightOnlyQuantizer``): no data; it
  optimises each block's zero point for the weight error. It writes zero points, so its output
  head cannot be shared with the embedding table.

Why GPTQ is written here rather than used through
``MatMulNBitsQuantizer(GPTQWeightOnlyQuantConfig)`` (onnxruntime 1.32):

1. its ``gptq`` propagates each column's rounding error with the wrong triangle of the Cholesky
   factor (``cholesky(inv(H)).T`` then a *column* below the diagonal, which is all zeros), so no
   error is ever propagated and it reduces to round-to-nearest; measured in the tests: its output
   error equals RTN's where ours is well below;
2. its packing re-derives each block's scale from the fake-quantized values (``quant_tensor``),
   which in the symmetric format scales every block by 16/15 or 14/15;
3. its driver (``gptq_quantize``) runs the whole model once per distinct MatMul input and
   calibration row (onnxruntime does not prune a graph to the requested outputs): 121 forwards per
   row on SmolLM2-135M. Here one forward per row fetches every MatMul input at once.

So ``gptq_blockwise`` is the reference GPTQ loop (IST-DASLab ``gptq.py``: lazy 128-column
updates, group scales from the partly updated weights) with the library's symmetric grid (checked
equal to the library's where the triangle does not matter: a diagonal Hessian), returning the
integer codes and block scales so they are stored exactly; the MatMulNBits node is built by the
library's ``make_matmul_weight_only_node``.
"""

from __future__ import annotations

import warnings
from typing import Any

from edgeqlora import threads
from edgeqlora.errors import ConfigError, InputError

from .graph import add_ms_domain, quantizer_module, weight_matmuls

# GPTQ's own settings: the library defaults (damping 1 % of the mean Hessian diagonal, 128-column
# lazy-update blocks), no activation reordering (reordering would permute the quantization
# blocks, which MatMulNBits stores in input order).
PERCDAMP = 0.01
LAZY_BLOCK = 128


def _empty_feed(model, ids: list[int]) -> dict[str, Any]:
    """Inputs of the exported decoder for a prefill of ``ids`` with an empty KV cache."""
    import numpy as np

    feed = {"input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values."):
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            feed[inp.name] = np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)
    return feed


def hessians(model, nodes, sequences: list[list[int]]) -> dict[str, Any]:
    """``H = 2/T * sum x x^T`` (float64) over the ``T`` calibration tokens for the input of each
    MatMul in ``nodes``, keyed by input name: one onnxruntime run per sequence fetches them all."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    names = sorted({n.input[0] for n in nodes})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    # Serialized in memory: an fp32 model over 2 GB (protobuf's limit) needs a file instead.
    try:
        blob = probe.SerializeToString()
    except ValueError:
        raise InputError("GPTQ calibration of a model over 2 GB is not supported; use int4 "
                         "or int4-hqq") from None
    del probe
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads.free_cores()  # not a core another process holds
    sess = ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
    del blob
    h = {}
    tokens = 0
    for ids in sequences:
        outs = sess.run(names, _empty_feed(model, ids))
        for name, x in zip(names, outs):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            h[name] = h.get(name, 0.0) + x.T @ x
        tokens += len(ids)
    return {k: v * (2.0 / tokens) for k, v in h.items()}


def gptq_blockwise(weight, hessian, bits: int = 4, group_size: int = 32,
                   blocksize: int = LAZY_BLOCK, percdamp: float = PERCDAMP):
    """GPTQ of a MatMul weight ``[K, N]`` (ONNX layout: input features first), symmetric, one
    scale per ``group_size`` inputs and output column.

    onnxruntime's ``neural_compressor.weight_only.gptq`` (scheme "sym", perchannel, no actorder,
    no mse) with its error propagation corrected (see the module docstring); it returns only the
    fake-quantized weight, this also returns what MatMulNBits stores. Returns
    ``(codes, scales, dequantized)``: ``codes`` uint8 ``[K, N]`` in ``0..2**bits-1`` (zero
    point ``2**(bits-1)``, MatMulNBits' implicit one), ``scales`` float32
    ``[ceil(K/group_size), N]``, ``dequantized = scales * (codes - zp)``."""
    import numpy as np

    w = np.array(weight, dtype=np.float32, copy=True)
    h = np.array(hessian, dtype=np.float64, copy=True)
    k, n = w.shape
    maxq = 2 ** bits - 1
    zp = (maxq + 1) // 2

    def find_scale(block):
        # The library's find_params(scheme="sym"): range from max |w|, min clamped at 0 first;
        # float64 as there (its clamp is against a float64 zeros array).
        block = block.astype(np.float64)
        xmin = np.minimum(block.min(axis=0), 0.0)
        xmax = np.maximum(block.max(axis=0), 0.0)
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
        both0 = (xmin == 0) & (xmax == 0)
        xmin, xmax = np.where(both0, -1, xmin), np.where(both0, 1, xmax)
        return (xmax - xmin) / maxq

    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead, :] = 0
    h[np.arange(k), np.arange(k)] += percdamp * np.mean(np.diag(h))
    # Lower Cholesky factor L of H^-1: column i of L below the diagonal is row i of the upper
    # factor the GPTQ paper uses, i.e. how column i's error spreads over the later inputs.
    hinv = np.linalg.cholesky(np.linalg.inv(h))
    codes = np.zeros((k, n), dtype=np.uint8)
    scales = np.zeros(((k + group_size - 1) // group_size, n), dtype=np.float32)
    deq = np.zeros_like(w)
    scale = None
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[i1:i2].copy()
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                # As in the library (and the GPTQ reference code): the group's scale comes from
                # ``w``, which is updated with the errors of earlier lazy blocks only.
                scale = find_scale(w[col:col + group_size])
                scales[col // group_size] = scale
            q = np.clip(np.round(w1[i] / scale) + zp, 0, maxq)
            codes[col] = q
            exact = scale * (q - zp)  # float64, as the library computes the error
            deq[col] = exact
            e = (w1[i] - exact) / hinv1[i, i]
            w1[i:] -= np.outer(hinv1[i:, i], e)
            err1[i] = e
        w[i2:] -= hinv[i2:, i1:i2] @ err1
    return codes, scales, deq


def apply_gptq(model, sequences: list[list[int]], bits: int, block_size: int,
               accuracy_level: int, progress: bool = False) -> int:
    """Replace every weight MatMul still in ``model`` by a GPTQ-quantized MatMulNBits (in
    place); returns how many. Calibration activations come from the model itself (fp32)."""

    if bits != 4:
        raise ConfigError(f"GPTQ here writes 4-bit MatMulNBits, not {bits}-bit")
    nodes = weight_matmuls(model)
    with blas_threads(threads.free_cores()):
        return _apply_gptq(model, nodes, sequences, bits, block_size, accuracy_level, progress)


def blas_threads(n: int):
    """numpy's BLAS (OpenBLAS) held to ``n`` threads: its threads, like OpenMP's, wait for each
    other at every call, so one on a core another process holds stalls the Cholesky and the
    column updates (threadpoolctl; without it the BLAS keeps its own count)."""
    import contextlib

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _apply_gptq(model, nodes, sequences, bits, block_size, accuracy_level, progress) -> int:
    import numpy as np
    from onnx import numpy_helper
    from onnxruntime.quantization.neural_compressor.weight_only import (
        make_matmul_weight_only_node)

    hs = hessians(model, nodes, sequences)
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    replaced = {}
    from edgeqlora.progress import Ticker

    ticker = Ticker("GPTQ", len(nodes), "weights", enabled=None if not progress else False)
    it = nodes
    if progress:
        from rich.progress import track

        it = track(nodes, description="GPTQ", transient=True)
    for node in it:
        w = numpy_helper.to_array(inits[node.input[1]])
        k, n = w.shape
        codes, scales, _ = gptq_blockwise(w, hs[node.input[0]], bits, block_size)
        k_blocks = scales.shape[0]
        # MatMulNBits rows: one per (output column, input block), block_size codes each; a last
        # partial block is padded with the zero point (dequantizes to 0).
        padded = np.full((k_blocks * block_size, n), 2 ** (bits - 1), dtype=np.uint8)
        padded[:k] = codes
        q = padded.T.reshape(-1, block_size)
        new, new_inits = make_matmul_weight_only_node(
            node=node, weight_shape=(k, n), num_bits=bits, group_size=block_size,
            k_blocks=k_blocks, q_weight=q, scale=np.ascontiguousarray(scales.T),
            zero_point=None, accuracy_level=accuracy_level)
        replaced[id(node)] = (new, new_inits)
        ticker.update(len(replaced))
    new_nodes = []
    for node in model.graph.node:
        if id(node) in replaced:
            new, new_inits = replaced[id(node)]
            new_nodes.append(new)
            model.graph.initializer.extend(new_inits)
            if uses.get(node.input[1]) == 1:
                model.graph.initializer.remove(inits[node.input[1]])
        else:
            new_nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(new_nodes)
    add_ms_domain(model)
    return len(replaced)


def apply_hqq(model, bits: int, block_size: int, accuracy_level: int):
    """HQQ (onnxruntime's ``HQQWeightOnlyQuantizer``, torch on CPU) on every weight MatMul still
    in ``model``; returns the new model. HQQ's config takes no accuracy level, so its nodes get
    ``accuracy_level`` here (without it onnxruntime computes them at level 0, in float32)."""
    from onnx import helper

    nbits = quantizer_module()
    HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer = (nbits.HQQWeightOnlyQuantConfig,
                                                      nbits.MatMulNBitsQuantizer)

    before = {n.name for n in model.graph.node if n.op_type == "MatMulNBits"}
    q = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(
        block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",)))
    with warnings.catch_warnings():
        # It hands torch a read-only numpy view of each weight, which it only reads.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        q.process()
    model = q.model.model
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.name not in before:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            node.ClearField("attribute")
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level",
                                                                int(accuracy_level))])
    return model


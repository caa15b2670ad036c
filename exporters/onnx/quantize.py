"""Weight storage of an fp32 ONNX decoder: MatMulNBits quantization, fp16 weights, the token
embedding table, and the operator counts each recipe must produce.

Weight-only quantization with onnxruntime's ``MatMulNBitsQuantizer`` (the library, not our own
numerics): ``int4`` round-to-nearest blockwise (``DEFAULT``), ``int4-kquant`` (k-quant search),
``int4-kquant-last`` (k-quant with the output head at 8 bits and the embedding table in fp16),
``int8`` (MatMulNBits 8-bit). The token-embedding ``Gather`` becomes a 4-bit
``GatherBlockQuantized`` for the plain int4 recipes and an fp16 table (``Gather`` + ``Cast``)
otherwise; with tied weights it reads the (4- or 8-bit) output head's bytes instead of a table of
its own. ``int4-q8head``: int4 layers, the tied head + embedding at 8 bits (what GGUF Q4_0 does
with its output tensor). ``fp16`` stores every weight in fp16 and computes in fp32 (``Cast``
after each weight): CPU kernels for fp16 MatMul are missing or slow on x86, and the logits stay
close. The calibrated recipes (``int4-gptq*``, ``int4-hqq*``) are written by ``gptq.py`` with the
same storage. Graph edits are small and done with ``onnx.helper``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from edgeqlora.errors import ConfigError

from .graph import (add_ms_domain, embedding_gathers, initializers, quantizer_module,
                    weight_matmuls)


def store_fp16(model, nodes, input_index: int) -> int:
    """Store the weight at ``input_index`` of each node in fp16 and compute in fp32: the node
    reads an fp16 initializer, and a Cast brings the value (for Gather: the gathered rows,
    so the table itself stays fp16 in memory) back to fp32. Returns the count converted."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = initializers(model)
    new_nodes = []
    done = 0
    for node in model.graph.node:
        if node in nodes:
            name = node.input[input_index]
            t = inits[name]
            half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                           name + "_fp16")
            model.graph.initializer.remove(t)
            model.graph.initializer.append(half)
            if node.op_type == "Gather":
                out = node.output[0]
                node.input[0] = half.name
                node.output[0] = out + "_fp16"
                new_nodes += [node, helper.make_node("Cast", [out + "_fp16"], [out],
                                                     to=TensorProto.FLOAT,
                                                     name=node.name + "_cast_fp32")]
            else:
                cast_out = name + "_fp32"
                new_nodes += [helper.make_node("Cast", [half.name], [cast_out],
                                               to=TensorProto.FLOAT, name=name + "_cast"), node]
                node.input[input_index] = cast_out
            done += 1
        else:
            new_nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(new_nodes)
    return done


def is_tied(model) -> bool:
    """Whether the embedding table and the output head hold the same values (tied weights: the
    TorchScript exporter writes the head as its own transposed copy)."""
    import numpy as np
    from onnx import numpy_helper

    gathers, heads = embedding_gathers(model), [n for n in weight_matmuls(model)
                                                if n.name.endswith("lm_head/MatMul")]
    if len(gathers) != 1 or len(heads) != 1:
        return False
    inits = initializers(model)
    table = inits[gathers[0].input[0]]
    head = inits[heads[0].input[1]]
    if list(table.dims) != list(reversed(head.dims)):
        return False
    return bool(np.array_equal(numpy_helper.to_array(table), numpy_helper.to_array(head).T))


def share_tied_embedding(model) -> bool:
    """For tied weights: read the embedding rows from the 4-bit output head instead of storing
    a second 4-bit table (as onnxruntime-genai's builder does; ~14 MB less for SmolLM2-135M).

    MatMulNBits keeps B as [N, blocks, block_bytes] uint8 (4-bit: low nibble first) with an
    implicit zero point of 8 (8-bit: 128) when it has no zero-point input; GatherBlockQuantized
    on uint8 data [N, K*bits/8] with no zero points dequantizes the same bytes the same way
    (both widths checked to 2e-9 when this was written). Only the symmetric case (no zero
    points) is shared; otherwise returns False and nothing changes."""
    import numpy as np
    from onnx import helper, numpy_helper

    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits"
             and re.search(r"lm_head/MatMul_Q\d+$", n.name)]
    gathers = embedding_gathers(model)
    if len(heads) != 1 or len(gathers) != 1 or len([i for i in heads[0].input if i]) != 3:
        return False
    head, gather = heads[0], gathers[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    bits = int(attrs.get("bits", 4))
    if bits not in (4, 8):
        return False
    inits = initializers(model)
    n, k = int(attrs["N"]), int(attrs["K"])
    shape = numpy_helper.from_array(np.array([n, k * bits // 8], dtype=np.int64),
                                    head.input[1] + "_as_table_shape")
    model.graph.initializer.append(shape)
    table = inits[gather.input[0]]
    nodes = []
    for node in model.graph.node:
        if node is gather:
            nodes += [helper.make_node("Reshape", [head.input[1], shape.name],
                                       [head.input[1] + "_as_table"],
                                       name=gather.name + "_shared_table"),
                      helper.make_node("GatherBlockQuantized",
                                       [head.input[1] + "_as_table", gather.input[1],
                                        head.input[2]], list(gather.output),
                                       name=gather.name + f"_Q{bits}_shared",
                                       domain="com.microsoft",
                                       block_size=int(attrs["block_size"]), gather_axis=0,
                                       quantize_axis=1, bits=bits)]
        else:
            nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    model.graph.initializer.remove(table)
    return True


def quantize(model, recipe: dict[str, Any], options: dict[str, Any],
             calibration: list[list[int]] | None = None, progress: bool = False):
    """Apply ``recipe`` to the fp32 ``model`` (an onnx.ModelProto); returns the new model.
    ``calibration``: token id sequences for the recipes that read data (GPTQ)."""
    nbits = quantizer_module()
    DefaultWeightOnlyQuantConfig = nbits.DefaultWeightOnlyQuantConfig
    KQuantWeightOnlyQuantConfig = nbits.KQuantWeightOnlyQuantConfig
    MatMulNBitsQuantizer = nbits.MatMulNBitsQuantizer

    bits = recipe["bits"]
    if bits == 32:
        return model
    # The quantizer logs one INFO line per graph node ("skip to quantize ..."): thousands.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
        logging.WARNING)
    if bits == 16:
        store_fp16(model, weight_matmuls(model), 1)
        store_fp16(model, embedding_gathers(model), 0)
        return model
    tied = is_tied(model)
    common = {"block_size": options["block_size"], "is_symmetric": options["symmetric"],
              "accuracy_level": options["accuracy_level"]}
    if recipe["algorithm"] == "k_quant":
        head = [n.name for n in weight_matmuls(model) if n.name.endswith("lm_head/MatMul")]
        custom = {name: {"bits": recipe["head_bits"]} for name in head} \
            if recipe.get("head_bits") else None
        q = MatMulNBitsQuantizer(model, bits=bits, **common,
                                 algo_config=KQuantWeightOnlyQuantConfig(
                                     customized_weight_config=custom))
        q.process()
        model = q.model.model
        # The k-quant path (rtn_quantize) writes com.microsoft nodes without importing the domain.
        add_ms_domain(model)
    else:
        heads = [n.name for n in weight_matmuls(model) if n.name.endswith("lm_head/MatMul")]
        if recipe.get("head_bits") and heads:
            # The output head alone at head_bits (no op type matches "-"; only the named node).
            q = MatMulNBitsQuantizer(model, nodes_to_include=heads,
                                     algo_config=DefaultWeightOnlyQuantConfig(
                                         bits=recipe["head_bits"], op_types_to_quantize=("-",),
                                         **common))
            q.process()
            model = q.model.model
        if recipe["algorithm"] == "gptq":
            from .gptq import apply_gptq

            if not calibration:
                raise ConfigError("GPTQ needs calibration sequences (calibration_data=)")
            apply_gptq(model, calibration, bits, options["block_size"],
                       options["accuracy_level"], progress)
        elif recipe["algorithm"] == "hqq":
            from .gptq import apply_hqq

            model = apply_hqq(model, bits, options["block_size"], options["accuracy_level"])
        else:
            q = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
                bits=bits, op_types_to_quantize=("MatMul",), **common))
            q.process()
            model = q.model.model
    if recipe["embedding"] in ("int4", "head") and tied and share_tied_embedding(model):
        pass
    elif recipe["embedding"] == "head":
        store_fp16(model, embedding_gathers(model), 0)  # untied: no 8-bit table to share
    elif recipe["embedding"] == "int4":
        # GatherBlockQuantized: the table in 4-bit blocks along the hidden dimension.
        import numpy as np

        q = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
            bits=4, op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),),
            **common))
        # An all-zero row (a padding token's) has scale 0: the quantizer divides by it, then
        # np.where keeps 0 for it; numpy's warning about the discarded NaN is noise. So are the
        # quantizer's two warnings that it raises the opset to 21 and the IR version to 10 for
        # the int4 table (the export's graph is checked and run by onnxruntime after writing).
        nbits_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
        level = nbits_log.level
        nbits_log.setLevel(logging.ERROR)
        try:
            with np.errstate(divide="ignore", invalid="ignore"):
                q.process()
        finally:
            nbits_log.setLevel(level)
        model = q.model.model
    elif recipe["embedding"] == "fp16":
        store_fp16(model, embedding_gathers(model), 0)
    return model


def expected_ops(recipe: dict[str, Any], n_linear: int) -> dict[str, int]:
    """Operator counts the recipe must produce from ``n_linear`` weight MatMuls."""
    bits = recipe["bits"]
    if bits in (4, 8):
        exp = {"MatMulNBits": n_linear}
        if recipe["embedding"] == "int4":
            exp["GatherBlockQuantized"] = 1
        return exp
    return {"MatMul": n_linear} if bits == 32 else {"MatMul": n_linear, "Cast": n_linear}

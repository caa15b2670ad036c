"""Adapter-only ONNX export: a base graph with LoRA *inputs* + an onnxruntime adapter file.

A phone keeps one base model in memory and switches fine-tunes by switching a small file: the
base graph computes ``y = x @ W + (x @ A) @ B`` for every adapted linear layer, where ``A``
(``lora.<module>.A``, [in, r]) and ``B`` (``lora.<module>.B``, [r, out], the LoRA scale folded
in) are graph inputs. An adapter file in onnxruntime's ``AdapterFormat`` holds their values;
``RunOptions.add_active_adapter`` (or onnxruntime-genai's ``Adapters``) binds them per run
without reloading the base. The inputs default to rank-0 tensors ([in, 0] / [0, out]): with no
adapter bound the base runs alone.

The base MatMuls are quantized as in a merged export (``quantize.py``) first; the LoRA path is
inserted after (onnxruntime's quantizer folds initializer-backed graph inputs into plain
initializers), so it stays fp32, as trained.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgeqlora.errors import ConfigError

from .recipes import MODEL_FILE

ADAPTER_FILE = "adapter.onnx_adapter"
# The exported linear layers' MatMuls, before or after weight quantization (MatMulNBits nodes
# keep the name with a _Q4/_Q8 suffix).
_NODE = re.compile(r"^/m/(?P<module>.+)/MatMul(_Q\d+)?$")


def lora_input_names(module: str) -> tuple[str, str]:
    return f"lora.{module}.A", f"lora.{module}.B"


def add_lora_inputs(model, lora: dict[str, tuple[Any, Any, float]]) -> dict[str, Any]:
    """Insert the LoRA path on every weight MatMul named in ``lora`` (base weight key ->
    ``(A [r, in], B [out, r], scale)``, as ``export_adapter`` passes it); returns the adapter
    parameters {input name: fp32 array} in the graph's layout."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    params: dict[str, Any] = {}
    nodes = []
    done = set()
    for node in model.graph.node:
        m = _NODE.match(node.name) if node.op_type in ("MatMul", "MatMulNBits") else None
        key = m["module"].replace("/", ".") + ".weight" if m is not None else ""
        if m is None or key not in lora:
            nodes.append(node)
            continue
        # A.T [in, r] and (scale * B).T [r, out]
        params.update(adapter_params({key: lora[key]}))
        a_name, b_name = lora_input_names(key[:-len(".weight")])
        out = node.output[0]
        node.output[0] = out + "_base"
        nodes += [node,
                  helper.make_node("MatMul", [node.input[0], a_name], [out + "_xa"],
                                   name=node.name + "_lora_A"),
                  helper.make_node("MatMul", [out + "_xa", b_name], [out + "_lora"],
                                   name=node.name + "_lora_B"),
                  helper.make_node("Add", [out + "_base", out + "_lora"], [out],
                                   name=node.name + "_lora_add")]
        k, n = params[a_name].shape[0], params[b_name].shape[1]
        model.graph.input.extend([
            helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [k, "lora_rank"]),
            helper.make_tensor_value_info(b_name, TensorProto.FLOAT, ["lora_rank", n])])
        # Rank-0 defaults make the inputs overridable initializers: without an adapter the
        # base runs alone, and onnxruntime's Python API does not demand them in every feed.
        model.graph.initializer.extend([
            numpy_helper.from_array(np.zeros((k, 0), np.float32), a_name),
            numpy_helper.from_array(np.zeros((0, n), np.float32), b_name)])
        done.add(key)
    missing = sorted(set(lora) - done)
    if missing:
        raise ConfigError(f"adapter-only ONNX export: LoRA on {', '.join(missing[:3])} has no "
                          "matching linear layer in the exported graph (embedding or output-head "
                          "LoRA is not supported adapter-only); export the merged model instead")
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return params


def write_adapter(params: dict[str, Any], path: Path, dtype: str = "f32") -> dict[str, Any]:
    """Write ``params`` as an onnxruntime adapter file (``AdapterFormat``)."""
    import numpy as np
    import onnxruntime as ort

    if dtype != "f32":
        # The graph's LoRA inputs are fp32; an fp16/int8 file would need Cast/dequant nodes.
        raise ConfigError(f"ONNX adapter files are written in f32 (got adapter_quant={dtype!r})")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                        for k, v in params.items()})
    fmt.export_adapter(str(path))
    rank = {int(v.shape[1]) for k, v in params.items() if k.endswith(".A")}
    return {"file": path.name, "parameters": len(params), "rank": sorted(rank),
            "size_bytes": path.stat().st_size}


def adapter_params(lora: dict[str, tuple[Any, Any, float]]) -> dict[str, Any]:
    """The adapter-file parameters of ``lora`` (same names and layout as ``add_lora_inputs``)."""
    import numpy as np

    params = {}
    for key, (a, b, scale) in lora.items():
        a_name, b_name = lora_input_names(key[:-len(".weight")])
        params[a_name] = np.ascontiguousarray(np.asarray(a, dtype=np.float32).T)
        params[b_name] = np.ascontiguousarray((np.asarray(b, dtype=np.float32)
                                               * np.float32(scale)).T)
    return params


def write_adapter_file(lora: dict[str, tuple[Any, Any, float]], path: str | Path,
                       base_export: str | Path | None = None) -> dict[str, Any]:
    """Write another trained adapter's LoRA deltas (same base, same target modules; the format
    of ``add_lora_inputs``) as an adapter file for an existing adapter-only ONNX export, so a
    device can switch to it without a new base. With ``base_export`` the names and shapes are
    checked against that export's graph first."""
    from edgeqlora.errors import InputError

    params = adapter_params(lora)
    if base_export is not None:
        import onnx

        model = onnx.load(str(Path(base_export) / MODEL_FILE), load_external_data=False)
        dims = {t.name: list(t.dims) for t in model.graph.initializer
                if t.name.startswith("lora.")}
        problems = [name for name in params if name not in dims] + \
            [name for name, v in params.items() if name in dims and
             (dims[name][0] if name.endswith(".A") else dims[name][1])
             != (v.shape[0] if name.endswith(".A") else v.shape[1])]
        if problems:
            raise InputError(f"the adapter does not fit the base export {base_export}: "
                             f"{', '.join(problems[:3])} missing or of another shape (the base "
                             "was exported for other target modules or another model)")
    return write_adapter(params, Path(path))

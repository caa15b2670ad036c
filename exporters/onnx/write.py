"""``write_export``: a Hugging Face checkpoint -> ``model.onnx`` (+ ``model.onnx.data``), its
``genai_config.json``, tokenizer and chat template, in a directory the caller owns.

The steps: trace the fp32 graph (``graph``), apply the quant recipe (``quantize``, ``gptq``),
insert LoRA inputs for an adapter-only export (``lora``, after quantization), save, then the
side files (``genai``). ``nf4-exact`` goes through ``nf4`` instead: the unmerged base and the
LoRA deltas, the 4-bit codes bitsandbytes made.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeqlora.errors import ConfigError, ExportError, InputError

from . import recipes
from .genai import copy_tokenizer, write_genai_config
from .graph import export_fp32, op_counts, save, step, weight_matmuls
from .recipes import (FROM_ADAPTER_QUANTS, MODEL_FILE, RECIPES, check_model_dir,
                      check_options, check_quant, check_recipe_options)

log = logging.getLogger(__name__)


def write_export(model_dir: str | Path, out_dir: str | Path, quant: str, *,
                 lora: dict[str, tuple[Any, Any, float]] | None = None,
                 adapter_quant: str | None = None,
                 calibration: tuple[list[list[int]], dict[str, Any]] | None = None,
                 progress: bool = False, **options: Any) -> dict[str, Any]:
    """Write an ONNX export of the checkpoint ``model_dir`` into ``out_dir`` (an existing, empty
    directory); returns ``info`` for the manifest.

    ``options``: block_size, symmetric, accuracy_level (int4/int8), context_length (genai's
    max_length), calibration_rows / calibration_data (what ``calibration_request`` asked for);
    for nf4-exact base_quant and quantized. ``calibration``: ``(sequences, record)`` for the
    ``CALIBRATED`` quants, made by the export stage; ``record`` goes in the manifest. ``lora``
    (weight name -> ``(A [r, in], B [out, r], scale)``): an adapter-only export (LoRA inputs
    + an adapter file), or for nf4-exact the deltas kept unmerged."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    q = (quant or "").strip().lower()
    opts = check_options(options)
    if q in FROM_ADAPTER_QUANTS:
        from .nf4 import write_nf4_exact

        return write_nf4_exact(model_dir, out_dir, lora, opts, progress)
    quant = check_quant(quant, adapter_only=lora is not None)
    check_recipe_options(quant, opts)
    recipe = RECIPES[quant]
    cfg = check_model_dir(model_dir)
    info: dict[str, Any] = {"quant": quant, "model_file": MODEL_FILE,
                            "recipe": {**recipe, **({k: opts[k] for k in
                                                     ("block_size", "symmetric",
                                                      "accuracy_level")}
                                                    if recipe["bits"] in (4, 8) else {})},
                            "architecture": cfg["architectures"][0]}
    sequences = None
    if recipe["algorithm"] == "gptq":
        if not calibration or not calibration[0]:
            raise ConfigError(f"quant={quant} calibrates on data: give calibration_data= a data "
                              "spec (CLI: --calibration-data), normally the data the adapter was "
                              "trained on, e.g. embedded:iot or a .jsonl file; write_export takes "
                              "the sequences made from it as calibration=(sequences, record)")
        sequences, info["recipe"]["calibration"] = calibration
    elif recipe["algorithm"] == "hqq":
        # HQQ optimises a zero point per block: asymmetric whatever ``symmetric`` says.
        info["recipe"]["symmetric"] = False
    with tempfile.TemporaryDirectory(prefix=".onnx-fp32-", dir=out_dir.parent) as scratch:
        model, dims, n_linear, seconds = quantized_graph(model_dir, Path(scratch), quant, opts,
                                                         sequences, progress)
        info.update(seconds)
        params = None
        if lora is not None:
            from .lora import add_lora_inputs

            # After quantization: the quantizer turns initializer-backed inputs into constants.
            t1 = time.perf_counter()
            params = add_lora_inputs(model, lora)
            info["quantize_seconds"] = round(info["quantize_seconds"]
                                             + time.perf_counter() - t1, 2)
        save(model, out_dir)
    if params is not None:
        from .lora import ADAPTER_FILE, write_adapter

        if adapter_quant not in (None, "f32"):
            log.info("ONNX adapter files are written in f32; adapter_quant=%s does not apply",
                     adapter_quant)
        info["adapter_file"] = ADAPTER_FILE
        info["adapter"] = write_adapter(params, out_dir / ADAPTER_FILE)
    info["ops"] = op_counts(model)
    from .quantize import expected_ops

    info["expected_ops"] = expected_ops(recipe, n_linear)
    info["matmulnbits"] = info["ops"].get("MatMulNBits", 0)
    info["embedding_shared_with_head"] = any(re.search(r"_Q\d+_shared$", n.name)
                                             for n in model.graph.node)
    info["quant_mix"] = {op: info["ops"][op] for op in ("MatMulNBits", "GatherBlockQuantized",
                                                        "MatMul") if op in info["ops"]}
    info["dims"] = dims
    gc = write_genai_config(model_dir, out_dir, dims, opts["context_length"])
    info["context_length"] = gc["search"]["max_length"]
    info["tokenizer_files"] = copy_tokenizer(model_dir, out_dir)
    info["size_bytes"] = sum(p.stat().st_size for p in out_dir.glob("model.onnx*"))
    info["genai"] = "installed" if recipes.has_genai() else recipes.GENAI_MISSING
    if not recipes.has_genai():
        log.warning(recipes.GENAI_MISSING)
    return info


def quantized_graph(model_dir: Path, scratch: Path, quant: str, opts: dict[str, Any],
                    sequences: list[list[int]] | None = None, progress: bool = False
                    ) -> tuple[Any, dict[str, Any], int, dict[str, float]]:
    """Trace ``model_dir`` into an fp32 graph (in ``scratch``) and apply ``quant``'s recipe:
    ``(onnx.ModelProto, dims, number of weight MatMuls, {export_seconds, quantize_seconds})``.
    The one path from a checkpoint to quantized weights: every export takes it, and so does the
    trainer's ``onnx-int4`` device base (``device.tensor_bytes``)."""
    t0 = time.perf_counter()
    raw = scratch / "fp32.onnx"
    step("exporting the model to ONNX (torch.onnx)", progress)
    try:
        dims = export_fp32(model_dir, raw)
    except InputError:
        raise
    except Exception as exc:  # torch's exporter raises many types; name the step
        raise ExportError(f"torch.onnx.export failed on {model_dir} ({type(exc).__name__}: "
                          f"{exc})") from None
    seconds = {"export_seconds": round(time.perf_counter() - t0, 2)}
    import onnx

    model = onnx.load(str(raw))
    n_linear = len(weight_matmuls(model))
    step(f"quantizing ({quant})", progress)
    t1 = time.perf_counter()
    from .quantize import quantize

    model = quantize(model, RECIPES[quant], opts, sequences, progress)
    seconds["quantize_seconds"] = round(time.perf_counter() - t1, 2)
    return model, dims, n_linear, seconds

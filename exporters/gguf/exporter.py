"""``write_export`` and ``verify_export``: the GGUF files of one export (model, adapter,
tokenizer files, Ollama Modelfile) into a directory the export stage owns, and their check.

How the model file is written: one streaming pass (``writer.write_model_gguf``) for the direct
types and the K-quant mixes the plan knows, an importance matrix applied as each tensor is
quantized; otherwise (a mix left to llama.cpp, or a direct type with an imatrix) an F32 GGUF
beside the output, llama.cpp's quantizer or the direct writer from it, and the imatrix applied
to the result (``imatrix.apply_imatrix``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgeqlora.artifacts import SHIPPED_TOKENIZER_FILES
from edgeqlora.errors import ConfigError

from . import common
from . import imatrix as IM
from .common import DIRECT_QUANTS, K_QUANTS
from .lora import write_lora_gguf
from .metadata import read_config
from .modelfile import modelfile
from .options import check_options
from .plan import plan_tensors
from .verify import read_back, verify
from .writer import quantize_gguf, write_model_gguf


def _imatrix(model_dir: Path, quant: str, source: str, calibration, progress: bool
             ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(imatrix or None, what ``info["imatrix"]`` records or None), before any file is
    written."""
    if quant not in IM.IMATRIX_QUANTS:
        if source == IM.NONE and calibration is None:
            return None, None
        if calibration is not None:
            source = calibration[1].get("source", calibration[1]["data"])
        elif source == IM.AUTO:
            source = "auto (the adapter's training data)"
        return None, {"source": source, "used": False,
                      "note": f"{quant} does not use an importance matrix (llama.cpp ignores "
                              "one for F32/F16/BF16/Q8_0); not computed"}
    if calibration is None:
        if source == IM.NONE:
            return None, None
        raise ConfigError(f"imatrix={source} needs calibration sequences, which the export "
                          "stage makes from calibration_request() (for 'auto': the adapter's "
                          "training data); here pass calibration=(sequences, record) from "
                          "edgeqlora.heldout.calibration_sequences")
    sequences, record = calibration
    im, made = IM.build_imatrix(model_dir, sequences, progress=progress)
    return im, {"source": record["data"], "used": True, **record, **made}


def write_export(model_dir: str | Path, out_dir: str | Path, quant: str, *,
                 lora: dict[str, tuple[Any, Any, float]] | None = None,
                 adapter_quant: str = "q8_0", name: str = "model", progress: bool = False,
                 calibration: tuple[list[list[int]], dict[str, Any]] | None = None,
                 imatrix: str | None = None, imatrix_rows: int | None = None,
                 calibration_general: float | None = None,
                 identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a GGUF export into ``out_dir`` (an existing, empty temporary directory).

    Full model: ``model_dir`` is the merged checkpoint -> ``<name>.<quant>.gguf``. Adapter-only
    (``lora`` given): ``model_dir`` is the unmerged base -> ``base.<quant>.gguf`` plus
    ``adapter.<adapter_quant>.gguf``. Tokenizer files, chat template and an Ollama Modelfile go
    beside them.

    ``calibration``: ``(sequences, record)`` from ``heldout.calibration_sequences`` (what
    ``calibration_request`` asked for). For a quant that uses an importance matrix (K-quants,
    Q4_0) its tensors are quantized with one computed on those sequences in torch; recorded
    under ``info["imatrix"]``. Types that use none (f32/f16/bf16/q8_0) get a note instead.
    ``imatrix`` / ``imatrix_rows`` / ``calibration_general``: the options the request came from
    (checked here too; the rows already hold the general share, the record says how much).
    ``identity``: the ``general.*`` keys of the model file (``export_inputs.identity``)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    quant = common.check_quant(quant)
    opts = check_options({"imatrix": imatrix, "imatrix_rows": imatrix_rows, "name": name,
                          "calibration_general": calibration_general})
    stem = "base" if lora is not None else opts["name"]
    model_file = out_dir / f"{stem}.{quant}.gguf"
    info: dict[str, Any] = {"quant": quant, "model_file": model_file.name}
    # Before any file is written: no calibration data or a bad one fails here.
    im, record = _imatrix(model_dir, quant, opts["imatrix"], calibration, progress)
    if record is not None:
        info["imatrix"] = record
    cfg = read_config(model_dir)
    plan = plan_tensors(model_dir, cfg, quant) if quant in K_QUANTS else None
    if (quant in DIRECT_QUANTS and im is None) or plan is not None:
        # One streaming pass; K-quant mixes with llama.cpp's types and kernels, the imatrix
        # applied as each tensor is quantized.
        info.update(write_model_gguf(model_dir, model_file, quant, name=stem,
                                     identity=identity,
                                     progress=progress, imatrix=im, plan=plan))
        info["writer"] = "direct"
        if im is not None:
            takes = [t["name"] for t in info["plan"] if t["qtype"].name in IM.IMATRIX_TYPES]
            info["imatrix"].update(requantized=sum(n in im for n in takes),
                                   without_imatrix=sorted(n for n in takes if n not in im))
    else:
        # llama.cpp quantizes from an F32 GGUF (exact merged weights), written beside the
        # output so a full disk shows up here and the temporary goes away with the directory.
        # The imatrix pass re-quantizes from it too.
        info["writer"] = "llama.cpp quantizer"
        with tempfile.TemporaryDirectory(prefix=".f32-", dir=out_dir.parent) as scratch:
            f32 = Path(scratch) / "model.f32.gguf"
            info.update(write_model_gguf(model_dir, f32, "f32", name=stem, progress=progress,
                                         identity=identity))
            if quant in DIRECT_QUANTS:
                info["plan"] = write_model_gguf(model_dir, model_file, quant, name=stem,
                                                identity=identity, progress=progress)["plan"]
            else:
                quantize_gguf(f32, model_file, quant)
                info["plan"] = None
            if im is not None:
                done = IM.apply_imatrix(f32, model_file, im, progress=progress)
                info["imatrix"].update(requantized=len(done["requantized"]),
                                       without_imatrix=done["without_imatrix"])
    if lora is not None:
        adapter_quant = common.check_adapter_quant(adapter_quant)
        adapter_file = out_dir / f"adapter.{adapter_quant}.gguf"
        info["adapter"] = write_lora_gguf(lora, model_dir, adapter_file, adapter_quant)
        info["adapter_file"] = adapter_file.name
    back = info["readback"] = read_back(model_file)
    info["quant_mix"] = back["types"]
    info["tensor_count"] = back["tensor_count"]
    for fname in SHIPPED_TOKENIZER_FILES + ("generation_config.json", "config.json"):
        if (model_dir / fname).is_file():
            shutil.copy(model_dir / fname, out_dir / fname)
    (out_dir / "Modelfile").write_text(modelfile(model_dir, model_file.name,
                                                 info.get("adapter_file")))
    return info


def verify_export(out_dir: str | Path, info: dict[str, Any], reference,
                  thresholds: dict[str, float]) -> dict[str, Any]:
    """The files ``write_export`` wrote (``info``) in llama.cpp through the GGUF runtime, LoRA
    adapter applied, against ``reference`` (a ``heldout.VerifySet``): structure, top-1 and mean
    KL over its distinct positions, tokenization of its texts."""
    out_dir = Path(out_dir)
    lora = out_dir / info["adapter_file"] if info.get("adapter_file") else None
    return verify(out_dir / info["model_file"], reference, thresholds, plan=info.get("plan"),
                  lora_path=lora, readback=info.get("readback"))

"""torch -> fp32 ONNX: the transformers model traced with its KV cache as explicit tensors, and
the small helpers that find its parts (weight MatMuls, the embedding Gather), save it and
say which step runs.

``torch.onnx.export`` (the TorchScript exporter) of the transformers model wrapped so the cache
is explicit: inputs ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/value``; outputs ``logits`` and ``present.{i}.key/value`` -- the
names onnxruntime-genai's ``decoder`` expects. Exporting the model transformers itself runs
keeps RoPE (Llama 3 scaling, Gemma 3's per-layer bases), GQA, biases (qwen2), q/k norms (qwen3,
gemma3), Gemma's (1 + w) norms and soft-capping, and Phi-3's fused projections (one MatMul
each) exactly as trained; sliding-window layers keep full caches and the window is in the mask
(see ``WithCache``). A hand-built graph (as the genai model builder writes) could drift from
the checkpoint silently (optimum-onnx 0.1.0 exports transformers-5 checkpoints with the wrong
RoPE theta, for one). The TorchScript exporter writes the tied ``lm_head`` as its own
pre-transposed weight, so it is quantized like any other MatMul.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .recipes import DATA_FILE, MODEL_FILE

# The TorchScript exporter's newest opset. The 4-bit GatherBlockQuantized embedding needs opset 21
# (int4 tensors) and the quantizer raises the import to 21 itself; 20 -> 21 only widens type
# sets, while 17 -> 21 would leave ReduceMean with an ``axes`` attribute opset 18 removed.
OPSET = 20


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids"] + past, ["logits"] + present


# Inside ``reuse_traces()``: the folder of the kept traces, and (checkpoint key) -> (the
# folder holding that checkpoint's trace, its dims).
_reuse: tuple[Path, dict[tuple, tuple[Path, dict[str, Any]]]] | None = None


@contextlib.contextmanager
def reuse_traces():
    """Within it, ``export_fp32`` traces a checkpoint once: a later call on the same files
    (names, sizes and mtimes) and opset gets a copy of the kept trace (a trace is most of a
    small model's export; the quant search of ``export --device`` writes several quants of one
    merged checkpoint). The kept traces are deleted on leaving. Nested uses share the outer
    one's."""
    global _reuse
    if _reuse is not None:
        yield
        return
    root = Path(tempfile.mkdtemp(prefix="edgeqlora-traces-"))
    _reuse = root, {}
    try:
        yield
    finally:
        _reuse = None
        shutil.rmtree(root, ignore_errors=True)


def _trace_key(model_dir: Path, opset: int) -> tuple:
    root = Path(model_dir).resolve()
    files = tuple((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)
                  for p in sorted(root.rglob("*")) if p.is_file() for st in [p.stat()])
    return str(root), files, opset


def export_fp32(model_dir: Path, path: Path, opset: int = OPSET) -> dict[str, Any]:
    """Trace the checkpoint into an fp32 ONNX decoder with an explicit KV cache at ``path``
    (or, inside ``reuse_traces()``, copy the trace already made of the same files). Any
    external-data files the trace needs are written beside ``path``."""
    if _reuse is None:
        return _trace(model_dir, path, opset)
    root, kept = _reuse
    key = _trace_key(model_dir, opset)
    if key not in kept:
        where = Path(tempfile.mkdtemp(prefix="trace-", dir=root))
        kept[key] = where, _trace(model_dir, where / MODEL_FILE, opset)
    where, dims = kept[key]
    path = Path(path)
    for file in where.iterdir():  # copies: a hard link would let a writer change the kept one
        shutil.copyfile(file, path if file.name == MODEL_FILE else path.parent / file.name)
    return dict(dims)


def _trace(model_dir: Path, path: Path, opset: int) -> dict[str, Any]:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    class WithCache(torch.nn.Module):
        """forward(ids, mask, positions, *past) -> (logits, *present): the cache as tensors."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # No config: every layer a full DynamicLayer. With the config, Gemma's sliding
            # layers would be DynamicSlidingWindowLayers that keep only the last window - 1
            # keys, so present.{i} of a sliding layer would not be past + new tokens (the
            # runtimes and onnxruntime-genai feed every present back as the next past, whole).
            # Full layers keep the history; the sliding window is applied by the attention
            # mask transformers builds from config.sliding_window, which is the same
            # attention the checkpoint computes.
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers[:n_layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    names_in, names_out = io_names(n_layers)
    # Traced with a non-empty past and several new tokens so neither the prefill-only nor the
    # single-token branch of the attention code is baked in; tests check both regimes.
    batch, seq, past_len = 1, 3, 2
    ids = torch.randint(0, min(cfg.vocab_size, 1000), (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq)[None]
    past = [torch.zeros(batch, n_kv, past_len, head_dim) for _ in range(2 * n_layers)]
    dynamic = {"input_ids": {0: "batch_size", 1: "sequence_length"},
               "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
               "position_ids": {0: "batch_size", 1: "sequence_length"},
               "logits": {0: "batch_size", 1: "sequence_length"}}
    dynamic.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in names_in[3:]})
    dynamic.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in names_out[1:]})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
        torch.onnx.export(WithCache(model), (ids, mask, pos, *past), str(path),
                          input_names=names_in, output_names=names_out,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    return {"num_hidden_layers": n_layers, "num_key_value_heads": n_kv,
            "num_attention_heads": cfg.num_attention_heads, "head_size": head_dim,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}


def initializers(model) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def embedding_gathers(model) -> list[Any]:
    """Gather nodes reading a 2-D weight initializer (the token-embedding table)."""
    inits = initializers(model)
    return [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
            and len(inits[n.input[0]].dims) == 2]


def weight_matmuls(model) -> list[Any]:
    inits = initializers(model)
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2]


def op_counts(model) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def add_ms_domain(model) -> None:
    """Import the com.microsoft domain (contrib ops) if the graph does not yet."""
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def save(model, out_dir: Path) -> None:
    """``model.onnx`` + every tensor of 1 KiB or more in ``model.onnx.data`` (protobuf cannot
    hold a file over 2 GB; genai and our runtime read the pair)."""
    import onnx

    for stale in list(Path(out_dir).glob("model.onnx*")):
        stale.unlink()
    onnx.save_model(model, str(Path(out_dir) / MODEL_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)


def step(what: str, enabled: bool) -> None:
    """One line on stderr naming the slow step that starts (``progress=True``)."""
    if enabled:
        from rich.console import Console

        Console(stderr=True).print(f"[dim]{what}...[/dim]")


def quantizer_module():
    """onnxruntime's ``matmul_nbits_quantizer``, imported without its side effect: the module
    calls ``logging.basicConfig(level=INFO)`` at import, which turns on every library's INFO
    lines on stderr for the rest of the process (gguf's "This GGUF file is for Little Endian
    only" in a quickstart's later stages). The root logger is put back as it was."""
    import importlib

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module("onnxruntime.quantization.matmul_nbits_quantizer")
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)

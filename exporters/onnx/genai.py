"""The files beside ``model.onnx`` and the onnxruntime-genai check: ``genai_config.json``, the
tokenizer files and chat template, and a greedy decode in onnxruntime-genai.

``genai_config.json`` names the model type, the I/O names, the heads, ``max_length`` = the
context asked for, and ``past_present_share_buffer: false`` because the graph concatenates its
cache rather than using GroupQueryAttention's shared buffer. Our runtime (``runtimes.onnx``)
reads the same file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgeqlora.artifacts import SHIPPED_TOKENIZER_FILES

from .recipes import GENAI_CONFIG, GENAI_TYPES, MODEL_FILE, read_config


def genai_config(model_dir: Path, dims: dict[str, Any], context_length: int) -> dict[str, Any]:
    cfg = read_config(model_dir)
    gen = {}
    if (Path(model_dir) / "generation_config.json").is_file():
        gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    max_len = min(int(context_length), int(cfg.get("max_position_embeddings") or
                                           context_length))
    return {
        "model": {
            "bos_token_id": gen.get("bos_token_id", cfg.get("bos_token_id")),
            "context_length": max_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": dims["head_size"],
                "hidden_size": dims["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": dims["num_attention_heads"],
                "num_hidden_layers": dims["num_hidden_layers"],
                "num_key_value_heads": dims["num_key_value_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": gen.get("pad_token_id", cfg.get("pad_token_id", eos)),
            "type": GENAI_TYPES[cfg["architectures"][0]],
            "vocab_size": dims["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
            "length_penalty": 1.0,
            # The context the user asked for: genai sizes its buffers from it (its default
            # would be the model's full max_position_embeddings).
            "max_length": max_len, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1,
            # The graph concatenates past and new keys (no GroupQueryAttention), so genai must
            # hand each step's present outputs back as the next past inputs.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(model_dir: Path, out_dir: Path, dims: dict[str, Any],
                       context_length: int) -> dict[str, Any]:
    gc = genai_config(model_dir, dims, context_length)
    (Path(out_dir) / GENAI_CONFIG).write_text(json.dumps(gc, indent=4) + "\n")
    return gc


def copy_tokenizer(model_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in SHIPPED_TOKENIZER_FILES + ("generation_config.json", "config.json"):
        if (Path(model_dir) / name).is_file():
            shutil.copy(Path(model_dir) / name, Path(out_dir) / name)
            copied.append(name)
    return copied


def genai_check(out_dir: Path, prompt: list[int], expected: list[int], n: int,
                adapter_file: str | None = None) -> dict[str, Any]:
    """Load the export in onnxruntime-genai (with its adapter, if any) and decode up to ``n``
    tokens greedily from ``prompt``; ``expected`` is our runtime's greedy answer (without its
    end token)."""
    try:
        import onnxruntime_genai as og

        model = og.Model(str(out_dir))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + n, batch_size=1)
        gen = og.Generator(model, params)
        if adapter_file:
            adapters = og.Adapters(model)
            adapters.load(str(Path(out_dir) / adapter_file), "adapter")
            gen.set_active_adapter(adapters, "adapter")
        gen.append_tokens(prompt)
        got = []
        while not gen.is_done() and len(got) < n:
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
    except Exception as exc:  # genai raises plain RuntimeError for every load failure
        return {"loaded": False, "error": str(exc).splitlines()[0] if str(exc) else repr(exc)}
    # genai also returns the end token our runtime strips.
    return {"loaded": True, "tokens": got, "identical_greedy": got[:len(expected)] == expected}

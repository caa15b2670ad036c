"""The plain inputs the export stage hands an exporter: LoRA deltas as arrays, calibration rows
made once per request, and the reference an export is verified against (``heldout.VerifySet``:
the merged model's, or the trained model's, logits on held-out sequences, run in batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bnb_import import quiet_bnb_import
from .errors import ConfigError, DataError, InputError
from .heldout import VerifySet, heldout_sequences, training_data_spec, verification_texts


def lora_arrays(adapter) -> dict[str, tuple[Any, Any, float]]:
    """The adapter's deltas as plain arrays, the form the exporters take."""
    return {k: (d.A.float().numpy(), d.B.float().numpy(), d.scale)
            for k, d in adapter.deltas.items()}


def check_from_adapter(adapter, quant: str) -> list[str]:
    """Refusals for a quant made from the trained adapter itself (ONNX nf4-exact)."""
    from .merge import is_quantized_weight

    quiet_bnb_import(purpose=f"{quant} export (the NF4 codes come from bitsandbytes)")
    outside = [k for k, d in adapter.deltas.items()
               if d.embedding or not is_quantized_weight(k, [1, 1])]
    if outside:
        raise ConfigError(f"{quant} keeps LoRA unmerged on the 4-bit linear layers only; "
                          f"{adapter.dir} also adapts {', '.join(outside[:3])}: use --quant "
                          "int8 or fp16 (merged) for this adapter")
    return list(adapter.deltas)


def from_adapter_inputs(adapter, scratch: Path, options: dict[str, Any]):
    """The unmerged original base, the LoRA deltas and the 4-bit layout of the trained model:
    what an exporter needs to write the trained model as trained."""
    from . import merge as M

    base = scratch / "base"
    base.mkdir()
    M.write_merged(adapter, base, "original", "float32", with_lora=False)
    quantized = [name for _, name, shape, _ in M.tensor_specs(adapter.base_dir)
                 if M.is_quantized_weight(name, shape)]
    options.update(base_quant=dict(adapter.quant), quantized=quantized)
    return base, lora_arrays(adapter), None


def calibration_requests(exporter, quants: list[str], options: dict[str, Any],
                          manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each quant's calibration request with ``auto`` resolved to the adapter's training data;
    a spec that names nothing here fails now, before the merge."""
    from .rows import check_spec

    out = {}
    for q in quants:
        req = exporter.calibration_request(q, options)
        if req is None:
            continue
        req = dict(req)
        if req["spec"] in (None, "", "auto"):
            spec = training_data_spec(manifest)
            if not spec:
                raise InputError(f"{req['what']}: 'auto' means the adapter's training data, and "
                                 "there is none recorded here; pass a data spec (a .jsonl file "
                                 "or embedded:iot)")
            req["spec"], req["source"] = spec, "auto (the adapter's training data)"
        try:
            check_spec(req["spec"])
        except (InputError, DataError) as exc:
            raise type(exc)(f"{req['what']}: {exc}") from None
        out[q] = req
    return out


class Calibrations:
    """Calibration rows made once per distinct request, with the checkpoint's tokenizer."""

    def __init__(self, requests: dict[str, dict[str, Any]], model_dir: Path):
        self.requests, self.model_dir, self._made = requests, model_dir, {}

    def get(self, quant: str):
        from .heldout import calibration_sequences

        req = self.requests.get(quant)
        if req is None:
            return None
        key = (req["spec"], req["rows"], req["max_len"], req.get("general", 0.0))
        if key not in self._made:
            seqs, record = calibration_sequences(tokenizer(self.model_dir), req["spec"],
                                                 req["rows"], req["max_len"], req["what"],
                                                 general=req.get("general", 0.0))
            if req.get("source"):
                record["source"] = req["source"]
            self._made[key] = (seqs, record)
        return self._made[key]


def tokenizer(model_dir: Path):
    from .hf_tokenizer import load

    return load(model_dir)


def text_ids(tok):
    return lambda text, special: list(tok(text, add_special_tokens=special)["input_ids"])


def merged_reference(merged: Path, manifest: dict[str, Any], eval_tokens: int,
                      n_texts: int = 16, known: list | None = None) -> VerifySet:
    """Held-out sequences and the merged checkpoint's fp32 logits on them: ``known`` (the
    merge-base measurement already ran the merged model on the same sequences), else from the
    model, run when an exporter first asks for logits and then kept for every quant tried."""
    import torch

    def load():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()

    tok = tokenizer(merged)
    seqs = heldout_sequences(manifest, tok, eval_tokens)
    ref = VerifySet(seqs, batched(seqs, load), verification_texts(manifest, tok, n_texts),
                    text_ids(tok), label="merged model")
    if known is not None and len(known) == len(seqs):
        ref.preload(known)
    return ref


def trained_reference(adapter, model_dir: Path, eval_tokens: int,
                      n_texts: int = 0) -> VerifySet:
    """Held-out sequences and the trained model's logits (4-bit base + LoRA, as trained)."""
    def load():
        from .qlora import dequantized_weights, load_trained

        model = load_trained(adapter.dir, device="cpu")
        # Dequantized once for every sequence (same outputs as bitsandbytes' CPU path). The
        # context manager is held on the model: were it garbage-collected, its exit would put
        # the per-call dequantization back.
        model._edgeqlora_dequantized = dequantized_weights(model)
        model._edgeqlora_dequantized.__enter__()
        return model

    tok = tokenizer(model_dir)
    seqs = heldout_sequences(adapter.manifest, tok, eval_tokens)
    base = adapter.quant.get("quant", "nf4")
    return VerifySet(seqs, batched(seqs, load),
                     verification_texts(adapter.manifest, tok, n_texts), text_ids(tok),
                     label=f"trained model ({base.upper() if base in ('nf4', 'fp4') else base}"
                           " + LoRA)")


def batched(seqs: list[list[int]], load):
    """``logits(ids)`` for a VerifySet: on the first call the model is loaded and run on every
    sequence in batches (``qlora.forward_logits``), then answered from those."""
    done: dict[tuple, Any] = {}

    def logits(ids: list[int]):
        if not done:
            from .logits import forward_logits

            model = load()
            done.update(zip(map(tuple, seqs), forward_logits(model, seqs)))
            del model
        return done[tuple(ids)]

    return logits


# Licences of the embedded bases (their manifests predate the field; a local checkpoint's is
# not guessed).
_EMBEDDED_LICENSES = {"embedded": "apache-2.0", "embedded:smollm2": "apache-2.0"}


def identity(adapter) -> dict[str, Any]:
    """What an export says it is (GGUF ``general.*``, as llama.cpp's converter and the hub
    write them): the base's own name and size, the adapter as the fine-tune, the base as
    ``base_model``. From the adapter manifest and the base's fingerprint only."""
    import gguf

    fp, data = adapter.base_fingerprint, adapter.manifest.get("data") or {}
    repo = fp.get("name") or ""
    org, _, short = repo.rpartition("/") if "/" in repo else ("", "", repo)
    short = short or Path(str(fp.get("path") or "model")).name
    spec = str((adapter.manifest.get("base") or {}).get("spec") or "")
    task = Path(str(data.get("spec") or "data")).stem.replace("embedded:", "") or "data"
    out = {"name": f"{short} edgeqlora {task}", "basename": short,
           "finetune": f"edgeqlora-{task}", "base_model": {"name": short}}
    if fp.get("num_parameters"):
        out["size_label"] = gguf.size_label(int(fp["num_parameters"]), 0, 0, 0)
    license_ = fp.get("license") or _EMBEDDED_LICENSES.get(spec)
    if license_:
        out["license"] = license_.split(" ")[0]
    if org:
        out["base_model"].update(organization=org, repo_url=f"https://huggingface.co/{repo}")
    return out



def answer_schema(adapter) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON Schema an export carries: the adapter's ``schema.json``, or for an adapter
    written before adapters carried one, what its training config resolves to (the embedded
    task's schema); (None, None) when its answers have none."""
    from .schema import read_schema, resolve

    record = adapter.manifest.get("schema") or {}
    own = read_schema(adapter.dir)
    if own is not None:
        return own, record.get("source")
    if "schema" in adapter.manifest:  # trained with schema=none, or a dataset without one
        return None, None
    return resolve(str((adapter.manifest.get("data") or {}).get("spec") or ""), "")

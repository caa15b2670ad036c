"""Merge a trained LoRA adapter into its base model, tensor by tensor, in fp32.

``merge_adapter(adapter_dir, out_dir, merge_base=...)`` writes a plain Hugging Face checkpoint
(safetensors, config, tokenizer, chat template) in which every targeted weight is
``W' = W + s * B @ A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA). Other exporters
(GGUF, ONNX) start from that directory.

Which ``W``? A QLoRA adapter was trained against the 4-bit weights, not the 16-bit ones:

- ``dequantized``: the NF4/FP4 weights dequantized exactly as bitsandbytes does in the trained
  model (``quantize_4bit`` + ``dequantize_4bit`` with the manifest's block size, double
  quantization and dtype) -- every quantized linear layer, targeted or not, because the trained
  model ran all of them in 4-bit (torchtune's choice). With the trained model at hand (the
  export stage loads it anyway) its own dequantized weights are taken instead of a second round
  trip: the same numbers (tested). The round trip of a base under the same settings is kept
  across runs (``edgeqlora.roundtrip``: bitsandbytes' 4-bit codes, dequantized again);
- ``original``: the weights of the base checkpoint (what Unsloth merges into);
- ``auto`` (the default): the base the adapter was trained against -- ``dequantized`` for a
  4-bit adapter, ``original`` for a plain-LoRA one (``quant=none``) and for LLM.int8, whose
  outlier decomposition has no static dequantized weight. The merge is then the trained model
  up to float rounding (measured: KLD ~1e-11 against the trained model, where the original
  weights give ~0.2 on the quickstart adapter);
- ``best``: both merged, each measured against the trained model (NF4 base + adapter,
  ``load_trained``) on held-out tokens (mean KL divergence of next-token distributions); the
  better one is kept and both figures are recorded.

Streaming: the base is read one tensor at a time with ``safetensors.safe_open`` and the merged
tensors are written one at a time, so peak memory is about the largest tensor plus buffers, not
the model (``artifacts.SafetensorsStreamWriter``: the safetensors library only writes whole dicts).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import math
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .artifacts import (TOKENIZER_FILES, SafetensorsStreamWriter, check_lora_config, read_json,
                        read_verified_manifest, safetensors_files, safetensors_specs,
                        write_manifest)
from .config import MERGE_BASES
from .errors import ConfigError, InputError, ManifestError
from .merge_measure import measure_against_trained
from .roundtrip import nf4_roundtrip  # noqa: F401  (merge's API since the first wave)

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# PEFT's state-dict keys: base_model.model.<module>.lora_A.weight etc.
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|"
                       r"lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.weight)?$")


@dataclass
class LoraDelta:
    """One adapted module: ``delta = scale * B @ A`` added to ``<module>.weight``."""

    module: str
    A: Any  # torch [r, in] (Linear) or [r, vocab] (Embedding)
    B: Any  # torch [out, r] (Linear) or [dim, r] (Embedding)
    scale: float
    embedding: bool = False

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self):
        """``scale * B @ A`` in fp32, in the layout of the base weight."""
        d = (self.B.float() @ self.A.float()) * self.scale
        # PEFT's Embedding LoRA: lora_embedding_A [r, vocab], B [dim, r]; weight is [vocab, dim].
        return d.T if self.embedding else d


@dataclass
class Adapter:
    dir: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    deltas: dict[str, LoraDelta]  # by base weight key
    base_dir: Path
    base_fingerprint: dict[str, Any]

    @property
    def quant(self) -> dict[str, Any]:
        return self.manifest.get("quant", {})


def _safetensors_error(path: Path, exc: Exception, what: str) -> InputError:
    return InputError(f"{what} {path} cannot be read as safetensors ({exc}); the file is "
                      "truncated or corrupt: copy or write it again")


def _scale(cfg: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling for ``module``: alpha/r (rsLoRA: alpha/sqrt(r)), with rank_pattern /
    alpha_pattern overrides matched on the module name's suffix as PEFT does."""
    alpha = float(cfg.get("lora_alpha", 8))
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """The adapter's manifest, PEFT config and LoRA matrices (fp32 on CPU), with its base
    resolved and checked by weight hash."""
    from safetensors import safe_open

    from .base import base_fingerprint, resolve_base

    adapter_dir = Path(adapter_dir)
    manifest = read_verified_manifest(adapter_dir, "adapter", "adapter")
    cfg_path = adapter_dir / ADAPTER_CONFIG
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise InputError(f"adapter {adapter_dir} has no {ADAPTER_CONFIG} / {ADAPTER_WEIGHTS}; "
                         "is it a PEFT adapter written by edgeqlora train?")
    cfg = read_json(cfg_path, InputError)
    check_lora_config(cfg, cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA; only LoRA "
                         "adapters can be merged")
    if cfg.get("use_dora"):
        raise InputError(f"{cfg_path}: DoRA adapters (use_dora=true) are not supported by the "
                         "merge yet; train with lora.dora=false")

    parts: dict[str, dict[str, Any]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                m = _LORA_KEY.match(key)
                if not m:
                    raise InputError(f"{weights}: tensor {key!r} is not a LoRA matrix (full "
                                     "modules_to_save copies are not supported by the merge)")
                parts.setdefault(m["module"], {})[m["part"]] = f.get_tensor(key).float()
    except InputError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError, not an OSError
        raise _safetensors_error(weights, exc, "adapter weights") from None

    deltas = {}
    for module, p in sorted(parts.items()):
        emb = "lora_embedding_A" in p
        a = p.get("lora_embedding_A" if emb else "lora_A")
        b = p.get("lora_embedding_B" if emb else "lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"{weights}: module {module} has no matching lora_A/lora_B pair "
                             f"(found {sorted(p)})")
        d = LoraDelta(module, a, b, _scale(cfg, module, int(a.shape[0])), embedding=emb)
        deltas[d.weight_key] = d

    base = manifest.get("base", {})
    path = Path(base.get("path", ""))
    if not (path / "config.json").is_file():
        # Trained on another machine: resolve the spec again.
        path = resolve_base(base.get("spec", "embedded"))
    fp = base_fingerprint(path)
    if base.get("weights_sha256") and fp["weights_sha256"] != base["weights_sha256"]:
        raise ManifestError(
            f"adapter {adapter_dir} was trained on base {base.get('spec')!r} with weights sha256 "
            f"{base['weights_sha256'][:16]}..., but {path} has {fp['weights_sha256'][:16]}...; "
            "merge with the base the adapter was trained on")
    return Adapter(adapter_dir, manifest, cfg, deltas, Path(path), fp)


def base_weight_files(base_dir: Path) -> list[Path]:
    return safetensors_files(base_dir, "base model")


def tensor_specs(base_dir: Path) -> list[tuple[Path, str, list[int], str]]:
    """(file, name, shape, safetensors dtype) of every base tensor, from headers only."""
    return safetensors_specs(base_dir, "base")


def iter_base_tensors(base_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, torch tensor) for every tensor of the base, one at a time."""
    from safetensors import safe_open

    for path in base_weight_files(base_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
            for name in names:
                # Reopened per tensor: pages read through a mapping kept open stay resident, so
                # RSS would grow to the model size (see exporters/gguf/writer.py).
                with safe_open(str(path), framework="pt") as f:
                    tensor = f.get_tensor(name)
                yield name, tensor
        except InputError:
            raise
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise
            raise _safetensors_error(path, exc, "base weights") from None


def is_quantized_weight(name: str, shape) -> bool:
    """Whether ``load_base`` holds this tensor in 4-bit: the 2-D weights of the decoder layers'
    linear modules. Embeddings, norms and the output head stay in fp32 (transformers' bitsandbytes
    integration skips the output embeddings; norms are not Linear)."""
    return name.endswith(".weight") and len(shape) == 2 and ".layers." in name


def trained_weights(adapter: Adapter, trained) -> dict[str, Any]:
    """The trained model's own dequantized 4-bit weights, by tensor name, where they are what
    ``nf4_roundtrip`` would give: quantized with the same settings (a bf16-trained adapter's
    base loads in fp32 on CPU, so its weights are round-tripped instead)."""
    from .qlora import trained_base_weights
    from .roundtrip import settings

    s = settings(adapter.quant)
    return {name: w for name, (w, st) in trained_base_weights(trained).items()
            if st.dtype == s["dtype"] and st.blocksize == s["blocksize"]
            and st.quant_type == s["quant_type"] and bool(st.nested) == s["compress_statistics"]}


@dataclass
class MergeResult:
    """What ``merge_adapter`` wrote and how it chose the base."""

    out_dir: Path
    merge_base: str  # the base used: original | dequantized
    requested: str  # what was asked: auto | original | dequantized
    kld: dict[str, float] = field(default_factory=dict)  # vs the trained model, per base measured
    top1: dict[str, float] = field(default_factory=dict)
    eval_tokens: int = 0
    merged_modules: int = 0
    dtype: str = "float32"
    base: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def check_fit(adapter: Adapter) -> None:
    """Every LoRA delta must fit a base tensor; the message names both sides when not."""
    shapes = {name: shape for _, name, shape, _ in tensor_specs(adapter.base_dir)}
    spec = adapter.manifest.get("base", {}).get("spec", "?")
    for key, d in adapter.deltas.items():
        want = (int(d.A.shape[1]), int(d.B.shape[0])) if d.embedding else \
            (int(d.B.shape[0]), int(d.A.shape[1]))
        if key not in shapes:
            raise ManifestError(
                f"adapter {adapter.dir} (trained on base {spec!r}) adapts {key}, which base "
                f"{adapter.base_dir} does not have; merge with the base it was trained on")
        if tuple(shapes[key]) != want:
            raise ManifestError(
                f"adapter {adapter.dir} (trained on base {spec!r}) does not fit base "
                f"{adapter.base_dir}: {key} is {list(shapes[key])} in the base, the adapter's "
                f"delta is {list(want)}")


def write_merged(adapter: Adapter, out_dir: Path, merge_base: str, dtype: str = "float32",
                 with_lora: bool = True, progress: bool = False,
                 dequantized: dict[str, Any] | None = None) -> int:
    """Stream the base through the merge into ``out_dir`` (which must exist). With
    ``with_lora=False`` the base alone is written (original or dequantized): the base GGUF of an
    adapter-only export. ``dequantized`` (``qlora.trained_base_weights``) gives the trained
    model's own dequantized 4-bit weights by tensor name; a weight it lacks is round-tripped
    here. Returns the number of modules merged."""
    import torch

    from .roundtrip import RoundTrips

    if merge_base not in ("original", "dequantized"):
        raise ConfigError(f"merge_base={merge_base!r} is not one of original, dequantized")
    if dtype not in _ST_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(_ST_DTYPES)}")
    specs = [(name, shape) for _, name, shape, _ in tensor_specs(adapter.base_dir)]
    tensors = iter_base_tensors(adapter.base_dir)
    head = _own_head(specs, dequantized) if merge_base == "dequantized" else None
    if head is not None:  # written last, from ``dequantized`` like any known weight
        specs.append(("lm_head.weight", tuple(head.shape)))
        tensors = itertools.chain(tensors, [("lm_head.weight", head)])
    writer = SafetensorsStreamWriter(out_dir / "model.safetensors", specs, _ST_DTYPES[dtype])
    merged = 0
    roundtrips = RoundTrips(adapter.base_fingerprint.get("weights_sha256"), adapter.quant) \
        if merge_base == "dequantized" else None
    try:
        with torch.no_grad():
            for name, tensor in _progress(tensors, len(specs), "merging", progress):
                w = tensor.float()
                known = (dequantized or {}).get(name) if merge_base == "dequantized" else None
                if known is not None:
                    w = known.float()
                elif merge_base == "dequantized" and is_quantized_weight(name, w.shape):
                    w = roundtrips.get(name, w)
                d = adapter.deltas.get(name) if with_lora else None
                if d is not None:
                    # fp32 add: in bf16 the low bits of a small delta would be lost.
                    w = w + d.delta()
                    merged += 1
                data = w.detach().to(getattr(torch, dtype)).contiguous()
                writer.write(name, data.reshape(-1).view(torch.uint8).numpy())
    except BaseException:
        writer.fh.close()
        raise
    writer.close()
    if roundtrips is not None:
        roundtrips.save()
    _copy_side_files(adapter, out_dir, dtype, untied=head is not None)
    return merged


def _own_head(specs, dequantized: dict[str, Any] | None):
    """The device base's output head when the checkpoint ties it to the embedding but the base
    holds other bytes for it (``onnx-int4-hqq``: ``device_base.untie_head``), else None: the
    merge then writes it as a tensor of its own and unties the config."""
    from .device_base import separate_head

    if "lm_head.weight" in {name for name, _ in specs}:
        return None
    return separate_head(dequantized or {})


def _progress(it, total: int, what: str, enabled: bool):
    if not enabled:
        yield from it
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=total)
        for item in it:
            yield item
            bar.advance(task)


def _copy_side_files(adapter: Adapter, out_dir: Path, dtype: str, untied: bool = False) -> None:
    cfg = json.loads((adapter.base_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if untied:
        cfg["tie_word_embeddings"] = False
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in ("generation_config.json",):
        if (adapter.base_dir / name).is_file():
            shutil.copy(adapter.base_dir / name, out_dir / name)
    for name in TOKENIZER_FILES:
        src = adapter.dir / name if (adapter.dir / name).is_file() else adapter.base_dir / name
        if src.is_file():
            shutil.copy(src, out_dir / name)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, merge_base: str = "auto",
                  dtype: str = "float32", eval_tokens: int = 2048, force: bool = False,
                  progress: bool = False) -> MergeResult:
    """Merge the adapter in ``adapter_dir`` into its base and write a Hugging Face checkpoint
    to ``out_dir`` (atomically; ``force`` replaces an existing one). See the module docstring
    for ``merge_base``. ``eval_tokens`` held-out tokens measure the merge against the trained
    model under ``auto`` and ``best``."""
    from .artifacts import atomic_dir, versions

    adapter = read_adapter(adapter_dir)
    check_fit(adapter)
    resolve_merge_base(adapter, merge_base)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force, what="merged model") as tmp:
        result = _merge_into(adapter, tmp, merge_base, dtype, eval_tokens, progress)
        result.out_dir = out_dir
        write_manifest(tmp, "merged", {
            "merge": {k: v for k, v in result.to_dict().items() if k != "out_dir"},
            "adapter": {"path": str(adapter.dir.resolve()),
                        "lora": adapter.manifest.get("lora"),
                        "quant": adapter.quant},
            "versions": versions("edgeqlora", "torch", "peft", "bitsandbytes", "safetensors"),
        })
    return result


FOUR_BIT = ("nf4", "fp4")


def resolve_merge_base(adapter: Adapter, merge_base: str) -> str:
    """The base ``merge_base`` merges into: ``auto`` is the one the adapter was trained against
    (module docstring); ``dequantized`` and ``best`` need an adapter trained on a 4-bit base."""
    if merge_base not in MERGE_BASES:
        raise ConfigError(f"merge_base={merge_base!r} is not one of {', '.join(MERGE_BASES)}")
    quant = adapter.quant.get("quant", "nf4")
    if merge_base == "auto":
        return "dequantized" if _quantized(quant) else "original"
    if merge_base in ("dequantized", "best") and not _quantized(quant):
        raise ConfigError(f"merge_base={merge_base} needs an adapter trained on a 4-bit base "
                          f"(quant=nf4 or fp4); {adapter.dir} was trained with quant={quant}: "
                          "merge into its original weights (merge_base=original or auto)")
    return merge_base


def reproduces_trained(adapter: Adapter, base: str) -> bool:
    """Whether merging into ``base`` gives the trained model up to float rounding: the
    dequantized 4-bit weights, or the original ones of a plain-LoRA adapter."""
    quant = adapter.quant.get("quant", "nf4")
    return (base == "dequantized") == _quantized(quant) and quant != "int8"


def _quantized(quant: str) -> bool:
    """Trained on a quantized base with a static dequantized weight: NF4/FP4 or a device base."""
    from .device_base import is_device_quant

    return quant in FOUR_BIT or is_device_quant(quant)


def dequantized_base(adapter: Adapter, trained=None) -> dict[str, Any] | None:
    """The weights a ``dequantized`` merge takes as they are: a device-aware adapter's device
    base (every tensor, checked against the manifest's sha256s), or the trained model's own
    dequantized 4-bit weights when it is loaded; None: round-trip through bitsandbytes."""
    from .device_base import check_recorded, device_state, is_device_quant

    quant = adapter.quant.get("quant", "nf4")
    if is_device_quant(quant):
        state, record = device_state(adapter.base_dir, quant)
        check_recorded(record, adapter.quant.get("device"), f"adapter {adapter.dir}")
        return state
    return trained_weights(adapter, trained) if trained is not None else None


def _merge_into(adapter: Adapter, out: Path, merge_base: str, dtype: str, eval_tokens: int,
                progress: bool, trained=None) -> MergeResult:
    """Write the merged checkpoint into the (existing, empty) directory ``out``. ``trained``:
    the trained model (``qlora.load_trained``) if the caller has it loaded; under ``auto`` and
    ``best``, ``eval_tokens`` held-out tokens measure the merge against it (0: not measured)."""
    base = resolve_merge_base(adapter, merge_base)
    result = MergeResult(out, base, merge_base, dtype=dtype,
                         base={k: adapter.base_fingerprint.get(k) for k in
                               ("id", "name", "weights_sha256", "model_type")})
    if merge_base == "best":
        return _keep_best(adapter, out, result, eval_tokens, progress, trained)
    measure = eval_tokens > 0 and merge_base == "auto"
    if measure and trained is None:
        from .qlora import load_trained

        trained = load_trained(adapter.dir, device="cpu")
    known = dequantized_base(adapter, trained) if base == "dequantized" else None
    result.merged_modules = write_merged(adapter, out, base, dtype, progress=progress,
                                         dequantized=known)
    if measure:
        score = measure_against_trained(adapter.dir, {base: out}, eval_tokens, trained=trained)
        _record(result, score)
    return result


def _record(result: MergeResult, scores: dict[str, dict[str, Any]]) -> None:
    for base, s in scores.items():
        result.kld[base] = s["kld"]
        result.top1[base] = s["top1"]
        result.eval_tokens = s["tokens"]


def _keep_best(adapter: Adapter, out: Path, result: MergeResult, eval_tokens: int,
               progress: bool, trained) -> MergeResult:
    """``best``: both bases merged side by side, each measured against the trained model; the
    better one is moved into ``out``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".merge-", dir=out.parent) as scratch:
        cands = {}
        for base in ("original", "dequantized"):
            d = Path(scratch) / base
            d.mkdir()
            known = dequantized_base(adapter, trained) if base == "dequantized" else None
            result.merged_modules = write_merged(adapter, d, base, result.dtype,
                                                 progress=progress, dequantized=known)
            cands[base] = d
        scores = measure_against_trained(adapter.dir, cands, eval_tokens, keep_logits=True,
                                         trained=trained)
        _record(result, scores)
        best = min(scores, key=lambda b: scores[b]["kld"])
        result.merge_base = best
        # Not a field (not in the record): the merged model's logits on the held-out set.
        result.logits = scores[best]["logits"]
        for p in cands[best].iterdir():
            shutil.move(str(p), out / p.name)
    return result

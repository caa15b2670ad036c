"""The fit check: will this export run on that device, in how much memory, how fast?

``model_facts(path)`` reads sizes and architecture numbers from an export directory or a bare
GGUF file (tensor table and metadata through ``runtimes.gguf_header``, the one GGUF header
reader; nothing is loaded).
``fit(facts, profile, context)`` is a pure function of those facts and a ``DeviceProfile``:

    resident = weights + repacked copies + KV cache + runtime overhead

- **weights**: the model file. llama.cpp maps it and prefetches every page (``MAP_POPULATE``),
  so all of it is resident (measured: RssFile grows by the file size).
- **repacked copies**: on CPUs with the right SIMD, ggml-cpu copies some quant types into an
  interleaved layout in anonymous memory (``ggml_repack_get_optimal_repack_type`` in llama.cpp's
  ``ggml-cpu/repack.cpp``, mirrored in ``_repacked``); the mapped file pages stay resident too,
  so those tensors count twice (measured on this machine with a Q4_0 file: +57 MiB anon).
- **KV cache**: ``n_ctx x layers x kv_heads x (key_dim + value_dim)`` in f16, llama.cpp's
  default cache type; the context is padded to 256 cells as llama.cpp does.
- **runtime overhead**: the Python process with the runtime and server imported
  (``PROCESS_BASE``), llama.cpp's per-context state (vocabulary tables, output buffer;
  ``CONTEXT_FIXED`` + ``CONTEXT_PER_VOCAB``) and the compute buffer pages actually touched when
  a full 512-token batch is decoded at the end of a full context: the attention score matrix
  ``heads x n_ctx x 512`` in f32 plus its f16 copy for the KV matmul (no flash attention on
  CPU), and the per-token activations.

Decode speed is bandwidth-bound: every generated token reads every weight once plus the KV
cache, so ``tok/s = DECODE_EFFICIENCY x bandwidth / bytes_per_token`` (at half the context).

The constants were measured on the embedded SmolLM2-135M GGUF with llama-cpp-python 0.3.36
(tests/test_devices.py re-measures them: predicted vs measured RSS within 15 %). ONNX figures
are an estimate: no ONNX runtime shim was measured.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from edgeqlora.artifacts import read_json
from edgeqlora.errors import DeviceError, EdgeQloraError

from edgeqlora.runtimes.gguf_header import Tensor, read_gguf_header

from .profiles import DeviceProfile

MiB = 2**20
# Resident memory of `edgeqlora serve` before a model is loaded: python + numpy + jinja2 +
# llama_cpp + starlette/uvicorn, measured 50.6 MiB on x86_64 (43 MiB for `edgeqlora run`).
PROCESS_BASE = 50 * MiB
# llama.cpp context state after load without the KV cache: 20 MiB measured with a 49,152-token
# vocabulary. How it splits between a fixed part and the vocabulary tables (token strings,
# BPE merge ranks) is an estimate.
CONTEXT_FIXED = 4 * MiB
CONTEXT_PER_VOCAB = 340
# llama.cpp's default physical batch (n_ubatch) and KV cell padding; the runtime shim uses 512.
N_UBATCH = 512
KV_PAD = 256
# Share of the theoretical DRAM bandwidth llama.cpp's decode reaches. Measured examples:
# Raspberry Pi 5, llama3.1:8b Q4_K_M (~4.6 GB read per token) at 2.17 tok/s = 10 GB/s of
# 17.1 GB/s = 58 %, llama3.2:3b at 4.88 tok/s = 54 % (geerlingguy/ai-benchmarks issue 7);
# Apple M1 Max (400 GB/s), llama3.1 8B Q4_K_M at 46 tok/s = 57 % (Metal). 0.55 in between.
DECODE_EFFICIENCY = 0.55
# Verdicts: "fits" leaves 15 % of the usable memory for the page cache and the rest of the
# system's growth; "tight" is within the usable memory but without that margin.
FIT_MARGIN = 0.85

# ggml quant types and the SIMD that makes ggml-cpu repack them (llama.cpp repack.cpp).
_REPACK_X86_AVX2 = {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8}
_REPACK_X86_AVX512 = {"Q2_K": 8}
_REPACK_ARM_DOTPROD = {"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "IQ4_NL": 4, "MXFP4": 4,
                       "Q8_0": 4}


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the fit needs to know about a model file: sizes and architecture numbers."""

    path: str
    target: str
    quant: str | None
    architecture: str
    file_bytes: int  # model file(s) on disk, adapter included
    n_params: int
    n_layers: int
    n_embd: int
    n_head: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    kv_values_per_token: int  # sum over layers of kv_heads x (key_dim + value_dim)
    tensors: tuple[Tensor, ...] = dataclasses.field(default=(), repr=False)
    tied_embeddings: bool = False

    @property
    def bits_per_weight(self) -> float:
        """Average bits per parameter: the quality order used by ``pick_quant``."""
        return 8 * sum(t.n_bytes for t in self.tensors) / max(1, self.n_params) \
            if self.tensors else 8 * self.file_bytes / max(1, self.n_params)

    @property
    def decode_read_bytes(self) -> int:
        """Weight bytes read per generated token: all of them, except the token embedding
        (one row is gathered) when the model has a separate output matrix."""
        if not self.tensors:
            return self.file_bytes
        skip = "" if self.tied_embeddings else "token_embd.weight"
        return sum(t.n_bytes for t in self.tensors if t.name != skip)


@dataclasses.dataclass(frozen=True)
class FitResult:
    device: str
    model: str
    quant: str | None
    context: int
    weights_bytes: int
    repacked_bytes: int
    kv_bytes: int
    runtime_bytes: int
    usable_bytes: int
    decode_tok_s: float | None
    verdict: str  # "fits", "tight", "does not fit", "no runtime"
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.repacked_bytes + self.kv_bytes + self.runtime_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def gguf_facts(path: str | Path, target_path: str | None = None,
               extra: Sequence[Path] = ()) -> ModelFacts:
    """Facts from a GGUF file's metadata and tensor table (plus adapter files in ``extra``)."""
    from edgeqlora.errors import require

    gguf = require("gguf", "gguf", "Reading a GGUF file's architecture")
    path = Path(path)
    kv, tensors = read_gguf_header(path, DeviceError)
    arch = kv.get(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise DeviceError(f"{path}: GGUF key general.architecture is missing")

    def num(key_template: str, required: bool = True):
        key = key_template.format(arch=arch)
        value = kv.get(key)
        if value is None and required:
            raise DeviceError(f"{path}: GGUF key {key} is missing; cannot size this model")
        return value

    n_layers = int(num(gguf.Keys.LLM.BLOCK_COUNT))
    n_embd = int(num(gguf.Keys.LLM.EMBEDDING_LENGTH))
    n_head_raw = num(gguf.Keys.Attention.HEAD_COUNT)
    kv_raw = num(gguf.Keys.Attention.HEAD_COUNT_KV, required=False)
    # Some architectures store per-layer head counts as arrays.
    heads = list(n_head_raw) if isinstance(n_head_raw, list) else [n_head_raw] * n_layers
    kv_heads = heads if kv_raw is None else (
        list(kv_raw) if isinstance(kv_raw, list) else [kv_raw] * n_layers)
    n_head = max(int(h) for h in heads)
    key_len = num(gguf.Keys.Attention.KEY_LENGTH, required=False) or n_embd // max(1, n_head)
    value_len = num(gguf.Keys.Attention.VALUE_LENGTH, required=False) or key_len
    ff = num(gguf.Keys.LLM.FEED_FORWARD_LENGTH, required=False) or 4 * n_embd
    n_ff = max(ff) if isinstance(ff, list) else int(ff)
    ctx_train = int(num(gguf.Keys.LLM.CONTEXT_LENGTH, required=False) or 0)
    names = {t.name for t in tensors}
    vocab = num(gguf.Keys.LLM.VOCAB_SIZE, required=False)
    if vocab is None:
        tokens = kv.get(gguf.Keys.Tokenizer.LIST)
        vocab = len(tokens) if isinstance(tokens, list) else int(tokens) if tokens else next(
            (t.ne1 for t in tensors if t.name == "token_embd.weight"), 0)
    file_bytes = path.stat().st_size
    for p in extra:
        tensors += read_gguf_header(p, DeviceError)[1]
        file_bytes += p.stat().st_size
    ftype = kv.get(gguf.Keys.General.FILE_TYPE)
    quant = None
    if ftype is not None:
        try:
            quant = gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").lower()
        except ValueError:
            quant = None
    return ModelFacts(
        path=target_path or str(path), target="gguf", quant=quant, architecture=arch,
        file_bytes=file_bytes, n_params=sum(t.n_elements for t in tensors
                                            if t.name.endswith(".weight")),
        n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_ff=n_ff, n_vocab=int(vocab),
        n_ctx_train=ctx_train,
        kv_values_per_token=sum(int(k) * (int(key_len) + int(value_len)) for k in kv_heads),
        tensors=tuple(tensors), tied_embeddings="output.weight" not in names)


def _onnx_facts(export_dir: Path, manifest: dict[str, Any]) -> ModelFacts:
    # No tensor table without loading the graph: sizes from the files, architecture from the
    # Hugging Face config.json the exporter copies beside the model.
    config_path = export_dir / "config.json"
    if not config_path.is_file():
        raise DeviceError(f"{export_dir} has no config.json; the fit check needs the model's "
                          "architecture (layers, heads) for an ONNX export")
    cfg = read_json(config_path, DeviceError)
    _check_onnx_model(export_dir / ((manifest.get("exporter") or {}).get("model_file")
                                    or "model.onnx"))
    files = manifest.get("files") or {}
    size = sum(int(m.get("size_bytes", 0)) for n, m in files.items()
               if n.endswith((".onnx", ".onnx.data", ".data")))
    return ModelFacts(path=str(export_dir), target="onnx", quant=manifest.get("quant"),
                      file_bytes=size, **_config_numbers(cfg, config_path))


def _check_onnx_model(model: Path) -> None:
    """``model`` must be an ONNX graph whose external tensors lie inside their data files (a
    size check alone passes random bytes of the right length). With the onnx package: the
    graph is parsed without its weights and every external tensor's offset + length checked
    against its file; without it (a device with only onnxruntime), the protobuf's first field
    must be ModelProto's ir_version."""
    if not model.is_file():
        raise DeviceError(f"{model} listed in the manifest is missing")
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    except ImportError:
        with open(model, "rb") as f:
            head = f.read(2)
        if len(head) < 2 or head[0] != 0x08 or not 1 <= head[1] <= 0x7F:
            raise DeviceError(f"{model} is not an ONNX model (it does not start as a "
                              "ModelProto does)") from None
        return
    try:
        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception as exc:  # protobuf raises DecodeError and others on garbage
        raise DeviceError(f"{model} is not an ONNX model ({type(exc).__name__}: "
                          f"{str(exc)[:80]})") from None
    if not graph.node:
        raise DeviceError(f"{model} is not an ONNX model (its graph has no nodes)")
    for t in graph.initializer:
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        data = model.parent / info.location
        if not data.is_file() or int(info.offset or 0) + int(info.length or 0) > \
                data.stat().st_size:
            raise DeviceError(f"{model}: tensor {t.name} lies beyond its data file "
                              f"{info.location} (truncated or not this model's)")


def _config_numbers(cfg: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """The architecture numbers of ``ModelFacts`` from a Hugging Face ``config.json``."""
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                           "vocab_size") if not isinstance(cfg.get(k), int)]
    if missing:
        raise DeviceError(f"{source} lacks {', '.join(missing)}")
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    kv = cfg.get("num_key_value_heads") or n_head
    n_ff = cfg.get("intermediate_size") or 4 * cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    h = cfg["hidden_size"]
    params = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2) \
        + layers * (2 * h * h + 2 * h * kv * head_dim + 3 * h * n_ff)
    return dict(architecture=str(cfg.get("model_type", "?")), n_params=params, n_layers=layers,
                n_embd=h, n_head=n_head, n_ff=n_ff, n_vocab=cfg["vocab_size"],
                n_ctx_train=int(cfg.get("max_position_embeddings") or 0),
                kv_values_per_token=layers * kv * 2 * head_dim,
                tied_embeddings=bool(cfg.get("tie_word_embeddings")))


def model_facts(path: str | Path, allow_failed: bool = False) -> ModelFacts:
    """Facts of an export directory (``manifest.json``) or a bare ``.gguf`` file. An export
    whose files do not match the sizes and sha256s its manifest records (truncated, replaced,
    missing) or whose verification or gate failed (unless ``allow_failed``) is a DeviceError."""
    from edgeqlora.artifacts import check_usable_export, read_manifest
    from edgeqlora.runtimes import check_export_files, model_files

    p = Path(path)
    if not p.exists():
        raise DeviceError(f"{p} does not exist; pass an export directory or a .gguf file")
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise DeviceError(f"{p} is not a GGUF file (first bytes are not 'GGUF') and "
                                  "not an export directory")
        return gguf_facts(p)
    try:
        manifest = read_manifest(p, kind="export")
        check_usable_export(p, manifest, allow_failed, "fit")
        check_export_files(p, manifest, verify=True)
    except EdgeQloraError as exc:
        raise DeviceError(str(exc)) from None
    target = manifest.get("target")
    if target == "gguf":
        model, adapter = model_files(p, manifest, "gguf")
        if not model.is_file():
            raise DeviceError(f"{p}: model file {model.name} listed in the manifest is missing")
        facts = gguf_facts(model, str(p), [adapter] if adapter is not None else [])
        return dataclasses.replace(facts, quant=manifest.get("quant") or facts.quant)
    if target == "onnx":
        return _onnx_facts(p, manifest)
    raise DeviceError(f"{p}: export target {target!r} is not one the fit check knows "
                      "(gguf, onnx)")


def predict_facts(config: dict[str, Any], shapes: dict[str, Sequence[int]], target: str,
                  quant: str, block_size: int | None = None, path: str = "",
                  tokenizer_dir: str | Path | None = None, **options: Any) -> ModelFacts:
    """What an export of a model would look like, before it is written: the facts ``fit``
    needs, from the model's ``config.json`` and its tensor shapes (Hugging Face names, as in
    the safetensors headers).

    The sizes and per-tensor types are the exporter's own prediction (``predict`` of
    ``edgeqlora.exporters.gguf`` / ``.onnx``, built from the plan its writer follows), so the
    fit check never keeps a copy of the quant rules. An unknown target or quant is a
    DeviceError."""
    from edgeqlora.errors import ConfigError
    from edgeqlora.exporters import get_exporter

    numbers = _config_numbers(config, path or "config.json")
    try:
        exporter = get_exporter(target)
        if block_size is not None:  # ONNX's MatMulNBits block size
            options["block_size"] = block_size
        predicted = exporter.predict(config, shapes, quant, tokenizer_dir=tokenizer_dir,
                                     **options)
    except ConfigError as exc:
        raise DeviceError(f"no size prediction for {target} quant {quant!r}: {exc}") from None
    if predicted.get("n_params"):
        numbers["n_params"] = int(predicted["n_params"])
    return ModelFacts(path=path, target=target, quant=quant,
                      file_bytes=int(predicted["file_bytes"]),
                      tensors=tuple(predicted.get("tensors") or ()), **numbers)


def _repacked(facts: ModelFacts, profile: DeviceProfile) -> int:
    """Bytes ggml-cpu copies into its repacked layout on this CPU (0 for other runtimes)."""
    if facts.target != "gguf":
        return 0
    feats = set(profile.features)
    table: dict[str, int] = {}
    if profile.arch == "x86_64":
        if "avx2" in feats:
            table.update(_REPACK_X86_AVX2)
        if "avx512" in feats:
            table.update(_REPACK_X86_AVX512)
    elif profile.arch == "aarch64" and feats & {"dotprod", "i8mm"}:
        table.update(_REPACK_ARM_DOTPROD)
    # token_embd is read with GET_ROWS, which the repacked layout does not serve: it stays in
    # the mapping. Only matrices of the transformer blocks and the output head are repacked.
    return sum(t.n_bytes for t in facts.tensors
               if t.type in table and t.ne1 % table[t.type] == 0
               and t.name != "token_embd.weight" and t.ne1 > 1)


def kv_cache_bytes(facts: ModelFacts, context: int) -> int:
    cells = math.ceil(context / KV_PAD) * KV_PAD
    bytes_per_value = 2 if facts.target == "gguf" else 4  # f16 in llama.cpp; f32 estimate ONNX
    return cells * facts.kv_values_per_token * bytes_per_value


def runtime_overhead_bytes(facts: ModelFacts, context: int, filled: int | None = None) -> int:
    """Process, context state and compute working set when ``filled`` tokens (default: the
    whole context) are in the cache and the last batch is decoded."""
    filled = context if filled is None else min(filled, context)
    ubatch = max(1, min(N_UBATCH, filled))
    n_kv = math.ceil(filled / KV_PAD) * KV_PAD
    # Attention scores f32 [n_kv, ubatch, heads] plus the f16 copy ggml makes of them for the
    # V matmul (in the CPU backend's work buffer): 1.5 x the f32 matrix.
    scores = int(1.5 * 4 * facts.n_head * n_kv * ubatch)
    # Activations of one layer for the batch (residual, norm, q/k/v/out, gate/up/act), f32.
    activations = 4 * ubatch * (4 * facts.n_embd + 3 * facts.n_ff)
    logits = 2 * 4 * facts.n_vocab  # the last token's logits and llama.cpp's output buffer
    context_state = CONTEXT_FIXED + CONTEXT_PER_VOCAB * facts.n_vocab
    return PROCESS_BASE + context_state + scores + activations + logits


def decode_tokens_per_s(facts: ModelFacts, profile: DeviceProfile, context: int
                        ) -> float | None:
    if not profile.bandwidth_gbs or not math.isfinite(profile.bandwidth_gbs):
        return None
    bytes_per_value = 2 if facts.target == "gguf" else 4
    per_token = facts.decode_read_bytes + facts.kv_values_per_token * bytes_per_value * context // 2
    return DECODE_EFFICIENCY * profile.bandwidth_gbs * 1e9 / per_token


def memory_breakdown(facts: ModelFacts, profile: DeviceProfile, context: int,
                     filled: int | None = None) -> dict[str, int]:
    """Predicted resident bytes by part, for ``filled`` tokens in the cache (default: the
    whole context, the worst case the verdict uses)."""
    return {"weights_bytes": facts.file_bytes, "repacked_bytes": _repacked(facts, profile),
            "kv_bytes": kv_cache_bytes(facts, context),
            "runtime_bytes": runtime_overhead_bytes(facts, context, filled)}


def fit(facts: ModelFacts, profile: DeviceProfile, context: int = 2048) -> FitResult:
    """Predicted resident memory, decode speed and a verdict for ``facts`` on ``profile``."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 16:
        raise DeviceError(f"context={context!r} must be an integer >= 16 tokens")
    notes = []
    if facts.n_ctx_train and context > facts.n_ctx_train:
        notes.append(f"context {context} is beyond the model's training context "
                     f"{facts.n_ctx_train}")
    if facts.target == "onnx":
        notes.append("ONNX memory is an estimate (not measured against the runtime)")
    result = dict(device=profile.name, model=facts.path, quant=facts.quant, context=context,
                  **memory_breakdown(facts, profile, context),
                  usable_bytes=profile.usable_bytes,
                  decode_tok_s=decode_tokens_per_s(facts, profile, context))
    total = sum(result[k] for k in ("weights_bytes", "repacked_bytes", "kv_bytes",
                                    "runtime_bytes"))
    if facts.target not in profile.runtimes:
        verdict = "no runtime"
        notes.append(f"{profile.name} has no {facts.target} runtime (it has: "
                     f"{', '.join(profile.runtimes)})")
    elif total <= FIT_MARGIN * profile.usable_bytes:
        verdict = "fits"
    elif total <= profile.usable_bytes:
        verdict = "tight"
    else:
        verdict = "does not fit"
    return FitResult(verdict=verdict, notes=tuple(notes), **result)


@dataclasses.dataclass(frozen=True)
class QuantChoice:
    facts: ModelFacts
    result: FitResult
    reason: str
    considered: tuple[FitResult, ...]


def pick_quant(candidates: Iterable[ModelFacts | str | Path], profile: DeviceProfile,
               context: int = 2048) -> QuantChoice:
    """The highest-quality candidate (most bits per weight) that fits ``profile``.

    Candidates are export directories, .gguf files or ``ModelFacts``. A "fits" verdict wins over
    "tight"; among equals the larger model wins. Nothing within the usable memory raises a
    DeviceError naming the smallest footprint found.
    """
    facts = [c if isinstance(c, ModelFacts) else model_facts(c) for c in candidates]
    if not facts:
        raise DeviceError("pick_quant needs at least one candidate export")
    results = [(f, fit(f, profile, context)) for f in facts]
    ranked = sorted(results, key=lambda fr: fr[0].bits_per_weight, reverse=True)
    for wanted in ("fits", "tight"):
        for f, r in ranked:
            if r.verdict == wanted:
                skipped = [g for g, s in ranked if g.bits_per_weight > f.bits_per_weight]
                how = "fits" if wanted == "fits" else "fits, without margin,"
                why = (f"{f.quant or f.path} ({f.bits_per_weight:.2f} bits/weight) is the "
                       f"highest-precision candidate that {how} {profile.name}: "
                       f"{r.total_bytes / MiB:.0f} MiB predicted of {profile.usable_mb} MiB "
                       f"usable at context {context}")
                if skipped:
                    why += "; larger: " + ", ".join(
                        f"{g.quant or g.path} {s.total_bytes / MiB:.0f} MiB ({s.verdict})"
                        for g, s in ranked if g in skipped)
                return QuantChoice(f, r, why, tuple(r for _, r in results))
    smallest_f, smallest = min(results, key=lambda fr: fr[1].total_bytes)
    runtime_less = [r for _, r in results if r.verdict == "no runtime"]
    if len(runtime_less) == len(results):
        raise DeviceError(f"none of the {len(results)} candidate(s) can run on {profile.name}: "
                          f"it has no {smallest_f.target} runtime (it has: "
                          f"{', '.join(profile.runtimes)})")
    raise DeviceError(
        f"no candidate fits {profile.name} ({profile.usable_mb} MiB usable) at context "
        f"{context}: the smallest footprint is {smallest_f.quant or smallest_f.path} at "
        f"{smallest.total_bytes / MiB:.0f} MiB ({smallest_f.path}); try a smaller quant, a "
        "shorter --context or a smaller base model")

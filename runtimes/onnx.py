"""ONNX runtime on plain onnxruntime: the KV-cache decode loop in numpy, tokenizer from
``tokenizer.json`` (the ``tokenizers`` library), chat template via ``chat_template.ChatTemplate``.

Reads an export written by ``exporters/onnx/``: ``model.onnx`` whose inputs are
``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key/value`` and whose
outputs are ``logits`` and ``present.{i}.key/value``; the layer count, KV heads and head size come
from ``genai_config.json`` (the same file onnxruntime-genai reads). No torch, no transformers.

Generation: the prompt is run in one pass (chunks of ``n_batch`` tokens) with an empty cache, then
one token per step, each step's ``present`` tensors fed back as the next ``past``. Sampling is
plain numpy: temperature 0 is the argmax (what the parity gate compares); otherwise top-k, then
top-p, then a draw from a ``numpy.random.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Generator, Iterator, Mapping, Sequence

import numpy as np

from edgeqlora.errors import InputError, MissingDependencyError, require

from .base import Interrupted, Runtime, Sampling, default_threads, sample
from .chat_template import ChatTemplate
from .gguf import read_tokenizer_files

GENAI_CONFIG = "genai_config.json"
DEFAULT_N_BATCH = 512


def _bytes_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's unicode-char -> byte table (``bytes_to_unicode`` inverted).

    Written out because ``tokenizers`` exposes no per-token raw bytes: ``decode([id])`` replaces
    half of a multi-byte character with U+FFFD, which would break streaming of non-ASCII text."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(dec: Mapping[str, Any] | None) -> bool:
    """Whether a tokenizer's decoder (its tokenizer.json entry) maps bytes to unicode."""
    dec = dec or {}
    kinds = [dec.get("type")] + [d.get("type") for d in dec.get("decoders") or []]
    return "ByteLevel" in kinds


class ONNXRuntime(Runtime):
    """An ONNX export in onnxruntime (CPU by default)."""

    name = "onnx"

    def __init__(self, model_path: str | Path, export_dir: str | Path | None = None,
                 n_ctx: int | None = None, n_threads: int | None = None,
                 providers: Sequence[str] | None = None, n_batch: int = DEFAULT_N_BATCH,
                 lora_path: Any = None, lora_scale: float = 1.0, prompt_cache: bool = False):
        if lora_scale != 1.0:
            raise InputError(f"lora_scale={lora_scale}: onnxruntime adapters are applied as "
                             "exported (no scale); re-export the adapter instead")
        ort = _onnxruntime()
        tokenizers = require("tokenizers", "device-onnx", "Running an ONNX export")
        self.path = Path(model_path)
        self.export_dir = Path(export_dir) if export_dir is not None else self.path.parent
        if not self.path.is_file():
            raise InputError(f"{self.path} does not exist")
        cfg_path = self.export_dir / GENAI_CONFIG
        if not cfg_path.is_file():
            raise InputError(f"{self.export_dir} has no {GENAI_CONFIG}; re-export it with "
                             "'edgeqlora export --target onnx'")
        try:
            cfg = json.loads(cfg_path.read_text())
            dec = cfg["model"]["decoder"]
            self.n_layers = int(dec["num_hidden_layers"])
            self.n_kv = int(dec["num_key_value_heads"])
            self.head_size = int(dec["head_size"])
            context = int(cfg["search"]["max_length"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                ValueError) as exc:
            raise InputError(f"{cfg_path} is not a usable genai config ({exc!r}); re-export "
                             "the model") from None
        self.n_threads = int(n_threads) if n_threads else default_threads()
        if self.n_threads < 1:
            raise InputError(f"n_threads={n_threads} must be >= 1")
        self.n_ctx = int(n_ctx) if n_ctx is not None else context
        if self.n_ctx < 2:
            raise InputError(f"n_ctx={n_ctx} is too small")
        self.n_batch = int(n_batch)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.n_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(str(self.path), sess_options=opts,
                                              providers=list(providers or
                                                             ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise InputError(f"onnxruntime could not load {self.path} "
                             f"({str(exc).splitlines()[0] if str(exc) else exc!r}); the file is "
                             "truncated, corrupt or needs a newer onnxruntime") from None
        inputs = {i.name for i in self._sess.get_inputs()}
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layers)
                            for kv in ("key", "value")]
        missing = {"input_ids", "attention_mask", "position_ids", *self._past_names} - inputs
        if missing:
            raise InputError(f"{self.path} lacks the inputs {sorted(missing)[:4]}; it is not "
                             "an edgeqlora ONNX export")
        # Adapter-only exports: LoRA weights are graph inputs bound from an adapter file.
        # They are overridable initializers (rank-0 defaults = the base alone).
        self._lora_inputs = {i.name for i in self._sess.get_overridable_initializers()
                             if i.name.startswith("lora.")}
        self._ort = ort
        self._run_options = None
        self.lora_path = None
        self.set_adapter(lora_path)
        self._outputs = [o.name for o in self._sess.get_outputs()]
        self.vocab_size = int(self._sess.get_outputs()[0].shape[-1]
                              if isinstance(self._sess.get_outputs()[0].shape[-1], int)
                              else cfg["model"]["vocab_size"])

        tok_path = self.export_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise InputError(f"{self.export_dir} has no tokenizer.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(tok_path))
            # From the parsed tokenizer, not a second parse of the file (~0.1 s for 49k tokens).
            decoder = self._tok.decoder
            decoder = json.loads(decoder.__getstate__()) if decoder is not None else None
        except Exception as exc:
            raise InputError(f"{tok_path} cannot be read by the tokenizers library "
                             f"({exc})") from None
        self._byte_level = _is_byte_level(decoder)
        self._byte_table = _bytes_decoder() if self._byte_level else {}
        self._special_ids = {int(i) for i, t in self._tok.get_added_tokens_decoder().items()
                             if t.special}
        self._piece_cache: dict[int, bytes] = {}
        # prompt_cache: the KV cache of the last generation (its tokens and present tensors);
        # a prompt that starts with the same tokens decodes only the rest (as the GGUF runtime
        # does, with the same caveat: kernels round a split batch differently).
        self.prompt_cache = bool(prompt_cache)
        self._kv: tuple[list[int], dict[str, np.ndarray]] | None = None

        files = read_tokenizer_files(self.export_dir)
        self.special_tokens = {k: v for k, v in files.items() if k.endswith("_token")}
        source = files.get("chat_template")
        self.chat_template = ChatTemplate(source, self.special_tokens,
                                          files.get("chat_template_origin", str(tok_path))) \
            if source else None
        eos = cfg["model"].get("eos_token_id")
        self._eog = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        gen = self.export_dir / "generation_config.json"
        if gen.is_file():
            g = json.loads(gen.read_text()).get("eos_token_id")
            self._eog |= set(g if isinstance(g, list) else [g] if g is not None else [])
        eos_text = self.special_tokens.get("eos_token")
        if eos_text and self._tok.token_to_id(eos_text) is not None:
            self._eog.add(self._tok.token_to_id(eos_text))
        self._eog.discard(None)

    def set_adapter(self, path: str | Path | None) -> None:
        """Switch the LoRA adapter file (onnxruntime ``AdapterFormat``) without reloading the
        base; ``None`` runs the base alone (rank-0 LoRA inputs). The prompt cache is dropped:
        its keys and values came from the old adapter."""
        self._kv = None
        if path is None:
            self._run_options, self.lora_path = None, None
            return
        if not self._lora_inputs:
            raise InputError(f"{self.path} has no LoRA inputs; adapters apply to an "
                             "adapter-only export (edgeqlora export --adapter-only)")
        path = Path(path)
        if not path.is_file():
            raise InputError(f"adapter file {path} does not exist")
        adapter = self._ort.LoraAdapter()
        try:
            adapter.Load(str(path))
        except Exception as exc:  # onnxruntime raises its own Fail type
            raise InputError(f"{path} is not an onnxruntime adapter file ({exc})") from None
        opts = self._ort.RunOptions()
        opts.add_active_adapter(adapter)
        self._adapter = adapter  # the run options hold a reference; keep it alive
        self._run_options, self.lora_path = opts, path

    # tokens

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"tokenize() takes a string, got {type(text).__name__}")
        if not text:
            return []
        # encode_special_tokens=True makes control-token text plain text (HF's
        # split_special_tokens); the default matches them as tokens, as transformers does.
        self._tok.encode_special_tokens = not special
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        ids = [int(t) for t in ids]
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise InputError(f"token id {t} is outside the vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=not special)

    def _piece(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            if token in self._special_ids:
                piece = b""  # like llama.cpp's server: control tokens are not rendered
            elif self._byte_level:
                text = self._tok.id_to_token(token) or ""
                piece = bytes(self._byte_table.get(c, 0x3F) for c in text)
            else:
                piece = self._tok.decode([token], skip_special_tokens=True).encode("utf-8")
            self._piece_cache[token] = piece
        return piece

    def _is_eog(self, token: int) -> bool:
        return token in self._eog

    # the model

    def _empty_cache(self) -> dict[str, np.ndarray]:
        z = np.zeros((1, self.n_kv, 0, self.head_size), dtype=np.float32)
        return {n: z for n in self._past_names}

    def _run(self, ids: Sequence[int], past: dict[str, np.ndarray], start: int
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits ``[len(ids), vocab]`` of ``ids`` at positions ``start...`` after ``past``."""
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, start + n), dtype=np.int64),
                "position_ids": np.arange(start, start + n, dtype=np.int64)[None],
                **past}
        try:
            out = self._sess.run(self._outputs, feed, self._run_options)
        except Exception as exc:  # e.g. an adapter file made for another base
            if self._run_options is not None and self._run_options.terminate:
                raise Interrupted() from None  # stopped by its Cancel (_interruptible)
            if self.lora_path is None:
                raise
            raise InputError(f"adapter {self.lora_path} does not fit {self.path} "
                             f"({str(exc).splitlines()[0]})") from None
        return out[0][0], dict(zip(self._past_names, out[1:]))

    @contextlib.contextmanager
    def _interruptible(self, cancel):
        """Run options of the call's own (the adapter too) whose ``terminate``, set by
        ``cancel``, stops the ``session.run`` in progress (onnxruntime checks it between
        nodes)."""
        kept = self._run_options
        opts = self._ort.RunOptions()
        if self.lora_path is not None:
            opts.add_active_adapter(self._adapter)

        def stop():
            opts.terminate = True

        self._run_options = opts
        try:
            with cancel.hooked(stop):
                yield
        finally:
            self._run_options = kept

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        past, logits = self._empty_cache(), []
        for start in range(0, len(ids), self.n_batch):
            chunk, past = self._run(ids[start:start + self.n_batch], past, start)
            logits.append(chunk)
        return np.concatenate(logits), past

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = self.check_ids(token_ids)
        return np.ascontiguousarray(self._prefill(ids)[0], dtype=np.float32)

    def _logit_steps(self, prompt_ids: list[int]) -> Generator[np.ndarray, int, None]:
        keep = 0
        if self.prompt_cache and self._kv is not None:
            cached, kv = self._kv
            while keep < min(len(cached), len(prompt_ids) - 1) \
                    and cached[keep] == prompt_ids[keep]:
                keep += 1
        if keep:
            past = {n: np.ascontiguousarray(a[:, :, :keep]) for n, a in self._kv[1].items()}
            last, past = self._run(prompt_ids[keep:], past, keep)
            last = last[-1]
        else:
            logits, past = self._prefill(prompt_ids)
            last = logits[-1]
        seen = list(prompt_ids)
        pos = len(prompt_ids)
        try:
            while True:
                token = yield last
                if pos >= self.n_ctx:
                    return
                step, past = self._run([token], past, pos)
                seen.append(token)
                last = step[-1]
                pos += 1
        finally:
            if self.prompt_cache:
                self._kv = (seen, past)

    def _token_stream(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[int]:
        rng = np.random.default_rng(sampling.seed)
        steps = self._logit_steps(prompt_ids)
        try:
            logits = next(steps)
            while True:
                token = sample(logits, sampling, rng)
                yield token
                logits = steps.send(token)
        except StopIteration:
            return
        finally:
            steps.close()

    def _ll_tokenizer(self) -> Any:
        if self.__dict__.get("_lltok") is None:
            from .constrain import _llguidance

            llg = _llguidance()
            spec = (self.export_dir / "tokenizer.json").read_text(encoding="utf-8")
            self._lltok = llg.LLTokenizer(spec, n_vocab=self.vocab_size,
                                          eos_token=sorted(self._eog) or None)
        return self._lltok

    def info(self) -> dict[str, Any]:
        return {**super().info(), "n_threads": self.n_threads,
                "providers": self._sess.get_providers(),
                "lora": str(self.lora_path) if self.lora_path else None,
                "size_bytes": sum(p.stat().st_size for p in self.path.parent.glob(
                    self.path.name + "*"))}

    def close(self) -> None:
        self._sess = None
        self._kv = None


def _onnxruntime():
    try:
        return require("onnxruntime", "device-onnx", "Running an ONNX export")
    except MissingDependencyError:
        raise
    except Exception as exc:  # the native library failed to load
        raise MissingDependencyError(f"onnxruntime is installed but does not load: {exc}; "
                                     "reinstall it with: pip install --force-reinstall "
                                     "onnxruntime") from None


def load_onnx(model_path: Path, export_dir: Path | None = None,
              manifest: Mapping[str, Any] | None = None, **kwargs: Any) -> ONNXRuntime:
    """The loader ``runtimes.load`` calls for ``target: onnx``."""
    return ONNXRuntime(model_path, export_dir=export_dir, **kwargs)

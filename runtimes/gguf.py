"""GGUF runtime on llama-cpp-python: tokenize, chat template, streaming generation, logits.

Generation uses llama.cpp's own sampler chain (``Llama.generate``); the text side (UTF-8 pieces,
stop strings, finish reasons) is the shared loop in ``base.py``. ``Llama.create_completion`` is
not used: it re-detokenizes the whole completion after every token (quadratic) and its
per-token buffer is 32 bytes, which truncates long tokens.

Sampling is plain: top-k, top-p, temperature, no min-p and no repetition penalty, so that
temperature 0 is exactly the argmax of the model's logits, what the parity gate compares.

LoRA adapters (GGUF ``general.type=adapter``, as ``edgeqlora export --adapter-only`` and
llama.cpp's ``convert_lora_to_gguf.py`` write them) are loaded with llama.cpp's own adapter API
and switched on the context with ``set_adapter``, without reloading the base; each adapter file
is read once and kept until ``close``. ``Llama(lora_path=...)`` is not used: in
llama-cpp-python 0.3.36 it checks the adapter pointer with ``is None``, which a NULL ctypes
pointer never is, so an adapter made for another base crashes the process instead of raising.

Logits for every position (the parity gate's input) are decoded through llama.cpp's batch API
with an output flag on every token, chunk by chunk. ``Llama(logits_all=True)`` would do it too,
but it keeps an ``n_ctx x vocab`` float32 array alive for the model's whole life (400 MB for a
2048 context and a 49k vocabulary) even when no one asks for logits.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any, Generator, Iterator, Mapping, Sequence

import numpy as np

from edgeqlora.errors import InputError, MissingDependencyError, require

from .base import Runtime, Sampling, default_threads
from .chat_template import ChatTemplate
from .gguf_abort import AbortFlag
from .gguf_header import trained_context

GGUF_MAGIC = b"GGUF"
DEFAULT_N_CTX = 2048
MAX_N_CTX = 1 << 24  # past any model's trained context: a typo, refused before llama.cpp allocates


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _llama_cpp():
    try:
        return require("llama_cpp", "gguf", "Running a GGUF export")
    except MissingDependencyError:
        raise
    except Exception as exc:  # the shared library failed to load (wrong CPU, missing libc...)
        raise MissingDependencyError(f"llama-cpp-python is installed but does not load: {exc}; "
                                     "reinstall it with: pip install --force-reinstall "
                                     "'edgeqlora[gguf]'") from None


class GGUFRuntime(Runtime):
    """A GGUF model in llama.cpp.

    ``tokenizer`` is an optional mapping with ``chat_template`` and special-token strings taken
    from the export directory's tokenizer files; what is missing comes from the GGUF metadata.
    ``prompt_cache=True`` reuses the KV cache of a prompt prefix shared with the previous call
    (faster multi-turn chat) at the price of answers that may depend on call order (see
    ``_token_stream``).
    """

    name = "gguf"

    def __init__(self, model_path: str | Path, n_ctx: int | None = None,
                 n_threads: int | None = None, lora_path: str | Path | None = None,
                 lora_scale: float = 1.0, tokenizer: Mapping[str, Any] | None = None,
                 n_batch: int = 512, prompt_cache: bool = False):
        llama_cpp = _llama_cpp()
        self.path = Path(model_path)
        if not self.path.is_file():
            raise InputError(f"{self.path} does not exist")
        if not is_gguf(self.path):
            raise InputError(f"{self.path} is not a GGUF file (its first bytes are not 'GGUF')")
        if lora_path is not None:
            # Checked before the base loads, so a wrong path fails fast.
            lora_path = _check_adapter_file(Path(lora_path))
        self.n_threads = int(n_threads) if n_threads else default_threads()
        if self.n_threads < 1:
            raise InputError(f"n_threads={n_threads} must be >= 1")
        requested_ctx = DEFAULT_N_CTX if n_ctx is None else int(n_ctx)
        if n_ctx is None:  # the default fits the trained context without a second load
            requested_ctx = min(requested_ctx, trained_context(self.path) or requested_ctx)
        if requested_ctx < 16:
            raise InputError(f"n_ctx={n_ctx} is too small (need >= 16 tokens)")
        if requested_ctx > MAX_N_CTX:
            raise InputError(f"n_ctx={n_ctx} is larger than any model's context window "
                             f"(at most {MAX_N_CTX:,} tokens here)")

        def open_llama(ctx: int):
            # llama.cpp prints some warnings even with verbose=False (e.g. a context longer
            # than the trained one); loading is silent, failures come back as exceptions.
            from llama_cpp._utils import suppress_stdout_stderr

            try:
                with suppress_stdout_stderr(disable=False):
                    return llama_cpp.Llama(
                        model_path=str(self.path), n_ctx=ctx, n_batch=n_batch,
                        n_ubatch=n_batch, n_threads=self.n_threads,
                        n_threads_batch=self.n_threads, logits_all=False, verbose=False)
            except (ValueError, RuntimeError, OSError) as exc:
                asked = f" with n_ctx={ctx}" if n_ctx is not None else ""
                why = (f"a {ctx:,}-token context may not fit in memory (try a smaller "
                       "--n-ctx), or the file" if n_ctx is not None else "the file")
                raise InputError(f"llama.cpp could not load {self.path}{asked} ({exc}); {why} "
                                 "is truncated, corrupt or of an architecture this "
                                 "llama-cpp-python does not know") from None

        self._llm = open_llama(requested_ctx)
        trained_ctx = int(self._llm._model.n_ctx_train())
        if 0 < trained_ctx < requested_ctx:
            # Past its trained context a model degrades; the default shrinks to fit (rare: a
            # second load), an explicit request is refused.
            self._llm.close()
            if n_ctx is not None:
                raise InputError(f"n_ctx={n_ctx} is larger than the context {self.path.name} "
                                 f"was trained for ({trained_ctx} tokens)")
            self._llm = open_llama(trained_ctx)
        self._lib = llama_cpp
        self._abort = AbortFlag(llama_cpp, self._llm._ctx.ctx)
        self._vocab = self._llm._model.vocab
        self.vocab_size = int(self._llm.n_vocab())
        self.n_ctx = int(self._llm.n_ctx())
        self.metadata = dict(self._llm.metadata)
        # Resolved adapter path -> (llama_adapter_lora pointer, file size, mtime): loaded once.
        self._adapters: dict[Path, tuple[Any, int, int]] = {}
        self.lora_path: Path | None = None
        self.lora_scale = 1.0
        if lora_path is not None:
            try:
                self.set_adapter(lora_path, lora_scale)
            except BaseException:
                self.close()
                raise
        self.prompt_cache = bool(prompt_cache)
        tokenizer = dict(tokenizer or {})
        self.special_tokens = self._special_tokens(tokenizer)
        source = tokenizer.get("chat_template") or self.metadata.get("tokenizer.chat_template")
        origin = tokenizer.get("chat_template_origin") or (
            f"{self.path.name}: tokenizer.chat_template")
        self.chat_template = ChatTemplate(source, self.special_tokens, origin) if source else None
        self._piece_buf = ctypes.create_string_buffer(256)

    def _special_tokens(self, tokenizer: Mapping[str, Any]) -> dict[str, str]:
        # apply_chat_template passes the tokenizer's named special tokens to the template; the
        # GGUF records their ids (tokenizer.ggml.<name>_token_id), the export dir their strings.
        out = {}
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                          ("pad_token", "padding"), ("sep_token", "seperator"),
                          ("cls_token", "cls"), ("mask_token", "mask")):
            if tokenizer.get(name):
                out[name] = str(tokenizer[name])
                continue
            raw = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
            if raw is not None and raw.lstrip("-").isdigit() and 0 <= int(raw) < self.vocab_size:
                out[name] = self._llm._model.token_get_text(int(raw))
        return out

    # LoRA adapters

    def set_adapter(self, path: str | Path | None, scale: float = 1.0) -> None:
        """Apply the LoRA adapter GGUF at ``path`` (scaled by ``scale``) instead of the current
        one, without reloading the base; ``None`` runs the base alone.

        An adapter file is read once and kept until ``close``, so switching back and forth costs
        no file I/O. The prompt cache is dropped: its keys and values came from the old adapter.
        """
        llm = self._llm
        if llm is None:
            raise InputError(f"{self.path}: the runtime is closed")
        if path is None:
            if self._lib.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None) != 0:
                raise RuntimeError("llama.cpp refused to clear the LoRA adapters")
            self.lora_path, self.lora_scale = None, 1.0
            llm.reset()
            return
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale):
            raise InputError(f"LoRA scale={scale!r} must be a finite number")
        path = _check_adapter_file(Path(path))
        adapter = self._adapter(path)
        adapters = (self._lib.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(float(scale))
        if self._lib.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales) != 0:
            raise InputError(f"llama.cpp could not apply LoRA adapter {path} to {self.path}")
        self.lora_path, self.lora_scale = path, float(scale)
        llm.reset()

    def _adapter(self, path: Path):
        key = path.resolve()
        st = key.stat()
        cached = self._adapters.get(key)
        if cached is not None and cached[1:] == (st.st_size, st.st_mtime_ns):
            return cached[0]
        with _LlamaLog(self._lib) as log:
            adapter = self._lib.llama_adapter_lora_init(self._llm._model.model,
                                                        str(key).encode("utf-8"))
        # Failure is a NULL pointer (falsy), not None; the reason only goes to llama.cpp's log.
        if not adapter:
            reason = log.error() or "no reason given"
            raise InputError(f"llama.cpp could not load LoRA adapter {path} for {self.path.name} "
                             f"(llama_adapter_lora_init returned NULL: {reason}); it must be a "
                             "GGUF LoRA made for this very base model, e.g. by 'edgeqlora "
                             "export --adapter-only' from an adapter trained on it")
        if cached is not None:  # the file changed on disk: drop the stale copy
            self._free_adapter(cached[0])
        self._adapters[key] = (adapter, st.st_size, st.st_mtime_ns)
        return adapter

    def _free_adapter(self, adapter) -> None:
        # Detach before freeing: the context may still point at it.
        self._lib.llama_set_adapters_lora(self._llm._ctx.ctx, None, 0, None)
        self._lib.llama_adapter_lora_free(adapter)

    # tokens

    def tokenize(self, text: str, special: bool = True, add_bos: bool = False) -> list[int]:
        """``add_bos=True``: add what the GGUF's vocabulary says to add (its BOS, if
        ``tokenizer.ggml.add_bos_token``), as HF's ``add_special_tokens=True`` does; the
        export's tokenization check compares the two."""
        if not isinstance(text, str):
            raise InputError(f"tokenize() takes a string, got {type(text).__name__}")
        if not text and not add_bos:
            return []
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        ids = [int(t) for t in ids]
        if not ids:
            return ""
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise InputError(f"token id {t} is outside the vocabulary [0, {self.vocab_size})")
        arr = (self._lib.llama_token * len(ids))(*ids)
        size = max(64, 8 * len(ids))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._vocab, arr, len(ids), buf, size,
                                           False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 1
        raise RuntimeError("llama_detokenize kept asking for a larger buffer")

    def _piece(self, token: int) -> bytes:
        # Like llama.cpp's server: the bytes of each token, special tokens not rendered.
        n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buf,
                                           len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n + 16)
            n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buf,
                                               len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    def _is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    # generation

    def _token_stream(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[int]:
        if sampling.temperature > 0:
            # None -> a fresh random seed, as llama.cpp does.
            seed = sampling.seed if sampling.seed is not None else int(
                np.random.default_rng().integers(0, 2**32 - 1))
            self._llm.set_seed(seed)
        if not self.prompt_cache:
            # Llama.generate would reuse the KV cache of the longest common prefix with the
            # previous call and re-decode only the rest. ggml's single-token kernels round
            # differently from its batched ones (~0.15 logits measured on the embedded Q4_1), so
            # the same prompt could then give a different greedy answer depending on what ran
            # before it. Decoding every prompt from scratch makes answers reproducible.
            self._llm.reset()
        # top_k 0 means "off" for us and for llama.cpp (k <= 0 keeps the whole vocabulary).
        return self._llm.generate(prompt_ids, top_k=sampling.top_k, top_p=sampling.top_p,
                                  min_p=0.0, typical_p=1.0, temp=sampling.temperature,
                                  repeat_penalty=1.0, frequency_penalty=0.0,
                                  presence_penalty=0.0)

    def _interruptible(self, cancel):
        return self._abort.armed(cancel)  # a long prompt batch stops too (gguf_abort.py)

    def _logit_steps(self, prompt_ids: list[int]) -> Generator[np.ndarray, int, None]:
        llm = self._llm
        keep = 0
        if self.prompt_cache:
            # The KV cache of the longest prefix shared with what was decoded last (at least one
            # token is decoded again: its logits are the first step's).
            cached = llm.input_ids[:llm.n_tokens].tolist()
            while keep < min(len(cached), len(prompt_ids) - 1) \
                    and cached[keep] == prompt_ids[keep]:
                keep += 1
        if keep:
            llm._ctx.kv_cache_seq_rm(-1, keep, -1)
            llm.n_tokens = keep
        else:
            llm.reset()
        llm.eval(prompt_ids[keep:])
        while True:
            # eval() asks for the last position's logits only: row 0 of the output.
            token = yield np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(self.vocab_size,))
            llm.eval([token])

    def _ll_tokenizer(self) -> Any:
        if self.__dict__.get("_lltok") is None:
            from .constrain import _llguidance

            _llguidance()
            from llguidance.llamacpp import lltokenizer_from_vocab

            eog = [t for t in range(self.vocab_size) if self._is_eog(t)]
            self._lltok = lltokenizer_from_vocab(self._vocab, n_vocab=self.vocab_size,
                                                 eos_token=eog or None)
        return self._lltok

    def reset(self) -> None:
        """Forget the cached prompt (benchmarks use this to time prefill from scratch)."""
        self._llm.reset()

    # parity

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        it = self.iter_logits([token_ids])
        try:
            return next(it)
        finally:
            it.close()

    def iter_logits(self, sequences: Sequence[Sequence[int]]) -> Iterator[np.ndarray]:
        """Logits ``[len(ids), vocab]`` of each sequence in turn, each from an empty context.

        Consecutive sequences that start with the same tokens (held-out examples share their
        system prompt) reuse the previous sequence's KV cache for that prefix: the prefix rows
        are copied, only the rest is decoded (as llama-cpp-python's own generate() reuses a
        prompt prefix)."""
        llm = self._llm
        llm.reset()
        # Llama's private context and batch objects: the public API has no "logits for every
        # position" without logits_all (see the module docstring). Checked by the tests.
        ctx, batch = llm._ctx, llm._batch
        ctx.kv_cache_seq_rm(-1, 0, -1)
        step = llm.n_batch
        prev: list[int] = []
        prev_out = None
        try:
            for token_ids in sequences:
                ids = self.check_ids(token_ids)
                keep = 0
                while keep < min(len(ids), len(prev)) - 1 and ids[keep] == prev[keep]:
                    keep += 1
                ctx.kv_cache_seq_rm(-1, keep, -1)
                out = np.empty((len(ids), self.vocab_size), dtype=np.float32)
                if keep:
                    out[:keep] = prev_out[:keep]
                for start in range(keep, len(ids), step):
                    chunk = ids[start:start + step]
                    batch.set_batch(batch=chunk, n_past=start, logits_all=True)
                    ctx.decode(batch)
                    rows = np.ctypeslib.as_array(ctx.get_logits(),
                                                 shape=(len(chunk) * self.vocab_size,))
                    out[start:start + len(chunk)] = rows.reshape(len(chunk), self.vocab_size)
                prev, prev_out = ids, out
                yield out
        finally:
            # The next generate() starts from an empty cache: eval() clears it from n_tokens=0.
            llm.reset()
            ctx.kv_cache_seq_rm(-1, 0, -1)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "n_threads": self.n_threads,
                "architecture": self.metadata.get("general.architecture"),
                "file_type": self.metadata.get("general.file_type"),
                "size_bytes": self.path.stat().st_size,
                "lora": str(self.lora_path) if self.lora_path else None,
                "lora_scale": self.lora_scale if self.lora_path else None,
                "loaded_adapters": [str(p) for p in self._adapters]}

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            # Adapters before the model, as Llama frees its own lora_path adapter.
            for adapter, _, _ in getattr(self, "_adapters", {}).values():
                self._free_adapter(adapter)
            self._adapters = {}
            llm.close()
            self._llm = None


def _check_adapter_file(path: Path) -> Path:
    if not path.is_file():
        raise InputError(f"LoRA adapter {path} does not exist")
    if not is_gguf(path):
        raise InputError(f"LoRA adapter {path} is not a GGUF file (its first bytes are not "
                         "'GGUF'); export it with 'edgeqlora export --adapter-only' or convert a "
                         "PEFT adapter with llama.cpp's convert_lora_to_gguf.py")
    return path


class _LlamaLog:
    """Collect llama.cpp's log while a call runs, then give the log back to llama-cpp-python.

    llama.cpp reports why an adapter did not load (wrong shape, wrong general.type, truncated
    file) only in its log; the C API returns NULL. Not thread-safe, like the runtime itself.
    """

    # ggml.h: enum ggml_log_level {NONE, DEBUG, INFO, WARN, ERROR, CONT}
    _WARN, _ERROR = 3, 4

    def __init__(self, lib):
        self._lib = lib
        self.lines: list[tuple[int, str]] = []

        def collect(level, text, user_data):
            self.lines.append((int(level), text.decode("utf-8", errors="replace").strip()))

        self._callback = lib.llama_log_callback(collect)  # kept alive while installed

    def __enter__(self):
        # Whatever logger is installed (llama-cpp-python's, or a user's) comes back afterwards.
        self._previous = (self._lib.llama_log_callback(), ctypes.c_void_p())
        self._lib.llama_log_get(ctypes.byref(self._previous[0]),
                                ctypes.byref(self._previous[1]))
        self._lib.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        self._lib.llama_log_set(*self._previous)

    def error(self) -> str:
        errors = [t for level, t in self.lines if level == self._ERROR and t]
        errors = errors or [t for level, t in self.lines if level == self._WARN and t]
        # "llama_adapter_lora_init_from_file_ptr: failed to ..." -> "failed to ..."
        return "; ".join(t.split(": ", 1)[-1] for t in errors)


def load_gguf(model_path: Path, export_dir: Path | None = None,
              manifest: Mapping[str, Any] | None = None, **kwargs: Any) -> GGUFRuntime:
    """The loader ``runtimes.load`` calls for ``target: gguf`` (or a bare .gguf file)."""
    tokenizer = read_tokenizer_files(export_dir) if export_dir is not None else {}
    return GGUFRuntime(model_path, tokenizer=tokenizer, **kwargs)


def read_tokenizer_files(export_dir: Path) -> dict[str, Any]:
    """Chat template and special-token strings from an export dir's HF tokenizer files.

    Precedence as in transformers: ``chat_template.jinja`` over the ``chat_template`` key of
    ``tokenizer_config.json``; special tokens from ``tokenizer_config.json`` then
    ``special_tokens_map.json``.
    """
    import json

    out: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = export_dir / name
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{p} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{p} must hold a JSON object")
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                    "cls_token", "mask_token"):
            value = data.get(key)
            if isinstance(value, dict):  # serialized AddedToken
                value = value.get("content")
            if isinstance(value, str) and value:
                out[key] = value
        template = data.get("chat_template")
        if isinstance(template, str) and template:
            out["chat_template"] = template
            out["chat_template_origin"] = f"{p}: chat_template"
        elif isinstance(template, list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if named.get("default"):
                out["chat_template"] = named["default"]
                out["chat_template_origin"] = f"{p}: chat_template[default]"
    jinja = export_dir / "chat_template.jinja"
    if jinja.is_file():
        out["chat_template"] = jinja.read_text(encoding="utf-8")
        out["chat_template_origin"] = str(jinja)
    return out

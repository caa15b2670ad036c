"""The parity gate: does the exported file behave like the model that was trained?

Reference: the trained model exactly as trained (NF4 base + LoRA adapter, in torch, through
``edgeqlora.qlora.load_trained``). Candidates: export directories run through their own
torch-free runtime (``edgeqlora.runtimes``). Both see the *same token ids*, from

(a) the held-out task set the adapter's manifest points to (full conversations, the chat
    template applied by the reference tokenizer), and
(b) a general English text shipped with the package (``edgeqlora/assets/english.txt``), so a
    candidate that kept the task but lost the language shows up too.

Per candidate and set: mean and p99 KL(reference || candidate) of the next-token distributions,
top-1 agreement, perplexity ratio (candidate / reference, on the same next tokens), and on the
task set the exact match of greedy answers produced through the candidate runtime's own chat
template and generate, next to the reference's, plus how many answers are identical to the
reference's. The gate fails a candidate whose mean KLD, top-1 or perplexity ratio is beyond the
config's ``parity`` thresholds, or whose runtime builds different prompt tokens than the trained
model's tokenizer.

The metric functions are ``edgeqlora.metrics`` (pure numpy, float64; ``tests/test_parity.py``
checks them against torch).
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from . import threads
from .constrained_eval import answers
from .errors import InputError, ParityError
from .metrics import distinct_positions, kl_divergence, nll, summarize

ENGLISH_TEXT = Path(__file__).with_name("assets") / "english.txt"
# Text chunks stay short enough for any candidate context and for a cheap reference forward.
TEXT_CHUNK = 512
TASK_MAX_LEN = 256


class Reference(Protocol):
    """The trained model's side: its tokenizer, logits and greedy answers."""

    def tokenize(self, text: str) -> list[int]: ...

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]: ...

    def logits(self, token_ids: list[int]) -> np.ndarray: ...

    def greedy(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]: ...


class TorchReference:
    """The trained model exactly as trained: NF4 base + adapter in torch, with the base's HF
    tokenizer and chat template."""

    def __init__(self, adapter_dir: str | Path, device: str | None = None):
        from .artifacts import read_manifest
        from .base import resolve_base
        from .hf_tokenizer import load as tokenizer
        from .qlora import dequantized_weights, load_trained

        self.adapter_dir = Path(adapter_dir)
        self.manifest = read_manifest(self.adapter_dir, kind="adapter")
        self.model = load_trained(self.adapter_dir, device=device)
        # On CPU every forward (logits and each greedy token) would dequantize every 4-bit
        # weight again in bitsandbytes' CPU matmul; dequantized once instead, same outputs
        # (qlora.dequantized_weights; a no-op on GPU). Held for the reference's lifetime.
        self._dequantized = dequantized_weights(self.model)
        self._dequantized.__enter__()
        base = self.manifest.get("base", {})
        path = Path(base.get("path", ""))
        if not (path / "config.json").is_file():
            path = resolve_base(base.get("spec", "embedded"))
        self.tokenizer = tokenizer(path)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def chat_ids(self, messages, add_generation_prompt):
        return list(self.tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=False,
            add_generation_prompt=add_generation_prompt))

    def logits(self, token_ids):
        import torch

        threads.adapt()
        with torch.no_grad():
            x = torch.tensor([list(token_ids)], dtype=torch.long, device=self.model.device)
            return self.model(x).logits[0].float().cpu().numpy()

    def greedy(self, conversations, max_new_tokens):
        from .evaluate import greedy_generate

        return greedy_generate(self.model, self.tokenizer, conversations, max_new_tokens)


@dataclass
class TaskSet:
    """Held-out conversations (prompt + answer), and IoT targets when the task is the embedded
    one (scored with ``tasks.iot.score``); otherwise answers are compared as strings."""

    conversations: list[list[dict]]
    targets: list[dict] | None = None
    source: str = ""

    @property
    def prompts(self) -> list[list[dict]]:
        out = []
        for messages in self.conversations:
            last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
            out.append(messages[:last])
        return out

    @property
    def answers(self) -> list[str]:
        return [[m for m in c if m.get("role") == "assistant"][-1]["content"]
                for c in self.conversations]


def task_set(manifest: Mapping[str, Any], n: int) -> TaskSet:
    """The held-out rows the adapter's manifest points to (the trainer's eval data, or the
    embedded IoT task's held-out split): the sample the trainer scored (``heldout_examples``),
    so the reference's exact match is the trainer's, command for command."""
    from .heldout import heldout_examples
    from .tasks import iot

    convs = [c for c in heldout_examples(dict(manifest), n)
             if any(m.get("role") == "assistant" for m in c)]
    if not convs:
        raise InputError("the adapter's held-out data has no conversation with an answer")
    spec = str((manifest.get("data") or {}).get("spec", ""))
    targets = None
    if spec.startswith("embedded:iot") or not spec:
        parsed = [iot.parse_action([m for m in c if m["role"] == "assistant"][-1]["content"])
                  for c in convs]
        if all(p is not None for p in parsed):
            targets = parsed
    return TaskSet(convs, targets, source=spec or "embedded:iot")


def english_sequences(tokenize: Callable[[str], list[int]], n_tokens: int,
                      path: Path = ENGLISH_TEXT) -> list[list[int]]:
    """The shipped English text as chunks of at most TEXT_CHUNK token ids (``n_tokens`` total)."""
    ids = tokenize(path.read_text(encoding="utf-8"))[:n_tokens]
    return [ids[i:i + TEXT_CHUNK] for i in range(0, len(ids), TEXT_CHUNK) if len(ids[i:]) >= 2]


def exact_match(outputs: list[str], task: TaskSet) -> float:
    if not outputs:
        return 0.0
    if task.targets is not None:
        from .tasks import iot

        return float(iot.score(outputs, task.targets)["exact_match"])
    return float(np.mean([o.strip() == a.strip() for o, a in zip(outputs, task.answers)]))


@dataclass
class _Acc:
    kld: list = field(default_factory=list)
    top1: list = field(default_factory=list)
    ref_nll: list = field(default_factory=list)
    cand_nll: list = field(default_factory=list)

    def add(self, ref: np.ndarray, cand: np.ndarray, ids: list[int],
            keep: np.ndarray | None = None) -> None:
        """One sequence's logits; ``keep`` masks the positions that count (distinct contexts)."""
        keep = np.ones(len(ids), dtype=bool) if keep is None else keep
        self.kld.append(kl_divergence(ref, cand)[keep])
        self.top1.append((ref.argmax(-1) == cand.argmax(-1))[keep])
        self.ref_nll.append(nll(ref[:-1], ids[1:])[keep[:-1]])
        self.cand_nll.append(nll(cand[:-1], ids[1:])[keep[:-1]])

    def summary(self) -> dict[str, float]:
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
        return summarize(cat(self.kld), cat(self.top1), cat(self.ref_nll), cat(self.cand_nll))


def compare(reference: Reference, candidates: Mapping[str, Any], task: TaskSet,
            text_seqs: list[list[int]], max_new_tokens: int = 64,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every candidate runtime against the reference; returns the report body."""
    say = progress or (lambda msg: None)
    task_seqs = [reference.chat_ids(c, add_generation_prompt=False)[:TASK_MAX_LEN]
                 for c in task.conversations]
    sets = {"task": [s for s in task_seqs if len(s) >= 2], "text": text_seqs}
    acc = {name: {s: _Acc() for s in ("task", "text", "all")} for name in candidates}
    for set_name, seqs in sets.items():
        # Held-out examples share their system prompt: each distinct context counts once.
        keeps = distinct_positions(seqs)
        for i, (ids, keep) in enumerate(zip(seqs, keeps)):
            say(f"logits: {set_name} {i + 1}/{len(seqs)}")
            ref = reference.logits(ids)
            for name, rt in candidates.items():
                cand = rt.logits(ids)
                acc[name][set_name].add(ref, cand, ids, keep)
                acc[name]["all"].add(ref, cand, ids, keep)

    prompts = task.prompts
    say(f"greedy answers: reference ({len(prompts)} prompts)")
    ref_out = [o.strip() for o in reference.greedy(prompts, max_new_tokens)]
    ref_prompt_ids = [reference.chat_ids(p, add_generation_prompt=True) for p in prompts]
    report: dict[str, Any] = {
        "reference": {"task": {"examples": len(prompts),
                               "exact_match": exact_match(ref_out, task),
                               "source": task.source},
                      "samples": [{"prompt": p[-1]["content"], "output": o}
                                  for p, o in zip(prompts[:3], ref_out[:3])]},
        "candidates": {},
    }
    for name, rt in candidates.items():
        mismatched = sum(rt.chat_ids(p, add_generation_prompt=True) != ref_ids
                         for p, ref_ids in zip(prompts, ref_prompt_ids))
        got = answers(rt, prompts, max_new_tokens, getattr(rt, "json_schema", None),
                      lambda i: say(f"greedy answers: {name} {i + 1}/{len(prompts)}"))
        outs = got["free"]
        identical = sum(a == b for a, b in zip(outs, ref_out))
        report["candidates"][name] = {
            "runtime": rt.info() if hasattr(rt, "info") else {},
            "task": {**acc[name]["task"].summary(), "examples": len(prompts),
                     "exact_match": exact_match(outs, task),
                     "identical_answers": identical,
                     "prompt_token_mismatches": mismatched,
                     # With the export's JSON schema (reported, never gated: see
                     # constrained_eval); None when the export carries none.
                     "constrained": _constrained(got, task)},
            "text": acc[name]["text"].summary(),
            "all": acc[name]["all"].summary(),
            "samples": [{"prompt": p[-1]["content"], "output": o}
                        for p, o in zip(prompts[:3], outs[:3])],
        }
    return report


def _constrained(got: Mapping[str, Any], task: TaskSet) -> dict[str, Any] | None:
    if not got["constrained"]:
        return None
    n = len(got["free"])
    return {"exact_match": exact_match(got["constrained"], task),
            "valid_json": sum(got["valid_constrained"]) / n,
            "valid_json_unconstrained": sum(got["valid_free"]) / n,
            "redecoded": got["redecoded"]}


def thresholds_from(cfg) -> dict[str, float]:
    """The gate's thresholds from a ``ParityConfig`` (or a mapping with the same keys)."""
    get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
    th = {"max_kld": float(get("max_kld")), "min_top1": float(get("min_top1")),
          "max_ppl_ratio": float(get("max_ppl_ratio"))}
    p99 = get("max_p99_kld", None)
    if p99 is not None:
        th["max_p99_kld"] = float(p99)
    # Exact-match retention (candidate EM / reference EM) when the config defines it.
    em = get("min_exact_match_ratio", None)
    if em is not None:
        th["min_exact_match_ratio"] = float(em)
    return th


SETS = ("task", "text")


def gate(report: Mapping[str, Any], thresholds: Mapping[str, float]) -> dict[str, list[str]]:
    """Failing metrics per candidate (an empty list = passed). Each evaluation set (the task's
    held-out answers, the general text) is judged on its own, mean and p99 KL both: pooled, a
    good task score averages past a lost language (an ONNX int4-gptq export measured top-1 0.46,
    KLD 1.10 on general text while the pooled figures passed). A NaN fails every comparison."""
    ref_em = report["reference"]["task"]["exact_match"]
    failures = {}
    for name, c in report["candidates"].items():
        problems = []
        for part in SETS:
            m = c.get(part) or {}
            if not m.get("tokens"):
                continue
            if not m["mean_kld"] <= thresholds["max_kld"]:
                problems.append(f"{part} mean KLD {m['mean_kld']:.4f} > max_kld "
                                f"{thresholds['max_kld']}")
            if "max_p99_kld" in thresholds and not m["p99_kld"] <= thresholds["max_p99_kld"]:
                problems.append(f"{part} p99 KLD {m['p99_kld']:.4f} > max_p99_kld "
                                f"{thresholds['max_p99_kld']}")
            if not m["top1"] >= thresholds["min_top1"]:
                problems.append(f"{part} top-1 agreement {m['top1']:.4f} < min_top1 "
                                f"{thresholds['min_top1']}")
            if not m["ppl_ratio"] <= thresholds["max_ppl_ratio"]:
                problems.append(f"{part} perplexity ratio {m['ppl_ratio']:.4f} > "
                                f"max_ppl_ratio {thresholds['max_ppl_ratio']}")
        if "min_exact_match_ratio" in thresholds and ref_em > 0:
            ratio = c["task"]["exact_match"] / ref_em
            if not ratio >= thresholds["min_exact_match_ratio"]:
                problems.append(f"exact match {c['task']['exact_match']:.3f} is {ratio:.3f} of "
                                f"the reference's {ref_em:.3f} < min_exact_match_ratio "
                                f"{thresholds['min_exact_match_ratio']}")
        if c["task"]["prompt_token_mismatches"]:
            problems.append(f"prompt tokens differ from the trained model's on "
                            f"{c['task']['prompt_token_mismatches']} of "
                            f"{c['task']['examples']} held-out prompts (chat template or "
                            "tokenizer changed in the export)")
        failures[name] = problems
    return failures


def base_label(manifest: Mapping[str, Any]) -> str:
    """The quantized base an adapter was trained on, as a reader names it: NF4, FP4, INT8, the
    16/32-bit base for quant=none, or the device base (GGUF-Q4_K_M ...)."""
    quant = str((manifest.get("quant") or {}).get("quant") or "nf4")
    return "16/32-bit" if quant == "none" else quant.upper()


def _machine() -> dict[str, Any]:
    import os

    return {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}


# The hidden work directory of an atomic write (artifacts.atomic_dir: ``.NAME.tmp-PID-xyz``),
# where the export stage gates an export before it moves into place: named for NAME.
_WORK_DIR = re.compile(r"^\.(?P<name>.+)\.(?:tmp|work|stage)-\d+-[^.]*$")


def _candidate_names(paths: Sequence[Path]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        base = p.name if p.is_dir() else p.stem
        work = _WORK_DIR.match(base)
        base = work["name"] if work else base
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def run_parity(reference: str | Path, candidates: Sequence[str | Path], out: str | Path,
               cfg=None, *, examples: int | None = None, text_tokens: int | None = None,
               max_new_tokens: int = 64, n_threads: int | None = None, force: bool = False,
               progress: bool = True, reference_model: Reference | None = None,
               allow_failed: bool = False) -> dict[str, Any]:
    """Compare each candidate export with the trained adapter; write ``parity.json``,
    ``parity.md`` and ``parity.png`` into ``out``; raise ParityError if any candidate fails.

    ``cfg`` is a ``Config`` (its ``parity`` section is used) or a ``ParityConfig``; default
    thresholds otherwise. ``reference_model`` replaces the torch reference (tests). A candidate
    whose manifest records a failed verification or gate is refused unless ``allow_failed``.
    """
    from . import runtimes
    from .artifacts import atomic_dir, json_safe, prepare_output, read_manifest, versions
    from .config import Config, ParityConfig
    from .parity_report import markdown, plot

    pcfg = cfg.parity if isinstance(cfg, Config) else (cfg or ParityConfig())
    thresholds = thresholds_from(pcfg)
    examples = pcfg.eval_examples if examples is None else examples
    text_tokens = pcfg.text_tokens if text_tokens is None else text_tokens
    if examples < 1 or text_tokens < 0 or max_new_tokens < 1:
        raise InputError(f"examples={examples} must be >= 1, text_tokens={text_tokens} >= 0, "
                         f"max_new_tokens={max_new_tokens} >= 1")
    if not candidates:
        raise InputError("give at least one --candidate export to compare")
    cand_paths = [Path(c) for c in candidates]
    out = prepare_output(out, force=force, what="parity report")
    manifest = read_manifest(reference, kind="adapter")
    task = task_set(manifest, examples)

    say = _progress_printer(progress)
    # Cheap failures first: every candidate must load before the reference is built.
    loaded: dict[str, Any] = {}
    try:
        for name, path in zip(_candidate_names(cand_paths), cand_paths):
            say(f"loading candidate {name}")
            # Default context: 2048 tokens or the model's own if shorter; sequences here are at
            # most TEXT_CHUNK / TASK_MAX_LEN + max_new_tokens long.
            kwargs: dict[str, Any] = {}
            if n_threads:
                kwargs["n_threads"] = n_threads
            # Every file against its manifest's sha256: the gate measures the bytes that ship.
            loaded[name] = runtimes.load(path, verify=True, allow_failed=allow_failed, **kwargs)
        say(f"loading the trained reference ({base_label(manifest)} base + adapter)")
        ref = reference_model if reference_model is not None else TorchReference(reference)
        text_seqs = english_sequences(ref.tokenize, text_tokens) if text_tokens else []
        start = time.perf_counter()
        report = compare(ref, loaded, task, text_seqs, max_new_tokens, say)
    finally:
        for rt in loaded.values():
            rt.close()
    report["thresholds"] = thresholds
    report["failures"] = gate(report, thresholds)
    report["passed"] = not any(report["failures"].values())
    report["settings"] = {"reference": str(reference), "reference_base": base_label(manifest),
                          "candidates": {n: str(p) for n, p in
                                         zip(report["candidates"], cand_paths)},
                          "examples": len(task.conversations), "text_tokens":
                          sum(len(s) for s in text_seqs), "max_new_tokens": max_new_tokens,
                          "seconds": round(time.perf_counter() - start, 1)}
    report["machine"] = _machine()
    report["versions"] = versions("edgeqlora", "torch", "transformers", "peft", "bitsandbytes",
                                  "llama_cpp_python", "numpy")
    with atomic_dir(out, force=force, what="parity report") as tmp:
        # strict JSON: a NaN metric is the string "NaN" (as in manifests), never a bare NaN
        (tmp / "parity.json").write_text(json.dumps(json_safe(json.loads(json.dumps(
            report, default=float))), indent=2, allow_nan=False) + "\n")
        (tmp / "parity.md").write_text(markdown(report))
        try:
            plot(report, tmp / "parity.png")
        except ImportError:
            say("matplotlib is not installed: no parity.png (pip install 'edgeqlora[plot]')")
    if not report["passed"]:
        failing = "; ".join(f"{n}: {', '.join(p)}" for n, p in report["failures"].items() if p)
        raise ParityError(f"parity gate failed ({failing}); report in {out}/parity.md")
    return report


def _progress_printer(enabled: bool) -> Callable[[str], None]:
    """The gate's progress lines: rate-limited on a terminal (``enabled``), one every
    ``EDGEQLORA_PROGRESS_S`` seconds off one (a log, a pipe: whatever ``enabled`` says, so that
    ``edgeqlora export > log`` shows where a minutes-long gate is). Not ``enabled``, the lines
    start with the measuring (``logits:``): what fails while loading stays one error line."""
    from .progress import every_s, off_terminal

    if not enabled and not off_terminal():
        return lambda msg: None

    last = {"t": 0.0, "prefix": None, "started": enabled}
    # Per-example messages at most 4 times a second on a terminal; in a log, one every
    # EDGEQLORA_PROGRESS_S seconds (a new phase always shows).
    gap = every_s() if off_terminal() else 0.25

    def say(msg: str) -> None:
        if not last["started"]:
            if not msg.startswith("logits:"):
                return
            last["started"] = True
        now = time.monotonic()
        # "greedy answers: gguf-q8_0 7/40": the phase is what comes before the count, and the
        # last count of a phase always shows.
        head, _, count = msg.rpartition(" ")
        done, _, total = count.partition("/")
        counted = bool(head) and done.isdigit() and total.isdigit()
        prefix = head if counted else msg.split(":")[0]
        final = counted and done == total
        if prefix == last["prefix"] and now - last["t"] < gap and not final:
            return
        last["t"], last["prefix"] = now, prefix
        print(f"parity: {msg}", file=sys.stderr, flush=True)

    return say

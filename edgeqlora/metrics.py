"""Agreement metrics on logits: one implementation, numpy, float64, torch-free.

Every comparison the toolkit makes (export verification, merge-base choice, the parity gate,
the arm64 check, the benchmarks) uses these functions, so a figure means the same everywhere.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError



def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 (float32 loses the small probabilities that
    dominate a KL divergence's tail)."""
    return _log_softmax_and_probs(logits)[0]


def _log_softmax_and_probs(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log softmax, softmax) in float64, computed in place: a [1,327 x 49,152] set is 0.5 GB a
    copy, so every copy saved shows in an export's verification time."""
    x = np.array(logits, dtype=np.float64)  # a copy: worked on in place below
    x -= x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    total = p.sum(axis=-1, keepdims=True)
    x -= np.log(total)
    p /= total
    return x, p


def _pair(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, cand = np.atleast_2d(ref), np.atleast_2d(cand)
    if ref.shape != cand.shape:
        raise InputError(f"reference logits {ref.shape} and candidate logits {cand.shape} "
                         "differ in shape (different vocabulary or sequence?)")
    return ref, cand


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_cand) of the next-token distributions at each position: ``[n]``."""
    ref, cand = _pair(ref_logits, cand_logits)
    lp_ref, p_ref = _log_softmax_and_probs(ref)
    lp_ref -= log_softmax(cand)
    kld = np.einsum("ij,ij->i", p_ref.reshape(-1, p_ref.shape[-1]),
                    lp_ref.reshape(-1, lp_ref.shape[-1])).reshape(p_ref.shape[:-1])
    return np.maximum(kld, 0.0)  # rounding can give -1e-17 for identical rows


def top1_agreement(ref_logits: np.ndarray, cand_logits: np.ndarray) -> float:
    """Share of positions where both pick the same most likely next token."""
    ref, cand = _pair(ref_logits, cand_logits)
    return float((ref.argmax(axis=-1) == cand.argmax(axis=-1)).mean())


def distinct_positions(sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """For each sequence, a boolean mask of the positions whose context (the tokens up to and
    including that position) no earlier position of any sequence had.

    A position's next-token prediction depends only on its context, so a context seen before is
    the same measurement again: held-out chat examples that share a system prompt would
    otherwise count every prompt position once per example (28 of the embedded task's ~72
    tokens), and one near-tie flipped inside the prompt would move top-1 agreement by a whole
    position per example. Metrics are taken over distinct contexts only. (A token trie: no
    library offers this.)"""
    root: dict = {}
    masks = []
    for ids in sequences:
        node, keep = root, np.zeros(len(ids), dtype=bool)
        for t, tok in enumerate(ids):
            child = node.get(tok)
            if child is None:
                child = node[tok] = {}
                keep[t] = True
            node = child
        masks.append(keep)
    return masks


def nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of ``targets[i]`` under ``logits[i]``: ``[n]``."""
    lp = log_softmax(np.atleast_2d(logits))
    t = np.asarray(targets, dtype=np.int64)
    if t.shape != (lp.shape[0],):
        raise InputError(f"{t.shape[0] if t.ndim else 0} targets for {lp.shape[0]} positions")
    return -lp[np.arange(len(t)), t]


def perplexity(logits: np.ndarray, targets: Sequence[int]) -> float:
    """exp(mean NLL) of ``targets`` given ``logits`` (row i predicts targets[i])."""
    return float(np.exp(nll(logits, targets).mean()))


def summarize(kld: np.ndarray, top1: np.ndarray, ref_nll: np.ndarray,
              cand_nll: np.ndarray) -> dict[str, float]:
    """One set's per-position measurements -> the numbers the report shows."""
    if len(kld) == 0:
        return {"tokens": 0}
    ref_ppl = float(np.exp(ref_nll.mean())) if len(ref_nll) else float("nan")
    cand_ppl = float(np.exp(cand_nll.mean())) if len(cand_nll) else float("nan")
    return {"tokens": int(len(kld)), "mean_kld": float(kld.mean()),
            "p99_kld": float(np.percentile(kld, 99)), "max_kld": float(kld.max()),
            "top1": float(top1.mean()), "ref_ppl": ref_ppl, "ppl": cand_ppl,
            "ppl_ratio": cand_ppl / ref_ppl}


class Agreement:
    """Running top-1 agreement and mean KL(ref || cand) over sequences, one at a time, so
    memory stays at one sequence's logits instead of [all tokens, vocab] twice. ``add`` takes
    the rows of one sequence (already restricted to its distinct positions, if wanted)."""

    def __init__(self) -> None:
        self.top1 = self.kld = 0.0
        self.tokens = 0

    def add(self, ref_logits: np.ndarray, cand_logits: np.ndarray) -> None:
        ref, cand = _pair(ref_logits, cand_logits)
        if not len(ref):
            return
        self.kld += float(kl_divergence(ref, cand).sum())
        self.top1 += float((ref.argmax(axis=-1) == cand.argmax(axis=-1)).sum())
        self.tokens += int(ref.shape[0])

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {"top1": self.top1 / n, "kld": self.kld / n, "tokens": self.tokens}

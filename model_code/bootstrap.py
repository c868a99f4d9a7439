"""Paired bootstrap of a WER difference between two systems on the same test set.

What: :func:`paired_bootstrap` takes, for every utterance of a test set, the word errors of
system A (the candidate), of system B (the champion) and the number of reference words, and
returns the WER difference ``Δ = WER_A - WER_B`` with a 95 % percentile confidence interval and
the bootstrap probability that A is better than B by at least a margin.

Why: a golden set of a few hundred utterances gives WERs whose difference is easily noise. The
paired bootstrap of Bisani & Ney (2004, "Bootstrap estimates for confidence intervals in ASR
performance evaluation") resamples the *same* units for both systems, so the variance that the
two systems share (hard utterances are hard for both) cancels, and the interval is much tighter
than two independent intervals. When utterances come in correlated blocks (a speaker's
utterances share voice and channel), the blocks, not the utterances, are the independent
units: resampling speaker blocks gives an honest (wider) interval. WER is a ratio of sums, so
a bootstrap replicate's WER is ``Σ errors / Σ words`` over the drawn blocks, never a mean of
per-utterance WERs.

Plain numpy, no torch; plain arguments, no configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def block_sums(
    errors_a: Sequence[float],
    errors_b: Sequence[float],
    ref_words: Sequence[float],
    blocks: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    """Sum per-utterance counts into blocks.

    Inputs are ``(N,)`` per-utterance counts and optional ``(N,)`` block labels (``None`` =
    every utterance is its own block). Returns ``(ea (K,), eb (K,), n (K,), labels (K,))`` with
    ``K`` blocks in first-seen order.
    """
    ea = np.asarray(errors_a, dtype=np.float64)
    eb = np.asarray(errors_b, dtype=np.float64)
    n = np.asarray(ref_words, dtype=np.float64)
    if not (ea.shape == eb.shape == n.shape) or ea.ndim != 1:
        raise ValueError(f"paired counts must be 1-D and of equal length, got {ea.shape}, {eb.shape}, {n.shape}")
    if blocks is None:
        return ea, eb, n, list(range(ea.shape[0]))
    if len(blocks) != ea.shape[0]:
        raise ValueError(f"{len(blocks)} block labels for {ea.shape[0]} utterances")
    labels: list[Any] = []
    index: dict[Any, int] = {}
    ids = np.empty(ea.shape[0], dtype=np.int64)
    for i, b in enumerate(blocks):
        if b not in index:
            index[b] = len(labels)
            labels.append(b)
        ids[i] = index[b]
    k = len(labels)
    return (
        np.bincount(ids, weights=ea, minlength=k),
        np.bincount(ids, weights=eb, minlength=k),
        np.bincount(ids, weights=n, minlength=k),
        labels,
    )


def paired_bootstrap(
    errors_a: Sequence[float],
    errors_b: Sequence[float],
    ref_words: Sequence[float],
    blocks: Sequence[Any] | None = None,
    n_samples: int = 1000,
    seed: int = 0,
    margin: float = 0.0,
    chunk: int = 256,
) -> dict[str, Any]:
    """Paired bootstrap of ``Δ = WER_A - WER_B`` (negative = A is better).

    ``errors_a``, ``errors_b``, ``ref_words``: ``(N,)`` per-utterance word errors of A and B and
    reference word counts; ``blocks``: ``(N,)`` labels of the resampling units (speakers) or
    ``None`` for utterances. Each of ``n_samples`` replicates draws ``K`` blocks with
    replacement (same draw for A and B) and computes both WERs as ratios of sums.

    Returns ``delta`` (observed Δ), ``ci95`` ([2.5 %, 97.5 %] percentiles of the replicate Δs),
    ``p_better`` = P(Δ* < -margin) (the share of replicates in which A beats B by more than
    ``margin``; ties do not count as better, so identical systems get 0), ``p_worse`` =
    P(Δ* > 0), ``wer_a``, ``wer_b``, ``n_blocks``, ``n_samples``, ``std``. Deterministic for a
    given ``seed``.
    """
    ea, eb, n, labels = block_sums(errors_a, errors_b, ref_words, blocks)
    k = ea.shape[0]
    total = float(n.sum())
    if k == 0 or total <= 0:
        raise ValueError("paired_bootstrap needs at least one block with reference words")
    delta = float((ea.sum() - eb.sum()) / total)
    rng = np.random.default_rng(seed)
    deltas = np.empty(int(n_samples), dtype=np.float64)
    for start in range(0, int(n_samples), chunk):
        m = min(chunk, int(n_samples) - start)
        idx = rng.integers(0, k, size=(m, k))  # (m, K) drawn block indices
        words = n[idx].sum(axis=1)  # (m,)
        diff = (ea[idx] - eb[idx]).sum(axis=1)  # (m,)
        # a replicate that drew only empty-reference blocks has no WER; count it as "no change"
        deltas[start : start + m] = np.divide(diff, words, out=np.zeros(m), where=words > 0)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return {
        "delta": delta,
        "ci95": [float(lo), float(hi)],
        "p_better": float(np.mean(deltas < -margin)),
        "p_worse": float(np.mean(deltas > 0)),
        "std": float(deltas.std(ddof=1)) if deltas.shape[0] > 1 else 0.0,
        "wer_a": float(ea.sum() / total),
        "wer_b": float(eb.sum() / total),
        "n_blocks": int(k),
        "n_samples": int(n_samples),
        "margin": float(margin),
        "blocks": "utterance" if blocks is None else "block",
        "block_labels": [str(b) for b in labels] if blocks is not None else None,
    }


def bootstrap_wer_ci(
    errors: Sequence[float],
    ref_words: Sequence[float],
    blocks: Sequence[Any] | None = None,
    n_samples: int = 1000,
    seed: int = 0,
) -> list[float]:
    """95 % percentile interval of one system's WER (same resampling as :func:`paired_bootstrap`)."""
    zeros = np.zeros(len(errors))
    r = paired_bootstrap(errors, zeros, ref_words, blocks, n_samples=n_samples, seed=seed)
    return r["ci95"]

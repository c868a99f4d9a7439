"""Word and character error counts (jiwer), corpus-level and per utterance.

Rates are computed from summed counts (corpus WER = Σ errors / Σ reference words), never as a
mean of per-utterance rates, so the bootstrap in ``evaluate`` can resample per-utterance counts.

Words are whitespace-separated (multiple spaces collapsed, ends stripped); characters include
the spaces between words (jiwer's default CER transform). Inputs are expected to be already
normalized (``model_code.text.normalize_text``).

Empty references: an empty (or all-space) reference has 0 words and 0 characters; every
hypothesis word/character against it is an insertion. A rate whose denominator is 0 is defined
as 0.0 when there are no errors and 1.0 otherwise (finite and JSON-able; "everything wrong").
"""

from __future__ import annotations

from collections.abc import Sequence

import jiwer


def _rate(errors: int, total: int) -> float:
    if total > 0:
        return errors / total
    return 0.0 if errors == 0 else 1.0


def _check(refs: Sequence[str], hyps: Sequence[str]) -> tuple[list[str], list[str]]:
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    return [" ".join(r.split()) for r in refs], [" ".join(h.split()) for h in hyps]


def _chunk_counts(alignments) -> list[tuple[int, int, int, int]]:
    """Per sentence (S, D, I, H) from jiwer alignment chunks."""
    out = []
    for chunks in alignments:
        s = d = i = h = 0
        for c in chunks:
            n_ref = c.ref_end_idx - c.ref_start_idx
            n_hyp = c.hyp_end_idx - c.hyp_start_idx
            if c.type == "equal":
                h += n_ref
            elif c.type == "substitute":
                s += n_ref
            elif c.type == "delete":
                d += n_ref
            elif c.type == "insert":
                i += n_hyp
        out.append((s, d, i, h))
    return out


def per_utterance_counts(refs: Sequence[str], hyps: Sequence[str]) -> list[dict[str, int]]:
    """One dict per pair: ``word_errors, ref_words, char_errors, ref_chars`` and the word
    ``substitutions, deletions, insertions, hits``."""
    refs, hyps = _check(refs, hyps)
    if not refs:
        return []
    words = _chunk_counts(jiwer.process_words(refs, hyps).alignments)
    chars = _chunk_counts(jiwer.process_characters(refs, hyps).alignments)
    out = []
    for (s, d, i, h), (cs, cd, ci, ch) in zip(words, chars, strict=True):
        out.append({
            "word_errors": s + d + i,
            "ref_words": s + d + h,
            "char_errors": cs + cd + ci,
            "ref_chars": cs + cd + ch,
            "substitutions": s,
            "deletions": d,
            "insertions": i,
            "hits": h,
        })
    return out


def error_counts(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float | int]:
    """Corpus counts: ``wer, cer, substitutions, deletions, insertions, hits, ref_words,
    char_errors, ref_chars`` (+ ``word_errors``, ``n_utts``). Empty input → all zeros."""
    per = per_utterance_counts(refs, hyps)
    tot = {k: sum(p[k] for p in per) for k in
           ("substitutions", "deletions", "insertions", "hits", "ref_words", "word_errors",
            "char_errors", "ref_chars")}
    return {
        "wer": _rate(tot["word_errors"], tot["ref_words"]),
        "cer": _rate(tot["char_errors"], tot["ref_chars"]),
        **tot,
        "n_utts": len(per),
    }

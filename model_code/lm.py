"""Word n-gram language model (ARPA) and decoding lexicon, written in pure Python.

:func:`build_arpa` estimates an interpolated Kneser-Ney model (Chen & Goodman 1998, one
discount per order, ``D_n = n1 / (n1 + 2 n2)`` from that order's count-of-counts) and writes it
in ARPA format, which KenLM (loaded through flashlight-text) reads directly — no KenLM binaries
needed. In an interpolated model the ARPA backoff weight of a context ``h`` is exactly the
interpolation weight ``γ(h) = D · N1+(h·) / Σ_w c(h w)`` and each listed n-gram carries its
fully interpolated probability, so ARPA's backoff rule reproduces the interpolated model.

Conventions (as KenLM expects): one ``<s>`` at the start of each sentence and ``</s>`` at the
end; ``<s>`` is a unigram with log10 probability -99 (it is never predicted); ``<unk>`` gets
the share of unigram mass that the discount frees (uniform over the vocabulary). Lower orders
use continuation counts (number of distinct left neighbours), except n-grams that start with
``<s>``, which have no left neighbour and keep their raw counts.

:func:`build_lexicon` writes the flashlight lexicon: ``word<TAB>t o k e n s`` per line, where the
spelling comes from ``tokenizer.spell(word)`` — for characters that is the letters followed by
``|`` (the word separator, which is the decoder's silence token).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def _discount(counts: dict[tuple[str, ...], int]) -> float:
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    if n1 == 0 or n2 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2.0 * n2), 0.1), 0.9)


def build_arpa(texts: Iterable[str], order: int = 3) -> str:
    """Interpolated Kneser-Ney n-gram LM of whitespace-split ``texts`` as an ARPA string.

    ``order`` ≥ 2 (KenLM refuses unigram models). Empty texts are ignored; with no words at all the model holds only
    ``<s>``, ``</s>`` and ``<unk>``.
    """
    if order < 2:
        raise ValueError("order must be >= 2 (KenLM needs at least a bigram model)")
    sents = [t.split() for t in texts]
    sents = [s for s in sents if s]

    # raw counts of every n-gram, order 1..N
    raw: list[dict[tuple[str, ...], int]] = [defaultdict(int) for _ in range(order + 1)]
    for words in sents:
        seq = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for i in range(len(seq) - n + 1):
                raw[n][tuple(seq[i : i + n])] += 1
    raw[1].pop((BOS,), None)

    # adjusted counts: highest order raw; lower orders = distinct left extensions (KN),
    # except n-grams starting with <s> (no left context possible)
    adj: list[dict[tuple[str, ...], int]] = [dict() for _ in range(order + 1)]
    adj[order] = dict(raw[order])
    for n in range(order - 1, 0, -1):
        left: dict[tuple[str, ...], int] = defaultdict(int)
        for g in raw[n + 1]:
            left[g[1:]] += 1
        for g, c in raw[n].items():
            adj[n][g] = c if g[0] == BOS else left.get(g, c)

    disc = [0.0] + [_discount(adj[n]) for n in range(1, order + 1)]

    # per context: total adjusted count and number of distinct followers, per order
    ctx_total: list[dict[tuple[str, ...], int]] = [defaultdict(int) for _ in range(order + 1)]
    ctx_types: list[dict[tuple[str, ...], int]] = [defaultdict(int) for _ in range(order + 1)]
    for n in range(1, order + 1):
        for g, c in adj[n].items():
            ctx_total[n][g[:-1]] += c
            ctx_types[n][g[:-1]] += 1

    vocab = sorted({g[0] for g in adj[1]} | {EOS, UNK})
    uniform = 1.0 / len(vocab)
    prob: list[dict[tuple[str, ...], float]] = [dict() for _ in range(order + 1)]

    # unigrams, interpolated with the uniform distribution (gives <unk> its mass)
    tot1 = ctx_total[1][()]
    if tot1 > 0:
        gamma1 = disc[1] * ctx_types[1][()] / tot1
        for w in vocab:
            c = adj[1].get((w,), 0)
            prob[1][(w,)] = max(c - disc[1], 0.0) / tot1 + gamma1 * uniform
    else:
        for w in vocab:
            prob[1][(w,)] = uniform

    def lower(g: tuple[str, ...]) -> float:
        """Interpolated probability of the last word of ``g`` given its context, recursively."""
        n = len(g)
        if n == 1:
            return prob[1].get(g, prob[1][(UNK,)])
        if g in prob[n]:
            return prob[n][g]
        h = g[:-1]
        tot = ctx_total[n].get(h, 0)
        if tot == 0:
            return lower(g[1:])
        return disc[n] * ctx_types[n][h] / tot * lower(g[1:])

    for n in range(2, order + 1):
        for g, c in adj[n].items():
            h = g[:-1]
            tot = ctx_total[n][h]
            gamma = disc[n] * ctx_types[n][h] / tot
            prob[n][g] = max(c - disc[n], 0.0) / tot + gamma * lower(g[1:])

    def backoff(g: tuple[str, ...]) -> float | None:
        n = len(g) + 1
        if n > order:
            return None
        tot = ctx_total[n].get(g, 0)
        if tot == 0:
            return None
        return disc[n] * ctx_types[n][g] / tot

    lines = ["\\data\\"]
    entries: list[list[tuple[tuple[str, ...], float, float | None]]] = [[] for _ in range(order + 1)]
    # <s> is listed (contexts need it) but never predicted
    entries[1].append(((BOS,), -99.0, backoff((BOS,))))
    for g in sorted(prob[1]):
        entries[1].append((g, math.log10(prob[1][g]), backoff(g)))
    for n in range(2, order + 1):
        for g in sorted(prob[n]):
            entries[n].append((g, math.log10(prob[n][g]), backoff(g)))
    for n in range(1, order + 1):
        lines.append(f"ngram {n}={len(entries[n])}")
    lines.append("")
    for n in range(1, order + 1):
        lines.append(f"\\{n}-grams:")
        for g, lp, bo in entries[n]:
            if bo is not None and bo > 0 and n < order:
                lines.append(f"{lp:.6f}\t{' '.join(g)}\t{math.log10(bo):.6f}")
            else:
                lines.append(f"{lp:.6f}\t{' '.join(g)}")
        lines.append("")
    lines.append("\\end\\")
    return "\n".join(lines) + "\n"


def build_lexicon(words: Iterable[str], tokenizer) -> str:
    """Flashlight lexicon text: one ``word<TAB>tok tok ... |`` line per distinct word (sorted).

    Words whose spelling would lose characters (characters outside the tokenizer's vocabulary)
    are left out: the decoder could never produce them correctly.
    """
    lines = []
    for w in sorted({w for w in words if w and not w.isspace()}):
        spelling = tokenizer.spell(w)
        letters = "".join(t for t in spelling if t not in ("|", "<blank>")).replace("\u2581", "")
        if letters != w:
            continue
        lines.append(f"{w}\t{' '.join(spelling)}")
    return "\n".join(lines) + ("\n" if lines else "")


def lexicon_words(texts: Iterable[str]) -> list[str]:
    """Distinct whitespace-split words of ``texts``, sorted."""
    return sorted({w for t in texts for w in t.split()})

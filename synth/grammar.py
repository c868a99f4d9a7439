"""Sentences of the synthetic corpus: a committed lexicon and a small English grammar.

``corpus_data/lexicon.txt`` (committed; made once by ``corpus_data/build_lexicon.py``) holds ~3,000
common English lemmas (nouns, verbs, adjectives, adverbs) with their inflections and wordfreq Zipf
values; every form was checked to be read as an ordinary word by espeak-ng. The grammar
(declaratives in several tenses, negations, copula sentences, existentials, yes/no and
wh-questions, imperatives, relative clauses, coordinated and subordinated clauses) fills its slots
from the lexicon with frequency-weighted sampling (weight ``10 ** (0.7 * zipf)``), so common words
are common (Zipf-like) and sentences are grammatical, not word salad. A sentence comes with its
spoken form: the transcript with clause punctuation (commas, a full stop or a question mark) that
synthesizers use for prosody and do not speak.

Partition: a sentence belongs to the golden set iff ``sha256("asrflow-corpus-v1:" + text)`` is
0 mod 10; :func:`draw_sentence` draws only from the requested partition.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synth.common import CorpusError, bucket

DATA_DIR = Path(__file__).resolve().parent / "corpus_data"
LEXICON_PATH = DATA_DIR / "lexicon.txt"
ALLOWED_TEXT = re.compile(r"[a-z']+( [a-z']+)*")
MIN_WORDS, MAX_WORDS = 3, 20
GOLDEN_SENTENCE_BUCKETS = 10  # 1 in 10 sentences is golden-only
ZIPF_WEIGHT = 0.7  # sampling weight 10 ** (ZIPF_WEIGHT * zipf): Zipf-like but not too peaked


@dataclass(frozen=True)
class _Class:
    """One open word class: entries (tuples of forms) and cumulative sampling weights."""

    forms: tuple[tuple[str, ...], ...]
    cum: np.ndarray

    def pick(self, rng: np.random.Generator) -> tuple[str, ...]:
        return self.forms[int(np.searchsorted(self.cum, rng.random() * self.cum[-1], side="right"))]


@functools.lru_cache(maxsize=1)
def load_lexicon(path: Path = LEXICON_PATH) -> dict[str, _Class]:
    """Parse the committed lexicon into word classes (noun, verb, adj, adv) with Zipf weights."""
    rows: dict[str, list[tuple[tuple[str, ...], float]]] = {"noun": [], "verb": [], "adj": [], "adv": []}
    n_forms = {"noun": 2, "verb": 5, "adj": 1, "adv": 1}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            _lemma, pos, zipf, forms = line.split("\t")
            f = tuple(forms.split(","))
            if pos not in rows or len(f) != n_forms[pos] or not all(re.fullmatch(r"[a-z']+", x) for x in f):
                raise ValueError(line)
            rows[pos].append((f, float(zipf)))
        except ValueError as e:
            raise CorpusError(f"{path}:{lineno}: malformed lexicon line {line!r}") from e
    out = {}
    for pos, items in rows.items():
        if not items:
            raise CorpusError(f"{path}: no {pos} entries")
        w = np.array([10 ** (ZIPF_WEIGHT * z) for _, z in items])
        out[pos] = _Class(tuple(f for f, _ in items), np.cumsum(w))
    return out


def _choice(rng: np.random.Generator, items, p=None):
    return items[int(rng.choice(len(items), p=p))]


_SUBJ_PRON = (
    ("i", "1s"),
    ("you", "2"),
    ("he", "3s"),
    ("she", "3s"),
    ("it", "3s"),
    ("we", "p"),
    ("they", "p"),
)
_OBJ_PRON = ("me", "you", "him", "her", "it", "us", "them")
_DET_SG = ("the", "a", "this", "that", "my", "your", "his", "her", "our", "their", "every", "one")
_DET_SG_P = (0.34, 0.22, 0.07, 0.05, 0.06, 0.05, 0.05, 0.04, 0.04, 0.04, 0.02, 0.02)
_DET_PL = tuple(
    "the|some|these|those|my|your|our|their|many|all the|two|three|four|five|ten|twenty|a few|most".split("|")
)
_PREP = tuple(
    "in on at with from near under behind after before for about into over through across without "
    "around by to".split()
)
_INTENS = ("very", "really", "quite", "so", "too", "a bit", "pretty", "rather")
_MODALS = ("can", "could", "will", "would", "should", "might", "must", "may")
_NEG_MODALS = ("can't", "won't", "wouldn't", "shouldn't", "couldn't", "cannot", "will not", "must not")
_SAY = tuple(
    "i think that|she said that|he knows that|we heard that|they believe that|it seems that|i guess|"
    "you know|my friend told me that|everyone says that".split("|")
)
_SUB = ("because", "when", "while", "after", "before", "although", "if", "until", "since")
_COORD = ("and", "but", "so", "or")
_TIME = tuple(
    "today|yesterday|tomorrow|tonight|last week|next year|every day|this morning|on monday|"
    "in the evening|at night|later|now|soon|again".split("|")
)
_WH = ("what", "where", "why", "when", "how")


class _Grammar:
    """Random sentence generator over the lexicon; every method draws only from the given rng."""

    def __init__(self, lex: dict[str, _Class], rng: np.random.Generator):
        self.lex, self.rng = lex, rng

    def p(self, prob: float) -> bool:
        return bool(self.rng.random() < prob)

    def noun(self) -> tuple[str, str]:
        return self.lex["noun"].pick(self.rng)  # (singular, plural)

    def adj(self) -> str:
        return self.lex["adj"].pick(self.rng)[0]

    def adv(self) -> str:
        return self.lex["adv"].pick(self.rng)[0]

    def verb(self) -> tuple[str, ...]:
        return self.lex["verb"].pick(self.rng)  # base, 3sg, past, gerund, participle

    @staticmethod
    def _a(word: str) -> str:
        if word.startswith(("eu", "one", "once", "uni", "us", "ut", "ur")):
            return "a"
        return "an" if word[0] in "aeiou" else "a"

    def np(self, allow_pp: bool = True, subject: bool = False) -> tuple[list[str], str]:
        """A noun phrase and its person/number ("1s", "2", "3s", "p")."""
        r = self.rng.random()
        if r < 0.22:
            if subject:
                w, agr = _choice(self.rng, _SUBJ_PRON)
                return [w], agr
            return [_choice(self.rng, _OBJ_PRON)], "3s"
        plural = self.p(0.3)
        sg, pl = self.noun()
        words: list[str] = []
        if self.p(0.35):
            if self.p(0.12):
                words.append(_choice(self.rng, _INTENS[:3]))
            words.append(self.adj())
        words.append(pl if plural else sg)
        if plural:
            det = _choice(self.rng, _DET_PL) if self.p(0.8) else ""
        else:
            det = _choice(self.rng, _DET_SG, p=_DET_SG_P)
            if det == "a":
                det = self._a(words[0])
        head = det.split() if det else []
        out = head + words
        if allow_pp and self.p(0.15):
            out += self.pp(allow_pp=False)
        return out, "p" if plural else "3s"

    def pp(self, allow_pp: bool = False) -> list[str]:
        return [_choice(self.rng, _PREP)] + self.np(allow_pp=allow_pp)[0]

    def complement(self) -> list[str]:
        r = self.rng.random()
        out: list[str] = []
        if r < 0.65:
            out += self.np()[0]
        elif r < 0.8:
            out += self.pp()
        if self.p(0.2):
            out += self.pp()
        if self.p(0.12):
            out.append(self.adv())
        elif self.p(0.1):
            out += _choice(self.rng, _TIME).split()
        return out

    def vp(self, agr: str) -> list[str]:
        """A verb phrase agreeing with the subject, in one of several tenses, maybe negated."""
        base, s3, past, ger, part = self.verb()
        r = self.rng.random()
        neg = self.p(0.15)
        if r < 0.28:  # present simple
            if neg:
                v = (
                    ["doesn't" if agr == "3s" else "don't", base]
                    if self.p(0.6)
                    else ["does not" if agr == "3s" else "do not", base]
                )
            else:
                v = [s3 if agr == "3s" else base]
        elif r < 0.56:  # past simple
            v = [_choice(self.rng, ("didn't", "did not")), base] if neg else [past]
        elif r < 0.68:  # progressive
            be = {"1s": "am", "2": "are", "3s": "is", "p": "are"}[agr]
            if self.p(0.3):
                be = "was" if agr in ("1s", "3s") else "were"
            v = [be, "not", ger] if neg else [be, ger]
        elif r < 0.78:  # perfect
            have = "has" if agr == "3s" else "have"
            v = [have, "not", part] if neg else [have, part]
        elif r < 0.9:  # modal
            v = _choice(self.rng, _NEG_MODALS).split() + [base] if neg else [_choice(self.rng, _MODALS), base]
        else:  # going to
            be = {"1s": "am", "2": "are", "3s": "is", "p": "are"}[agr]
            v = [be, "going", "to", base]
        if not neg and self.p(0.06):
            v.insert(0 if len(v) == 1 else 1, self.adv())
        return v + self.complement()

    def clause(self) -> list[str]:
        subj, agr = self.np(subject=True)
        r = self.rng.random()
        if r < 0.7:
            return subj + self.vp(agr)
        if r < 0.85:  # copula
            be = {"1s": "am", "2": "are", "3s": "is", "p": "are"}[agr]
            if self.p(0.4):
                be = "was" if agr in ("1s", "3s") else "were"
            pred = [self.adj()]
            if self.p(0.3):
                pred.insert(0, _choice(self.rng, _INTENS))
            if self.p(0.15):
                pred += [_choice(self.rng, ("and", "but")), self.adj()]
            verb = (
                [be]
                if self.p(0.85)
                else (["seems" if agr == "3s" else "seem"] if self.p(0.5) else ["looked"])
            )
            return subj + verb + pred
        # relative clause on the subject
        if subj[0] in {w for w, _ in _SUBJ_PRON}:
            subj, agr = (["the", self.noun()[0]], "3s")
        if self.p(0.5):  # "the man who saw the dog ..."
            rel = ["that" if self.p(0.6) else "who", self.verb()[2]] + self.np(allow_pp=False)[0]
        else:  # "the book that my friend wrote ..."
            rel = ["that"] + self.np(allow_pp=False, subject=True)[0] + [self.verb()[2]]
        return subj + rel + self.vp(agr)

    def sentence(self) -> tuple[list[str], str]:
        """One sentence: its words and the spoken form (with punctuation for prosody)."""
        r = self.rng.random()
        if r < 0.42:
            w = self.clause()
            return w, " ".join(w) + "."
        if r < 0.52:  # two coordinated or subordinated clauses
            a, b = self.clause(), self.clause()
            if self.p(0.5):
                conj = _choice(self.rng, _COORD)
                return a + [conj] + b, f"{' '.join(a)}, {conj} {' '.join(b)}."
            sub = _choice(self.rng, _SUB)
            if self.p(0.5):
                return a + [sub] + b, f"{' '.join(a)} {sub} {' '.join(b)}."
            return [sub] + b + a, f"{sub} {' '.join(b)}, {' '.join(a)}."
        if r < 0.6:  # reported speech
            head = _choice(self.rng, _SAY).split()
            c = self.clause()
            return head + c, f"{' '.join(head)} {' '.join(c)}."
        if r < 0.68:  # existential
            sg, pl = self.noun()
            if self.p(0.5):
                w = ["there", _choice(self.rng, ("is", "was")), self._a(sg), sg] + self.pp()
            else:
                w = [
                    "there",
                    _choice(self.rng, ("are", "were")),
                    _choice(self.rng, ("some", "many", "no", "two", "a few")),
                    pl,
                ] + self.pp()
            return w, " ".join(w) + "."
        if r < 0.78:  # yes/no question
            subj, agr = self.np(subject=True)
            base = self.verb()[0]
            if self.p(0.5):
                aux = _choice(self.rng, ("did", "does" if agr == "3s" else "do"))
            else:
                aux = _choice(self.rng, _MODALS[:6])
            w = [aux] + subj + [base] + self.complement()
            return w, " ".join(w) + "?"
        if r < 0.87:  # wh question
            wh = _choice(self.rng, _WH)
            subj, agr = self.np(subject=True)
            v = self.verb()
            if self.p(0.6):
                aux = _choice(self.rng, ("did", "does" if agr == "3s" else "do", "can", "should", "will"))
                w = [wh, aux] + subj + [v[0]]
                if wh != "what":
                    w += self.np()[0] if self.p(0.6) else []
            else:
                be = {"1s": "am", "2": "are", "3s": "is", "p": "are"}[agr]
                w = [wh, be] + subj + [v[3]]
            return w, " ".join(w) + "?"
        # imperative
        w = []
        if self.p(0.2):
            w.append("please")
        if self.p(0.15):
            w += ["don't"]
        w += [self.verb()[0]] + self.np()[0]
        if self.p(0.4):
            w += self.pp()
        return w, " ".join(w) + "."


def is_golden_sentence(text: str) -> bool:
    """True iff ``text`` is in the golden partition (never used by training weeks)."""
    return bucket(text, GOLDEN_SENTENCE_BUCKETS) == 0


def draw_sentence(rng: np.random.Generator, golden: bool) -> tuple[str, str]:
    """A (transcript, spoken text) pair of 3-20 words in the requested sentence partition."""
    g = _Grammar(load_lexicon(), rng)
    for _ in range(10_000):
        words, spoken = g.sentence()
        text = " ".join(words)
        if MIN_WORDS <= len(words) <= MAX_WORDS and is_golden_sentence(text) == golden:
            if not ALLOWED_TEXT.fullmatch(text):  # a bug in the grammar, not bad luck
                raise CorpusError(f"generated transcript has disallowed characters: {text!r}")
            return text, spoken
    raise CorpusError("could not draw a sentence in the requested partition")  # pragma: no cover

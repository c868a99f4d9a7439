"""The embedded synthetic speech corpus: English sentences spoken by espeak-ng voices.

Why: the pipeline must run end to end on a laptop and in CI with no network and no downloaded
data set, yet the model needs speech it can actually learn from. This module writes a landing
zone week (``generate_week``) or the golden set (``generate_golden``) as 16-bit WAV files plus a
NeMo-style ``manifest.jsonl``::

    {"id": "w001-000000", "audio_filepath": "audio/w001-000000.wav", "duration": 2.4271,
     "text": "the old man walked to the river", "speaker": "en-us_f3_p45"}

``audio_filepath`` is relative to the manifest; ``duration`` is the length of the written audio;
``text`` holds only lowercase letters, apostrophes and single spaces.

Sentences. ``corpus_data/lexicon.txt`` (committed; made once by ``corpus_data/build_lexicon.py``)
holds ~3,000 common English lemmas (nouns, verbs, adjectives, adverbs) with their inflections and
wordfreq Zipf values; every form was checked to be read as an ordinary word by espeak-ng. A small
grammar (declaratives in several tenses, negations, copula sentences, existentials, yes/no and
wh-questions, imperatives, relative clauses, coordinated and subordinated clauses) fills its slots
from the lexicon with frequency-weighted sampling (weight ``10 ** (0.7 * zipf)``), so common words
are common (Zipf-like) and sentences are grammatical, not word salad. Sentences have 3 to 20 words;
a share ``long_form_share`` (default 2%) of utterances are long-form: sentences joined until the
audio lasts over 20 s. espeak is given the transcript with clause punctuation added for prosody
(commas, a full stop or question mark), which it does not speak; SSML is off.

Voices. A speaker is a fixed (espeak English voice, voice variant, base pitch) triple, its id
``<voice>_<variant>_p<pitch>``; the speaking rate (120-220 wpm) and level vary per utterance. Light
noise (white or brown, SNR drawn from ``noise_snr_db``, default 15-40 dB) and a little leading and
trailing silence are added in numpy. Audio is espeak's native 22,050 Hz (ingest resamples).

Golden set, disjoint from training by construction:
  * sentences: a sentence belongs to the golden partition iff ``sha256("asrflow-corpus-v1:" + text)``
    is 0 mod 10. Training weeks reject golden-partition sentences and the golden set accepts only
    them, so a golden sentence can never equal a training sentence (of any week, any seed). The
    golden set also draws from its own random stream (stream 1; weeks use stream 0).
  * voices: (voice, variant) combinations whose hash is 0 mod 6 are reserved for the golden set and
    never speak in a training week, so golden speakers are unseen speakers (every base voice and
    every variant still occurs in training, only the combinations are new).

Determinism. Utterance ``i`` of week ``w`` is drawn from ``numpy.random.default_rng([seed, stream,
w, i])``, so its text, voice and noise do not depend on ``jobs`` or on scheduling, and the same
arguments give byte-identical audio and manifests. Files are written to a temporary name and moved
into place with ``os.replace``; the manifest is written last, so a killed run leaves no manifest
that points at missing audio, and re-running with the same arguments rewrites the same bytes.

Work is spread over ``jobs`` threads (0 = all cores), each running espeak-ng subprocesses.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

CODE_VERSION = "1"
DATA_DIR = Path(__file__).resolve().parent / "corpus_data"
LEXICON_PATH = DATA_DIR / "lexicon.txt"
ESPEAK = "espeak-ng"
SAMPLE_RATE = 22050  # espeak-ng's native rate; the ingest step resamples to 16 kHz
ALLOWED_TEXT = re.compile(r"[a-z']+( [a-z']+)*")
MIN_WORDS, MAX_WORDS = 3, 20
LONG_FORM_MIN_S = 20.0
SPEED_WPM = (120, 220)
DEFAULT_SNR_DB = (15.0, 40.0)
GOLDEN_SENTENCE_BUCKETS = 10  # 1 in 10 sentences is golden-only
GOLDEN_VOICE_BUCKETS = 6  # 1 in 6 (voice, variant) combinations is golden-only
STREAM_WEEK, STREAM_GOLDEN = 0, 1
ZIPF_WEIGHT = 0.7  # sampling weight 10 ** (ZIPF_WEIGHT * zipf): Zipf-like but not too peaked

# espeak-ng English voices (all ship with the espeak-ng package; MBROLA voices are not used).
VOICES = tuple("en-us en en-gb-scotland en-gb-x-gbclan en-gb-x-rp en-gb-x-gbcwmd en-029 en-us-nyc".split())
# voice variants that still sound like speech (robot, whisper, croak and effect variants are left out)
VARIANTS = tuple(
    "m1 m2 m3 m4 m5 m6 m7 m8 f1 f2 f3 f4 f5 klatt klatt2 klatt3 klatt4 Alex Alicia Andrea Andy Annie "
    "adam antonio aunty belinda benjamin boris caleb david ed edward Gene iven iven2 john Lee linda "
    "max Michael Mike michel norbert paul pedro quincy rob robert shelby steph steph2 travis victor "
    "zac grandma grandpa".split()
)
PITCHES = (35, 45, 55, 65)  # espeak -p (0-99, default 50)


class CorpusError(ValueError):
    """Bad arguments or a broken synthesis environment (e.g. espeak-ng missing)."""


# --------------------------------------------------------------------------------------------------
# lexicon and grammar
# --------------------------------------------------------------------------------------------------


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


def _bucket(text: str, buckets: int) -> int:
    return int.from_bytes(hashlib.sha256(f"asrflow-corpus-v1:{text}".encode()).digest()[:8], "big") % buckets


def is_golden_sentence(text: str) -> bool:
    """True iff ``text`` is in the golden partition (never used by training weeks)."""
    return _bucket(text, GOLDEN_SENTENCE_BUCKETS) == 0


def is_golden_voice(voice: str, variant: str) -> bool:
    """True iff the (voice, variant) combination is reserved for the golden set."""
    return _bucket(f"voice:{voice}+{variant}", GOLDEN_VOICE_BUCKETS) == 0


@functools.lru_cache(maxsize=2)
def speakers(golden: bool) -> tuple[tuple[str, str, int], ...]:
    """The speaker pool of training weeks (golden=False) or of the golden set, in a fixed order."""
    return tuple(
        (v, var, p) for v in VOICES for var in VARIANTS for p in PITCHES if is_golden_voice(v, var) == golden
    )


def speaker_id(voice: str, variant: str, pitch: int) -> str:
    return f"{voice}_{variant}_p{pitch}"


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


# --------------------------------------------------------------------------------------------------
# synthesis
# --------------------------------------------------------------------------------------------------


def _espeak(spoken: str, voice: str, variant: str, pitch: int, speed: int) -> np.ndarray:
    """Synthesize with espeak-ng; returns int16 samples at SAMPLE_RATE."""
    cmd = [ESPEAK, "-v", f"{voice}+{variant}", "-s", str(speed), "-p", str(pitch), "-a", "70", "--stdout"]
    proc = subprocess.run(cmd, input=spoken.encode(), capture_output=True, check=False)
    if proc.returncode != 0:
        raise CorpusError(
            f"espeak-ng failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace').strip()}"
        )
    b = proc.stdout
    # espeak streams a WAV with placeholder sizes: read the fmt chunk, take everything after "data"
    if b[:4] != b"RIFF" or b[8:12] != b"WAVE" or b[36:40] != b"data":
        raise CorpusError(f"espeak-ng gave no WAV for {spoken!r} ({voice}+{variant})")
    sr = int.from_bytes(b[24:28], "little")
    if sr != SAMPLE_RATE or int.from_bytes(b[34:36], "little") != 16:
        raise CorpusError(f"espeak-ng gave {sr} Hz audio, expected {SAMPLE_RATE} Hz 16-bit")
    data = b[44:]
    return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")


def _postprocess(x: np.ndarray, rng: np.random.Generator, snr_db: tuple[float, float]) -> np.ndarray:
    """Pad with a little silence, set a random level and add white or brown noise at a random SNR."""
    y = x.astype(np.float64) / 32768.0
    y = np.concatenate(
        [
            np.zeros(int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)),
            y,
            np.zeros(int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)),
        ]
    )
    peak = np.max(np.abs(y)) or 1.0
    y *= rng.uniform(0.25, 0.85) / peak
    voiced = y[np.abs(y) > 1e-4]
    p_sig = float(np.mean(voiced**2)) if voiced.size else 1e-6
    snr = rng.uniform(*snr_db)
    noise = rng.standard_normal(y.size)
    if rng.random() < 0.4:  # brown-ish noise: leaky integration of white noise
        c = np.cumsum(noise)
        w = min(401, c.size)  # remove the drift: subtract a running mean (via cumulative sums)
        cc = np.concatenate([[0.0], np.cumsum(c)])
        idx = np.arange(c.size)
        lo, hi = np.clip(idx - w // 2, 0, c.size), np.clip(idx + w // 2 + 1, 0, c.size)
        noise = c - (cc[hi] - cc[lo]) / (hi - lo)
    noise *= np.sqrt(p_sig / (10 ** (snr / 10)) / (np.mean(noise**2) or 1.0))
    y = np.clip(y + noise, -1.0, 32767 / 32768)
    return np.round(y * 32768.0).astype("<i2")


def _wav_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class _Job:
    folder: Path
    uid: str
    seed_key: tuple[int, ...]
    golden: bool
    long_form_share: float
    snr_db: tuple[float, float]


def _make_utterance(job: _Job) -> dict:
    """Draw, synthesize and write one utterance; everything comes from the job's own rng."""
    rng = np.random.default_rng(list(job.seed_key))
    pool = speakers(job.golden)
    voice, variant, pitch = pool[int(rng.integers(len(pool)))]
    speed = int(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1))
    long_form = bool(rng.random() < job.long_form_share)
    texts, spoken = [], []
    t, s = draw_sentence(rng, job.golden)
    texts.append(t)
    spoken.append(s)
    audio = _espeak(" ".join(spoken), voice, variant, pitch, speed)
    while long_form and len(audio) < (LONG_FORM_MIN_S + 1.0) * SAMPLE_RATE:
        # add sentences (roughly enough for the remaining time) and re-synthesize the whole passage
        missing_s = LONG_FORM_MIN_S + 1.0 - len(audio) / SAMPLE_RATE
        for _ in range(max(1, int(missing_s * speed / 60 / 9))):
            t, s = draw_sentence(rng, job.golden)
            texts.append(t)
            spoken.append(s)
        audio = _espeak(" ".join(spoken), voice, variant, pitch, speed)
    samples = _postprocess(audio, rng, job.snr_db)
    rel = f"audio/{job.uid}.wav"
    _atomic_write(job.folder / rel, _wav_bytes(samples))
    return {
        "id": job.uid,
        "audio_filepath": rel,
        "duration": round(len(samples) / SAMPLE_RATE, 6),
        "text": " ".join(texts),
        "speaker": speaker_id(voice, variant, pitch),
    }


def _check_args(utterances: int, seed: int, jobs: int, long_form_share: float, snr_db) -> tuple[float, float]:
    if not isinstance(utterances, int) or utterances < 1:
        raise CorpusError(f"utterances must be a positive integer, got {utterances!r}")
    if not isinstance(seed, int) or seed < 0:
        raise CorpusError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(jobs, int) or jobs < 0:
        raise CorpusError(f"jobs must be >= 0 (0 = all cores), got {jobs!r}")
    if not 0.0 <= long_form_share <= 1.0:
        raise CorpusError(f"long_form_share must be in [0, 1], got {long_form_share!r}")
    lo, hi = (float(v) for v in snr_db)
    if lo > hi:
        raise CorpusError(f"noise_snr_db must be (low, high) with low <= high, got {snr_db!r}")
    if shutil.which(ESPEAK) is None:
        raise CorpusError("espeak-ng is not installed (apt-get install espeak-ng; `make setup` does it)")
    return lo, hi


def _generate(
    folder: Path,
    prefix: str,
    seed_head: tuple[int, ...],
    utterances: int,
    golden: bool,
    jobs: int,
    long_form_share: float,
    snr_db: tuple[float, float],
    info: dict,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    folder = Path(folder)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    load_lexicon()  # parse once, before the threads start
    workers = jobs or os.cpu_count() or 1
    todo = [
        _Job(folder, f"{prefix}{i:06d}", (*seed_head, i), golden, long_form_share, snr_db)
        for i in range(utterances)
    ]
    t0 = time.monotonic()
    every = max(1, min(100, utterances // 10))
    rows: list[dict] = []
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for n, row in enumerate(ex.map(_make_utterance, todo), 1):  # map keeps the input order
            rows.append(row)
            if n % every == 0 or n == utterances:
                log.info(
                    "corpus %s: %d/%d utterances (%.1f s)", folder.name, n, utterances, time.monotonic() - t0
                )
                if progress:
                    progress(n, utterances)
    info_bytes = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()
    _atomic_write(folder / "corpus_info.json", info_bytes)
    manifest = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows).encode()
    _atomic_write(folder / "manifest.jsonl", manifest)  # last: its presence means the folder is complete
    hours = sum(r["duration"] for r in rows) / 3600
    log.info("corpus %s: %d utterances, %.3f h, %.1f s", folder, len(rows), hours, time.monotonic() - t0)
    return {
        "folder": str(folder),
        "n": len(rows),
        "hours": round(hours, 6),
        "n_long_form": sum(r["duration"] > LONG_FORM_MIN_S for r in rows),
        "n_speakers": len({r["speaker"] for r in rows}),
        "manifest": str(folder / "manifest.jsonl"),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }


def _lexicon_sha() -> str:
    return hashlib.sha256(LEXICON_PATH.read_bytes()).hexdigest()


def generate_week(
    out: Path,
    week: int,
    utterances: int,
    seed: int,
    jobs: int = 0,
    *,
    long_form_share: float = 0.02,
    noise_snr_db: tuple[float, float] = DEFAULT_SNR_DB,
) -> dict:
    """Synthesize training week ``week`` into ``out/week-NNN/`` (WAV audio + ``manifest.jsonl``).

    Each week draws new sentences (random stream keyed by week) over the same vocabulary and the
    training speaker pool. Returns a summary: folder, n, hours, n_long_form, n_speakers, manifest,
    manifest_sha256.
    """
    if not isinstance(week, int) or not 0 <= week <= 999:
        raise CorpusError(f"week must be an integer in 0..999, got {week!r}")
    snr = _check_args(utterances, seed, jobs, long_form_share, noise_snr_db)
    info = {
        "kind": "week",
        "week": week,
        "utterances": utterances,
        "seed": seed,
        "long_form_share": long_form_share,
        "noise_snr_db": list(snr),
        "code_version": CODE_VERSION,
        "lexicon_sha256": _lexicon_sha(),
        "sample_rate": SAMPLE_RATE,
    }
    return _generate(
        Path(out) / f"week-{week:03d}",
        f"w{week:03d}-",
        (seed, STREAM_WEEK, week),
        utterances,
        False,
        jobs,
        long_form_share,
        snr,
        info,
    )


def generate_golden(
    out: Path,
    utterances: int,
    seed: int,
    jobs: int = 0,
    *,
    long_form_share: float = 0.02,
    noise_snr_db: tuple[float, float] = DEFAULT_SNR_DB,
) -> dict:
    """Synthesize the golden set into ``out/`` from golden-only sentences and golden-only voices.

    See the module docstring for how golden sentences and speakers are kept out of every training
    week. Returns the same summary as :func:`generate_week`.
    """
    snr = _check_args(utterances, seed, jobs, long_form_share, noise_snr_db)
    info = {
        "kind": "golden",
        "utterances": utterances,
        "seed": seed,
        "long_form_share": long_form_share,
        "noise_snr_db": list(snr),
        "code_version": CODE_VERSION,
        "lexicon_sha256": _lexicon_sha(),
        "sample_rate": SAMPLE_RATE,
    }
    return _generate(
        Path(out), "golden-", (seed, STREAM_GOLDEN, 0), utterances, True, jobs, long_form_share, snr, info
    )

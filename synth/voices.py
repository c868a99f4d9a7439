"""Speakers of the synthetic corpus: espeak-ng, Festival and flite voices, and a signal-level warp.

A :class:`Speaker` is one fixed voice setting; its ``id`` is the manifest's ``speaker`` field and
always means the same settings. Per utterance only the speaking rate varies (espeak ``-s`` words per
minute, Festival/flite ``Duration_Stretch``).

* espeak-ng: (English voice, voice variant, base pitch ``-p``); id ``en-us_f3_p45``. A
  (voice, variant) combination whose hash is 0 mod 6 is reserved for the golden set.
* Festival: ``kal_diphone``, ``ked_diphone`` (diphone, 16 kHz) and ``cmu_us_slt_arctic_hts`` (HTS,
  32 kHz; about ten times slower, so it gets a smaller weight); id ``festival-kal_w-100``.
* flite: ``awb``, ``rms``, ``slt``, ``kal16``; golden set only, never in a training week, so the golden
  set can measure transfer to a synthesizer the model has never heard; id ``flite-awb``.

Signal-level speaker diversity: a warp of ``w`` cents resamples the voice as if it had been
recorded at ``2 ** (w / 1200)`` times its rate (speed perturbation: pitch, formants, i.e. apparent
vocal-tract length, and tempo all move together), done in numpy (``scipy.signal.resample_poly``)
together with the conversion to the corpus rate. Training speakers use warps from
:data:`TRAIN_WARPS`, golden Festival speakers only warps from :data:`GOLDEN_WARPS` (disjoint), so
golden Festival speakers are unseen voice settings. The warp is part of the speaker id (``_w+200``).

Determinism: espeak-ng, Festival (diphone and HTS) and flite give the same bytes for the same text
and settings (checked in ``tests/synth``). Festival runs as one long-lived ``festival --pipe``
process per worker thread (starting one costs ~1 s, an utterance ~20 ms with a diphone voice):
before every utterance the voice is selected again and ``Duration_Stretch`` set, so an utterance's
audio does not depend on what the process synthesized before.
"""

from __future__ import annotations

import atexit
import functools
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf

from synth.common import SAMPLE_RATE, CorpusError, bucket, resample

ESPEAK, FESTIVAL, FLITE = "espeak-ng", "festival", "flite"
SYNTHS = ("espeak", "festival", "flite")
TRAIN_SYNTHS = ("espeak", "festival")  # flite is the golden set's unseen synthesizer: never trained on
SPEED_WPM = (120, 220)  # espeak-ng speaking rate per utterance
GOLDEN_VOICE_BUCKETS = 6  # 1 in 6 espeak (voice, variant) combinations is golden-only

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

# Festival voices (Debian festvox-kallpc16k, festvox-kdlpc16k, festvox-us-slt-hts) and their weights
# in training weeks: the HTS voice costs ~0.25 s per utterance against ~0.02 s for a diphone voice.
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
FESTIVAL_WEIGHTS = (0.4, 0.4, 0.2)
FESTIVAL_SHORT = {"kal_diphone": "kal", "ked_diphone": "ked", "cmu_us_slt_arctic_hts": "slt"}
FLITE_VOICES = ("awb", "rms", "slt", "kal16")  # `flite -lv`, less kal (8 kHz) and awb_time (time-of-day only)

# signal-level warps in cents: training and golden grids are disjoint
TRAIN_WARPS = (-300, -200, -100, 0, 100, 200, 300)
GOLDEN_WARPS = (-250, -150, 150, 250)

_SPOKEN = re.compile(r"[a-z' ,.?]+")  # what the grammar's spoken form may hold (safe inside a Scheme string)


@dataclass(frozen=True)
class Speaker:
    """One fixed voice setting of one synthesizer."""

    synth: str  # espeak | festival | flite
    voice: str
    variant: str = ""  # espeak voice variant
    pitch: int = 0  # espeak base pitch (-p)
    warp: int = 0  # signal-level warp in cents (0 = none)

    @property
    def id(self) -> str:
        w = f"_w{self.warp:+d}" if self.warp else ""
        if self.synth == "espeak":
            return f"{speaker_id(self.voice, self.variant, self.pitch)}{w}"
        return f"{self.synth}-{FESTIVAL_SHORT.get(self.voice, self.voice)}{w}"


def speaker_id(voice: str, variant: str, pitch: int) -> str:
    """The id of an (unwarped) espeak speaker."""
    return f"{voice}_{variant}_p{pitch}"


def is_golden_voice(voice: str, variant: str) -> bool:
    """True iff the espeak (voice, variant) combination is reserved for the golden set."""
    return bucket(f"voice:{voice}+{variant}", GOLDEN_VOICE_BUCKETS) == 0


@functools.lru_cache(maxsize=2)
def speakers(golden: bool) -> tuple[tuple[str, str, int], ...]:
    """The espeak (voice, variant, pitch) pool of training weeks (golden=False) or of the golden set."""
    return tuple(
        (v, var, p) for v in VOICES for var in VARIANTS for p in PITCHES if is_golden_voice(v, var) == golden
    )


def festival_speakers(golden: bool) -> tuple[Speaker, ...]:
    """Festival speakers: every voice with every warp of the training or of the golden grid."""
    warps = GOLDEN_WARPS if golden else TRAIN_WARPS
    return tuple(Speaker("festival", v, warp=w) for v in FESTIVAL_VOICES for w in warps)


def draw_speaker(rng: np.random.Generator, synth: str, golden: bool, warp_share: float = 0.0) -> Speaker:
    """One speaker of ``synth`` from the training or golden pool.

    espeak: a pool triple; in training, with probability ``warp_share`` a non-zero training warp.
    festival: a voice (weighted) and a warp of the partition's grid. flite: a voice (golden only).
    """
    if synth == "espeak":
        pool = speakers(golden)
        voice, variant, pitch = pool[int(rng.integers(len(pool)))]
        warp = 0
        if not golden and rng.random() < warp_share:
            nonzero = [w for w in TRAIN_WARPS if w]
            warp = nonzero[int(rng.integers(len(nonzero)))]
        return Speaker("espeak", voice, variant, pitch, warp)
    if synth == "festival":
        voice = FESTIVAL_VOICES[int(rng.choice(len(FESTIVAL_VOICES), p=FESTIVAL_WEIGHTS))]
        warps = GOLDEN_WARPS if golden else TRAIN_WARPS
        return Speaker("festival", voice, warp=warps[int(rng.integers(len(warps)))])
    if synth == "flite":
        if not golden:
            raise CorpusError("flite is reserved for the golden set (the unseen synthesizer)")
        return Speaker("flite", FLITE_VOICES[int(rng.integers(len(FLITE_VOICES)))])
    raise CorpusError(f"unknown synthesizer {synth!r} (known: {', '.join(SYNTHS)})")


def draw_rate(rng: np.random.Generator, synth: str, stretch: tuple[float, float]) -> float:
    """The speaking rate of one utterance: espeak words per minute, else a duration stretch."""
    if synth == "espeak":
        return float(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1))
    return round(float(rng.uniform(*stretch)), 3)


def require(synths: set[str]) -> None:
    """Raise a readable error when a synthesizer the run needs is not installed."""
    missing = [
        (s, exe)
        for s, exe in (("espeak", ESPEAK), ("festival", FESTIVAL), ("flite", FLITE))
        if s in synths and shutil.which(exe) is None
    ]
    if "festival" in synths and not missing and shutil.which("stdbuf") is None:
        missing.append(("festival", "stdbuf"))
    if missing:
        names = ", ".join(exe for _, exe in missing)
        raise CorpusError(
            f"{names} not installed (apt-get install espeak-ng festival festvox-kallpc16k festvox-kdlpc16k "
            "festvox-us-slt-hts flite; `make setup` does it)"
        )


# --------------------------------------------------------------------------------------------------
# synthesizers
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


def _read_wav(path: Path, what: str) -> tuple[np.ndarray, int]:
    try:
        x, sr = sf.read(path, dtype="int16")
    except (OSError, RuntimeError) as e:
        raise CorpusError(f"{what} wrote no readable audio: {e}") from e
    finally:
        path.unlink(missing_ok=True)
    if x.ndim != 1 or x.size == 0:
        raise CorpusError(f"{what} wrote empty or multichannel audio")
    return x, int(sr)


class Festival:
    """One long-lived ``festival --pipe`` process, driven line by line through stdin.

    Festival's stdout is line-buffered with ``stdbuf -oL`` so that a marker printed after each
    utterance tells that its WAV file is complete. Starting one costs ~2 s of CPU (voices and
    lexicon load on first use), so idle processes are kept for the next run in this interpreter
    (:func:`_acquire_festival`); that is safe because every utterance sets its voice and parameters.
    """

    def __init__(self) -> None:
        self.n = 0
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", FESTIVAL, "--pipe"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    def synth(self, spoken: str, voice: str, stretch: float, workdir: Path) -> tuple[np.ndarray, int]:
        if not _SPOKEN.fullmatch(spoken) or voice not in FESTIVAL_VOICES:
            raise CorpusError(f"festival: refusing text {spoken!r} / voice {voice!r}")
        self.n += 1
        path = workdir / f"fest-{threading.get_ident()}-{self.n}.wav"
        marker = f"@@asrflow-{self.n}"
        script = (
            f"(voice_{voice})\n(Parameter.set 'Duration_Stretch {stretch:.3f})\n"
            f'(utt.save.wave (SynthText "{spoken}") "{path}" \'riff)\n(format t "{marker}\\n")\n'
        )
        try:
            self.proc.stdin.write(script)
            self.proc.stdin.flush()
            while (line := self.proc.stdout.readline()) and line.strip() != marker:
                pass
        except (BrokenPipeError, OSError) as e:
            raise CorpusError(f"festival process died: {e}") from e
        if not line:
            raise CorpusError(
                f"festival process ended (exit {self.proc.poll()}) while synthesizing {spoken!r}"
            )
        return _read_wav(path, f"festival ({voice})")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


_IDLE_FESTIVALS: list[Festival] = []
_IDLE_LOCK = threading.Lock()
MAX_IDLE_FESTIVALS = 2  # ~330 MB resident each (voices and lexicon loaded)


def _acquire_festival() -> Festival:
    with _IDLE_LOCK:
        while _IDLE_FESTIVALS:
            f = _IDLE_FESTIVALS.pop()
            if f.alive():
                return f
    return Festival()


def _release_festival(f: Festival, reuse: bool) -> None:
    with _IDLE_LOCK:
        if reuse and f.alive() and len(_IDLE_FESTIVALS) < MAX_IDLE_FESTIVALS:
            _IDLE_FESTIVALS.append(f)
            return
    f.close()


@atexit.register
def close_idle_festivals() -> None:
    """End the Festival processes kept for reuse (also run at interpreter exit)."""
    with _IDLE_LOCK:
        idle = list(_IDLE_FESTIVALS)
        _IDLE_FESTIVALS.clear()
    for f in idle:
        f.close()


def _flite(spoken: str, voice: str, stretch: float, workdir: Path) -> tuple[np.ndarray, int]:
    path = workdir / f"flite-{threading.get_ident()}.wav"
    cmd = [FLITE, "-voice", voice, "--setf", f"duration_stretch={stretch:.3f}", "-t", spoken, "-o", str(path)]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise CorpusError(f"flite failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace').strip()}")
    return _read_wav(path, f"flite ({voice})")


class Engines:
    """The synthesizers of one corpus run: per-thread Festival processes and a scratch folder."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="asrflow-synth-")
        self.workdir = Path(self._tmp.name)
        self._local = threading.local()
        self._festivals: list[Festival] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(reuse=exc_type is None)

    def _festival(self) -> Festival:
        f = getattr(self._local, "festival", None)
        if f is None or not f.alive():
            f = _acquire_festival()
            self._local.festival = f
            with self._lock:
                self._festivals.append(f)
        return f

    def synthesize(self, spk: Speaker, spoken: str, rate: float) -> np.ndarray:
        """``spoken`` in ``spk``'s voice at ``rate``; float64 at SAMPLE_RATE with the speaker's warp."""
        if spk.synth == "espeak":
            x, sr = _espeak(spoken, spk.voice, spk.variant, spk.pitch, int(rate)), SAMPLE_RATE
        elif spk.synth == "festival":
            x, sr = self._festival().synth(spoken, spk.voice, rate, self.workdir)
        elif spk.synth == "flite":
            x, sr = _flite(spoken, spk.voice, rate, self.workdir)
        else:
            raise CorpusError(f"unknown synthesizer {spk.synth!r}")
        return to_corpus_rate(x, sr, spk.warp)

    def close(self, reuse: bool = True) -> None:
        """Hand the Festival processes back for reuse (or end them) and remove the scratch folder."""
        with self._lock:
            for f in self._festivals:
                _release_festival(f, reuse)
            self._festivals.clear()
        self._tmp.cleanup()


def to_corpus_rate(x: np.ndarray, sr: int, warp_cents: int = 0) -> np.ndarray:
    """int16 samples at ``sr`` → float64 in [-1, 1) at SAMPLE_RATE, warped by ``warp_cents``.

    A positive warp raises pitch and formants and shortens the audio by the same factor.
    """
    y = x.astype(np.float64) / 32768.0
    ratio = Fraction(SAMPLE_RATE, sr)
    if warp_cents:
        ratio = Fraction(float(ratio) / 2.0 ** (warp_cents / 1200.0)).limit_denominator(200)
    return resample(y, ratio.numerator, ratio.denominator)

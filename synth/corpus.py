"""The embedded synthetic corpus: English sentences from two training synthesizers through varied channels.

Why: the pipeline must run end to end on a laptop and in CI with no network and no downloaded
data set, yet the model needs speech it can learn from, and the golden set must say whether what
it learned carries over beyond one synthesizer. Measured (``FINDINGS.md``): a model trained on
espeak-ng alone nearly solves espeak and stays at 50-65 % CER on other synthesizers; more of the
same data does not help. So training weeks mix synthesizers, speakers and channels, and the golden
set measures transfer slice by slice.

What: ``generate_week`` writes a landing-zone week, ``generate_golden`` the golden set, as 16-bit
WAV files (22,050 Hz; ingest resamples) plus a NeMo-style ``manifest.jsonl``::

    {"id": "w001-000000", "audio_filepath": "audio/w001-000000.wav", "duration": 2.4271,
     "text": "the old man walked to the river", "speaker": "en-us_f3_p45",
     "synth": "espeak", "condition": "clean"}

``audio_filepath`` is relative to the manifest; ``duration`` is the length of the written audio;
``text`` holds only lowercase letters, apostrophes and single spaces; ``synth`` is one of
``espeak|festival|flite``; ``condition`` names the row's one main channel condition, one of
:data:`CONDITIONS`: ``clean|reverb|telephone|noisy|babble|clipped``. Every row, clean ones too, has
light background noise (white or brown, ``noise_snr_db``, default 15-40 dB), a little leading and
trailing silence and a drawn level (``level_dbfs``). A share ``long_form_share`` (2 %) of
utterances are long-form: sentences joined until the audio lasts over 20 s.

Sentences come from :mod:`synth.grammar` (a committed lexicon and a small English grammar),
speakers from :mod:`synth.voices` (espeak-ng voice x variant x pitch; Festival kal, ked and slt-hts;
a signal-level pitch/formant warp), channels from :mod:`synth.channel` (room reverberation,
telephone band, coloured noise, babble, clipping, level), shares, ranges, ramp and golden slices
from :mod:`synth.mix`.

Training weeks and the diversity ramp (``mix=Mix.from_config(cfg.corpus)``; without it, as in the
CLI and the test fixtures, the defaults, which equal the config's): a week's synthesizer and condition of each utterance are
drawn from the shares of a :class:`Mix` (config ``corpus.*``: ``synth_shares``, default Festival
35 %, espeak the rest; ``condition_shares``, default 50 % of rows get a condition; a share of espeak
utterances get a warped speaker). Measured: a 50/50 espeak+Festival mix with heavy augmentation,
trained from scratch, never left the CTC plateau, where clean espeak did. Week 1 trains from scratch
and later weeks warm-start, so a week's condition shares and strengths are scaled by ``min(1, week
/ diversity_ramp_weeks)`` (default 4): week 1 is ~88 % clean with mild conditions (RT60 up to
0.4 s, SNR 11-15 dB), week 2 half way, from week 4 the full mix (RT60 0.2-1.0 s, noise 0-15 dB
SNR, clipping at 15-50 % of the peak). Strengths narrow towards their mild end (short RT60, high
SNR, light clipping). ``diversity_ramp_weeks = 0`` gives the full channel mix at once. The voices
(synthesizer shares, warp share) have their own ramp, ``voice_ramp_weeks`` (default 1: every week
has all of them): the plateau came from the channels, not from the voices (bench/README.md).

Golden set, disjoint from training by construction, in fixed slices (:data:`GOLDEN_SLICES`, version
:data:`GOLDEN_VERSION`): clean espeak from unseen speakers (30 %), clean Festival with unseen voice
settings (15 %), clean flite (15 %; a synthesizer no training week uses), and unseen espeak speakers
under reverb, telephone, noise (10 % each), babble and clipping (5 % each) at full strength.
Condition slices use espeak so that each can be read against the clean espeak slice.
  * sentences: a sentence is golden iff ``sha256("asrflow-corpus-v1:" + text)`` is 0 mod 10;
    weeks reject golden sentences and the golden set accepts only them. The golden set also draws
    from its own random stream (stream 1; weeks use stream 0; babble banks stream 2).
  * speakers: espeak (voice, variant) combinations whose hash is 0 mod 6 are golden-only; golden
    Festival speakers use warps (``voices.GOLDEN_WARPS``) no training speaker uses; flite voices
    are never drawn for a training week (``synth_shares`` may not name flite). flite's awb and rms
    are unseen speakers too; its slt and kal16 share their recorded donor with Festival's slt and
    kal (another engine and voice build): the ``speaker`` field tells them apart.
  * babble: golden babble is made of golden sentences spoken by golden espeak speakers, training
    babble of training sentences and speakers.
  * the golden channel ranges are fixed here (:data:`GOLDEN_MIX`), not read from the config.

Determinism. Utterance ``i`` of week ``w`` draws its text from ``numpy.random.default_rng([seed,
stream, w, i, 0])``, its synthesizer, condition, speaker and rate from ``[..., 1]`` and its channel
from ``[..., 2]``, so sentences do not change when the mix does, and nothing depends on ``jobs`` or
on scheduling. espeak-ng, Festival and flite are deterministic and every effect is numpy/scipy, so
the same arguments give byte-identical audio and manifests. Files are written to a temporary name
and moved into place with ``os.replace``; the manifest is written last, so a killed run leaves no
manifest that points at missing audio, and re-running rewrites the same bytes.

Speed: work is spread over ``jobs`` threads (0 = all cores); espeak-ng and flite run as one process
per utterance, Festival as one long-lived process per thread (see :mod:`synth.voices`). 1,500
utterances take well under a minute on 2 cores.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from synth import channel, voices
from synth.common import SAMPLE_RATE, CorpusError
from synth.grammar import (
    ALLOWED_TEXT,
    LEXICON_PATH,
    MAX_WORDS,
    MIN_WORDS,
    draw_sentence,
    is_golden_sentence,
    load_lexicon,
)
from synth.mix import CONDITIONS, GOLDEN_MIX, GOLDEN_SLICES, Mix, _pair, _pick, golden_plan
from synth.voices import (
    PITCHES,
    SPEED_WPM,
    VARIANTS,
    VOICES,
    Speaker,
    _espeak,
    is_golden_voice,
    speaker_id,
    speakers,
)

__all__ = [
    "ALLOWED_TEXT",
    "CONDITIONS",
    "CorpusError",
    "GOLDEN_MIX",
    "GOLDEN_SLICES",
    "MAX_WORDS",
    "MIN_WORDS",
    "Mix",
    "PITCHES",
    "SAMPLE_RATE",
    "SPEED_WPM",
    "Speaker",
    "VARIANTS",
    "VOICES",
    "_espeak",
    "draw_sentence",
    "generate_golden",
    "generate_week",
    "golden_plan",
    "is_golden_sentence",
    "is_golden_voice",
    "load_lexicon",
    "plan_week",
    "speaker_id",
    "speakers",
]

log = logging.getLogger(__name__)

CODE_VERSION = "2"  # 2: Festival voices, warps, channel conditions, synth/condition fields, ramp
GOLDEN_VERSION = "2"  # golden figures of another version are not comparable (1: espeak only, no slices)
LONG_FORM_MIN_S = 20.0
DEFAULT_SNR_DB = (15.0, 40.0)
STREAM_WEEK, STREAM_GOLDEN, STREAM_BABBLE = 0, 1, 2
BABBLE_BANK = 16  # sentences synthesized per run for babble

# --------------------------------------------------------------------------------------------------
# one utterance
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    folder: Path
    uid: str
    key: tuple[int, ...]
    golden: bool
    mix: Mix  # already scaled to the week's strength
    long_form_share: float
    snr_db: tuple[float, float]
    synth: str | None = None  # fixed by the golden plan, else drawn
    condition: str | None = None


def _channel(
    x: np.ndarray, cond: str, rng: np.random.Generator, job: _Job, bank: list[np.ndarray]
) -> np.ndarray:
    """Room, padding, background noise, condition and level: float speech -> int16 samples."""
    m = job.mix
    if cond == "reverb":
        x = channel.reverb(x, channel.room_impulse_response(rng, rng.uniform(*m.reverb_rt60_s)))
    y = channel.pad(x, rng)
    p = channel.active_power(y)
    kind = "brown" if rng.random() < 0.4 else "white"
    y = channel.add_at_snr(y, channel.coloured_noise(rng, y.size, kind), rng.uniform(*job.snr_db), p)
    if cond == "noisy":
        kind = channel.NOISE_KINDS[int(rng.integers(len(channel.NOISE_KINDS)))]
        noise = channel.coloured_noise(rng, y.size, kind)
        y = channel.add_at_snr(y, noise, rng.uniform(*m.noisy_snr_db), p)
    elif cond == "babble":
        talkers = int(rng.integers(m.babble_talkers[0], m.babble_talkers[1] + 1))
        y = channel.add_at_snr(
            y, channel.babble(rng, bank, y.size, talkers), rng.uniform(*m.babble_snr_db), p
        )
    elif cond == "telephone":
        y = channel.telephone(y, rng)
    elif cond == "clipped":
        y = channel.clip(y, rng.uniform(*m.clip_fraction))
    return channel.to_int16(y, rng.uniform(*m.level_dbfs))


def _voice_plan(job: _Job) -> tuple[str, str, Speaker, float]:
    """(synth, condition, speaker, rate) of one utterance: its stream 1 alone decides them."""
    r_voice = np.random.default_rng([*job.key, 1])
    u_synth, u_cond = r_voice.random(), r_voice.random()
    synth = job.synth or _pick(u_synth, job.mix.synth_probs())
    cond = job.condition or _pick(u_cond, job.mix.condition_probs())
    spk = voices.draw_speaker(r_voice, synth, job.golden, job.mix.warp_share)
    return synth, cond, spk, voices.draw_rate(r_voice, synth, job.mix.festival_stretch)


def _make_utterance(job: _Job, engines: voices.Engines, bank: list[np.ndarray]) -> dict:
    """Draw, synthesize and write one utterance; everything comes from the job's own streams."""
    r_text, r_chan = np.random.default_rng([*job.key, 0]), np.random.default_rng([*job.key, 2])
    synth, cond, spk, rate = _voice_plan(job)
    long_form = bool(r_text.random() < job.long_form_share)
    texts, spoken = [], []
    t, s = draw_sentence(r_text, job.golden)
    texts.append(t)
    spoken.append(s)
    audio = engines.synthesize(spk, " ".join(spoken), rate)
    while long_form and audio.size < (LONG_FORM_MIN_S + 1.0) * SAMPLE_RATE:
        # add sentences (roughly enough for the remaining time) and re-synthesize the whole passage
        missing_s = LONG_FORM_MIN_S + 1.0 - audio.size / SAMPLE_RATE
        for _ in range(max(1, int(missing_s / 3.5))):
            t, s = draw_sentence(r_text, job.golden)
            texts.append(t)
            spoken.append(s)
        audio = engines.synthesize(spk, " ".join(spoken), rate)
    samples = _channel(audio, cond, r_chan, job, bank)
    rel = f"audio/{job.uid}.wav"
    _atomic_write(job.folder / rel, _wav_bytes(samples))
    return {
        "id": job.uid,
        "audio_filepath": rel,
        "duration": round(len(samples) / SAMPLE_RATE, 6),
        "text": " ".join(texts),
        "speaker": spk.id,
        "synth": synth,
        "condition": cond,
    }


def _babble_clip(key: tuple[int, ...], golden: bool, engines: voices.Engines) -> np.ndarray:
    """One babble-bank sentence (espeak, from the partition's sentences and speakers), unit power."""
    rng = np.random.default_rng(list(key))
    spk = voices.draw_speaker(rng, "espeak", golden)
    text_spoken = draw_sentence(rng, golden)[1]
    x = engines.synthesize(spk, text_spoken, voices.draw_rate(rng, "espeak", (1.0, 1.0)))
    return x / np.sqrt(channel.active_power(x))


def _wav_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# a run
# --------------------------------------------------------------------------------------------------


def _check_args(utterances: int, seed: int, jobs: int, long_form_share: float, snr_db) -> tuple[float, float]:
    if not isinstance(utterances, int) or utterances < 1:
        raise CorpusError(f"utterances must be a positive integer, got {utterances!r}")
    if not isinstance(seed, int) or seed < 0:
        raise CorpusError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(jobs, int) or jobs < 0:
        raise CorpusError(f"jobs must be >= 0 (0 = all cores), got {jobs!r}")
    if not 0.0 <= long_form_share <= 1.0:
        raise CorpusError(f"long_form_share must be in [0, 1], got {long_form_share!r}")
    try:
        return _pair(snr_db, "noise_snr_db")
    except CorpusError as e:
        raise CorpusError(f"noise_snr_db must be (low, high) with low <= high, got {snr_db!r}") from e


def _generate(
    folder: Path,
    prefix: str,
    key_head: tuple[int, ...],
    plan: list[tuple[str | None, str | None]],
    golden: bool,
    jobs: int,
    mix: Mix,
    long_form_share: float,
    snr_db: tuple[float, float],
    info: dict,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    utterances = len(plan)
    needs_babble = any(c == "babble" for _, c in plan) or (
        any(c is None for _, c in plan) and mix.condition_probs()["babble"] > 0
    )
    synths = (
        {"espeak"}
        | {s for s, _ in plan if s}
        | ({k for k, v in mix.synth_probs().items() if v > 0} if any(s is None for s, _ in plan) else set())
    )
    voices.require(synths)
    folder = Path(folder)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    load_lexicon()  # parse once, before the threads start
    todo = [
        _Job(folder, f"{prefix}{i:06d}", (*key_head, i), golden, mix, long_form_share, snr_db, s, c)
        for i, (s, c) in enumerate(plan)
    ]
    t0 = time.monotonic()
    every = max(1, min(100, utterances // 10))
    rows: list[dict] = []
    with voices.Engines() as engines, ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as ex:
        bank: list[np.ndarray] = []
        if needs_babble:
            bank_head = (key_head[0], STREAM_BABBLE, int(golden), *key_head[2:])
            bank = list(ex.map(lambda k: _babble_clip((*bank_head, k), golden, engines), range(BABBLE_BANK)))
        for n, row in enumerate(ex.map(lambda j: _make_utterance(j, engines, bank), todo), 1):  # keeps order
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
        "synths": dict(sorted(collections.Counter(r["synth"] for r in rows).items())),
        "conditions": dict(sorted(collections.Counter(r["condition"] for r in rows).items())),
        "manifest": str(folder / "manifest.jsonl"),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }


def _lexicon_sha() -> str:
    return hashlib.sha256(LEXICON_PATH.read_bytes()).hexdigest()


def _mix_info(mix: Mix) -> dict:
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in dataclasses.asdict(mix).items()}


def plan_week(week: int, utterances: int, seed: int, mix: Mix | None = None) -> list[dict]:
    """What :func:`generate_week` would synthesize, without synthesizing: per utterance its
    ``synth``, ``condition`` and ``speaker`` (cheap: for checking shares and partitions)."""
    mix = mix or Mix()
    mix.check()
    eff = mix.week(week)
    jobs = [
        _Job(Path(), "", (seed, STREAM_WEEK, week, i), False, eff, 0.0, DEFAULT_SNR_DB)
        for i in range(utterances)
    ]
    return [{"synth": p[0], "condition": p[1], "speaker": p[2].id} for p in map(_voice_plan, jobs)]


def generate_week(
    out: Path,
    week: int,
    utterances: int,
    seed: int,
    jobs: int = 0,
    *,
    long_form_share: float = 0.02,
    noise_snr_db: tuple[float, float] = DEFAULT_SNR_DB,
    mix: Mix | None = None,
) -> dict:
    """Synthesize training week ``week`` into ``out/week-NNN/`` (WAV audio + ``manifest.jsonl``).

    Each week draws new sentences (random stream keyed by week) over the same vocabulary, speakers
    from the training pools and synthesizers/conditions from ``mix`` (default :class:`Mix`; build
    one from the config with ``Mix.from_config(cfg.corpus)``) scaled by the week's ramp. Returns a
    summary: folder, n, hours, n_long_form, n_speakers, synths, conditions, manifest, manifest_sha256.
    """
    if not isinstance(week, int) or not 0 <= week <= 999:
        raise CorpusError(f"week must be an integer in 0..999, got {week!r}")
    snr = _check_args(utterances, seed, jobs, long_form_share, noise_snr_db)
    mix = mix or Mix()
    mix.check()
    strength = mix.strength(week)
    eff = mix.week(week)
    info = {
        "kind": "week",
        "week": week,
        "utterances": utterances,
        "seed": seed,
        "long_form_share": long_form_share,
        "noise_snr_db": list(snr),
        "mix": _mix_info(mix),
        "strength": strength,
        "voice_strength": mix.voice_strength(week),
        "synth_probs": eff.synth_probs(),
        "condition_probs": eff.condition_probs(),
        "code_version": CODE_VERSION,
        "lexicon_sha256": _lexicon_sha(),
        "sample_rate": SAMPLE_RATE,
    }
    return _generate(
        Path(out) / f"week-{week:03d}",
        f"w{week:03d}-",
        (seed, STREAM_WEEK, week),
        [(None, None)] * utterances,
        False,
        jobs,
        eff,
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
    """Synthesize the golden set into ``out/``: golden-only sentences and speakers, in fixed slices.

    See the module docstring for the slices and for how golden sentences, speakers and synthesizers
    are kept out of every training week. Returns the same summary as :func:`generate_week`.
    """
    snr = _check_args(utterances, seed, jobs, long_form_share, noise_snr_db)
    plan = golden_plan(utterances)
    info = {
        "kind": "golden",
        "utterances": utterances,
        "seed": seed,
        "long_form_share": long_form_share,
        "noise_snr_db": list(snr),
        "golden_version": GOLDEN_VERSION,
        "slices": {name: sum(p == (s, c) for p in plan) for name, s, c, _ in GOLDEN_SLICES},
        "mix": _mix_info(GOLDEN_MIX),
        "code_version": CODE_VERSION,
        "lexicon_sha256": _lexicon_sha(),
        "sample_rate": SAMPLE_RATE,
    }
    return _generate(
        Path(out),
        "golden-",
        (seed, STREAM_GOLDEN, 0),
        plan,
        True,
        jobs,
        GOLDEN_MIX,
        long_form_share,
        snr,
        info,
    )

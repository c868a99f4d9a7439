"""What a corpus run mixes: synthesizer and condition shares, channel ranges, the diversity ramp,
and the golden set's fixed slices. See :mod:`synth.corpus` for why.

A :class:`Mix` holds the full-diversity mix (its fields mirror ``CorpusConfig``). Two ramps scale
it per week: ``Mix.strength(week) = min(1, week / diversity_ramp_weeks)`` for the channel
conditions (their shares times it, every range narrowed towards its mild end) and
``Mix.voice_strength(week) = min(1, week / voice_ramp_weeks)`` for the voices (the synthesizer
shares and the warp share); ``Mix.at(s, voice_s)`` applies them.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synth import voices
from synth.common import CorpusError

CONDITIONS = ("clean", "reverb", "telephone", "noisy", "babble", "clipped")
# (slice name, synthesizer, condition, share of the golden set)
GOLDEN_SLICES = (
    ("espeak", "espeak", "clean", 0.30),
    ("festival", "festival", "clean", 0.15),
    ("flite", "flite", "clean", 0.15),
    ("reverb", "espeak", "reverb", 0.10),
    ("telephone", "espeak", "telephone", 0.10),
    ("noisy", "espeak", "noisy", 0.10),
    ("babble", "espeak", "babble", 0.05),
    ("clipped", "espeak", "clipped", 0.05),
)


def _pair(v: Any, name: str, lo: float | None = None, hi: float | None = None) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in v)
    except (TypeError, ValueError) as e:
        raise CorpusError(f"{name} must be a (low, high) pair, got {v!r}") from e
    if a > b or (lo is not None and a < lo) or (hi is not None and b > hi):
        raise CorpusError(f"{name} must be (low, high) with {lo} <= low <= high <= {hi}, got {v!r}")
    return a, b


@dataclass(frozen=True)
class Mix:
    """What a training week mixes, at full diversity; the fields mirror ``CorpusConfig``."""

    synth_shares: Mapping[str, float] = field(default_factory=lambda: {"festival": 0.35})
    condition_shares: Mapping[str, float] = field(
        default_factory=lambda: {
            "reverb": 0.15,
            "telephone": 0.10,
            "noisy": 0.12,
            "babble": 0.08,
            "clipped": 0.05,
        }
    )
    diversity_ramp_weeks: int = 4  # the channel conditions' ramp
    # the voices' ramp (synthesizer shares, warp share). 1 = every week has all voices: a week 1
    # with 25 % Festival and 25 % warped espeak under mild conditions trained as well as the ramped
    # one (golden WER 0.719 vs 0.715) with flite at 0.784 vs 0.895, while the full channel mix in
    # week 1 stayed on the CTC plateau (0.969); bench/README.md, bench/continuous.py
    voice_ramp_weeks: int = 1
    warp_share: float = 0.3
    festival_stretch: tuple[float, float] = (0.85, 1.2)
    level_dbfs: tuple[float, float] = (-20.0, -1.5)
    reverb_rt60_s: tuple[float, float] = (0.2, 1.0)
    noisy_snr_db: tuple[float, float] = (0.0, 15.0)
    babble_snr_db: tuple[float, float] = (0.0, 15.0)
    babble_talkers: tuple[int, int] = (3, 7)
    clip_fraction: tuple[float, float] = (0.15, 0.5)

    @classmethod
    def from_config(cls, cfg: Any) -> Mix:
        """The mix of a ``CorpusConfig`` (or any object with some of these attributes)."""
        kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
        return cls(
            **{
                k: dict(v) if isinstance(v, Mapping) else (tuple(v) if isinstance(v, list) else v)
                for k, v in kw.items()
            }
        )

    def check(self) -> None:
        """Raise CorpusError on shares or ranges that make no sense (or that would train on flite)."""
        for name, shares, allowed in (
            ("synth_shares", self.synth_shares, set(voices.TRAIN_SYNTHS) - {"espeak"}),
            ("condition_shares", self.condition_shares, set(CONDITIONS) - {"clean"}),
        ):
            if "flite" in shares:
                raise CorpusError(
                    "synth_shares: flite is the golden set's unseen synthesizer, never trained on"
                )
            bad = set(shares) - allowed
            if bad:
                rest = "espeak" if name == "synth_shares" else "clean"
                raise CorpusError(
                    f"{name}: unknown keys {sorted(bad)} (allowed: {sorted(allowed)}; {rest} is the rest)"
                )
            if any(not 0.0 <= float(v) <= 1.0 for v in shares.values()) or sum(shares.values()) > 1.0 + 1e-9:
                raise CorpusError(
                    f"{name} must be shares in [0, 1] summing to at most 1, got {dict(shares)!r}"
                )
        for name in ("diversity_ramp_weeks", "voice_ramp_weeks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise CorpusError(f"{name} must be an integer >= 0, got {v!r}")
        if not 0.0 <= self.warp_share <= 1.0:
            raise CorpusError(f"warp_share must be in [0, 1], got {self.warp_share!r}")
        _pair(self.festival_stretch, "festival_stretch", 0.3, 3.0)
        _pair(self.level_dbfs, "level_dbfs", -60.0, 0.0)
        _pair(self.reverb_rt60_s, "reverb_rt60_s", 0.05, 3.0)
        _pair(self.noisy_snr_db, "noisy_snr_db")
        _pair(self.babble_snr_db, "babble_snr_db")
        _pair(self.babble_talkers, "babble_talkers", 1, 20)
        _pair(self.clip_fraction, "clip_fraction", 0.01, 1.0)

    def strength(self, week: int) -> float:
        """How much of the channel mix week ``week`` gets: ``min(1, week / diversity_ramp_weeks)``."""
        return 1.0 if self.diversity_ramp_weeks == 0 else min(1.0, week / self.diversity_ramp_weeks)

    def voice_strength(self, week: int) -> float:
        """How much of the voice mix week ``week`` gets: ``min(1, week / voice_ramp_weeks)``."""
        return 1.0 if self.voice_ramp_weeks == 0 else min(1.0, week / self.voice_ramp_weeks)

    def week(self, week: int) -> Mix:
        """The mix of training week ``week``: both ramps applied."""
        return self.at(self.strength(week), self.voice_strength(week))

    def at(self, s: float, voice_s: float | None = None) -> Mix:
        """This mix scaled to strength ``s``: condition shares times ``s``, ranges narrowed to their
        mild end; synthesizer shares and the warp share times ``voice_s`` (default ``s``)."""
        v = s if voice_s is None else voice_s

        def mild_low(r):  # the low end is mild (RT60): keep it, shorten the range
            return (r[0], r[0] + s * (r[1] - r[0]))

        def mild_high(r):  # the high end is mild (SNR, clip fraction)
            return (r[1] - s * (r[1] - r[0]), r[1])

        return dataclasses.replace(
            self,
            synth_shares={k: x * v for k, x in self.synth_shares.items()},
            condition_shares={k: x * s for k, x in self.condition_shares.items()},
            warp_share=self.warp_share * v,
            reverb_rt60_s=mild_low(self.reverb_rt60_s),
            noisy_snr_db=mild_high(self.noisy_snr_db),
            babble_snr_db=mild_high(self.babble_snr_db),
            clip_fraction=mild_high(self.clip_fraction),
        )

    def synth_probs(self) -> dict[str, float]:
        p = {"festival": float(self.synth_shares.get("festival", 0.0))}
        return {"espeak": max(0.0, 1.0 - sum(p.values())), **p}

    def condition_probs(self) -> dict[str, float]:
        p = {c: float(self.condition_shares.get(c, 0.0)) for c in CONDITIONS[1:]}
        return {"clean": max(0.0, 1.0 - sum(p.values())), **p}


# the golden set's channel ranges, fixed here (not read from the config; changing them means a new
# corpus.GOLDEN_VERSION); shares do not apply to the golden set, its slices are GOLDEN_SLICES
GOLDEN_MIX = Mix(
    festival_stretch=(0.85, 1.2),
    level_dbfs=(-20.0, -1.5),
    reverb_rt60_s=(0.2, 1.0),
    noisy_snr_db=(0.0, 15.0),
    babble_snr_db=(0.0, 15.0),
    babble_talkers=(3, 7),
    clip_fraction=(0.15, 0.5),
)


def golden_plan(n: int) -> list[tuple[str, str]]:
    """(synth, condition) of golden rows 0..n-1: the slices in order, each with at least one row
    when n allows, counts by largest remainder."""
    shares = np.array([s for *_, s in GOLDEN_SLICES])
    base = np.ones(len(shares), dtype=int) if n >= len(shares) else np.zeros(len(shares), dtype=int)
    raw = shares / shares.sum() * (n - base.sum())
    counts = base + np.floor(raw).astype(int)
    for i in np.argsort(-(raw - np.floor(raw)), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [
        (synth, cond) for (_, synth, cond, _), c in zip(GOLDEN_SLICES, counts, strict=True) for _ in range(c)
    ]


def _pick(u: float, probs: dict[str, float]) -> str:
    """The key whose cumulative-probability interval holds the uniform draw ``u``."""
    keys, cum = list(probs), list(itertools.accumulate(probs.values()))
    return keys[min(bisect.bisect_right(cum, u * cum[-1]), len(keys) - 1)]

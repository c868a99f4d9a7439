"""Tests of the corpus mix: synthesizers, speakers, channel conditions, the diversity ramp and the
golden slices (real espeak-ng, Festival and flite; tiny counts).

What they guard: every synthesizer and every effect is deterministic (same arguments, same bytes,
whatever ran before in the same Festival process and whatever ``jobs``), each effect does what its
name says, weeks follow the configured shares and the ramp, and the golden set stays disjoint from
training by construction (sentences, speaker settings, and flite never in a training week).
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import welch

from pipeline_tasks.config import CONFIG_DIR, CorpusConfig, load_config
from synth import channel, corpus, voices

SR = corpus.SAMPLE_RATE
SENTENCE = "the old man walked to the river, and the dog came home."


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _shares(rows: list[dict], key: str) -> dict[str, float]:
    c = collections.Counter(r[key] for r in rows)
    return {k: v / len(rows) for k, v in c.items()}


# --------------------------------------------------------------------------------------------------
# synthesizers
# --------------------------------------------------------------------------------------------------


def _difference(what: str, a: np.ndarray, b: np.ndarray) -> str:
    """Where two syntheses differ (CI saw a Festival difference once that no rerun reproduced)."""
    if a.size != b.size:
        return f"{what}: {a.size} vs {b.size} samples"
    d = np.flatnonzero(a != b)
    return (
        f"{what}: {d.size} of {a.size} samples differ, first at {d[0] if d.size else None}, "
        f"max |a-b| {np.abs(a - b).max():.3g}, rms a {np.sqrt(np.mean(a**2)):.3g} b {np.sqrt(np.mean(b**2)):.3g}, "
        f"idle Festival pids {[f.proc.pid for f in voices._IDLE_FESTIVALS]}"
    )


def test_synthesizers_are_deterministic_and_settings_matter():
    fest = [voices.Speaker("festival", v, warp=100) for v in voices.FESTIVAL_VOICES]
    flite = [voices.Speaker("flite", v) for v in voices.FLITE_VOICES]
    with voices.Engines() as e:
        first = [e.synthesize(s, SENTENCE, 1.05) for s in fest + flite]
    with voices.Engines() as e:
        # the same Festival process first speaks other voices at other settings, in another order
        for s in reversed(fest):
            e.synthesize(voices.Speaker("festival", s.voice, warp=-200), "what did you say?", 0.9)
        again = [e.synthesize(s, SENTENCE, 1.05) for s in fest + flite]
        slower = e.synthesize(fest[0], SENTENCE, 1.2)
        lower = e.synthesize(voices.Speaker("festival", fest[0].voice, warp=-100), SENTENCE, 1.05)
    for a, b, s in zip(first, again, fest + flite, strict=True):
        assert a.size > SR and np.array_equal(a, b), _difference(s.id, a, b)
    # Duration_Stretch slows Festival down; a warp of -200 cents lengthens by 2 ** (200 / 1200)
    assert slower.size > 1.1 * first[0].size
    assert lower.size / first[0].size == pytest.approx(2 ** (200 / 1200), rel=0.01)
    # espeak through the same path: a warp is a resampling of the same espeak output
    esp = voices.Speaker("espeak", "en-us", "m3", 45)
    with voices.Engines() as e:
        plain, warped = (
            e.synthesize(esp, SENTENCE, 160),
            e.synthesize(voices.Speaker(**{**esp.__dict__, "warp": 300}), SENTENCE, 160),
        )
    assert warped.size / plain.size == pytest.approx(2 ** (-300 / 1200), rel=0.01)


def test_missing_synthesizer_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(voices.shutil, "which", lambda exe: None if exe == "festival" else f"/usr/bin/{exe}")
    with pytest.raises(corpus.CorpusError, match="festival.*apt-get install"):
        voices.require({"espeak", "festival"})
    voices.require({"espeak"})


# --------------------------------------------------------------------------------------------------
# channel conditions
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    with voices.Engines() as e:
        return e.synthesize(voices.Speaker("espeak", "en-us", "m3", 45), SENTENCE, 160)


@pytest.fixture(scope="module")
def bank() -> list[np.ndarray]:
    with voices.Engines() as e:
        return [corpus._babble_clip((9, corpus.STREAM_BABBLE, 0, 1, k), False, e) for k in range(4)]


def _render(x, cond, seed, bank, snr=(60.0, 60.0)) -> np.ndarray:
    job = corpus._Job(Path(), "x", (seed,), False, corpus.GOLDEN_MIX, 0.0, snr)
    return corpus._channel(x, cond, np.random.default_rng(seed), job, bank).astype(np.float64) / 32768


def _tail_frames(y: np.ndarray) -> int:
    """10 ms frames after the last one within 20 dB of the loudest that are still within 40 dB."""
    f = np.add.reduceat(y**2, np.arange(0, y.size, SR // 100)) + 1e-20
    db = 10 * np.log10(f / f.max())
    return int(np.sum(db[np.nonzero(db > -20)[0][-1] :] > -40))


def _band_share(y: np.ndarray, lo: float, hi: float = SR) -> float:
    f, p = welch(y, SR, nperseg=1024)
    return float(p[(f > lo) & (f < hi)].sum() / p.sum())


def _hf_share(y: np.ndarray, hz: float) -> float:
    return _band_share(y, hz)


@pytest.mark.parametrize("cond", corpus.CONDITIONS)
def test_each_condition_is_deterministic_and_does_what_it_says(cond, speech, bank):
    y = _render(speech, cond, 5, bank)
    assert np.array_equal(y, _render(speech, cond, 5, bank))  # same stream, same samples
    assert not np.array_equal(y, _render(speech, cond, 6, bank))  # another stream, other samples
    clean = _render(speech, "clean", 5, bank)  # the same utterance without the condition
    lead = int(0.045 * SR)  # the leading silence (>= 0.05 s) before the speech starts
    if cond == "clean":
        assert np.sqrt(np.mean(y[:lead] ** 2)) < 1e-3 * np.max(np.abs(y))  # 60 dB SNR: near silence
    elif cond == "reverb":
        # the room's tail: after the last loud 10 ms frame the level falls slowly, not at once
        assert y.size > clean.size + 0.15 * SR
        assert _tail_frames(y) > _tail_frames(clean) + 8
    elif cond == "telephone":
        assert _hf_share(y, 3800) < 0.01 * _hf_share(clean, 3800)  # nothing above the band
        f, p = welch(y, SR, nperseg=1024)
        assert p[(f > 20) & (f < 150)].sum() < 1e-3 * p.sum()  # no bass under the 300 Hz edge
    elif cond in ("noisy", "babble"):
        # background before the speech starts: noise at 0-15 dB below the speech, not near-silence
        def background_db(z):
            return 10 * np.log10(np.mean(z[:lead] ** 2) / channel.active_power(z))

        assert background_db(clean) < -45 and -25 < background_db(y) < 3
        if cond == "babble":  # babble is made of the bank's sentences: a bank of 5 kHz tones is heard
            tones = [np.sin(2 * np.pi * 5000 * np.arange(SR) / SR)] * 2
            assert _band_share(_render(speech, cond, 5, tones), 4900, 5100) > 20 * _band_share(
                clean, 4900, 5100
            )
    elif cond == "clipped":
        peak = np.max(np.abs(y))
        assert np.mean(np.abs(y) > 0.999 * peak) > 0.005  # flat tops: many samples at the clip level
        assert np.mean(np.abs(clean) > 0.999 * np.max(np.abs(clean))) < 0.001


def test_room_impulse_response_decays_at_its_rt60():
    for rt60 in (0.3, 0.8):
        h = channel.room_impulse_response(np.random.default_rng(1), rt60)
        assert h[0] == 1.0 and h.size == int(rt60 * SR) + 1
        # the level of the late tail (after the early reflections) falls 60 dB per rt60
        win = SR // 50
        e = np.add.reduceat(h**2, np.arange(0, h.size - win, win))[3:]  # from 60 ms on
        t = (np.arange(e.size) + 3.5) * win / SR
        slope = np.polyfit(t, 10 * np.log10(e), 1)[0]  # dB per second
        assert -60 / slope == pytest.approx(rt60, rel=0.15)
    # a babble of several talkers from a bank of speech clips keeps speech's fluctuating envelope
    with voices.Engines() as e:
        clips = [corpus._babble_clip((3, corpus.STREAM_BABBLE, 0, 1, k), False, e) for k in range(3)]
    b = channel.babble(np.random.default_rng(0), clips, 2 * SR, talkers=3)
    env = np.sqrt(np.add.reduceat(b**2, np.arange(0, b.size, SR // 50)))
    assert env.std() / env.mean() > 0.2 and b.size == 2 * SR


# --------------------------------------------------------------------------------------------------
# weeks: shares, ramp, determinism
# --------------------------------------------------------------------------------------------------


def test_week_shares_follow_the_mix_and_the_ramp():
    mix = corpus.Mix()
    full_synth, full_cond = mix.synth_probs(), mix.condition_probs()
    # the conditions follow diversity_ramp_weeks (4); the voices voice_ramp_weeks (1 by default,
    # 4 in the second mix): each ramp moves only its own shares
    for vmix, vramp in ((mix, 1), (corpus.Mix(voice_ramp_weeks=4), 4)):
        for week, s in ((1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
            v = min(1.0, week / vramp)
            plan = corpus.plan_week(week, 2000, seed=3, mix=vmix)
            got_s, got_c = _shares(plan, "synth"), _shares(plan, "condition")
            assert got_s["festival"] == pytest.approx(full_synth["festival"] * v, abs=0.03), (week, vramp)
            for c in corpus.CONDITIONS[1:]:
                assert got_c.get(c, 0.0) == pytest.approx(full_cond[c] * s, abs=0.025), (week, c)
            warped = sum("_w" in r["speaker"] for r in plan if r["synth"] == "espeak")
            assert warped / sum(r["synth"] == "espeak" for r in plan) == pytest.approx(
                mix.warp_share * v, abs=0.03
            )
    # week 0 is all clean, unwarped espeak; no ramp gives the full mix at once
    assert all(
        r == {**r, "synth": "espeak", "condition": "clean"} and "_w" not in r["speaker"]
        for r in corpus.plan_week(0, 300, seed=3)
    )
    flat = _shares(corpus.plan_week(1, 2000, seed=3, mix=corpus.Mix(diversity_ramp_weeks=0)), "synth")
    assert flat["festival"] == pytest.approx(full_synth["festival"], abs=0.03)
    # strengths narrow towards their mild end early on
    early = mix.at(mix.strength(1))
    assert early.reverb_rt60_s == pytest.approx((0.2, 0.4)) and early.noisy_snr_db == pytest.approx(
        (11.25, 15.0)
    )
    assert early.clip_fraction[0] > mix.clip_fraction[0] and early.babble_snr_db[0] > mix.babble_snr_db[0]
    # the sentences do not depend on the mix, only on (seed, week, utterance)
    assert corpus.plan_week(1, 5, 3) != corpus.plan_week(1, 5, 3, mix=corpus.Mix(diversity_ramp_weeks=0))


def test_full_mix_week_is_byte_identical_and_has_every_synth_and_condition(tmp_path):
    mix = corpus.Mix(
        diversity_ramp_weeks=0,
        synth_shares={"festival": 0.4},
        condition_shares={c: 0.16 for c in corpus.CONDITIONS[1:]},
    )
    a = corpus.generate_week(tmp_path / "a", week=3, utterances=30, seed=2, jobs=1, mix=mix)
    b = corpus.generate_week(tmp_path / "b", week=3, utterances=30, seed=2, jobs=2, mix=mix)
    ha = _file_hashes(tmp_path / "a" / "week-003")
    assert len(ha) == 32 and ha == _file_hashes(tmp_path / "b" / "week-003")
    assert set(a["synths"]) == {"espeak", "festival"} and set(a["conditions"]) == set(corpus.CONDITIONS)
    rows = _rows(Path(a["manifest"]))
    # the manifest holds what the plan says, and its shares are roughly the configured ones
    plan = corpus.plan_week(3, 30, 2, mix)
    assert [(r["synth"], r["condition"], r["speaker"]) for r in rows] == [tuple(p.values()) for p in plan]
    assert 0.2 < _shares(rows, "synth")["festival"] < 0.6
    assert b["manifest_sha256"] == a["manifest_sha256"]
    info = json.loads((tmp_path / "a" / "week-003" / "corpus_info.json").read_text())
    assert info["strength"] == info["voice_strength"] == 1.0 and info["code_version"] == corpus.CODE_VERSION


def test_tiny_week_rows_match_their_plan(tiny_landing):
    rows = _rows(tiny_landing / "week-001" / "manifest.jsonl")
    plan = corpus.plan_week(1, len(rows), seed=7)
    assert [(r["synth"], r["condition"], r["speaker"]) for r in rows] == [tuple(p.values()) for p in plan]
    assert _shares(rows, "condition")["clean"] > 0.6  # week 1 is mostly clean (the ramp)


# --------------------------------------------------------------------------------------------------
# golden slices
# --------------------------------------------------------------------------------------------------


def test_golden_plan_slices():
    for n in (8, 16, 150, 1000):
        plan = corpus.golden_plan(n)
        counts = collections.Counter(plan)
        assert len(plan) == n and len(counts) == len(corpus.GOLDEN_SLICES)  # every slice present
        for _, synth, cond, share in corpus.GOLDEN_SLICES:
            assert abs(counts[(synth, cond)] - share * n) <= 2.0 + 0.01 * n
    assert corpus.golden_plan(150).count(("flite", "clean")) == 22
    assert len(corpus.golden_plan(3)) == 3


def test_golden_slices_are_disjoint_from_training_by_construction(tiny_golden):
    golden = _rows(tiny_golden / "manifest.jsonl")
    assert [(r["synth"], r["condition"]) for r in golden] == corpus.golden_plan(len(golden))
    info = json.loads((tiny_golden / "corpus_info.json").read_text())
    assert info["golden_version"] == corpus.GOLDEN_VERSION and sum(info["slices"].values()) == len(golden)
    # speaker settings: golden Festival speakers only use golden warps, training ones only training warps
    gold_fest = {s.id for s in voices.festival_speakers(True)}
    train_fest = {s.id for s in voices.festival_speakers(False)}
    assert gold_fest.isdisjoint(train_fest) and set(voices.GOLDEN_WARPS).isdisjoint(voices.TRAIN_WARPS)
    assert {r["speaker"] for r in golden if r["synth"] == "festival"} <= gold_fest
    assert {r["speaker"] for r in golden if r["synth"] == "flite"} <= {
        f"flite-{v}" for v in voices.FLITE_VOICES
    }
    # many training weeks, full mix and ramp: never flite, never a golden speaker setting
    train = [
        r
        for mix in (corpus.Mix(), corpus.Mix(diversity_ramp_weeks=0, synth_shares={"festival": 1.0}))
        for w in (0, 1, 2, 4, 8)
        for r in corpus.plan_week(w, 300, seed=11, mix=mix)
    ]
    assert "flite" not in {r["synth"] for r in train}
    assert {
        r["speaker"] for r in train if r["synth"] == "festival"
    } == train_fest  # all of them, nothing else
    golden_espeak = {corpus.speaker_id(*s) for s in corpus.speakers(True)}
    assert not {r["speaker"].split("_w")[0] for r in train if r["synth"] == "espeak"} & golden_espeak
    # flite cannot be configured into training
    with pytest.raises(corpus.CorpusError, match="flite"):
        voices.draw_speaker(np.random.default_rng(0), "flite", golden=False)
    with pytest.raises(ValueError, match="flite"):
        CorpusConfig(synth_shares={"flite": 0.2})


def test_golden_is_byte_identical_with_every_slice(tmp_path):
    a = corpus.generate_golden(tmp_path / "a", utterances=8, seed=4, jobs=1)
    corpus.generate_golden(tmp_path / "b", utterances=8, seed=4, jobs=2)
    assert _file_hashes(tmp_path / "a") == _file_hashes(tmp_path / "b")
    assert a["synths"] == {"espeak": 6, "festival": 1, "flite": 1}
    assert a["conditions"] == {"clean": 3, **{c: 1 for c in corpus.CONDITIONS[1:]}}


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_corpus_defaults():
    # `asrflow corpus generate` and the test fixtures use the corpus defaults; the pipeline the config
    assert corpus.Mix.from_config(CorpusConfig()) == corpus.Mix()
    for profile in sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")):
        corpus.Mix.from_config(load_config(profile).corpus).check()

"""Training augmentation: speed perturbation of waveforms, the per-epoch speed-copy choice, and
VTLP / noise / reverb on log-mel features (model_code.audio.speed_perturb, model_code.augment)."""

from __future__ import annotations

import numpy as np
import pytest

from model_code.audio import speed_perturb
from model_code.augment import (
    FeatureAugment,
    add_noise,
    add_reverb,
    unit_hash,
    variant_choice,
    vtlp_source_hz,
    vtlp_warp,
)
from model_code.features import logmel, mel_centers_hz

SR = 16000


def _speechlike(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(130 + 20 * np.sin(2 * np.pi * 1.3 * t)) / SR
    env = 0.5 * (1 + np.sin(2 * np.pi * 4 * t))
    return (0.2 * env * sum(np.sin(k * phase) / k for k in range(1, 10)) + 0.003 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def _snr_db(clean: np.ndarray, noisy: np.ndarray, log_offset: float = 1e-6) -> float:
    """Measured utterance SNR from log-mels: Σ clean mel energy / Σ (noisy − clean) mel energy."""
    c = np.exp(clean.astype(np.float64)) - log_offset
    n = np.exp(noisy.astype(np.float64)) - log_offset
    return float(10 * np.log10(c.sum() / (n - c).sum()))


@pytest.mark.parametrize("factor", [0.9, 1.1, 0.8])
def test_speed_perturb_changes_duration_by_one_over_factor_and_pitch_by_factor(factor):
    t = np.arange(SR) / SR
    tone = (0.5 * np.sin(2 * np.pi * 400 * t)).astype(np.float32)  # 1 s at 400 Hz
    out = speed_perturb(tone, SR, factor)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.size - SR / factor) <= 1  # duration / factor
    spec = np.abs(np.fft.rfft(out[1000:-1000] * np.hanning(out.size - 2000)))
    peak_hz = np.argmax(spec) * SR / (out.size - 2000)
    assert peak_hz == pytest.approx(400 * factor, abs=3)  # tempo and pitch change together (Kaldi/sox speed)
    assert 0.45 < np.abs(out[1000:-1000]).max() < 0.55  # level kept
    np.testing.assert_array_equal(speed_perturb(tone, SR, 1.0), tone)
    with pytest.raises(ValueError):
        speed_perturb(tone, SR, 0.0)


def test_variant_choice_is_a_pure_hash_of_seed_epoch_index():
    idx = np.arange(3000)
    a = variant_choice(7, 2, idx, 3)
    # the same (seed, epoch, index) gives the same copy whatever else is asked for, in any order
    np.testing.assert_array_equal(a[[5, 2999, 17]], variant_choice(7, 2, [5, 2999, 17], 3))
    np.testing.assert_array_equal(a[::-1], variant_choice(7, 2, idx[::-1], 3))
    assert set(np.unique(a)) == {0, 1, 2} and np.all(np.abs(np.bincount(a) / a.size - 1 / 3) < 0.04)
    assert np.mean(a != variant_choice(7, 3, idx, 3)) > 0.5  # each epoch draws anew
    assert np.mean(a != variant_choice(8, 2, idx, 3)) > 0.5  # and so does another seed
    assert not variant_choice(7, 2, idx, 1).any()
    u = unit_hash(-3, 0, idx)
    assert u.shape == idx.shape and 0.0 <= u.min() and u.max() < 1.0


@pytest.mark.parametrize("snr", [0.0, 10.0, 20.0])
def test_noise_at_snr_s_gives_a_measured_snr_of_about_s(snr):
    clean = logmel(_speechlike())  # (T, 80)
    noisy = add_noise(clean, snr, np.random.default_rng(1), tilt_db=-6.0)
    assert noisy.shape == clean.shape and noisy.dtype == np.float32
    assert _snr_db(clean, noisy) == pytest.approx(snr, abs=0.3)
    # the noise fills the quiet cells: the floor rises, loud cells barely move
    quiet = clean < np.percentile(clean, 10)
    loud = clean > np.percentile(clean, 95)
    assert (noisy - clean)[quiet].mean() > 2.0 and (noisy - clean)[loud].mean() < 0.5 + (20 - snr) / 10


def test_reverb_decays_60_db_over_t60_and_keeps_frames_and_energy():
    feats = np.full((300, 4), np.log(1e-6), dtype=np.float32)  # silence (mel energy 0)...
    feats[50] = np.log(1.0 + 1e-6)  # ...but one frame of energy 1 in every band
    t60, frame_s = 0.4, 0.01
    out = add_reverb(feats, t60, frame_s)
    assert out.shape == feats.shape and out.dtype == np.float32
    e = np.exp(out[:, 0].astype(np.float64)) - 1e-6
    assert np.all(e[:50] < 1e-9)  # causal
    k = int(0.2 / frame_s)  # half of T60 later: 30 dB down
    assert 10 * np.log10(e[50 + k] / e[50]) == pytest.approx(-30.0, abs=0.5)
    assert e.sum() == pytest.approx(1.0, rel=1e-3)  # energy kept (unit-sum kernel)
    speech = logmel(_speechlike())
    rev = add_reverb(speech, 0.8, frame_s)
    assert rev.shape == speech.shape
    # smearing: the envelope varies less from frame to frame
    assert np.abs(np.diff(rev, axis=0)).mean() < 0.7 * np.abs(np.diff(speech, axis=0)).mean()


def test_feature_augment_is_deterministic_per_seed_epoch_index_and_respects_probabilities():
    feats = logmel(_speechlike(1.0))
    aug = FeatureAugment(noise_prob=0.5, noise_snr_db=(5, 10), reverb_prob=0.5, reverb_t60_s=(0.3, 0.6), seed=3)
    a = aug(feats, epoch=1, index=4)
    np.testing.assert_array_equal(a, aug(feats, epoch=1, index=4))  # a pure function: resumes exactly
    again = FeatureAugment(noise_prob=0.5, noise_snr_db=(5, 10), reverb_prob=0.5, reverb_t60_s=(0.3, 0.6), seed=3)
    np.testing.assert_array_equal(a, again(feats, epoch=1, index=4))  # no hidden state
    outs = [aug(feats, epoch=e, index=i) for e in range(3) for i in range(40)]
    changed = np.mean([not np.array_equal(o, feats) for o in outs])
    assert 0.6 < changed < 0.9  # 1 - 0.5 * 0.5 of the draws touch the features
    assert len({o.tobytes() for o in outs}) > 0.6 * len(outs)  # draws differ across (epoch, index)
    off = FeatureAugment(seed=3)
    assert not off.enabled and off(feats, 0, 0) is feats
    always = FeatureAugment(noise_prob=1.0, noise_snr_db=(10, 10), seed=3)
    assert _snr_db(feats, always(feats, 0, 0)) == pytest.approx(10.0, abs=0.3)
    with pytest.raises(ValueError):
        FeatureAugment(noise_prob=1.5)
    with pytest.raises(ValueError):
        FeatureAugment(reverb_t60_s=(0.8, 0.2))


# -- VTLP ---------------------------------------------------------------------------------------


def _tone_peak_hz(feats: np.ndarray, centers: np.ndarray) -> float:
    """Frequency of the strongest mel band, refined by a parabola through it and its neighbours."""
    s = feats.mean(axis=0).astype(np.float64)  # (F,)
    k = int(np.argmax(s[1:-1])) + 1
    y0, y1, y2 = s[k - 1 : k + 2]
    off = 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2)  # in bands, |off| < 1
    return float(np.interp(k + off, np.arange(len(centers)), centers))


@pytest.mark.parametrize("alpha", [0.9, 1.1, 0.95])
def test_vtlp_moves_spectral_content_from_f_to_alpha_f_below_the_boundary(alpha):
    t = np.arange(SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    feats = logmel(tone)  # (T, 80)
    centers = mel_centers_hz(feats.shape[1], SR)
    before = _tone_peak_hz(feats, centers)
    assert before == pytest.approx(1000.0, abs=25.0)
    after = _tone_peak_hz(vtlp_warp(feats, alpha, centers, SR / 2), centers)
    assert after == pytest.approx(alpha * before, abs=25.0)  # 100 Hz is ~2 mel bands here
    np.testing.assert_array_equal(vtlp_warp(feats, 1.0, centers, SR / 2), feats)


def test_vtlp_warp_is_monotone_continuous_and_keeps_nyquist():
    nyq = SR / 2
    g = np.linspace(0.0, nyq, 4001)
    for alpha in (0.85, 0.9, 1.0, 1.1, 1.2):
        src = vtlp_source_hz(g, alpha, nyq)
        assert src[0] == pytest.approx(0.0) and src[-1] == pytest.approx(nyq)
        assert np.all(np.diff(src) > 0)  # monotone: no band reads two places
        assert np.max(np.abs(np.diff(src))) < 3 * (g[1] - g[0]) / min(alpha, 1.0)  # no jump at the boundary
        low = g < 0.6 * nyq * min(alpha, 1.0)
        np.testing.assert_allclose(src[low], g[low] / alpha)
    centers = mel_centers_hz(80, SR)
    assert centers.shape == (80,) and np.all(np.diff(centers) > 0) and 0 < centers[0] < centers[-1] < nyq


def test_feature_augment_vtlp_draws_are_pure_and_leave_noise_and_reverb_draws_alone():
    feats = logmel(_speechlike(1.0))
    aug = FeatureAugment(vtlp_prob=0.5, vtlp_alpha=(0.9, 1.1), seed=3)
    assert aug.enabled
    alphas = [aug.vtlp_alpha_for(e, i) for e in range(4) for i in range(50)]
    warped = [a for a in alphas if a != 1.0]
    assert 0.35 < len(warped) / len(alphas) < 0.65
    assert min(warped) >= 0.9 and max(warped) <= 1.1 and max(warped) - min(warped) > 0.1
    np.testing.assert_array_equal(aug(feats, 2, 7), FeatureAugment(vtlp_prob=0.5, seed=3)(feats, 2, 7))
    # its own stream: with VTLP on at factor 1, noise and reverb draw exactly what they did without it
    kw = dict(noise_prob=0.5, noise_snr_db=(5, 10), reverb_prob=0.5, reverb_t60_s=(0.3, 0.6), seed=3)
    with_vtlp = FeatureAugment(vtlp_prob=1.0, vtlp_alpha=(1.0, 1.0), **kw)
    without = FeatureAugment(**kw)
    for i in range(6):
        np.testing.assert_array_equal(with_vtlp(feats, 1, i), without(feats, 1, i))
    with pytest.raises(ValueError):
        FeatureAugment(vtlp_alpha=(1.1, 0.9))
    with pytest.raises(ValueError):
        FeatureAugment(vtlp_prob=2.0)

"""Training-time augmentation on cached log-mel features: speed-variant choice, VTLP, noise, reverb.

SpecAugment (masks) lives with the model (:class:`model_code.conformer.SpecAugment`); this module
holds what is drawn per *utterance*, in numpy, from a pure function of ``(seed, epoch, index)``:

- :func:`variant_choice`: which cached copy of an utterance an epoch trains on (the speed-perturbed
  shards ``<feature_hash>-sp0.9`` / plain / ``-sp1.1``: Kaldi-style 0.9/1.0/1.1 copies, computed
  once by featurize with :func:`model_code.audio.speed_perturb`). A hash, not an RNG stream, so
  the choice for utterance ``i`` depends on nothing else (not on the data size, the batch order or
  a restored RNG) and both the sampler (durations) and the dataset (features) compute the same one.
- :class:`FeatureAugment`: additive noise at a drawn SNR and a cheap reverberation, both done on the
  *linear* mel energies (``exp(feats) - log_offset``) and taken back to log, so they act like
  their waveform-domain counterparts without touching audio: stationary coloured noise adds to
  the mel power (powers of uncorrelated signals add), and a room's exponentially decaying energy
  tail smears each mel band's power over the following frames (decay of 60 dB in T60). It also
  does vocal-tract-length perturbation (:func:`vtlp_warp`, Jaitly & Hinton 2013): the mel axis is
  read through a piecewise-linear frequency warp of drawn factor α, which moves formants the way a
  shorter (α > 1) or longer (α < 1) vocal tract would. It is the speaker counterpart of the
  corpus's pitch/formant warps, drawn anew every epoch.

Why features and not waveforms: the Parquet feature cache is the one source of training features;
noise and reverb drawn anew every epoch cannot be cached, and recomputing log-mels from audio in
the training loop would double the front end's cost. Everything here is deterministic per
``(seed, epoch, index)``, so a resumed run draws exactly what the uninterrupted one did
(``model_code.training``'s exact-resume guarantee) and DataLoader workers need no RNG state.
No torch: this runs in DataLoader workers and in the sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_code.features import mel_centers_hz

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SALT_VARIANT = 0x5BEED  # variant choice
_SALT_AUG = 0xA06  # noise / reverb draws
_SALT_VTLP = 0x71F  # VTLP draws: their own stream, so turning VTLP on leaves noise/reverb draws as they were

# energy decays by 60 dB (a factor 1e6) over T60: E(t) = exp(-ln(1e6) t / T60)
_LN_1E6 = float(np.log(1e6))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _mix64_int(x: int) -> int:
    """splitmix64's finalizer on a Python int (mod 2**64)."""
    m = 2**64 - 1
    x &= m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def unit_hash(seed: int, epoch: int, index: np.ndarray | Sequence[int] | int, salt: int = 0) -> np.ndarray:
    """Uniform numbers in [0, 1) as a pure hash of ``(seed, epoch, index, salt)``: float64, shape of ``index``."""
    g = 0x9E3779B97F4A7C15
    base = _mix64_int(_mix64_int((int(seed) ^ (int(salt) << 32)) + g) + int(epoch) * g)
    idx = np.asarray(index, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(np.uint64(base) + idx * _GOLDEN + np.uint64(1))
    return (h >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def variant_choice(seed: int, epoch: int, index: np.ndarray | Sequence[int], n_variants: int) -> np.ndarray:
    """Which of ``n_variants`` cached copies each utterance ``index`` uses in ``epoch``: int64, uniform.

    A pure hash of ``(seed, epoch, index)``: the same answer in the sampler and the dataset, after
    a resume, and for an utterance whatever else the data holds. ``n_variants == 1``: all zeros.
    """
    idx = np.asarray(index, dtype=np.int64)
    if n_variants <= 1:
        return np.zeros(idx.shape, dtype=np.int64)
    u = unit_hash(seed, epoch, idx, _SALT_VARIANT)
    return np.minimum((u * n_variants).astype(np.int64), n_variants - 1)


def _to_linear(feats: np.ndarray, log_offset: float) -> np.ndarray:
    """Log-mel ``log(mel + log_offset)`` → mel energies ``(T, F)`` float64, clipped at 0."""
    return np.maximum(np.exp(feats.astype(np.float64)) - log_offset, 0.0)


def _to_log(mel: np.ndarray, log_offset: float) -> np.ndarray:
    return np.log(np.maximum(mel, 0.0) + log_offset).astype(np.float32)


def noise_mel(shape: tuple[int, int], rng: np.random.Generator, tilt_db: float = 0.0, gamma_k: float = 4.0) -> np.ndarray:
    """Stationary coloured noise as mel energies ``(T, F)`` with mean 1 over the utterance.

    Spectral shape: a linear tilt of ``tilt_db`` dB from the lowest to the highest mel band
    (negative: more low-frequency energy, like pink/brown noise). Frame-to-frame fluctuation:
    Gamma(``gamma_k``) per cell, the spread of a noise power averaged over a few FFT bins.
    """
    t, f = shape
    tilt = 10.0 ** (tilt_db * np.linspace(0.0, 1.0, f) / 10.0)  # (F,)
    n = rng.gamma(gamma_k, 1.0 / gamma_k, size=(t, f)) * tilt[None, :]
    return n / max(float(n.mean()), 1e-30)


def add_noise(
    feats: np.ndarray, snr_db: float, rng: np.random.Generator, log_offset: float = 1e-6, tilt_db: float = 0.0
) -> np.ndarray:
    """Log-mel ``(T, F)`` → log-mel ``(T, F)`` of the same signal plus noise at ``snr_db``.

    SNR = 10·log10(Σ signal mel energy / Σ noise mel energy) over the whole utterance, the usual
    utterance-level definition; the noise is :func:`noise_mel` and the sum is done on linear mel
    energies, then taken back to ``log(· + log_offset)``.
    """
    if feats.size == 0:
        return feats.astype(np.float32)
    sig = _to_linear(feats, log_offset)
    p_sig = float(sig.mean())
    noise = noise_mel(feats.shape, rng, tilt_db) * (p_sig * 10.0 ** (-snr_db / 10.0))
    return _to_log(sig + noise, log_offset)


def reverb_kernel(t60_s: float, frame_s: float) -> np.ndarray:
    """Energy envelope of a diffuse reverberant tail, per frame: ``(K,)`` float64, sum 1.

    ``h[k] ∝ exp(-ln(1e6) · k · frame_s / T60)`` for ``k = 0 .. ceil(T60 / frame_s)`` (down 60 dB at
    T60); ``h[0]`` is the direct sound. Normalized to unit sum, so the utterance's total energy is
    kept (levels do not matter to the model, which normalizes its input).
    """
    k = np.arange(int(np.ceil(max(t60_s, 0.0) / frame_s)) + 1, dtype=np.float64)
    h = np.exp(-_LN_1E6 * k * frame_s / max(t60_s, 1e-9))
    return h / h.sum()


def add_reverb(feats: np.ndarray, t60_s: float, frame_s: float = 0.01, log_offset: float = 1e-6) -> np.ndarray:
    """Log-mel ``(T, F)`` → log-mel ``(T, F)`` with each mel band's energy smeared by :func:`reverb_kernel`.

    A causal convolution along time (FFT, all bands at once), cut back to ``T`` frames so the
    frame count (and so the duration the sampler batched) is unchanged. A cheap stand-in for a
    room impulse response: right for the energy envelope, blind to phase (which log-mel drops anyway).
    """
    t = feats.shape[0]
    h = reverb_kernel(t60_s, frame_s)
    if t == 0 or len(h) == 1:
        return feats.astype(np.float32)
    mel = _to_linear(feats, log_offset)
    n = 1 << int(np.ceil(np.log2(t + len(h) - 1)))
    out = np.fft.irfft(np.fft.rfft(mel, n, axis=0) * np.fft.rfft(h, n)[:, None], n, axis=0)[:t]
    return _to_log(out, log_offset)


def vtlp_source_hz(freqs_hz: np.ndarray, alpha: float, nyquist_hz: float, f_hi_hz: float | None = None) -> np.ndarray:
    """Where each output frequency reads the input, for a VTLP warp of factor ``alpha``: ``(F,)`` Hz.

    The forward warp (Jaitly & Hinton 2013) maps input frequency ``f`` to ``α·f`` up to the
    boundary ``f_b = f_hi·min(α, 1)/α``, then linearly so that the Nyquist frequency stays put
    (monotone, continuous). ``f_hi`` defaults to 0.6 × Nyquist (their 4,800 Hz at 16 kHz).
    Content at ``f`` in the input appears at the warped frequency in the output, so output
    frequency ``g`` reads the input at the inverse warp of ``g``.
    """
    g = np.asarray(freqs_hz, dtype=np.float64)
    a = float(alpha)
    f_hi_hz = 0.6 * nyquist_hz if f_hi_hz is None else float(f_hi_hz)
    f_b = f_hi_hz * min(a, 1.0) / a  # input-side boundary
    g_b = a * f_b  # its output-side image
    upper = nyquist_hz - (nyquist_hz - g) * (nyquist_hz - f_b) / (nyquist_hz - g_b)
    return np.where(g <= g_b, g / a, upper)


def vtlp_warp(feats: np.ndarray, alpha: float, centers_hz: np.ndarray, nyquist_hz: float,
              f_hi_hz: float | None = None) -> np.ndarray:
    """Log-mel ``(T, F)`` → log-mel ``(T, F)`` of the same speech with its spectrum warped by ``alpha``.

    Each output band reads the input at :func:`vtlp_source_hz` of its centre, between the two
    nearest input bands (linear in log energy; clamped at the lowest and highest band). ``alpha``
    1 returns the input unchanged; > 1 moves spectral content up (a shorter vocal tract).
    """
    f = feats.shape[1]
    if feats.size == 0 or float(alpha) == 1.0:
        return feats.astype(np.float32)
    src = vtlp_source_hz(centers_hz, alpha, nyquist_hz, f_hi_hz)  # (F,) Hz
    pos = np.interp(src, centers_hz, np.arange(f, dtype=np.float64))  # (F,) fractional band index
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, f - 1)
    w = (pos - lo).astype(np.float32)  # (F,)
    x = feats.astype(np.float32, copy=False)
    return x[:, lo] * (1.0 - w) + x[:, hi] * w


class FeatureAugment:
    """VTLP, noise and reverb on one utterance's log-mel features, drawn from ``(seed, epoch, index)``.

    Per call: with probability ``vtlp_prob`` a VTLP warp of factor α ~ U(``vtlp_alpha``) (the
    speaker first; its own random stream, so the draws below do not depend on it); then with
    probability ``reverb_prob`` a reverb of T60 ~ U(``reverb_t60_s``), then with
    probability ``noise_prob`` noise at SNR ~ U(``noise_snr_db``) dB with a spectral tilt ~
    U(-12, 6) dB (reverberant speech in a noisy room: the noise is not reverberated). ``frame_s`` is
    the hop in seconds; ``log_offset``, ``sample_rate``, ``f_min`` and ``f_max`` are the front end's
    (``model_code.features.logmel``): VTLP needs the mel bands' centre frequencies.
    """

    def __init__(
        self,
        noise_prob: float = 0.0,
        noise_snr_db: Sequence[float] = (5.0, 30.0),
        reverb_prob: float = 0.0,
        reverb_t60_s: Sequence[float] = (0.2, 0.8),
        vtlp_prob: float = 0.0,
        vtlp_alpha: Sequence[float] = (0.9, 1.1),
        frame_s: float = 0.01,
        log_offset: float = 1e-6,
        sample_rate: int = 16000,
        f_min: float = 0.0,
        f_max: float | None = None,
        seed: int = 0,
    ) -> None:
        for name, p in (("noise_prob", noise_prob), ("reverb_prob", reverb_prob), ("vtlp_prob", vtlp_prob)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if noise_snr_db[0] > noise_snr_db[1] or reverb_t60_s[0] > reverb_t60_s[1] or reverb_t60_s[0] <= 0:
            raise ValueError(f"bad ranges: noise_snr_db {noise_snr_db}, reverb_t60_s {reverb_t60_s}")
        if not 0.0 < vtlp_alpha[0] <= vtlp_alpha[1]:
            raise ValueError(f"bad range: vtlp_alpha {vtlp_alpha} (need 0 < low <= high)")
        self.noise_prob, self.reverb_prob, self.vtlp_prob = float(noise_prob), float(reverb_prob), float(vtlp_prob)
        self.noise_snr_db = (float(noise_snr_db[0]), float(noise_snr_db[1]))
        self.reverb_t60_s = (float(reverb_t60_s[0]), float(reverb_t60_s[1]))
        self.vtlp_alpha = (float(vtlp_alpha[0]), float(vtlp_alpha[1]))
        self.frame_s, self.log_offset, self.seed = float(frame_s), float(log_offset), int(seed)
        self.sample_rate, self.f_min = int(sample_rate), float(f_min)
        self.f_max = None if f_max is None else float(f_max)

    @property
    def enabled(self) -> bool:
        return self.noise_prob > 0.0 or self.reverb_prob > 0.0 or self.vtlp_prob > 0.0

    def vtlp_alpha_for(self, epoch: int, index: int) -> float:
        """The VTLP factor of utterance ``index`` in ``epoch`` (1.0 = not warped)."""
        if self.vtlp_prob <= 0.0:
            return 1.0
        u, a = self.rng(epoch, index, _SALT_VTLP).random(2)
        if u >= self.vtlp_prob:
            return 1.0
        lo, hi = self.vtlp_alpha
        return float(lo + (hi - lo) * a)

    def rng(self, epoch: int, index: int, salt: int = _SALT_AUG) -> np.random.Generator:
        """The generator of utterance ``index`` in ``epoch`` for the draws of ``salt`` (noise/reverb by
        default; VTLP has its own), independent of every other utterance's and every other salt's."""
        return np.random.default_rng([int(self.seed) % 2**64, int(epoch), int(index), int(salt)])

    def __call__(self, feats: np.ndarray, epoch: int, index: int) -> np.ndarray:
        """``feats`` float ``(T, F)`` log-mel → float32 ``(T, F)``, augmented or as it was."""
        if not self.enabled:
            return feats
        out = feats
        alpha = self.vtlp_alpha_for(epoch, index)
        if alpha != 1.0:
            centers = mel_centers_hz(feats.shape[1], self.sample_rate, self.f_min, self.f_max)
            out = vtlp_warp(out, alpha, centers, self.sample_rate / 2.0)
        rng = self.rng(epoch, index)
        u_rev, u_noise = rng.random(2)
        if u_rev < self.reverb_prob:
            out = add_reverb(out, float(rng.uniform(*self.reverb_t60_s)), self.frame_s, self.log_offset)
        if u_noise < self.noise_prob:
            snr = float(rng.uniform(*self.noise_snr_db))
            out = add_noise(out, snr, rng, self.log_offset, tilt_db=float(rng.uniform(-12.0, 6.0)))
        return out

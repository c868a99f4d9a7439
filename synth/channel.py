"""The channel of the synthetic corpus: room, line, noise, level, all in numpy/scipy.

Every function is a pure function of its arguments (and of the ``numpy.random.Generator`` it is
given), so an utterance's audio depends only on its own random stream. Signals are float64 at
:data:`synth.common.SAMPLE_RATE`.

* reverberation: a synthetic room impulse response (direct path, a few sparse early reflections
  after a drawn pre-delay, then exponentially decaying Gaussian noise reaching -60 dB at the drawn
  RT60, low-passed by a drawn amount as walls and air absorb highs; the direct-to-reverberant ratio
  is drawn too), convolved with ``scipy.signal.fftconvolve``;
* telephone band: resampled through 8 kHz, band-passed (4th-order Butterworth, edges drawn around
  300 and 3,400 Hz), 8-bit mu-law companded (G.711-like), resampled back;
* additive noise at a drawn SNR (relative to the active speech power): coloured noise (white, pink
  ~ 1/f or brown ~ 1/f**2 power spectrum, IIR-filtered white noise), or babble: several talkers cut from a bank
  of other sentences synthesized for that purpose;
* clipping at a drawn fraction of the peak; the output level (peak dBFS) is drawn last.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import butter, fftconvolve, lfilter, sosfilt

from synth.common import SAMPLE_RATE, resample

NOISE_KINDS = ("white", "pink", "brown")
# IIR colouring filters (b, a): pink ~ 1/f (Paul Kellet's economy pinking filter), brown ~ 1/f**2 above
# ~20 Hz (a leaky integrator: no DC drift); filters cost far less than FFT shaping
_COLOUR = {
    "pink": (
        [0.049922035, -0.095993537, 0.050612699, -0.004408786],
        [1.0, -2.494956002, 2.017265875, -0.522189400],
    ),
    "brown": ([1.0], [1.0, -0.995]),
}
TELEPHONE_RATE = 8000


def pad(y: np.ndarray, rng: np.random.Generator, seconds: tuple[float, float] = (0.05, 0.3)) -> np.ndarray:
    """Add a little leading and trailing silence."""
    lead = np.zeros(int(rng.uniform(*seconds) * SAMPLE_RATE))
    trail = np.zeros(int(rng.uniform(*seconds) * SAMPLE_RATE))
    return np.concatenate([lead, y, trail])


def active_power(y: np.ndarray) -> float:
    """Mean power of the samples above -60 dB of the peak (speech, not the silence around it)."""
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak <= 0.0:
        return 1e-12
    act = y[np.abs(y) > 1e-3 * peak]
    return float(np.mean(act**2)) if act.size else 1e-12


def coloured_noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Unit-RMS noise of ``kind``: white (flat), pink (~1/f) or brown (~1/f**2) power spectrum."""
    warm = 2048 if kind in _COLOUR else 0  # let the filter settle, then drop its start
    x = rng.standard_normal(n + warm)
    if kind in _COLOUR:
        x = lfilter(*_COLOUR[kind], x)[warm:]
        x -= x.mean()
    return x / (np.sqrt(np.mean(x**2)) or 1.0)


def add_at_snr(
    y: np.ndarray, noise: np.ndarray, snr_db: float, speech_power: float | None = None
) -> np.ndarray:
    """``y`` plus ``noise`` scaled to ``snr_db`` below the active speech power of ``y``."""
    p = active_power(y) if speech_power is None else speech_power
    noise = noise * np.sqrt(p / 10 ** (snr_db / 10) / (np.mean(noise**2) or 1.0))
    return y + noise


def room_impulse_response(rng: np.random.Generator, rt60_s: float) -> np.ndarray:
    """A synthetic room impulse response with reverberation time ``rt60_s`` (direct path = 1)."""
    sr = SAMPLE_RATE
    n = int(rt60_s * sr) + 1
    t = np.arange(n) / sr
    predelay = rng.uniform(0.002, 0.015)  # distance to the first reflecting wall
    decay = np.exp(-6.908 * t / rt60_s)  # -60 dB at rt60
    tail = rng.standard_normal(n) * decay
    tail[: int(predelay * sr) + 1] = 0.0
    a = rng.uniform(0.2, 0.7)  # one-pole low-pass: absorption of the highs
    tail = lfilter([1.0 - a], [1.0, -a], tail)
    k = int(rng.integers(4, 11))  # early reflections in the first 50 ms after the pre-delay
    pos = ((predelay + rng.uniform(0.0, 0.05, k)) * sr).astype(int)
    early = np.zeros(n)
    np.add.at(
        early,
        np.minimum(pos, n - 1),
        rng.uniform(0.2, 0.7, k) * rng.choice([-1.0, 1.0], k) * decay[np.minimum(pos, n - 1)],
    )
    reverberant = early + tail
    drr_db = rng.uniform(-3.0, 6.0)  # direct-to-reverberant energy ratio
    reverberant *= np.sqrt(1.0 / 10 ** (drr_db / 10) / (np.sum(reverberant**2) or 1.0))
    h = reverberant
    h[0] = 1.0
    return h


def reverb(y: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``y`` heard in the room ``h`` (the reverberant tail is kept)."""
    return fftconvolve(y, h)


def telephone(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``y`` through a telephone line: 8 kHz, 300-3,400 Hz band, 8-bit mu-law; back at SAMPLE_RATE."""
    z = resample(y, 160, 441)  # 22,050 -> 8,000 Hz
    lo, hi = rng.uniform(250.0, 350.0), rng.uniform(3200.0, 3500.0)
    z = sosfilt(butter(4, [lo, hi], btype="bandpass", fs=TELEPHONE_RATE, output="sos"), z)
    peak = float(np.max(np.abs(z))) or 1.0
    z = z / peak * 0.9
    mu = 255.0
    c = np.sign(z) * np.log1p(mu * np.abs(z)) / np.log1p(mu)  # compress
    c = np.round(c * 127.0) / 127.0  # 8 bits
    z = np.sign(c) * ((1.0 + mu) ** np.abs(c) - 1.0) / mu  # expand
    out = resample(z * peak / 0.9, 441, 160)
    return out[: y.size] if out.size >= y.size else np.pad(out, (0, y.size - out.size))


def babble(rng: np.random.Generator, bank: list[np.ndarray], n: int, talkers: int) -> np.ndarray:
    """``talkers`` voices from ``bank`` (unit-power clips), each from a random offset, looped to ``n``."""
    out = np.zeros(n)
    for _ in range(talkers):
        clip = bank[int(rng.integers(len(bank)))]
        start = int(rng.integers(clip.size))
        reps = -(-(n + start) // clip.size)
        out += np.tile(clip, reps)[start : start + n] * 10 ** (rng.uniform(-3.0, 3.0) / 20)
    return out


def clip(y: np.ndarray, fraction: float) -> np.ndarray:
    """Hard clipping at ``fraction`` of the peak (an overdriven preamp)."""
    t = fraction * (float(np.max(np.abs(y))) or 1.0)
    return np.clip(y, -t, t)


def to_int16(y: np.ndarray, peak_dbfs: float) -> np.ndarray:
    """Scale ``y`` to a peak of ``peak_dbfs`` and quantize to int16."""
    peak = float(np.max(np.abs(y))) or 1.0
    y = np.clip(y * (10 ** (peak_dbfs / 20) / peak), -1.0, 32767 / 32768)
    return np.round(y * 32768.0).astype("<i2")

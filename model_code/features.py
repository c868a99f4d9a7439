"""The log-mel front end: ONE implementation, in numpy, shared by featurize, training, export
and transcribe.

Why numpy and not torch: ``asrflow transcribe`` runs an exported model with onnxruntime only,
and feature extraction is a documented preprocessing step *outside* the ONNX graph. Keeping a
single implementation here, called by featurize (training features), export (parity check) and
transcribe (inference), makes train/serve parity hold by construction. This module must not
import torch.

The result equals ``torchaudio.transforms.MelSpectrogram(sample_rate, n_fft, win_length,
hop_length, f_min, f_max, n_mels, power=2.0, center=True, pad_mode="reflect", norm=None,
mel_scale="htk")`` followed by ``log(x + log_offset)`` (tested in
``tests/model_code/test_features.py``).

Feature normalization: none here. Per-utterance mean/variance normalization belongs to the
model (its first layer), so that it is part of the ONNX graph and cannot drift between training
and serving; the cache stores raw log-mel values.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import numpy as np
import scipy.fft  # ~4x numpy's rfft on (T, 400) float32 frames (bench/featurize.py)

# Bump when the numbers logmel() produces change: it is part of the feature-cache key. Not bumped
# for numpy -> scipy.fft: one float16 ulp on 0.04 % of values, so older cached shards stay valid.
FRONTEND_VERSION = "1"

# The FeatureConfig fields that change feature values (shard size, jobs... do not).
FEATURE_VALUE_FIELDS = (
    "sample_rate",
    "n_fft",
    "win_length",
    "hop_length",
    "n_mels",
    "f_min",
    "f_max",
    "log_offset",
    "dtype",
)


def feature_kwargs(cfg: Any) -> dict[str, Any]:
    """The :func:`logmel` keyword arguments from a config-like object or mapping (no dtype)."""
    get = cfg.get if isinstance(cfg, dict) else functools.partial(getattr, cfg)
    return {
        "sample_rate": int(get("sample_rate")),
        "n_fft": int(get("n_fft")),
        "win_length": int(get("win_length")),
        "hop_length": int(get("hop_length")),
        "n_mels": int(get("n_mels")),
        "f_min": float(get("f_min")),
        "f_max": None if get("f_max") is None else float(get("f_max")),
        "log_offset": float(get("log_offset")),
    }


def feature_hash(cfg: Any) -> str:
    """16-hex hash of everything that determines cached feature values (config + front-end version).

    Two configs with the same hash produce bit-identical cached features, so they share the cache
    folder ``<root>/feature_cache/<feature_hash>/``.
    """
    get = cfg.get if isinstance(cfg, dict) else functools.partial(getattr, cfg)
    material = {k: get(k) for k in FEATURE_VALUE_FIELDS}
    material["frontend_version"] = FRONTEND_VERSION
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _hz_to_mel_htk(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def _f_max_hz(sample_rate: int, f_max: float | None) -> float:
    """The filterbank's upper edge: ``f_max``, or ``sample_rate // 2`` (torchaudio's default) when None."""
    return float(sample_rate // 2) if f_max is None else float(f_max)


def mel_points_hz(f_min: float, f_max: float, n_mels: int) -> np.ndarray:
    """The ``n_mels + 2`` HTK mel-scale points ``(n_mels + 2,)`` in Hz that bound the triangular bands:
    band ``i`` rises from point ``i``, peaks at point ``i + 1`` (its centre) and falls to ``i + 2``."""
    return _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2))


@functools.lru_cache(maxsize=16)
def mel_centers_hz(n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> np.ndarray:
    """Centre frequencies ``(n_mels,)`` in Hz of :func:`logmel`'s bands for these arguments (read-only, cached)."""
    c = mel_points_hz(float(f_min), _f_max_hz(sample_rate, f_max), int(n_mels))[1:-1]
    c.setflags(write=False)
    return c


@functools.lru_cache(maxsize=16)
def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> np.ndarray:
    """Triangular HTK mel filterbank, no area normalization.

    Same construction as ``torchaudio.functional.melscale_fbanks(n_freqs, f_min, f_max, n_mels,
    sample_rate, norm=None, mel_scale="htk")``. Returns float32 ``(n_freqs, n_mels)`` (read-only,
    cached).
    """
    all_freqs = np.linspace(0.0, sample_rate // 2, n_freqs)  # (n_freqs,)
    f_pts = mel_points_hz(f_min, f_max, n_mels)  # (n_mels + 2,)
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1,)
    slopes = f_pts[None, :] - all_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up)).astype(np.float32)  # (n_freqs, n_mels)
    fb.setflags(write=False)
    return fb


@functools.lru_cache(maxsize=16)
def _window(n_fft: int, win_length: int) -> np.ndarray:
    """Periodic Hann window of ``win_length`` zero-padded (centered) to ``n_fft``, like torch.stft."""
    n = np.arange(win_length, dtype=np.float64)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)  # periodic hann
    left = (n_fft - win_length) // 2
    out = np.zeros(n_fft, dtype=np.float32)
    out[left : left + win_length] = w
    out.setflags(write=False)
    return out


def num_frames(num_samples: int, hop_length: int) -> int:
    """Frames :func:`logmel` returns for ``num_samples`` samples (center=True): ``1 + S // hop``."""
    return 1 + int(num_samples) // int(hop_length)


def _power(windowed: np.ndarray) -> np.ndarray:
    """|rfft|^2 of windowed frames: ``(T, n_fft)`` float32 -> ``(T, n_fft // 2 + 1)`` float32."""
    spec = scipy.fft.rfft(windowed, axis=-1)  # (T, n_fft//2+1) complex64
    return (spec.real * spec.real + spec.imag * spec.imag).astype(np.float32, copy=False)


def power_spectrum(wave: np.ndarray, n_fft: int, win_length: int, hop_length: int) -> np.ndarray:
    """|STFT|^2 with center=True reflect padding: ``(S,)`` float32 -> ``(T, n_fft // 2 + 1)`` float32."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"logmel expects a mono wave (S,), got shape {wave.shape}")
    pad = n_fft // 2
    if wave.shape[0] <= pad:
        # reflect padding needs more samples than the pad; torch raises here too. Zero-pad the
        # (degenerate, < n_fft/2 samples) input instead of failing: such clips are quarantined
        # upstream anyway.
        padded = np.pad(wave, (pad, pad), mode="constant")
    else:
        padded = np.pad(wave, (pad, pad), mode="reflect")  # (S + n_fft,)
    n_frames = 1 + (padded.shape[0] - n_fft) // hop_length
    frames = np.lib.stride_tricks.as_strided(
        padded,
        shape=(n_frames, n_fft),
        strides=(padded.strides[0] * hop_length, padded.strides[0]),
        writeable=False,
    )  # (T, n_fft) view
    return _power(frames * _window(n_fft, win_length))  # (T, n_fft//2+1)


def logmel(
    wave: np.ndarray,
    sample_rate: int = 16000,
    n_fft: int = 400,
    win_length: int = 400,
    hop_length: int = 160,
    n_mels: int = 80,
    f_min: float = 0.0,
    f_max: float | None = None,
    log_offset: float = 1e-6,
) -> np.ndarray:
    """Log-mel features of one mono wave.

    ``wave`` float32 ``(S,)`` in [-1, 1] at ``sample_rate`` -> float32 ``(T, n_mels)`` with
    ``T = 1 + S // hop_length``: hann window, center=True reflect padding, power spectrum, HTK mel
    filterbank without normalization, ``log(mel + log_offset)``. ``f_max=None`` means
    ``sample_rate // 2`` (torchaudio's default).
    """
    if win_length > n_fft:
        raise ValueError(f"win_length {win_length} > n_fft {n_fft}")
    f_max_v = _f_max_hz(sample_rate, f_max)
    power = power_spectrum(wave, n_fft, win_length, hop_length)  # (T, n_freqs)
    fb = mel_filterbank(n_fft // 2 + 1, float(f_min), f_max_v, int(n_mels), int(sample_rate))
    mel = power @ fb  # (T, n_mels)
    np.log(mel + np.float32(log_offset), out=mel)
    return mel


def logmel_batch(waves: list[np.ndarray], **kwargs: Any) -> list[np.ndarray]:
    """:func:`logmel` of several waves: list of ``(S_i,)`` -> list of ``(T_i, n_mels)``.

    The frames of all waves go through one rfft and one matmul (fewer, larger numpy calls than a
    loop over short clips); results equal the per-wave calls.
    """
    if not waves:
        return []
    n_fft = int(kwargs.get("n_fft", 400))
    win_length = int(kwargs.get("win_length", 400))
    hop_length = int(kwargs.get("hop_length", 160))
    sample_rate = int(kwargs.get("sample_rate", 16000))
    n_mels = int(kwargs.get("n_mels", 80))
    f_min = float(kwargs.get("f_min", 0.0))
    f_max = kwargs.get("f_max")
    log_offset = float(kwargs.get("log_offset", 1e-6))
    pad = n_fft // 2
    frame_views = []
    for w in waves:
        w = np.ascontiguousarray(w, dtype=np.float32)
        padded = np.pad(w, (pad, pad), mode="reflect" if w.shape[0] > pad else "constant")
        n = 1 + (padded.shape[0] - n_fft) // hop_length
        frame_views.append(
            np.lib.stride_tricks.as_strided(
                padded,
                shape=(n, n_fft),
                strides=(padded.strides[0] * hop_length, padded.strides[0]),
                writeable=False,
            )
        )
    frames = np.concatenate(frame_views, axis=0) * _window(n_fft, win_length)  # (sum T, n_fft)
    power = _power(frames)  # (sum T, n_fft//2+1)
    f_max_v = _f_max_hz(sample_rate, f_max)
    mel = power @ mel_filterbank(n_fft // 2 + 1, f_min, f_max_v, n_mels, sample_rate)  # (sum T, n_mels)
    np.log(mel + np.float32(log_offset), out=mel)
    out, start = [], 0
    for v in frame_views:
        out.append(mel[start : start + v.shape[0]])
        start += v.shape[0]
    return out

"""What every part of the synthetic corpus shares: the error type, the output rate, partition hashes."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from scipy.signal import firwin, resample_poly

SAMPLE_RATE = 22050  # every corpus WAV is written at espeak-ng's native rate; ingest resamples to 16 kHz
PARTITION_SALT = "asrflow-corpus-v1:"  # the golden/training partition of sentences and voices (never change)


class CorpusError(ValueError):
    """Bad arguments or a broken synthesis environment (e.g. espeak-ng or festival missing)."""


def bucket(key: str, buckets: int) -> int:
    """A stable hash bucket of ``key`` (sha256, so independent of PYTHONHASHSEED and platform)."""
    return int.from_bytes(hashlib.sha256(f"{PARTITION_SALT}{key}".encode()).digest()[:8], "big") % buckets


@functools.lru_cache(maxsize=64)
def _lowpass(up: int, down: int) -> np.ndarray:
    # the filter scipy.signal.resample_poly designs by default; designed once per ratio, not per call
    max_rate = max(up, down)
    taps = firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    taps.flags.writeable = False
    return taps


def resample(x: np.ndarray, up: int, down: int) -> np.ndarray:
    """``scipy.signal.resample_poly(x, up, down)`` with its anti-aliasing filter cached."""
    if up == down:
        return x
    return resample_poly(x, up, down, window=_lowpass(up, down))

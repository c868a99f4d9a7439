"""Audio decoding, resampling and storage for every step that touches waveforms.

What: :func:`load_audio` decodes WAV / FLAC / OGG / MP3 (through libsndfile via
``soundfile``), downmixes to mono and resamples to the target rate with
a numpy polyphase FIR (:func:`resample`, the filter of ``scipy.signal.resample_poly``); :func:`write_flac` stores a waveform as 16-bit FLAC
atomically; :func:`pcm16_hash` is the content hash of a waveform (sha256 of its int16
PCM bytes), which names files in the content-addressed raw store.

Why: ingest, golden, transcribe and featurize must agree bit-for-bit on how audio is
turned into samples, so there is one implementation. Every decode failure is raised as
:class:`AudioDecodeError` with a short machine ``reason`` (used as the quarantine
reason) and a readable ``message``, never as a bare libsndfile error. libsndfile reads a
truncated WAV silently (it trusts the file size, not the header), so the RIFF header is
parsed here and the declared data size compared with the bytes actually present.

Int16 convention: ``int16 = clip(round(x * 32768), -32768, 32767)``, the inverse of what
libsndfile does when it reads 16-bit PCM as float (``x = int16 / 32768``). So a FLAC
written by :func:`write_flac` and read back by :func:`load_audio` has the same
:func:`pcm16_hash` as the waveform that was written.

Plain arguments only: this module never imports ``pipeline_tasks`` or Airflow.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import uuid
from math import gcd
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np
import soundfile as sf

# reason codes (also used as quarantine reasons)
NOT_AUDIO = "not_audio"
AUDIO_TRUNCATED = "audio_truncated"
AUDIO_EMPTY = "audio_empty"
AUDIO_UNREADABLE = "audio_unreadable"
AUDIO_MISSING = "audio_missing"
AUDIO_NONFINITE = "audio_nonfinite"
AUDIO_TOO_LONG = "audio_too_long"  # header declares more than max_duration_s
AUDIO_TOO_LARGE = "audio_too_large"  # decoded size / channels / sample rate over a cap

# formats whose header frame count is exact (MP3's is an estimate from the bitrate)
_EXACT_FRAME_COUNT = {"FLAC", "OGG", "WAV", "WAVEX", "AIFF", "CAF", "W64", "RF64"}


class AudioDecodeError(Exception):
    """Audio that cannot be used. ``reason`` is a machine code, ``message`` says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across a process pool
        return (type(self), (self.reason, self.message))


def _riff_data_check(head: bytes, file_size: int) -> str | None:
    """Return a truncation message when a RIFF/WAVE header declares more bytes than exist.

    Walks the chunk list in ``head`` (the first bytes of the file) up to the ``data``
    chunk and compares its declared size with what the file holds. Returns ``None`` when
    the file is complete, is not RIFF/WAVE, or declares an unknown size (streamed WAVs
    write 0 or 0xFFFFFFFF).
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        cid = head[pos : pos + 4]
        (size,) = struct.unpack("<I", head[pos + 4 : pos + 8])
        if cid == b"data":
            if size in (0, 0xFFFFFFFF):
                return None
            have = file_size - (pos + 8)
            if have < size:
                return f"WAV header declares {size} data bytes but the file holds {max(have, 0)}"
            return None
        pos += 8 + size + (size & 1)  # chunks are word aligned
    if pos > file_size:
        return f"WAV chunk list runs past the end of the file ({file_size} bytes)"
    return None


def _open_source(path_or_fileobj: str | os.PathLike[str] | IO[bytes]) -> tuple[BinaryIO, str]:
    """A seekable binary stream and a name for messages."""
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        p = Path(path_or_fileobj)
        try:
            return open(p, "rb"), str(p)  # noqa: SIM115 - closed by the caller
        except FileNotFoundError as e:
            raise AudioDecodeError(AUDIO_MISSING, f"{p}: no such file") from e
        except IsADirectoryError as e:
            raise AudioDecodeError(AUDIO_UNREADABLE, f"{p}: is a directory") from e
        except OSError as e:
            raise AudioDecodeError(AUDIO_UNREADABLE, f"{p}: {e.strerror or e}") from e
    f = path_or_fileobj
    name = str(getattr(f, "name", "<stream>"))
    try:
        seekable = f.seekable()
    except (AttributeError, ValueError):
        seekable = False
    if not seekable:
        return io.BytesIO(f.read()), name
    return f, name  # type: ignore[return-value]


def _to_mono(data: np.ndarray) -> np.ndarray:
    if data.ndim == 2:
        data = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(data, dtype=np.float32)


def _kaiser_lowpass(up: int, down: int) -> np.ndarray:
    """The anti-aliasing FIR of ``scipy.signal.resample_poly`` (default window): Kaiser(β=5)-windowed
    sinc, cutoff ``1 / max(up, down)`` of Nyquist, ``20 * max(up, down) + 1`` taps, DC gain ``up``."""
    max_rate = max(up, down)
    half_len = 10 * max_rate
    n = np.arange(-half_len, half_len + 1, dtype=np.float64)
    cutoff = 1.0 / max_rate
    h = cutoff * np.sinc(cutoff * n) * np.kaiser(2 * half_len + 1, 5.0)
    return h / h.sum() * up


def resample(wave: np.ndarray, orig_sr: int, target_sr: int, block: int = 1 << 16) -> np.ndarray:
    """Resample a mono float32 wave ``(S,)`` → ``(ceil(S * target / orig),)`` with a polyphase FIR.

    Same filter and alignment as ``scipy.signal.resample_poly(wave, up, down)`` (the rational
    factor reduced by the gcd: 44.1 kHz → 16 kHz is up 160 / down 441), written in numpy because
    scipy's signal functions probe ``sys.modules["torch"]`` (array-API dispatch) and this module
    must run where torch is absent or blocked. It is the one resampler of the project: ingest,
    the golden set and serving (``asrflow transcribe``) all resample through it, so training
    and serving see the same 16 kHz signal for audio recorded at any rate. Output sample ``m`` is
    ``Σ_k x[k] · h[m·down + half_len - k·up]`` — only the taps that meet a nonzero sample of the
    zero-stuffed input are computed (``≈ len(h) / up`` per output), in blocks of ``block`` outputs.
    """
    if orig_sr == target_sr or wave.size == 0:
        return np.ascontiguousarray(wave, dtype=np.float32)
    g = gcd(int(orig_sr), int(target_sr))
    up, down = int(target_sr) // g, int(orig_sr) // g
    x = np.asarray(wave, dtype=np.float64)
    h = _kaiser_lowpass(up, down)
    half_len, taps_len = (h.shape[0] - 1) // 2, h.shape[0]
    n_in = x.shape[0]
    n_out = -(-n_in * up // down)
    n_taps = -(-taps_len // up)
    out = np.empty(n_out, dtype=np.float64)
    for s in range(0, n_out, block):
        m = np.arange(s, min(s + block, n_out), dtype=np.int64)
        base = m * down + half_len  # position in the zero-stuffed, filter-delayed domain
        k0 = base // up  # newest input sample that reaches output m
        phase = base - k0 * up
        acc = np.zeros(m.shape[0], dtype=np.float64)
        for j in range(n_taps):
            k = k0 - j
            hidx = phase + j * up
            ok = (hidx < taps_len) & (k >= 0) & (k < n_in)
            acc += np.where(ok, h[np.minimum(hidx, taps_len - 1)] * x[np.clip(k, 0, n_in - 1)], 0.0)
        out[s : s + m.shape[0]] = acc
    return out.astype(np.float32)


def speed_perturb(wave: np.ndarray, sr: int, factor: float) -> np.ndarray:
    """Kaldi-style speed perturbation: ``(S,)`` float32 → ``(ceil(S / factor),)`` float32 at ``sr``.

    The samples are read as if recorded at ``sr * factor`` and resampled to ``sr`` (what sox's
    ``speed`` effect in Kaldi's ``perturb_data_dir_speed.sh`` does): tempo *and* pitch change by
    ``factor``, the duration by ``1 / factor`` (a 0.9 copy is 11 % longer and lower). Same
    resampler as every other rate change of the project (:func:`resample`); ``sr * factor`` is
    rounded to whole Hz, so 0.9 / 1.1 at 16 kHz are the exact ratios 10/9 and 10/11.
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be > 0, got {factor}")
    if factor == 1.0:
        return np.ascontiguousarray(wave, dtype=np.float32)
    return resample(wave, int(round(sr * factor)), int(sr))


def check_header(
    info,
    name: str,
    max_duration_s: float | None = None,
    max_decoded_bytes: int | None = None,
    max_channels: int | None = None,
    max_sample_rate: int | None = None,
) -> int | None:
    """Refuse audio whose *header* declares too much, before any sample is decoded.

    A few KB of FLAC silence can declare hours of audio (a decompression bomb); so can a WAV
    header with an absurd sample rate or channel count (the resampler's filter grows with the
    rate). Raises :class:`AudioDecodeError` (``audio_too_long`` / ``audio_too_large``); returns
    the most frames :func:`load_audio` may decode (None: no cap), which also bounds a header
    that lies about its length.
    """
    sr, ch, frames = int(info.samplerate), int(info.channels), int(info.frames)
    if max_channels is not None and ch > max_channels:
        raise AudioDecodeError(AUDIO_TOO_LARGE, f"{name}: {ch} channels (at most {max_channels})")
    if max_sample_rate is not None and sr > max_sample_rate:
        raise AudioDecodeError(AUDIO_TOO_LARGE, f"{name}: sample rate {sr} Hz (at most {max_sample_rate})")
    caps = []
    if max_duration_s is not None:
        cap = int(max_duration_s * sr) + 1
        if frames > cap:
            raise AudioDecodeError(
                AUDIO_TOO_LONG, f"{name}: header declares {frames / sr:.1f} s of audio (at most {max_duration_s:g} s)"
            )
        caps.append(cap)
    if max_decoded_bytes is not None:
        cap = max(int(max_decoded_bytes) // (4 * max(ch, 1)), 1)
        if frames > cap:
            raise AudioDecodeError(
                AUDIO_TOO_LARGE,
                f"{name}: would decode to {frames * ch * 4 / 2**20:.1f} MiB (at most {max_decoded_bytes / 2**20:.1f} MiB)",
            )
        caps.append(cap)
    return min(caps) if caps else None


def load_audio(
    path_or_fileobj: str | os.PathLike[str] | IO[bytes],
    target_sr: int | None = 16000,
    *,
    max_duration_s: float | None = None,
    max_decoded_bytes: int | None = None,
    max_channels: int | None = None,
    max_sample_rate: int | None = None,
) -> tuple[np.ndarray, int, int]:
    """Decode audio to a mono float32 waveform at ``target_sr``.

    Returns ``(wave (S,) float32, orig_sample_rate, orig_channels)``. Multi-channel audio
    is averaged to mono; any other rate (8 kHz, 44.1 kHz...) is resampled, never
    rejected. ``target_sr=None`` keeps the original rate. The ``max_*`` caps are checked
    against the header before decoding (:func:`check_header`; ``audio_too_long`` /
    ``audio_too_large``), and decoding stops after the capped number of frames whatever the
    header says.

    Raises :class:`AudioDecodeError` with reason ``audio_missing`` (no such file),
    ``not_audio`` (not a format libsndfile recognises, e.g. text named ``.wav``),
    ``audio_truncated`` (fewer bytes/frames than the header declares, or a decode error
    part-way), ``audio_empty`` (zero frames), ``audio_nonfinite`` (NaN/inf samples in a
    float file) or ``audio_unreadable`` (a known format whose header is malformed, e.g. a
    cut-short OGG, or any other I/O failure).
    """
    f, name = _open_source(path_or_fileobj)
    own = isinstance(path_or_fileobj, (str, os.PathLike))
    try:
        start = f.tell()
        f.seek(0, io.SEEK_END)
        size = f.tell() - start
        f.seek(start)
        if size == 0:
            raise AudioDecodeError(AUDIO_EMPTY, f"{name}: file is 0 bytes")
        head = f.read(1 << 16)
        f.seek(start)
        trunc = _riff_data_check(head, size)
        if trunc:
            raise AudioDecodeError(AUDIO_TRUNCATED, f"{name}: {trunc}")
        try:
            info = sf.info(f)
            f.seek(start)
        except sf.LibsndfileError as e:
            if "malformed" in str(e.error_string).lower():
                raise AudioDecodeError(
                    AUDIO_UNREADABLE, f"{name}: a known audio format but malformed, corrupt or cut short ({e.error_string})"
                ) from e
            raise AudioDecodeError(NOT_AUDIO, f"{name}: not a recognised audio format ({e.error_string})") from e
        except (RuntimeError, ValueError) as e:
            raise AudioDecodeError(NOT_AUDIO, f"{name}: not a recognised audio format ({e})") from e
        if info.frames == 0 or info.samplerate <= 0:
            raise AudioDecodeError(AUDIO_EMPTY, f"{name}: no audio frames ({info.format}, {info.samplerate} Hz)")
        max_frames = check_header(info, name, max_duration_s, max_decoded_bytes, max_channels, max_sample_rate)
        try:
            if max_frames is None:
                data, sr = sf.read(f, dtype="float32", always_2d=True)
            else:  # one frame over the cap tells a header that under-declares its length
                data, sr = sf.read(f, frames=max_frames + 1, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise AudioDecodeError(AUDIO_TRUNCATED, f"{name}: decode failed part-way ({e})") from e
        if max_frames is not None and data.shape[0] > max_frames:
            raise AudioDecodeError(AUDIO_TOO_LONG, f"{name}: holds more audio than its header declares and the cap allows")
        channels = int(data.shape[1])
        if data.shape[0] == 0:
            raise AudioDecodeError(AUDIO_EMPTY, f"{name}: no audio frames")
        if info.format in _EXACT_FRAME_COUNT and data.shape[0] < info.frames:
            raise AudioDecodeError(
                AUDIO_TRUNCATED, f"{name}: header declares {info.frames} frames, decoded {data.shape[0]}"
            )
        if not np.isfinite(data).all():
            raise AudioDecodeError(AUDIO_NONFINITE, f"{name}: contains NaN or infinite samples")
    except AudioDecodeError:
        raise
    except OSError as e:
        raise AudioDecodeError(AUDIO_UNREADABLE, f"{name}: {e}") from e
    finally:
        if own:
            f.close()
    wave = _to_mono(data)
    if target_sr is not None:
        wave = resample(wave, int(sr), int(target_sr))
    return wave, int(sr), channels


def to_pcm16(wave: np.ndarray) -> np.ndarray:
    """float waveform → int16 with the libsndfile-inverse convention (x * 32768, clipped)."""
    w = np.asarray(wave, dtype=np.float64)
    return np.clip(np.rint(w * 32768.0), -32768, 32767).astype("<i2")


def pcm16_hash(wave: np.ndarray) -> str:
    """sha256 (hex) of the waveform's little-endian int16 PCM bytes: its content address."""
    return hashlib.sha256(to_pcm16(wave).tobytes()).hexdigest()


def write_flac(path: str | os.PathLike[str], wave: np.ndarray, sr: int) -> None:
    """Write a mono waveform as 16-bit FLAC, atomically (temp file in the same folder + ``os.replace``).

    A reader never sees a half-written file; a crash leaves at most a ``.tmp-*`` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{uuid.uuid4().hex}")
    try:
        sf.write(str(tmp), to_pcm16(wave), int(sr), format="FLAC", subtype="PCM_16")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

"""Probing, cutting and placing source audio for the importers (libsndfile through soundfile)."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

# reasons an audio file cannot be imported (the import report's machine codes)
AUDIO_MISSING = "audio_missing"
AUDIO_UNREADABLE = "audio_unreadable"
AUDIO_EMPTY = "audio_empty"
# formats whose header frame count is exact (MP3's is an estimate from the bitrate)
EXACT_FRAME_COUNT = {"FLAC", "OGG", "WAV", "WAVEX", "AIFF", "CAF", "W64", "RF64", "NIST", "AU", "VOC", "IRCAM"}
_HIRES_SUBTYPES = {"PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ALAC_24", "ALAC_32", "DPCM_16"}


# audio probing and cutting
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    frames: int
    samplerate: int
    channels: int
    format: str
    subtype: str
    size: int


class AudioProblem(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


def probe(path: Path) -> FileInfo:
    """Frames, rate, channels of an audio file; exact frame count (decodes formats like MP3)."""
    try:
        st = path.stat()
    except FileNotFoundError as e:
        raise AudioProblem(AUDIO_MISSING, f"audio file {str(path)!r} does not exist") from e
    except OSError as e:
        raise AudioProblem(AUDIO_UNREADABLE, f"{path}: {e.strerror or e}") from e
    if not path.is_file():
        raise AudioProblem(AUDIO_MISSING, f"{str(path)!r} is not a regular file")
    if st.st_size == 0:
        raise AudioProblem(AUDIO_EMPTY, f"{path}: file is 0 bytes")
    try:
        info = sf.info(str(path))
        frames = int(info.frames)
        if info.format not in EXACT_FRAME_COUNT and frames > 0:
            frames = 0
            with sf.SoundFile(str(path)) as f:
                for block in f.blocks(blocksize=1 << 16, dtype="int16", always_2d=True):
                    frames += block.shape[0]
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as e:
        raise AudioProblem(AUDIO_UNREADABLE, f"{path}: libsndfile cannot decode it ({e})") from e
    if frames <= 0 or info.samplerate <= 0:
        raise AudioProblem(AUDIO_EMPTY, f"{path}: no audio frames")
    return FileInfo(frames, int(info.samplerate), int(info.channels), info.format, info.subtype, st.st_size)


def cut_to_flac(src: Path, dest: Path, start_frame: int, n_frames: int, channels: tuple[int, ...] | None) -> int:
    """Write frames ``[start_frame, start_frame + n_frames)`` of ``src`` (the given channels) as FLAC.

    Bit-exact for 16-bit sources (read and written as int16); 24-bit PCM for higher-resolution
    sources. Written to a hidden temp name and renamed into place. Returns the frames written.
    """
    with sf.SoundFile(str(src)) as f:
        hires = f.subtype in _HIRES_SUBTYPES
        dtype = "int32" if hires else "int16"
        sr = f.samplerate
        if start_frame:
            f.seek(start_frame)
        data = f.read(n_frames, dtype=dtype, always_2d=True)
    if data.shape[0] != n_frames:
        raise AudioProblem(
            AUDIO_UNREADABLE, f"{src}: expected {n_frames} frames from frame {start_frame}, decoded {data.shape[0]}"
        )
    if channels is not None:
        data = np.ascontiguousarray(data[:, list(channels)])
    fmt, subtype = ("FLAC", "PCM_24" if hires else "PCM_16") if data.shape[1] <= 8 else ("WAV", "PCM_32" if hires else "PCM_16")
    tmp = dest.with_name(f".tmp-{dest.name}.{uuid.uuid4().hex[:8]}")
    try:
        sf.write(str(tmp), data, sr, format=fmt, subtype=subtype)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return int(data.shape[0])


def place_file(src: Path, dest: Path, mode: str) -> str:
    """Copy (or hard-link, with ``mode="link"``) ``src`` to ``dest`` via a temp name; returns what was done."""
    tmp = dest.with_name(f".tmp-{dest.name}.{uuid.uuid4().hex[:8]}")
    done = "copied"
    try:
        if mode == "link":
            try:
                os.link(src, tmp)
                done = "linked"
            except OSError:  # another filesystem, no permission, too many links: copy instead
                shutil.copyfile(src, tmp)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return done


# ---------------------------------------------------------------------------------

"""Builders for real landing-zone batches (real audio via numpy + soundfile) used by ingest/validate tests.

Why: the house rule is real parts, not mocks — every bad input here is an actual file
(a WAV cut in half, a text file named ``.wav``, 44.1 kHz stereo...) that ingest must decode
or reject with a precise reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float, sr: int = 16000, freq: float = 220.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A speech-like test signal: a tone plus a little noise (distinct per seed, so hashes differ)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    w = 0.3 * np.sin(2 * np.pi * (freq + 10 * seed) * t) + 0.01 * rng.standard_normal(n)
    w = w.astype(np.float32)
    if channels > 1:
        w = np.stack([w * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
    return w


def write_wav(path: Path, wave: np.ndarray, sr: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, sr, subtype="PCM_16")
    return path


def write_manifest(path: Path, entries: list[dict | bytes | str]) -> Path:
    """One JSON line per dict; ``bytes``/``str`` entries are written verbatim (to build broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for e in entries:
            if isinstance(e, dict):
                f.write(json.dumps(e).encode() + b"\n")
            elif isinstance(e, str):
                f.write(e.encode() + b"\n")
            else:
                f.write(e + b"\n")
    return path


def good_entries(batch_dir: Path, n: int, prefix: str = "g", seconds: float = 1.5, seed0: int = 0) -> list[dict]:
    """``n`` good utterances (16 kHz mono WAV) with plausible transcripts for their length."""
    texts = [
        "the quick brown fox jumps",
        "she sells sea shells today",
        "a cold wind blew over the hill",
        "we walked to the river bank",
        "the old man reads a book",
        "it's time to go home now",
    ]
    out = []
    for i in range(n):
        p = write_wav(batch_dir / "audio" / f"{prefix}{i}.wav", tone(seconds, seed=seed0 + i), 16000)
        out.append(
            {
                "id": f"{prefix}{i}",
                "audio_filepath": f"audio/{p.name}",
                "duration": seconds,
                "text": texts[i % len(texts)],
                "speaker": f"spk{i % 3}",
            }
        )
    return out


def build_bad_batch(landing: Path, batch: str = "week-001", n_good: int = 6) -> dict[str, str]:
    """A batch holding good rows plus one of every bad input; returns {row id or marker: expected reason}.

    Rows that have no id (broken lines) are keyed by their manifest line number ``L<n>``.
    """
    d = landing / batch
    a = d / "audio"
    entries: list[dict | bytes | str] = list(good_entries(d, n_good))
    expected: dict[str, str] = {}

    # truncated WAV: header says 2 s, half the bytes are there
    full = write_wav(a / "trunc_src.wav", tone(2.0, seed=50), 16000)
    data = full.read_bytes()
    (a / "trunc.wav").write_bytes(data[: len(data) // 2])
    full.unlink()
    entries.append({"id": "trunc", "audio_filepath": "audio/trunc.wav", "duration": 2.0, "text": "cut short"})
    expected["trunc"] = "audio_truncated"
    # zero-length audio (a valid WAV header with no frames)
    write_wav(a / "empty.wav", np.zeros(0, np.float32), 16000)
    entries.append({"id": "empty", "audio_filepath": "audio/empty.wav", "duration": 1.0, "text": "nothing here"})
    expected["empty"] = "audio_empty"
    # not audio at all
    (a / "notaudio.wav").write_text("this is a text file, not a wave file\n" * 20)
    entries.append({"id": "notaudio", "audio_filepath": "audio/notaudio.wav", "duration": 1.0, "text": "not audio"})
    expected["notaudio"] = "not_audio"
    # 8 kHz mono and 44.1 kHz stereo: resampled, accepted
    write_wav(a / "sr8k.wav", tone(1.5, sr=8000, seed=60), 8000)
    entries.append({"id": "sr8k", "audio_filepath": "audio/sr8k.wav", "duration": 1.5, "text": "eight kilohertz audio"})
    write_wav(a / "st44.wav", tone(1.5, sr=44100, channels=2, seed=61), 44100)
    entries.append({"id": "st44", "audio_filepath": "audio/st44.wav", "duration": 1.5, "text": "stereo audio here"})
    # empty transcript
    write_wav(a / "notext.wav", tone(1.0, seed=62), 16000)
    entries.append({"id": "notext", "audio_filepath": "audio/notext.wav", "duration": 1.0, "text": "  "})
    expected["notext"] = "empty_text"
    # a line that is not UTF-8 and one that is not JSON
    entries.append(b'{"id": "latin1", "audio_filepath": "audio/g0.wav", "text": "caf\xe9"}')
    expected[f"L{len(entries)}"] = "manifest_not_utf8"
    entries.append('{"id": "badjson", "audio_filepath": ')
    expected[f"L{len(entries)}"] = "manifest_bad_json"
    # long-form audio (25 s > max_train_duration_s 20 s): kept, flagged
    write_wav(a / "long.wav", tone(25.0, seed=63), 16000)
    entries.append(
        {"id": "long", "audio_filepath": "audio/long.wav", "duration": 25.0, "text": " ".join(["speech"] * 60)}
    )
    # a missing audio file
    entries.append({"id": "missing", "audio_filepath": "audio/nope.wav", "duration": 1.0, "text": "gone"})
    expected["missing"] = "audio_missing"
    # a duplicate id (same id as the first good row, other audio)
    write_wav(a / "dup.wav", tone(1.5, seed=64), 16000)
    entries.append({"id": "g0", "audio_filepath": "audio/dup.wav", "duration": 1.5, "text": "duplicate id here"})
    expected[f"L{len(entries)}"] = "duplicate_id"
    # paths escaping the landing zone: ../.., absolute outside, symlink out
    entries.append({"id": "esc1", "audio_filepath": "../../../../etc/passwd", "duration": 1.0, "text": "escape"})
    expected["esc1"] = "path_escape"
    entries.append({"id": "esc2", "audio_filepath": "/etc/passwd", "duration": 1.0, "text": "escape"})
    expected["esc2"] = "path_escape"
    outside = landing.parent / f"outside-{batch}.wav"
    write_wav(outside, tone(1.0, seed=65), 16000)
    link = a / "link.wav"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(outside, link)
    entries.append({"id": "esc3", "audio_filepath": "audio/link.wav", "duration": 1.0, "text": "escape"})
    expected["esc3"] = "path_escape"
    outside_dir = landing.parent / f"outside-dir-{batch}"
    write_wav(outside_dir / "x.wav", tone(1.0, seed=68), 16000)
    if not (d / "linkdir").is_symlink():
        os.symlink(outside_dir, d / "linkdir")
    entries.append({"id": "esc4", "audio_filepath": "linkdir/x.wav", "duration": 1.0, "text": "escape"})
    expected["esc4"] = "path_escape"
    # NaN and negative durations (json.dumps writes NaN, which Python's json reads back)
    write_wav(a / "nan.wav", tone(1.0, seed=66), 16000)
    entries.append({"id": "nandur", "audio_filepath": "audio/nan.wav", "duration": float("nan"), "text": "nan"})
    expected["nandur"] = "bad_duration"
    entries.append({"id": "negdur", "audio_filepath": "audio/nan.wav", "duration": -1.0, "text": "negative"})
    expected["negdur"] = "bad_duration"
    # declared duration that disagrees with the audio (says 5 s, is 1 s)
    write_wav(a / "mismatch.wav", tone(1.0, seed=67), 16000)
    entries.append({"id": "mismatch", "audio_filepath": "audio/mismatch.wav", "duration": 5.0, "text": "wrong length"})
    expected["mismatch"] = "duration_mismatch"
    write_manifest(d / "manifest.jsonl", entries)
    return expected

"""Helpers for the importer tests: the test utterance record and checks on a written batch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class Utt:
    id: str
    text: str
    speaker: str
    pcm: np.ndarray  # int16 samples
    sr: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / self.sr


def read_batch(batch_dir: Path) -> tuple[list[dict], dict]:
    """(manifest rows, import report) of a written batch."""
    rows = [json.loads(x) for x in (batch_dir / "manifest.jsonl").read_text().splitlines()]
    report = json.loads((batch_dir / "import_report.json").read_text())
    return rows, report


def audio_seconds(path: Path) -> float:
    """Decoded length (frames counted by decoding: exact for MP3 too)."""
    data, sr = sf.read(str(path), dtype="int16", always_2d=True)
    return data.shape[0] / sr


def check_rows(batch_dir: Path, rows: list[dict]) -> None:
    """Every row's audio exists inside the batch (or the landing zone) and its duration is the audio's."""
    for r in rows:
        f = batch_dir / r["audio_filepath"]
        assert f.is_file(), r
        assert abs(audio_seconds(f) - r["duration"]) < 1e-3, r


def reasons(report: dict) -> dict[str, str]:
    """{id or source: reason} of the report's rejected entries."""
    return {(e["id"] if e["id"] is not None else e["source"]): e["reason"] for e in report["rejected"]}


def make_librispeech(root: Path, utts: list[Utt], n: int = 4) -> dict[str, Utt]:
    """``root/dev-clean/<spk>/<chapter>/`` with FLAC + ``.trans.txt`` for the first ``n`` utterances.

    Speakers 19 and 26 alternate; returns {utterance id: source utterance}.
    """
    out = {}
    lines: dict[Path, list[str]] = {}
    for i, u in enumerate(utts[:n]):
        spk, chapter = ("19", "198") if i % 2 == 0 else ("26", "495")
        folder = root / "dev-clean" / spk / chapter
        folder.mkdir(parents=True, exist_ok=True)
        uid = f"{spk}-{chapter}-{i:04d}"
        sf.write(str(folder / f"{uid}.flac"), u.pcm, u.sr, subtype="PCM_16")
        lines.setdefault(folder / f"{spk}-{chapter}.trans.txt", []).append(f"{uid} {u.text.upper()}")
        out[uid] = u
    for path, ls in lines.items():
        path.write_text("\n".join(ls) + "\n")
    return out

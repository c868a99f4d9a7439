"""Hugging Face ``audiofolder`` layout: ``metadata.csv`` or ``metadata.jsonl`` + audio files in subfolders.

``SRC`` is the dataset folder; every ``metadata.csv`` / ``metadata.jsonl`` below it is read
(per-split folders ``train/metadata.csv`` are fine). ``file_name`` is relative to the metadata
file's folder. The transcript column is ``--text-column``, else the first of
``transcription``, ``text``, ``sentence`` present; the speaker column is ``--speaker-column``,
else the first of ``speaker_id``, ``speaker``, ``client_id`` present (none: no speaker). The id
is the ``id`` column when there is one, else the file's path under ``SRC`` without extension,
``/`` replaced by ``-`` (``train/0001.wav`` → ``train-0001``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline_tasks.landing.common import (
    AUDIO_MISSING,
    BAD_LINE,
    AudioRef,
    Candidate,
    LandingImportError,
    Parsed,
    clean_text,
    rel_where,
)

TEXT_COLUMNS = ("transcription", "text", "sentence")
SPEAKER_COLUMNS = ("speaker_id", "speaker", "client_id")
METADATA = ("metadata.csv", "metadata.jsonl")


def _rows(path: Path, out: Parsed, src: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """Column names and ``(where, row)`` pairs of one metadata file."""
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        if path.suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                cols = list(reader.fieldnames or [])
                for row in reader:
                    where = rel_where(path, src, reader.line_num)
                    if None in row or any(v is None for v in row.values()):
                        out.reject(where, None, BAD_LINE, "row has a different number of fields than the header")
                        continue
                    rows.append((where, row))
            return cols, rows
        cols_seen: dict[str, None] = {}
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = rel_where(path, src, i)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                out.reject(where, None, BAD_LINE, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                out.reject(where, None, BAD_LINE, "JSON line is not an object")
                continue
            cols_seen.update(dict.fromkeys(row))
            rows.append((where, row))
        return list(cols_seen), rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LandingImportError(f"audiofolder: cannot read {path}: {e}") from e


def _pick(cols: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, path: Path) -> str | None:
    if wanted:
        if wanted not in cols:
            raise LandingImportError(f"audiofolder: {path} has no {what} column {wanted!r} (columns: {cols})")
        return wanted
    return next((c for c in defaults if c in cols), None)


def read(src: Path, text_column: str | None = None, speaker_column: str | None = None) -> Parsed:
    src = Path(src)
    if not src.is_dir():
        raise LandingImportError(f"audiofolder: {src} is not a folder")
    metas = sorted(p for name in METADATA for p in src.rglob(name) if p.is_file())
    if not metas:
        raise LandingImportError(f"audiofolder: no {' or '.join(METADATA)} under {src}")
    out = Parsed()
    for meta in metas:
        cols, rows = _rows(meta, out, src)
        if not rows:
            continue
        if "file_name" not in cols:
            raise LandingImportError(f"audiofolder: {meta} has no 'file_name' column (columns: {cols})")
        tcol = _pick(cols, text_column, TEXT_COLUMNS, "transcript", meta)
        if tcol is None:
            raise LandingImportError(
                f"audiofolder: {meta} has none of the transcript columns {TEXT_COLUMNS}; name one with --text-column"
            )
        scol = _pick(cols, speaker_column, SPEAKER_COLUMNS, "speaker", meta)
        for where, row in rows:
            name = row.get("file_name")
            if not isinstance(name, str) or not name.strip():
                out.reject(where, None, BAD_LINE, "empty or missing 'file_name'")
                continue
            audio = meta.parent / name.strip()
            rel = rel_where(audio, src)
            given = row.get("id")
            uid = str(given) if given not in (None, "") else str(PurePosixPath(rel).with_suffix("")).replace("/", "-")
            if not audio.is_file():
                out.reject(where, uid, AUDIO_MISSING, f"audio file {name!r} does not exist")
                continue
            text = row.get(tcol)
            speaker = row.get(scol) if scol else None
            out.candidates.append(
                Candidate(
                    uid,
                    clean_text(text if isinstance(text, str) or text is None else json.dumps(text)),
                    str(speaker).strip() or None if speaker not in (None, "") else None,
                    AudioRef(audio),
                    where,
                )
            )
    return out

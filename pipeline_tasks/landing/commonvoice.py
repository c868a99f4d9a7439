"""Mozilla Common Voice release: ``<split>.tsv`` (``validated``, ``train``, ``dev``, ``test``...) + ``clips/*.mp3``.

``SRC`` is a language folder of a release (``cv-corpus-17.0/en``). Columns used: ``path``
(the clip's file name under ``clips/``; old releases omit the ``.mp3``), ``sentence`` (the
transcript) and ``client_id`` (the speaker: its first 16 hex characters, a hash already).
The id is the clip's file name without extension (``common_voice_en_123``). MP3 clips are
copied as they are: ingest decodes them through libsndfile (1.1 or newer reads MP3).
A row whose clip is missing is ``audio_missing``, a row with the wrong number of columns is
``bad_line``, an empty sentence is ``missing_transcript``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline_tasks.landing.common import (
    AUDIO_MISSING,
    BAD_LINE,
    AudioRef,
    Candidate,
    LandingImportError,
    Parsed,
    clean_text,
)

SPEAKER_CHARS = 16
REQUIRED = ("client_id", "path", "sentence")


def read(src: Path, split: str = "validated") -> Parsed:
    src = Path(src)
    tsv = src / (split if split.endswith(".tsv") else f"{split}.tsv")
    if not tsv.is_file():
        have = ", ".join(sorted(p.stem for p in src.glob("*.tsv"))) or "none"
        raise LandingImportError(f"commonvoice: no {tsv.name} in {src} (splits there: {have})")
    clips = src / "clips"
    out = Parsed()
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or any(c not in header for c in REQUIRED):
            raise LandingImportError(f"commonvoice: {tsv.name} lacks the columns {REQUIRED} (header: {header})")
        col = {name: header.index(name) for name in REQUIRED}
        for row in reader:
            line = reader.line_num
            where = f"{tsv.name}:{line}"
            if not any(x.strip() for x in row):
                continue
            if len(row) != len(header):
                out.reject(where, None, BAD_LINE, f"{len(row)} columns, the header has {len(header)}")
                continue
            name = row[col["path"]].strip()
            if not name:
                out.reject(where, None, BAD_LINE, "empty 'path'")
                continue
            audio = clips / name
            if not audio.exists() and not Path(name).suffix and (clips / f"{name}.mp3").exists():
                audio = clips / f"{name}.mp3"
            uid = Path(name).stem if Path(name).suffix else name
            if not audio.is_file():
                out.reject(where, uid, AUDIO_MISSING, f"clip {name!r} is not in clips/")
                continue
            client = row[col["client_id"]].strip()
            speaker = client[:SPEAKER_CHARS] or None
            out.candidates.append(Candidate(uid, clean_text(row[col["sentence"]]), speaker, AudioRef(audio), where))
    return out

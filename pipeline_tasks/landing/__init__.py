"""Importers: bring existing speech data sets into the landing zone as NeMo-style batches.

``asrflow landing import --format FORMAT SRC --batch NAME`` writes ``<landing>/<NAME>/``
holding ``manifest.jsonl`` (``id``, ``audio_filepath`` relative to the manifest, ``duration``
in seconds, the original ``text``, ``speaker``), the audio, and ``import_report.json`` (every
source entry that could not be mapped, with its reason). Formats: ``librispeech``,
``commonvoice``, ``kaldi``, ``lhotse``, ``audiofolder`` (one module each); the shared batch
writer is :mod:`pipeline_tasks.landing.common`.

Only local landing folders (or ``file://`` URLs) are written; for an object-store landing
zone, import into a local folder and copy the batch folder up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline_tasks.landing import audiofolder, commonvoice, kaldi, lhotse, librispeech
from pipeline_tasks.landing.common import (
    MANIFEST,
    REPORT,
    BatchExistsError,
    LandingImportError,
    Parsed,
    Rejected,
    check_glob,
    write_batch,
)

FORMATS = ("librispeech", "commonvoice", "kaldi", "lhotse", "audiofolder")

__all__ = [
    "FORMATS",
    "MANIFEST",
    "REPORT",
    "BatchExistsError",
    "LandingImportError",
    "import_batch",
    "parse",
    "resolve_landing",
]


def resolve_landing(url: str | os.PathLike[str]) -> Path:
    """A local landing folder from a path or ``file://`` URL; other fsspec URLs are refused."""
    s = str(url)
    if s.startswith("file://"):
        s = s[len("file://") :]
    elif "://" in s:
        raise LandingImportError(
            f"the landing zone {s!r} is a remote URL; `asrflow landing import` writes only to local folders: "
            "import into a local folder (--landing DIR), then copy the batch folder to the store "
            "(e.g. `aws s3 sync DIR/NAME s3://bucket/landing/NAME`)"
        )
    return Path(os.path.abspath(os.path.expanduser(s)))


def parse(
    fmt: str,
    src: Path,
    *,
    split: str = "validated",
    text_column: str | None = None,
    speaker_column: str | None = None,
) -> Parsed:
    """Read a source layout into candidates and rejections (no audio is touched yet)."""
    src = Path(src)
    if not src.exists():
        raise LandingImportError(f"source {src} does not exist")
    if fmt == "librispeech":
        return librispeech.read(src)
    if fmt == "commonvoice":
        return commonvoice.read(src, split=split)
    if fmt == "kaldi":
        return kaldi.read(src)
    if fmt == "lhotse":
        return lhotse.read(src)
    if fmt == "audiofolder":
        return audiofolder.read(src, text_column=text_column, speaker_column=speaker_column)
    raise LandingImportError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")


def _prefixed(parsed: Parsed, id_prefix: str, speaker_prefix: str) -> Parsed:
    if not id_prefix and not speaker_prefix:
        return parsed
    for c in parsed.candidates:
        c.id = id_prefix + c.id
        if c.speaker is not None:
            c.speaker = speaker_prefix + c.speaker
    parsed.rejected = [
        Rejected(r.where, None if r.id is None else id_prefix + r.id, r.reason, r.message) for r in parsed.rejected
    ]
    return parsed


def _jsonl_under(src: Path, manifest_glob: str) -> int:
    suffix = manifest_glob.rsplit("*", 1)[-1] or ".jsonl"
    if src.is_file():
        return int(src.name.endswith(suffix))
    return sum(1 for p in src.rglob(f"*{suffix}") if p.is_file())


def import_batch(
    fmt: str,
    src: str | os.PathLike[str],
    batch: str,
    landing: str | os.PathLike[str],
    *,
    mode: str = "copy",
    jobs: int = 0,
    split: str = "validated",
    text_column: str | None = None,
    speaker_column: str | None = None,
    id_prefix: str = "",
    speaker_prefix: str = "",
    manifest_glob: str = "**/*.jsonl",
) -> dict[str, Any]:
    """Import ``src`` (layout ``fmt``) as the landing batch ``batch``; returns the summary.

    ``mode``: ``copy`` (default) copies whole audio files; ``link`` hard-links them (a copy when
    that fails) and, for a ``src`` already inside the landing zone, points the manifest at the
    files where they are. Segments are always cut into their own FLAC files. ``jobs``: threads
    probing and writing audio (0 = all cores). ``id_prefix`` / ``speaker_prefix`` keep ids and
    speakers of different data sets apart (ingest keys utterances by id across every batch).
    """
    landing_dir = resolve_landing(landing)
    src_path = Path(os.path.abspath(os.path.expanduser(str(src))))
    notes = check_glob(manifest_glob, batch)
    parsed = _prefixed(
        parse(fmt, src_path, split=split, text_column=text_column, speaker_column=speaker_column), id_prefix, speaker_prefix
    )
    parsed.notes[:0] = notes
    real_src, real_landing = os.path.realpath(src_path), os.path.realpath(landing_dir)
    if real_src == real_landing or real_src.startswith(real_landing.rstrip("/") + "/"):
        n = _jsonl_under(src_path, manifest_glob)
        if n:
            parsed.notes.append(
                f"{src_path} lies inside the landing zone and holds {n} file(s) matching {manifest_glob!r}: "
                "ingest reads them as manifests too; move the source out of the landing zone"
            )
    jobs = jobs if jobs > 0 else (os.cpu_count() or 1)
    meta = {
        "format": fmt,
        "source": str(src_path),
        **({"split": split} if fmt == "commonvoice" else {}),
        **({"id_prefix": id_prefix} if id_prefix else {}),
        **({"speaker_prefix": speaker_prefix} if speaker_prefix else {}),
    }
    summary = write_batch(parsed, landing_dir, batch, mode=mode, jobs=jobs, meta=meta)
    summary["format"] = fmt
    summary["source"] = str(src_path)
    return summary

"""NeMo-style JSONL manifests: the one reader used by ingest, golden and ``asrflow transcribe``.

A manifest line is a JSON object with NeMo's field names (``audio_filepath``, ``duration``,
``text``; asrflow adds optional ``id`` and ``speaker``). :func:`parse_lines` turns bytes into
:class:`ManifestLine` records and never raises: a line that is not UTF-8, not JSON, or not an
object carries a machine ``reason`` and a readable ``message`` instead of a record, so ingest
can quarantine it and go on. :func:`iter_lines` streams a manifest from a file object with a
cap on the length of one line (a multi-GB line with no newline is one bad row, not an
out-of-memory kill). :func:`read_manifest` is the strict form for inputs a person points at
(the golden set, a manifest to transcribe): the first bad line is an error that names
``path:line``.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# a line longer than this is quarantined unread (ingest.max_manifest_line_bytes)
DEFAULT_MAX_LINE_BYTES = 1 << 20
_KEEP_OF_LONG_LINE = 1024  # bytes of an over-long line kept for the quarantine copy


class ManifestError(ValueError):
    """A manifest that cannot be used as a whole (strict reading)."""


@dataclass
class ManifestLine:
    line_no: int  # 1-based
    raw: bytes
    record: dict[str, Any] | None = None
    reason: str | None = None  # manifest_not_utf8 | manifest_bad_json | manifest_bad_row
    message: str | None = None


class LongLine(bytes):
    """The head of a manifest line longer than the cap (:func:`iter_lines`); ``size`` = its full length."""

    size: int = 0


def iter_lines(f: IO[bytes], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The lines of a binary stream (without ``\\n``), read ``chunk`` bytes at a time. A line
    longer than ``max_line_bytes`` is not kept in memory: it comes back as a :class:`LongLine`
    holding its first bytes, and the rest of it is skipped."""
    buf = bytearray()
    long: LongLine | None = None
    long_size = 0
    while True:
        data = f.read(chunk)
        if not data:
            break
        start = 0
        while True:
            nl = data.find(b"\n", start)
            piece = data[start:] if nl < 0 else data[start:nl]
            if long is not None:
                long_size += len(piece)
            else:
                buf += piece
                if len(buf) > max_line_bytes:
                    long = LongLine(bytes(buf[:_KEEP_OF_LONG_LINE]))
                    long_size = len(buf)
                    buf.clear()
            if nl < 0:
                break
            if long is not None:
                long.size = long_size
                yield long
                long = None
            else:
                yield bytes(buf)
                buf.clear()
            start = nl + 1
    if long is not None:
        long.size = long_size
        yield long
    elif buf:
        yield bytes(buf)


def _parse_one(i: int, raw: bytes) -> ManifestLine:
    out = ManifestLine(i, raw)
    if isinstance(raw, LongLine):
        out.reason, out.message = "manifest_bad_row", f"line {i} is {raw.size} bytes long (longer than the line cap)"
        return out
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        out.reason, out.message = "manifest_not_utf8", f"line {i} is not valid UTF-8 ({e.reason} at byte {e.start})"
        return out
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        out.reason, out.message = "manifest_bad_json", f"line {i} is not valid JSON ({e.msg} at column {e.colno})"
        return out
    except (RecursionError, ValueError) as e:  # nesting too deep, integers over Python's digit limit
        out.reason, out.message = "manifest_bad_row", f"line {i} cannot be parsed: {type(e).__name__}: {e}"[:500]
        return out
    if not isinstance(rec, dict):
        out.reason, out.message = "manifest_bad_json", f"line {i} is JSON but not an object"
        return out
    out.record = rec
    return out


def parse_lines(lines: Iterable[bytes]) -> Iterator[ManifestLine]:
    """Every non-blank line as a :class:`ManifestLine` (1-based line numbers); never raises."""
    for i, raw in enumerate(lines, start=1):
        if isinstance(raw, LongLine):
            yield _parse_one(i, raw)
            continue
        raw = raw.rstrip(b"\r\n")
        if raw.strip():
            yield _parse_one(i, raw)


def split_lines(data: bytes) -> Iterator[bytes]:
    return iter(data.split(b"\n"))


def read_manifest(
    path: str | os.PathLike[str], required: tuple[str, ...] = ("audio_filepath",)
) -> list[dict[str, Any]]:
    """A manifest's records, strictly: the first unusable line raises :class:`ManifestError`.

    Each record gets ``_line`` (1-based), ``_source`` (``path:line``) and ``_abs_path`` (its
    ``audio_filepath`` made absolute against the manifest's folder).
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for ml in parse_lines(f):
            if ml.record is None:
                raise ManifestError(f"{path}:{ml.line_no}: {ml.message}")
            missing = [k for k in required if k not in ml.record]
            if missing:
                raise ManifestError(f"{path}:{ml.line_no}: needs {' and '.join(repr(k) for k in required)}")
            rec = ml.record
            ap = Path(str(rec.get("audio_filepath", ""))).expanduser()
            rec["_line"] = ml.line_no
            rec["_source"] = f"{path}:{ml.line_no}"
            rec["_abs_path"] = str(ap if ap.is_absolute() else path.parent / ap)
            rows.append(rec)
    return rows


def batch_of(rel_manifest_path: str, landing_root: str) -> str:
    """The landing batch a manifest belongs to: its folder's name (``week-003/manifest.jsonl`` →
    ``week-003``), or the landing root's own name for a manifest at the top. Ingest records it on
    every row; ``asrflow status`` compares the landing zone's batches with the ingested ones."""
    parent = posixpath.dirname(rel_manifest_path)
    return posixpath.basename(parent) if parent not in ("", ".") else (posixpath.basename(landing_root.rstrip("/")) or "root")

"""The shared half of every importer: the batch writer and the report (audio probing and cutting: :mod:`.audio`).

An importer (one module per source format) only *parses*: it turns a source layout into
:class:`Candidate` utterances (id, original transcript, speaker, an :class:`AudioRef` naming a
source file and optionally a segment of it) plus :class:`Rejected` entries for whatever cannot
be mapped. :func:`write_batch` does the rest, the same way for every format:

1. drops repeated ids (``duplicate_id``) and candidates without a transcript;
2. probes every distinct source file once (libsndfile header; formats whose header frame count
   is only an estimate, such as MP3, are decoded to count frames exactly), checks segment
   bounds and plans each utterance: the whole file is *copied* (or hard-linked with
   ``mode="link"``; referenced in place when it already lies inside the landing zone), a
   segment or a channel subset is *cut* into its own FLAC file;
3. if ``<landing>/<batch>/`` exists, compares: the same content is a no-op (``status:
   unchanged``), different content is refused (:class:`BatchExistsError`). Compared: the
   manifest byte for byte, the report's rejected entries, and the audio by the source files'
   size and mtime recorded in the hidden ``.import_state.json`` (by content where those changed);
4. otherwise writes the batch into a hidden staging folder ``<landing>/.import-<batch>-<uuid>/``
   (each audio file to a temp name + ``os.replace``; ``.import_state.json``, ``import_report.json``,
   then ``manifest.jsonl`` last) and renames the folder into place, so ingest never sees a
   half-written batch (it skips hidden folders).

Nothing is dropped silently: every entry that does not reach the manifest is in
``import_report.json`` (not ``.jsonl``: ingest reads every ``*.jsonl`` as a manifest) with a
machine ``reason`` and a readable ``message``, and counted in the returned summary.

Transcripts are kept as they are in the source (only surrounding whitespace is stripped);
ingest normalizes them. Plain arguments only: no Airflow, no step modules.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import soundfile as sf

from pipeline_tasks.landing.audio import (  # noqa: F401  (re-exported: the importers' API)
    AUDIO_EMPTY,
    AUDIO_MISSING,
    AUDIO_UNREADABLE,
    EXACT_FRAME_COUNT,
    AudioProblem,
    FileInfo,
    cut_to_flac,
    place_file,
    probe,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
REPORT = "import_report.json"
STATE = ".import_state.json"  # source sizes + mtimes at import time (hidden: ingest skips it)
AUDIO_DIR = "audio"
STAGING_PREFIX = ".import-"
# a segment may end this far past the end of its recording (rounding in the source's
# timestamps); it is clipped to the end. Further than this is ``bad_segment``.
SEGMENT_END_TOLERANCE_S = 0.05
# whole-file supervisions whose bounds match the file within this are copied, not cut
WHOLE_FILE_TOLERANCE_S = 1e-3
MODES = ("copy", "link")

# reason codes in the report
MISSING_TRANSCRIPT = "missing_transcript"
UNSUPPORTED_SOURCE = "unsupported_source"
BAD_SEGMENT = "bad_segment"
BAD_LINE = "bad_line"
DUPLICATE_ID = "duplicate_id"
UNKNOWN_RECORDING = "unknown_recording"


class LandingImportError(RuntimeError):
    """The import cannot run at all (bad arguments, unreadable source layout, unsupported landing URL)."""


class BatchExistsError(LandingImportError):
    """``<landing>/<batch>/`` exists and holds something other than what this import would write."""


# ---------------------------------------------------------------------------------
# what importers produce
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioRef:
    """A source audio file, or a part of it.

    ``start``/``duration`` in seconds (``None``/``None`` = the whole file; ``duration=None``
    with a ``start`` = to the end of the file). ``channels``: the file's channel indices to keep
    (``None`` = all).
    """

    path: Path
    start: float | None = None
    duration: float | None = None
    channels: tuple[int, ...] | None = None


@dataclass
class Candidate:
    """One utterance an importer found: it still has to pass the probe to reach the manifest."""

    id: str
    text: str | None
    speaker: str | None
    audio: AudioRef
    where: str  # where in the source it came from, e.g. "84/121123/84-121123.trans.txt:3"


@dataclass(frozen=True)
class Rejected:
    """An entry that could not be mapped: in ``import_report.json``, never silently dropped."""

    where: str
    id: str | None
    reason: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.where, "id": self.id, "reason": self.reason, "message": self.message}


@dataclass
class Parsed:
    """An importer's result: candidates in source order, rejections, and notes for the summary."""

    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def reject(self, where: str, id: str | None, reason: str, message: str) -> None:
        self.rejected.append(Rejected(where, id, reason, message))


def clean_text(text: str | None) -> str | None:
    """The source transcript with surrounding whitespace removed; ``None`` when there is none."""
    if text is None:
        return None
    text = str(text).strip()
    return text or None


def rel_where(path: Path, root: Path, line: int | None = None) -> str:
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = str(path)
    return f"{rel}:{line}" if line is not None else rel


# ---------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------


@dataclass
class Planned:
    cand: Candidate
    action: str  # "copy" | "inplace" | "cut"
    audio_filepath: str  # relative to the batch folder
    duration: float
    start_frame: int = 0
    n_frames: int = 0

    def line(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "id": self.cand.id,
            "audio_filepath": self.audio_filepath,
            "duration": round(self.duration, 6),
            "text": self.cand.text,
        }
        if self.cand.speaker is not None:
            rec["speaker"] = self.cand.speaker
        return rec


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class _Names:
    """File names under ``audio/`` derived from ids: safe characters, unique even case-insensitively."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def get(self, uid: str, ext: str) -> str:
        safe = _UNSAFE.sub("_", uid).lstrip(".") or "_"
        if safe != uid or len(safe) > 150:
            safe = f"{safe[:120]}-{hashlib.sha1(uid.encode()).hexdigest()[:10]}"
        name = safe + ext
        if name.lower() in self.used:
            name = f"{safe}-{hashlib.sha1(uid.encode()).hexdigest()[:10]}{ext}"
        self.used.add(name.lower())
        return name


def _inside(path: Path, root: Path) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def _ext_for(path: Path, info: FileInfo) -> str:
    ext = path.suffix.lower()
    if re.fullmatch(r"\.[a-z0-9]{1,5}", ext):
        return ext
    return "." + info.format.lower()


def _map(fn: Callable[[Any], Any], items: Iterable[Any], jobs: int) -> list[Any]:
    items = list(items)
    if jobs <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # libsndfile releases the GIL
        return list(pool.map(fn, items))


def _probe_safe(path: Path) -> FileInfo | AudioProblem:
    try:
        return probe(path)
    except AudioProblem as e:
        return e


def plan(
    cands: list[Candidate], rejected: list[Rejected], landing: Path, batch: str, mode: str, jobs: int
) -> tuple[list[Planned], dict[str, int]]:
    """Probe audio and decide, for every candidate, how it reaches the batch. Appends rejections."""
    seen: dict[str, str] = {}
    keep: list[Candidate] = []
    for c in cands:
        if c.id in seen:
            rejected.append(Rejected(c.where, c.id, DUPLICATE_ID, f"id {c.id!r} already used by {seen[c.id]}"))
            continue
        seen[c.id] = c.where
        if c.text is None:
            rejected.append(Rejected(c.where, c.id, MISSING_TRANSCRIPT, "no transcript for this utterance"))
            continue
        keep.append(c)
    files = sorted({c.audio.path for c in keep})
    log.info("landing import: probing %d audio files for %d utterances", len(files), len(keep))
    infos = dict(zip(files, _map(_probe_safe, files, jobs), strict=True))
    names = _Names()
    out: list[Planned] = []
    stats: Counter[str] = Counter()
    for c in keep:
        a = c.audio
        info = infos[a.path]
        if isinstance(info, AudioProblem):
            rejected.append(Rejected(c.where, c.id, info.reason, info.message))
            continue
        sr = info.samplerate
        chans = a.channels
        if chans is not None:
            bad = [ch for ch in chans if not 0 <= ch < info.channels]
            if bad or not chans:
                rejected.append(
                    Rejected(c.where, c.id, BAD_SEGMENT, f"channel(s) {list(chans)} not in {a.path.name} ({info.channels} channels)")
                )
                continue
            if tuple(chans) == tuple(range(info.channels)):
                chans = None
        start_f, stop_f = 0, info.frames
        file_s = info.frames / sr
        if a.start is not None or a.duration is not None:
            start = 0.0 if a.start is None else float(a.start)
            end = file_s if a.duration is None else start + float(a.duration)
            msg = None
            if not (math.isfinite(start) and math.isfinite(end)):
                msg = f"segment bounds {a.start!r}+{a.duration!r} are not finite numbers"
            elif start < 0:
                msg = f"segment starts at {start:.3f}s, before the start of the recording"
            elif end <= start:
                msg = f"segment [{start:.3f}s, {end:.3f}s] is empty or reversed"
            elif start >= file_s:
                msg = f"segment starts at {start:.3f}s but {a.path.name} is only {file_s:.3f}s long"
            elif end > file_s + SEGMENT_END_TOLERANCE_S:
                msg = f"segment ends at {end:.3f}s but {a.path.name} is only {file_s:.3f}s long"
            if msg:
                rejected.append(Rejected(c.where, c.id, BAD_SEGMENT, msg))
                continue
            if end > file_s:
                stats["segments_clipped_to_end"] += 1
            start_f = int(round(start * sr))
            stop_f = min(int(round(end * sr)), info.frames)
            if abs(start_f) <= WHOLE_FILE_TOLERANCE_S * sr and abs(info.frames - stop_f) <= WHOLE_FILE_TOLERANCE_S * sr:
                start_f, stop_f = 0, info.frames  # the segment is the whole file
            if stop_f <= start_f:
                rejected.append(Rejected(c.where, c.id, BAD_SEGMENT, "segment is shorter than one sample"))
                continue
        if (start_f, stop_f) == (0, info.frames) and chans is None:
            if mode == "link" and _inside(a.path, landing):
                rel = os.path.relpath(os.path.realpath(a.path), os.path.realpath(landing) + "/" + batch)
                out.append(Planned(c, "inplace", PurePosixPath(*Path(rel).parts).as_posix(), file_s))
            else:
                name = names.get(c.id, _ext_for(a.path, info))
                out.append(Planned(c, "copy", f"{AUDIO_DIR}/{name}", file_s))
        else:
            n_out = len(chans) if chans is not None else info.channels
            name = names.get(c.id, ".flac" if n_out <= 8 else ".wav")  # FLAC holds up to 8 channels
            out.append(Planned(c, "cut", f"{AUDIO_DIR}/{name}", (stop_f - start_f) / sr, start_f, stop_f - start_f))
    return out, dict(stats)


# ---------------------------------------------------------------------------------
# the batch writer
# ---------------------------------------------------------------------------------


def _manifest_bytes(items: list[Planned]) -> bytes:
    return b"".join(json.dumps(p.line(), ensure_ascii=False).encode() + b"\n" for p in items)


def _report_doc(meta: dict[str, Any], n_entries: int, items: list[Planned], rejected: list[Rejected]) -> dict[str, Any]:
    return {
        **meta,
        "n_entries": n_entries,
        "n_imported": len(items),
        "n_rejected": len(rejected),
        "reasons": dict(sorted(Counter(r.reason for r in rejected).items())),
        "rejected": [r.as_dict() for r in rejected],
    }


def _report_bytes(doc: dict[str, Any]) -> bytes:
    """Valid JSON, one rejected entry per line (grep-able, diff-able)."""
    head = {k: v for k, v in doc.items() if k != "rejected"}
    lines = ["  " + json.dumps(r, ensure_ascii=False) for r in doc["rejected"]]
    body = json.dumps(head, indent=1, ensure_ascii=False)[:-2]  # drop the closing "\n}"
    rej = "[\n" + ",\n".join(lines) + "\n ]" if lines else "[]"
    return (body + ',\n "rejected": ' + rej + "\n}\n").encode()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _same_audio(p: Planned, f: Path, state: dict[str, Any]) -> bool:
    """Whether the batch's file ``f`` is what this import would write for ``p``.

    Cheap when the source is untouched since the import (same size and mtime as recorded in
    ``.import_state.json``); otherwise compared by content (bytes for copies, samples for cuts).
    """
    src = p.cand.audio.path
    if p.action == "inplace":
        return True
    try:
        if state.get(p.audio_filepath) == _stat_key(src):
            return True
        if p.action == "copy":
            return os.path.samefile(src, f) or filecmp.cmp(src, f, shallow=False)
        with tempfile.TemporaryDirectory(prefix="asrflow-import-") as tmp:
            fresh = Path(tmp) / f.name
            cut_to_flac(src, fresh, p.start_frame, p.n_frames, p.cand.audio.channels)
            return np.array_equal(sf.read(str(fresh), dtype="int32")[0], sf.read(str(f), dtype="int32")[0])
    except (OSError, AudioProblem, sf.LibsndfileError, RuntimeError, ValueError):
        return False


def _same_batch(batch_dir: Path, manifest: bytes, report: dict[str, Any], items: list[Planned]) -> str | None:
    """None when ``batch_dir`` already holds exactly this import; else why not."""
    mpath = batch_dir / MANIFEST
    if not mpath.is_file():
        return f"it has no {MANIFEST}"
    old = mpath.read_bytes()
    if old != manifest:
        old_lines, new_lines = old.splitlines(), manifest.splitlines()
        for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=False), start=1):
            if a != b:
                return f"{MANIFEST} differs at line {i}"
        return f"{MANIFEST} has {len(old_lines)} lines, this import writes {len(new_lines)}"
    try:
        old_report = json.loads((batch_dir / REPORT).read_text())
    except (OSError, ValueError):
        return f"its {REPORT} is missing or unreadable"
    if old_report.get("rejected") != report["rejected"]:
        return f"its {REPORT} lists other rejected entries"
    try:
        state = json.loads((batch_dir / STATE).read_text()).get("sources", {})
    except (OSError, ValueError, AttributeError):
        state = {}
    for p in items:
        f = batch_dir / p.audio_filepath
        if not f.is_file():
            return f"{p.audio_filepath} is missing"
        if not _same_audio(p, f, state):
            return f"{p.audio_filepath} differs from its source {p.cand.audio.path}"
    return None


def _write_items(
    stage: Path, items: list[Planned], mode: str, jobs: int, rejected: list[Rejected]
) -> tuple[list[Planned], Counter, dict[str, list[int]]]:
    (stage / AUDIO_DIR).mkdir(parents=True, exist_ok=True)

    def one(p: Planned) -> tuple[str, list[int] | None] | AudioProblem:
        try:
            if p.action == "inplace":
                return "in_place", None
            src, dest = p.cand.audio.path, stage / p.audio_filepath
            key = _stat_key(src)  # before reading: a change while importing shows up on the next compare
            if p.action == "copy":
                return place_file(src, dest, mode), key
            cut_to_flac(src, dest, p.start_frame, p.n_frames, p.cand.audio.channels)
            return "cut", key
        except AudioProblem as e:
            return e
        except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as e:
            return AudioProblem(AUDIO_UNREADABLE, f"{p.cand.audio.path}: {type(e).__name__}: {e}")

    done: Counter[str] = Counter()
    ok: list[Planned] = []
    state: dict[str, list[int]] = {}
    for p, res in zip(items, _map(one, items, jobs), strict=True):
        if isinstance(res, AudioProblem):
            rejected.append(Rejected(p.cand.where, p.cand.id, res.reason, res.message))
        else:
            done[res[0]] += 1
            ok.append(p)
            if res[1] is not None:
                state[p.audio_filepath] = res[1]
    return ok, done, state


def check_batch_name(batch: str) -> None:
    if not batch or batch in (".", "..") or batch.startswith(".") or not re.fullmatch(r"[A-Za-z0-9._=+-]+", batch):
        raise LandingImportError(
            f"batch name {batch!r} is not usable: use letters, digits and . _ = + - (not starting with '.'), no slashes"
        )


def check_glob(manifest_glob: str, batch: str) -> list[str]:
    """Make sure ingest reads the manifest and not the report (``ingest.manifest_glob``)."""

    def matches(rel: str) -> bool:
        pats = [manifest_glob] + ([manifest_glob[3:]] if manifest_glob.startswith("**/") else [])
        return any(fnmatch(rel, p) for p in pats) or PurePosixPath(rel).match(manifest_glob)

    if matches(f"{batch}/{REPORT}"):
        raise LandingImportError(
            f"ingest.manifest_glob {manifest_glob!r} matches {REPORT}: ingest would read the import report as a manifest"
        )
    if not matches(f"{batch}/{MANIFEST}"):
        return [f"ingest.manifest_glob {manifest_glob!r} does not match {batch}/{MANIFEST}: ingest will not read this batch"]
    return []


def write_batch(
    parsed: Parsed,
    landing: Path,
    batch: str,
    *,
    mode: str = "copy",
    jobs: int = 1,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``parsed`` as the landing batch ``landing/batch`` (see the module docstring); returns a summary."""
    if mode not in MODES:
        raise LandingImportError(f"mode must be one of {MODES}, got {mode!r}")
    check_batch_name(batch)
    landing.mkdir(parents=True, exist_ok=True)
    batch_dir = landing / batch
    if batch_dir.exists() and not batch_dir.is_dir():
        raise BatchExistsError(f"{batch_dir} exists and is not a folder")
    rejected = list(parsed.rejected)
    n_entries = len(parsed.candidates) + len(parsed.rejected)
    items, stats = plan(parsed.candidates, rejected, landing, batch, mode, jobs)
    meta = dict(meta or {})
    meta["batch"] = batch

    def summary(status: str, items: list[Planned], rejected: list[Rejected], done: dict[str, int]) -> dict[str, Any]:
        return {
            "status": status,
            "batch": batch,
            "batch_dir": str(batch_dir),
            "manifest": str(batch_dir / MANIFEST),
            "report": str(batch_dir / REPORT),
            "n_entries": n_entries,
            "n_imported": len(items),
            "n_rejected": len(rejected),
            "rejected_reasons": dict(sorted(Counter(r.reason for r in rejected).items())),
            "hours": round(sum(p.duration for p in items) / 3600, 4),
            "n_speakers": len({p.cand.speaker for p in items if p.cand.speaker is not None}),
            "audio": dict(sorted(done.items())),
            **({"segments_clipped_to_end": stats["segments_clipped_to_end"]} if stats.get("segments_clipped_to_end") else {}),
            "notes": list(parsed.notes),
        }

    manifest = _manifest_bytes(items)
    report = _report_doc(meta, n_entries, items, rejected)
    if batch_dir.exists() and any(batch_dir.iterdir()):
        why = _same_batch(batch_dir, manifest, report, items)
        if why is None:
            return summary("unchanged", items, rejected, {})
        # rows that fail only while writing (a file that decodes its header but not its frames)
        # are missing from the written manifest: if that explains the difference, rebuild to compare
        old_ids = {json.loads(x)["id"]: x for x in (batch_dir / MANIFEST).read_bytes().splitlines() if x.strip()} if (
            batch_dir / MANIFEST
        ).is_file() else None
        new_lines = {p.cand.id: json.dumps(p.line(), ensure_ascii=False).encode() for p in items}
        if old_ids is None or not all(new_lines.get(k) == v for k, v in old_ids.items()) or len(old_ids) == len(new_lines):
            raise BatchExistsError(
                f"batch {batch!r} already exists in {landing} with different content ({why}); "
                "choose another --batch name, or remove that folder if it should be replaced"
            )
    if not items:
        reasons = dict(Counter(r.reason for r in rejected))
        examples = "; ".join(f"{r.where}: {r.reason}: {r.message}" for r in rejected[:5])
        raise LandingImportError(f"nothing to import: all {n_entries} entries were rejected {reasons} (e.g. {examples})")

    stage = landing / f"{STAGING_PREFIX}{batch}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        items, done, state = _write_items(stage, items, mode, jobs, rejected)
        manifest = _manifest_bytes(items)
        report = _report_doc(meta, n_entries, items, rejected)
        (stage / STATE).write_text(json.dumps({"sources": state}, sort_keys=True) + "\n")
        (stage / REPORT).write_bytes(_report_bytes(report))
        (stage / MANIFEST).write_bytes(manifest)  # last: a folder with a manifest is complete
        if batch_dir.exists() and any(batch_dir.iterdir()):
            why = _same_batch(batch_dir, manifest, report, items)
            if why is None:
                return summary("unchanged", items, rejected, {})
            raise BatchExistsError(
                f"batch {batch!r} already exists in {landing} with different content ({why}); "
                "choose another --batch name, or remove that folder if it should be replaced"
            )
        try:
            os.replace(stage, batch_dir)  # an empty folder of that name is replaced; a full one is not
        except OSError as e:  # another import of the same batch won the race: compare with its result
            why = _same_batch(batch_dir, manifest, report, items)
            if why is None:
                return summary("unchanged", items, rejected, {})
            raise BatchExistsError(f"batch {batch!r} appeared in {landing} while importing, with different content ({why})") from e
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    log.info("landing import: wrote %s (%d utterances, %d rejected)", batch_dir, len(items), len(rejected))
    return summary("written", items, rejected, dict(done))

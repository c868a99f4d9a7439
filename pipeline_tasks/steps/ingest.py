"""The ``ingest`` step: landing zone → versioned 16 kHz mono FLAC snapshot + utterance manifest.

What it does, for every ``*.jsonl`` manifest in the landing zone (a folder or any fsspec
URL: ``file://``, ``memory://``, ``s3://``…; NeMo fields ``audio_filepath``, ``duration``,
``text``, optional ``id`` and ``speaker``; batch name = the manifest's parent folder):

1. parses each line (not UTF-8 / not JSON / missing fields / NaN or negative duration →
   quarantined), normalizes the transcript (:func:`model_code.text.normalize_text`;
   digits are spelled out by default), resolves the audio path and refuses any path
   that leaves the landing zone (``../``, absolute paths elsewhere, symlinks out of it);
2. decodes the audio on all cores (a process pool), downmixes, resamples to 16 kHz
   (8 kHz and 44.1 kHz stereo are resampled, not rejected), checks the declared
   duration against the decoded one, and stores it as FLAC in the batch's content-addressed
   raw store ``<workspace>/raw/<batch>/<h[:2]>/<h>.flac`` (``h`` = sha256 of the int16 PCM;
   an existing file is never rewritten; a workspace made before per-batch folders keeps
   ``raw/<h[:2]>/<h>.flac``);
3. merges the new rows into the cumulative manifest ``<workspace>/manifests/utterances.parquet``
   (every utterance ingested so far, one row per id), then ``dvc add`` / git commit /
   tag ``snapshot-<md5[:12]>`` / ``dvc push`` — all under the workspace lock, so a
   concurrent ingest waits and then merges on top. Each ``raw/<batch>`` is its own DVC
   output: only the batches this run wrote to are added and pushed;
4. writes ``manifest.parquet`` (a copy of the cumulative manifest) and
   ``quarantine.parquet`` (every landing row that could not be ingested, with a machine
   ``reason`` and readable ``message``) into the step output.

No landing row can stop the batch (issue 13): every line ends as a row or a quarantine entry.
A line that is not JSON, too deeply nested, longer than ``ingest.max_manifest_line_bytes``, or
whose values crash a check (a 5,000-digit number, a NUL byte in a path) is quarantined as
``manifest_bad_row`` with the exception's message. Manifests are streamed, not read whole;
only regular files are read (a FIFO in the landing zone would block forever), and an
unreadable manifest or audio file is quarantined. Audio is checked from its header before it
is decoded (``validate.max_duration_s``, ``ingest.max_decoded_mb``, ``ingest.max_channels``,
``ingest.max_sample_rate``: a few KB of FLAC can declare hours of audio). Decode work is
submitted in bounded batches (at most ``ingest.decode_batch`` files in flight, so an ``s3://``
landing never holds every file in memory), and a decode worker that dies (killed for memory)
does not fail the batch: the files it may have held are retried one by one in a fresh
worker, and the one that kills it again is quarantined as ``audio_decoder_died``. The same
audio under two ids would land in both train and dev (the split hashes ids): the second one
is quarantined as ``duplicate_audio``.

Decoding uses a process pool (``ingest.jobs`` processes, 0 = all cores) when there are at least
``ingest.pool_min_items`` files; smaller batches decode in-process, since a spawned worker
must first import torch. The pool uses the ``spawn`` start method, so a script that calls
:func:`run` must guard its entry point with ``if __name__ == "__main__":`` (spawned workers
re-import the main module; an unguarded script would re-run ingest in each worker and wait
forever on the step lock).

Why this shape: the step key hashes the landing zone's *content* (manifest bytes, each
file's content hash), the ingest config and the workspace location, never a time, so a
rerun on the same landing zone returns the cached result; and if the cache is gone the
workspace dedup (ids already present with the same audio and text are not new) makes
the rerun create no new commit, no new tag and no duplicate rows.

Cost that follows the new data, not the history (issue 18): a landing manifest whose folder's
files all have the content hashes recorded when its rows were last ingested in full (none
quarantined; ``manifests/landed.json``, versioned with the manifest) is not parsed again, and
rows ingested before from the same bytes are not decoded again (``manifests/sources.parquet``).
An id in a new manifest that was ingested from such a manifest is a ``duplicate_id``: the first
manifest ingested keeps it. What still grows with the history, and why: the landing zone is
listed and stat'ed every run (the step key must see a changed file), and the cumulative manifest
is read and rewritten (one Parquet file; ~0.1 s per 100,000 rows). A bad row never stops
the batch: it is quarantined (a copy of the offending file or manifest line goes to
``paths.quarantine_dir/<batch>/``; the source is never moved or deleted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import posixpath
import shutil
import stat
import time
import uuid
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts.schema import QUARANTINE_SCHEMA, UTTERANCE_SCHEMA, conform
from model_code.audio import AudioDecodeError, load_audio, pcm16_hash, write_flac
from model_code.text import TextRejected
from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import (
    canonical_json,
    file_md5,
    run_step,
    sha256_hex,
    step_key,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline_tasks.records import IngestResult, StepInputs
from pipeline_tasks.services.dvc_store import (
    MANIFEST_DIR,
    MANIFEST_REL,
    RAW_DIR,
    DataWorkspace,
    raw_batch_dir,
)
from pipeline_tasks.services.manifests import ManifestLine, batch_of, iter_lines, parse_lines

log = logging.getLogger(__name__)

STEP = "ingest"
# 2: one numpy resampler (model_code.audio.resample) for ingest, golden and serving
# 3: header caps before decoding, duplicate_audio, manifest_bad_row for any row that crashes a check
# 4: manifests/sources.parquet; rows ingested before from the same landing bytes are not decoded again
# 5: raw/<batch>/ DVC outputs, manifests/landed.json (unchanged manifests are not parsed again)
CODE_VERSION = "5"
# what decoding produces (sources.parquet records it: a change re-decodes every row once)
DECODER_VERSION = "4"
# landing manifest (relative path) -> signature of its folder's files when all its rows were ingested
LANDED_REL = f"{MANIFEST_DIR}/landed.json"
# raw/<batch> folders an interrupted run may have written to but not added (under .dvc/tmp: not committed)
PENDING_REL = ".dvc/tmp/asrflow-ingest-pending.json"

# id -> the landing bytes it was decoded from (content hash), its audio hash and the decoder version:
# a later run skips an id whose landing file has the same content hash, without decoding it again
SOURCES_REL = f"{MANIFEST_DIR}/sources.parquet"
SOURCES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("content_id", pa.string(), nullable=False),
        pa.field("audio_hash", pa.string(), nullable=False),
        pa.field("decoder", pa.string(), nullable=False),
    ],
    metadata={"asrflow.schema": "ingest_sources", "asrflow.schema_version": "1"},
)


class LandingError(RuntimeError):
    """The landing zone itself is unusable (missing, unreadable): nothing can be ingested."""


# ---------------------------------------------------------------------------------
# landing zone access
# ---------------------------------------------------------------------------------


@dataclass
class Landing:
    """A landing zone: an fsspec filesystem and the root path inside it."""

    url: str
    fs: Any = field(init=False)
    root: str = field(init=False)
    content_ids: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") or "/"
        if not self.fs.exists(self.root):
            raise LandingError(f"landing zone {self.url!r} does not exist")

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def rel(self, path: str) -> str:
        return posixpath.relpath(path, self.root)

    def manifests(self, pattern: str) -> list[str]:
        found = self.fs.glob(posixpath.join(self.root, pattern))
        if pattern.startswith("**/"):  # '**' may or may not match zero folders, depending on fsspec
            found += self.fs.glob(posixpath.join(self.root, pattern[3:]))
        out = sorted({p for p in found if not any(part.startswith(".") for part in self.rel(p).split("/"))})
        # a manifest reached through a symlink that leaves the landing zone is not read
        return [p for p in out if self.inside(p) and self.fs.isfile(p)]

    def _files(self) -> list[tuple[str, dict[str, Any]]]:
        """Every file under the root with its fsspec info; on local disk symlinked folders
        are not descended into (a link to ``/`` must not make us walk the whole disk)."""
        if not self.is_local:
            return [(p, i) for p, i in sorted(self.fs.find(self.root, detail=True).items()) if i.get("type") == "file"]
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError as e:  # dangling symlink (or a file we may not even stat)
                    try:
                        out.append((p, {"type": "file", "size": None, "dangling": os.readlink(p)}))
                    except OSError:
                        out.append((p, {"type": "file", "size": None, "unreadable": type(e).__name__}))
                    continue
                if not stat.S_ISREG(st.st_mode):  # FIFO, socket, device: never opened (a FIFO blocks)
                    out.append((p, {"type": "other", "size": None, "special": _file_kind(st.st_mode)}))
                    continue
                out.append((p, {"type": "file", "size": st.st_size}))
        return out

    def inside(self, path: str) -> bool:
        """Whether ``path`` (already normalized) is inside the root, following symlinks on local disk."""
        root = self.root
        if not (path == root or path.startswith(root.rstrip("/") + "/")):
            return False
        if self.is_local:
            real_root = os.path.realpath(root)
            real = os.path.realpath(path)
            return real == real_root or real.startswith(real_root.rstrip("/") + "/")
        return True

    def content_id(self, path: str, info: dict[str, Any]) -> str:
        """A content hash for the step key: the store's checksum when it has one, else sha1 of the bytes."""
        for k in ("ETag", "etag", "md5Hash", "md5", "checksum"):
            if info.get(k):
                return f"{k}:{str(info[k]).strip(chr(34))}"
        if info.get("dangling") is not None:
            return "dangling:" + str(info["dangling"])
        if info.get("special") is not None:
            return "special:" + str(info["special"])
        if info.get("unreadable") is not None:
            return "unreadable:" + str(info["unreadable"])
        if self.is_local and not self.inside(path):
            return "link-out:" + os.path.realpath(path)
        h = hashlib.sha1()
        try:
            with self.fs.open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:  # unreadable: its rows are quarantined when they are read
            return f"unreadable:{type(e).__name__}:{info.get('size')}"
        return "sha1:" + h.hexdigest()

    def fingerprint(self, stat_cache: str | os.PathLike[str] | None = None) -> str:
        """sha256 over (relative path, size, content hash) of every file in the landing zone.

        Also fills :attr:`content_ids` (relative path -> content hash), which ingest uses to skip
        utterances it ingested before from the same bytes. With ``stat_cache`` (a JSON file; local
        landing zones only), a file whose (inode, size, mtime_ns, ctime_ns) are those recorded there
        is not read again: its recorded content hash is used (ctime cannot be set back by a
        writer, so changed bytes always change the stat). Without it every file is hashed, which
        reads the whole landing zone, history included, every week.
        """
        cache: dict[str, list] = {}
        if stat_cache is not None and self.is_local:
            try:
                loaded = json.loads(Path(stat_cache).read_text())
                if isinstance(loaded, dict) and loaded.get("root") == self.root:
                    cache = loaded.get("files") or {}
            except (OSError, ValueError):
                cache = {}
        new_cache: dict[str, list] = {}
        items = []
        self.content_ids = {}
        for path, info in self._files():
            rel = self.rel(path)
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            cid = None
            sig = None
            if stat_cache is not None and self.is_local and info.get("size") is not None and self.inside(path):
                try:
                    st = os.stat(path)
                    sig = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
                except OSError:
                    sig = None
                hit = cache.get(rel)
                if sig is not None and isinstance(hit, list) and len(hit) == 5 and hit[:4] == sig:
                    cid = hit[4]
            if cid is None:
                cid = self.content_id(path, info)
            if sig is not None and cid.startswith("sha1:"):
                new_cache[rel] = [*sig, cid]
            self.content_ids[rel] = cid
            items.append([rel, info.get("size"), cid])
        if stat_cache is not None and self.is_local and new_cache != cache:
            try:
                write_json_atomic(Path(stat_cache), {"root": self.root, "files": new_cache})
            except OSError as e:  # only a cache: the next run hashes again
                log.warning("ingest: could not write the landing stat cache %s: %s", stat_cache, e)
        return sha256_hex(json.dumps(items, sort_keys=True))

    def audio_content_id(self, path: str) -> str | None:
        """The content hash of a landing file seen by :meth:`fingerprint` (``None`` if it was not)."""
        return self.content_ids.get(self.rel(path))


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "chardev"),
                       (stat.S_ISBLK, "blockdev"), (stat.S_ISDIR, "dir")):
        if test(mode):
            return name
    return "other"


# ---------------------------------------------------------------------------------
# per-row records
# ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One landing manifest line on its way through ingest."""

    batch: str
    source: str  # <manifest path relative to the landing root>:<line number>
    manifest_path: str
    line_no: int
    line: bytes
    id: str | None = None
    audio_filepath: str | None = None
    audio_full: str | None = None  # resolved path in the landing fs
    declared_duration: float | None = None
    text_raw: str | None = None
    text: str | None = None
    speaker: str | None = None
    reason: str | None = None
    message: str | None = None
    decoded: dict[str, Any] | None = None
    skipped: bool = False  # ingested before from the same bytes: not decoded again

    def reject(self, reason: str, message: str) -> None:
        self.reason, self.message = reason, message


def _batch_name(landing: Landing, manifest_path: str) -> str:
    return batch_of(landing.rel(manifest_path), landing.root)


def _storable(value: str) -> str:
    """``value`` if it can be stored as UTF-8 (Parquet); raises ``ValueError`` for a lone surrogate."""
    value.encode("utf-8")  # UnicodeEncodeError is a ValueError
    return value


def _safe_text(value: Any) -> str | None:
    """Any value as a string that can always be stored (for quarantine records)."""
    if value is None:
        return None
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _short(value: Any, n: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def _parse_row(landing: Landing, row: Row, ml: ManifestLine, tcfg: Any) -> None:
    """Fill ``row`` from one parsed line, or reject it with a reason (may raise on hostile values:
    the caller quarantines those as ``manifest_bad_row``)."""
    i = ml.line_no
    if ml.record is None:
        row.reject(ml.reason or "manifest_bad_json", ml.message or f"line {i} is unusable")
        return
    rec = ml.record
    rid = rec.get("id")
    row.id = _storable(str(rid)) if rid not in (None, "") else hashlib.sha1(row.source.encode()).hexdigest()[:16]
    afp = rec.get("audio_filepath")
    if not isinstance(afp, str) or not afp:
        row.reject("manifest_missing_field", "'audio_filepath' is missing or not a string")
        return
    row.audio_filepath = _storable(afp)
    if rec.get("speaker") is not None:
        row.speaker = _storable(str(rec["speaker"]))
    if "text" not in rec:
        row.reject("manifest_missing_field", "'text' is missing")
        return
    row.text_raw = _storable(rec["text"] if isinstance(rec["text"], str) else json.dumps(rec["text"]))
    dur = rec.get("duration")
    if dur is not None:
        if isinstance(dur, bool) or not isinstance(dur, (int, float)):
            row.reject("bad_duration", f"declared duration {_short(dur)} is not a number")
            return
        if not math.isfinite(dur) or dur <= 0:
            row.reject("bad_duration", f"declared duration {_short(dur)} is not a finite positive number")
            return
        row.declared_duration = float(dur)  # OverflowError for a huge int: quarantined by the caller
    try:
        row.text = tcfg.normalize(rec["text"])
    except TextRejected as e:
        row.reject(e.reason, e.message)
        return
    _resolve_audio(landing, row)


def _parse_manifest(landing: Landing, manifest_path: str, tcfg: Any, max_line_bytes: int = 1 << 20) -> list[Row]:
    """Parse one manifest into rows, streaming it; each bad line becomes a rejected row, never an
    exception (an unreadable manifest is one rejected row, ``manifest_unreadable``)."""
    rel = landing.rel(manifest_path)
    batch = _batch_name(landing, manifest_path)
    rows: list[Row] = []
    last = 0
    try:
        with landing.fs.open(manifest_path, "rb") as f:
            for ml in parse_lines(iter_lines(f, max_line_bytes)):
                i = last = ml.line_no
                row = Row(batch=batch, source=f"{rel}:{i}", manifest_path=manifest_path, line_no=i, line=ml.raw)
                rows.append(row)
                try:
                    _parse_row(landing, row, ml, tcfg)
                except Exception as e:  # noqa: BLE001 - no value in a landing row may stop the batch
                    row.reason = None
                    row.reject("manifest_bad_row", f"line {i} cannot be checked: {type(e).__name__}: {e}"[:500])
    except OSError as e:
        row = Row(batch=batch, source=f"{rel}:{last + 1}", manifest_path=manifest_path, line_no=last + 1, line=b"")
        row.reject("manifest_unreadable", f"manifest {rel} could not be read after line {last}: {type(e).__name__}: {e}"[:500])
        rows.append(row)
    return rows


def _resolve_audio(landing: Landing, row: Row) -> None:
    """Resolve ``audio_filepath`` against the manifest's folder; reject escapes and missing files."""
    afp = row.audio_filepath or ""
    if "\x00" in afp:  # os.path and every filesystem call raise on it
        row.reject("manifest_bad_row", "audio_filepath contains a NUL byte")
        return
    if "://" in afp:
        row.reject("path_escape", f"audio_filepath {afp!r} is a URL; only paths inside the landing zone are read")
        return
    base = posixpath.dirname(row.manifest_path)
    full = posixpath.normpath(afp if afp.startswith("/") else posixpath.join(base, afp))
    if not landing.inside(full):
        row.reject("path_escape", f"audio_filepath {afp!r} resolves outside the landing zone")
        return
    if not landing.fs.exists(full):
        row.reject("audio_missing", f"audio file {afp!r} does not exist")
        return
    if not landing.fs.isfile(full):
        row.reject("audio_missing", f"audio file {afp!r} is not a regular file")
        return
    row.audio_full = full


# ---------------------------------------------------------------------------------
# decoding (runs in worker processes)
# ---------------------------------------------------------------------------------


def _init_worker() -> None:
    """One compute thread per worker process: the pool already uses every core. Decoding does not
    use torch, so it is not imported here (a spawned worker would pay seconds for it)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:  # pragma: no cover - only if something imported it anyway
        torch.set_num_threads(1)


def decode_item(task: dict[str, Any]) -> dict[str, Any]:
    """Decode one audio file, check its duration, store it as FLAC in the raw store.

    ``task``: ``src`` (local path or bytes), ``declared`` (seconds or None), ``target_sr``,
    ``workspace``, ``raw_dir`` (the store folder inside it, default ``raw``), ``tol_s``, ``tol_ratio``,
    ``caps`` (``load_audio``'s ``max_*`` header caps).
    Returns ``{"ok": True, ...metadata}`` or ``{"ok": False, "reason", "message"}``; never raises
    for bad audio.
    """
    src = task["src"]
    _fault(task)
    try:
        import io

        wave, orig_sr, orig_ch = load_audio(
            io.BytesIO(src) if isinstance(src, bytes) else src, task["target_sr"], **(task.get("caps") or {})
        )
    except AudioDecodeError as e:
        return {"ok": False, "reason": e.reason, "message": e.message}
    except Exception as e:  # a decoder bug must not take the batch down
        return {"ok": False, "reason": "audio_unreadable", "message": f"{type(e).__name__}: {e}"}
    sr = int(task["target_sr"])
    duration = wave.shape[0] / sr
    declared = task.get("declared")
    if declared is not None:
        tol = max(float(task["tol_s"]), float(task["tol_ratio"]) * duration)
        if abs(declared - duration) > tol:
            return {
                "ok": False,
                "reason": "duration_mismatch",
                "message": f"declared duration {declared:.3f}s but the audio is {duration:.3f}s (tolerance {tol:.3f}s)",
            }
    h = pcm16_hash(wave)
    rel = f"{task.get('raw_dir') or RAW_DIR}/{h[:2]}/{h}.flac"
    dest = Path(task["workspace"]) / rel
    stored = False
    if not dest.exists():
        write_flac(dest, wave, sr)
        stored = True
    return {
        "ok": True,
        "audio_hash": h,
        "audio_path": rel,
        "num_samples": int(wave.shape[0]),
        "duration_s": float(duration),
        "orig_sample_rate": int(orig_sr),
        "orig_channels": int(orig_ch),
        "stored": stored,
    }


FAULT_ENV = "ASRFLOW_INGEST_FAULT"
DECODER_DIED = "audio_decoder_died"


def _fault(task: dict[str, Any]) -> None:
    """Test hook: ``ASRFLOW_INGEST_FAULT=kill:<file name>`` SIGKILLs a *pool worker* when it is
    given that file, as the kernel's OOM killer would (never the main process)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith("kill:") or multiprocessing.parent_process() is None:
        return
    if isinstance(task.get("src"), str) and os.path.basename(task["src"]) == spec[len("kill:") :]:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _jobs(n: int) -> int:
    return n if n > 0 else max(1, os.cpu_count() or 1)


def _died(message: str) -> dict[str, Any]:
    return {"ok": False, "reason": DECODER_DIED, "message": message}


def _decode_pool(
    n: int, make_task: Callable[[int], dict[str, Any]], jobs: int, window: int
) -> dict[int, dict[str, Any]]:
    """Decode items ``0..n-1`` in a spawned process pool, at most ``window`` in flight.

    A worker that dies (``BrokenProcessPool``: killed for memory, a crash in libsndfile) does not
    fail the batch: the items that were in flight are retried one at a time in a fresh
    one-process pool, where the item that kills its worker again gets ``audio_decoder_died``;
    then the pool is rebuilt for the rest.
    """
    results: dict[int, dict[str, Any]] = {}
    queue = deque(range(n))

    def pool(workers: int, init: bool) -> ProcessPoolExecutor:
        # spawn: a forked child of a process that already ran torch threads can deadlock
        return ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker if init else None
        )

    def submit(ex: ProcessPoolExecutor, i: int):
        try:
            task = make_task(i)
        except Exception as e:  # noqa: BLE001 - reading the source failed: that item only
            results[i] = {"ok": False, "reason": "audio_unreadable", "message": f"{type(e).__name__}: {e}"[:500]}
            return None
        return ex.submit(decode_item, task)

    while queue:
        suspects: list[int] = []
        with pool(jobs, init=True) as ex:
            inflight: dict[Any, int] = {}
            broken = False
            while (queue or inflight) and not broken:
                while queue and len(inflight) < window and not broken:
                    i = queue.popleft()
                    try:
                        fut = submit(ex, i)
                    except BrokenProcessPool:
                        suspects.append(i)
                        broken = True
                        break
                    if fut is not None:
                        inflight[fut] = i
                if not inflight:
                    continue
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    i = inflight.pop(fut)
                    try:
                        results[i] = fut.result()
                    except BrokenProcessPool:
                        suspects.append(i)
                        broken = True
                    except Exception as e:  # noqa: BLE001 - e.g. a result that could not be pickled
                        results[i] = {"ok": False, "reason": "audio_unreadable", "message": f"{type(e).__name__}: {e}"[:500]}
            if broken:
                suspects.extend(inflight.values())
                ex.shutdown(wait=True, cancel_futures=True)
        if suspects:
            log.warning("ingest: a decode worker died; retrying %d file(s) one at a time", len(suspects))
            iso = pool(1, init=False)
            try:
                for i in sorted(set(suspects)):
                    fut = submit(iso, i)
                    if fut is None:
                        continue
                    try:
                        results[i] = fut.result()
                    except BrokenProcessPool:
                        results[i] = _died("the decoder process died on this file (killed for memory or crashed)")
                        iso.shutdown(wait=True)
                        iso = pool(1, init=False)
            finally:
                iso.shutdown(wait=True)
    return results


def _decode_all(
    landing: Landing, rows: list[Row], cfg: AsrflowConfig, workspace: Path, raw_dir: Callable[[str], str]
) -> None:
    todo = [r for r in rows if r.reason is None and not r.skipped]
    ic = cfg.ingest
    max_bytes = int(ic.max_decoded_mb * 2**20)
    caps = {
        "max_duration_s": cfg.validate_.max_duration_s,
        "max_decoded_bytes": max_bytes,
        "max_channels": ic.max_channels,
        "max_sample_rate": ic.max_sample_rate,
    }

    def task(r: Row) -> dict[str, Any]:
        # local files are opened by the worker; other stores are read here (a worker cannot
        # see e.g. this process's memory:// filesystem) and shipped as bytes, a window at a time
        src: str | bytes
        if landing.is_local:
            src = r.audio_full
        else:
            size = landing.fs.size(r.audio_full)
            if size is not None and size > 2 * max_bytes:  # bigger encoded than any allowed decode
                raise ValueError(f"{size} bytes: larger than ingest.max_decoded_mb allows")
            src = landing.fs.cat_file(r.audio_full)
        return {
            "src": src,
            "declared": r.declared_duration,
            "target_sr": ic.target_sample_rate,
            "workspace": str(workspace),
            "raw_dir": raw_dir(r.batch),
            "tol_s": ic.max_duration_mismatch_s,
            "tol_ratio": ic.max_duration_mismatch_ratio,
            "caps": caps,
        }

    def one(r: Row) -> dict[str, Any]:
        try:
            t = task(r)
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "reason": "audio_unreadable", "message": f"{type(e).__name__}: {e}"[:500]}
        return decode_item(t)

    jobs = min(_jobs(ic.jobs), len(todo))
    if jobs <= 1 or len(todo) < ic.pool_min_items:
        results = [one(r) for r in todo]
    else:
        window = ic.decode_batch or 4 * jobs
        by_index = _decode_pool(len(todo), lambda i: task(todo[i]), jobs, max(window, jobs))
        results = [by_index[i] for i in range(len(todo))]
    for r, res in zip(todo, results, strict=True):
        if res["ok"]:
            r.decoded = res
        else:
            r.reject(res["reason"], res["message"])


# ---------------------------------------------------------------------------------
# quarantine
# ---------------------------------------------------------------------------------

_AUDIO_REASONS_PREFIX = ("audio_", "not_audio", "duration_mismatch")


def _copy_to_quarantine(landing: Landing, row: Row, qdir: Path) -> str | None:
    """Copy the offending file (audio for audio problems, else the manifest line) under ``qdir/<batch>/``.

    Never copies anything from outside the landing zone and never overwrites an existing copy.
    """
    dest_dir = qdir / row.batch
    stem = posixpath.basename(row.manifest_path).rsplit(".", 1)[0]
    if row.audio_full and row.reason and row.reason.startswith(_AUDIO_REASONS_PREFIX) and _copyable(landing, row):
        name = f"{stem}-L{row.line_no}-{posixpath.basename(row.audio_full)}"
        dest = dest_dir / name
        if not dest.exists():
            dest_dir.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".tmp-{name}.{uuid.uuid4().hex}")
            with landing.fs.open(row.audio_full, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(tmp, dest)
        return str(dest)
    name = f"{stem}-L{row.line_no}.jsonl"
    dest = dest_dir / name
    if not dest.exists():
        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{name}.{uuid.uuid4().hex}")
        tmp.write_bytes(row.line + b"\n")
        os.replace(tmp, dest)
    return str(dest)


_MAX_QUARANTINE_COPY = 256 * 2**20  # a bigger offending file is recorded, not copied


def _copyable(landing: Landing, row: Row) -> bool:
    """A regular file of a sane size: a decompression bomb's source is small, a 50 GB file is not copied."""
    try:
        info = landing.fs.info(row.audio_full)
    except (OSError, ValueError):
        return False
    size = info.get("size")
    return info.get("type") == "file" and (size is None or size <= _MAX_QUARANTINE_COPY)


def _quarantine_table(rows: list[Row], landing: Landing, qdir: Path, copy: bool) -> pa.Table:
    recs = []
    for r in rows:
        qcopy = None
        if copy:
            try:
                qcopy = _copy_to_quarantine(landing, r, qdir)
            except (OSError, ValueError) as e:  # the quarantine record matters more than the copy
                log.warning("could not copy %s to quarantine: %s", _safe_text(r.source), e)
        recs.append(
            {
                "id": _safe_text(r.id),
                "batch": _safe_text(r.batch),
                "source": _safe_text(r.source),
                "audio_filepath": _safe_text(r.audio_filepath),
                "reason": r.reason,
                "message": _safe_text(r.message),
                "stage": "ingest",
                "quarantined_copy": qcopy,
            }
        )
    return pa.Table.from_pylist(recs, schema=QUARANTINE_SCHEMA)


# ---------------------------------------------------------------------------------
# the cumulative manifest
# ---------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike[str]) -> pa.Table:
    """Read an utterance manifest and conform it to :data:`UTTERANCE_SCHEMA`."""
    return conform(pq.read_table(path), UTTERANCE_SCHEMA)


def _candidates(existing: pa.Table | None, column: str, values: set[str], columns: list[str]) -> list[dict[str, Any]]:
    """Rows of ``existing`` whose ``column`` is in ``values`` (in manifest order), as dicts of ``columns``.

    A vectorized filter first, so only the rows that can matter become Python objects (the
    cumulative manifest grows every week; the rows a run looks at are its landing rows)."""
    if existing is None or existing.num_rows == 0 or not values:
        return []
    mask = pc.is_in(existing.column(column), value_set=pa.array(sorted(values), pa.string()))
    return existing.filter(mask).select(columns).to_pylist()


def _merge(existing: pa.Table | None, rows: list[Row], max_train_s: float, sample_rate: int) -> tuple[pa.Table, int]:
    """Append decoded rows to the cumulative manifest; an id already present with the same audio and
    text is not new, with different content it is a ``duplicate_id`` rejection; the same audio
    under a new id is ``duplicate_audio``. Existing rows are not touched, except ``long_form``,
    which follows the current ``max_train_s``."""
    decoded = [r for r in rows if r.reason is None and r.decoded is not None]
    cols = ["id", "audio_hash", "text", "source"]
    by_id = {rec["id"]: rec for rec in _candidates(existing, "id", {r.id for r in decoded}, cols)}
    by_audio: dict[str, dict[str, Any]] = {}
    for rec in _candidates(existing, "audio_hash", {r.decoded["audio_hash"] for r in decoded}, cols):
        by_audio.setdefault(rec["audio_hash"], rec)
    new: list[dict[str, Any]] = []
    for r in decoded:
        d = r.decoded
        prev = by_id.get(r.id)
        if prev is not None:
            if prev["audio_hash"] != d["audio_hash"] or prev["text"] != r.text:
                r.reject(
                    "duplicate_id",
                    f"id {r.id!r} was already ingested from {prev['source']} with different audio or text",
                )
            continue
        same = by_audio.get(d["audio_hash"])
        if same is not None:
            # the same audio under another id would land in train *and* dev (split hashes ids)
            r.reject(
                "duplicate_audio",
                f"the same audio (sha256 {d['audio_hash'][:12]}) was already ingested as id {same['id']!r} "
                f"from {same['source']}",
            )
            continue
        rec = {
            "id": r.id,
            "audio_hash": d["audio_hash"],
            "audio_path": d["audio_path"],
            "duration_s": d["duration_s"],
            "num_samples": d["num_samples"],
            "sample_rate": int(sample_rate),
            "orig_sample_rate": d["orig_sample_rate"],
            "orig_channels": d["orig_channels"],
            "text": r.text,
            "text_raw": r.text_raw,
            "speaker": r.speaker,
            "batch": r.batch,
            "source": r.source,
            "long_form": d["duration_s"] > max_train_s,
        }
        by_id[r.id] = rec
        by_audio[d["audio_hash"]] = rec
        new.append(rec)
    table = pa.Table.from_pylist(new, schema=UTTERANCE_SCHEMA)
    if existing is not None:
        table = pa.concat_tables([existing.cast(UTTERANCE_SCHEMA), table])
    i = table.schema.get_field_index("long_form")
    lf = pc.greater(table.column("duration_s"), pa.scalar(float(max_train_s)))
    table = table.set_column(i, UTTERANCE_SCHEMA.field("long_form"), lf.cast(pa.bool_()))
    return table, len(new)


def _read_sources(path: Path) -> pa.Table | None:
    if not path.exists():
        return None
    try:
        return conform(pq.read_table(path), SOURCES_SCHEMA)
    except (OSError, ValueError, pa.ArrowException) as e:  # only an optimisation: decode everything instead
        log.warning("ingest: ignoring unreadable %s (%s); every landing row is decoded", path, e)
        return None


_UNSTABLE_CONTENT_IDS = ("unreadable:", "dangling:", "special:", "link-out:")


def _skip_known(
    landing: Landing, rows: list[Row], existing: pa.Table | None, sources: pa.Table | None, decoder: str, ws: Path
) -> int:
    """Mark rows ingested before from the same landing bytes (``Row.skipped``), before decoding.

    A row is skipped when its id is in the cumulative manifest with the same normalized text, the
    ingest that stored it recorded (``sources.parquet``) the same content hash of the same landing
    file, the same decoder version and the same audio hash, and its raw FLAC is in the store.
    Decoding it again would give the same audio hash and text, i.e. the row would be "not new": the
    result is the same, without the decode. Any other row is decoded as before (a changed file under
    a known id still becomes ``duplicate_id``; quarantined rows are retried every run)."""
    todo = [r for r in rows if r.reason is None and r.audio_full is not None and r.id is not None]
    ids = {r.id for r in todo}
    if not ids or existing is None or sources is None:
        return 0
    prev = {rec["id"]: rec for rec in _candidates(existing, "id", ids, ["id", "audio_hash", "text", "audio_path"])}
    src = {rec["id"]: rec for rec in _candidates(sources, "id", ids, ["id", "content_id", "audio_hash", "decoder"])}
    n = 0
    for r in todo:
        p, s = prev.get(r.id), src.get(r.id)
        if p is None or s is None:
            continue
        cid = landing.audio_content_id(r.audio_full)
        if (
            cid
            and not cid.startswith(_UNSTABLE_CONTENT_IDS)
            and s["content_id"] == cid
            and s["decoder"] == decoder
            and s["audio_hash"] == p["audio_hash"]
            and p["text"] == r.text
            and (ws / p["audio_path"]).exists()
        ):
            r.skipped = True
            n += 1
    return n


def _update_sources(
    landing: Landing, sources: pa.Table | None, rows: list[Row], manifest: pa.Table, decoder: str
) -> pa.Table:
    """``sources`` plus one entry per row decoded in this run that is in the manifest (same id and
    audio hash), replacing an older entry of the same id."""
    recs = []
    for r in rows:
        if r.reason is not None or r.decoded is None or r.audio_full is None:
            continue
        cid = landing.audio_content_id(r.audio_full)
        if not cid or cid.startswith(_UNSTABLE_CONTENT_IDS):
            continue
        recs.append({"id": r.id, "content_id": cid, "audio_hash": r.decoded["audio_hash"], "decoder": decoder})
    if recs:  # only ids whose manifest row has this audio (a rejected duplicate was never merged)
        in_manifest = {
            (x["id"], x["audio_hash"])
            for x in _candidates(manifest, "id", {x["id"] for x in recs}, ["id", "audio_hash"])
        }
        recs = [x for x in recs if (x["id"], x["audio_hash"]) in in_manifest]
    new = pa.Table.from_pylist(recs, schema=SOURCES_SCHEMA)
    if sources is None:
        return new
    if new.num_rows:
        keep = pc.invert(pc.is_in(sources.column("id"), value_set=new.column("id")))
        sources = sources.filter(keep)
    return pa.concat_tables([sources.cast(SOURCES_SCHEMA), new])


# ---------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------


def _folder_signature(keys: list[str], content_ids: dict[str, str], folder: str) -> str | None:
    """sha256 over (relative path, content hash) of every landing file under ``folder`` (``keys``:
    the sorted relative paths); ``None`` for the landing root or when a content hash is not stable
    (an unreadable file, a dangling link...): such a folder's manifests are always parsed."""
    if folder in ("", "."):
        return None
    lo, hi = bisect_left(keys, folder + "/"), bisect_left(keys, folder + "0")  # "0" follows "/"
    items = [(k, content_ids[k]) for k in keys[lo:hi]]
    if any(cid.startswith(_UNSTABLE_CONTENT_IDS) for _, cid in items):
        return None
    return sha256_hex(json.dumps(items))


def _read_landed(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or damaged: every manifest is parsed (only an optimisation)
        return {}
    man = data.get("manifests") if isinstance(data, dict) else None
    return {k: v for k, v in man.items() if isinstance(v, dict)} if isinstance(man, dict) else {}


def _landed_entries(
    landing: Landing, manifests: list[str], rows: list[Row], sigs: dict[str, str | None],
    landed: dict[str, dict[str, Any]], kept: dict[str, dict[str, Any]], parse_key: str,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The ledger after this run. A parsed manifest gets an entry when every row of it is in the
    manifest now (none quarantined) and all its audio lies in its own folder (so the folder
    signature covers every byte its rows came from), else loses its entry. Entries of manifests
    not parsed stay, also when a batch was archived out of the landing zone: its rows stay in the
    manifest, and a ledger that followed the landing zone would change the snapshot with no data."""
    by_manifest: dict[str, list[Row]] = {}
    for r in rows:
        by_manifest.setdefault(landing.rel(r.manifest_path), []).append(r)
    out = dict(landed)
    for m in manifests:
        rel = landing.rel(m)
        if rel in kept:
            continue
        rs, sig, folder = by_manifest.get(rel, []), sigs.get(rel), posixpath.dirname(rel)
        if sig and rs and all(
            r.reason is None and r.audio_full is not None and landing.rel(r.audio_full).startswith(folder + "/")
            for r in rs
        ):
            out[rel] = {"signature": sig, "parse": parse_key, "rows": len(rs)}
        else:
            out.pop(rel, None)
    return dict(sorted(out.items()))


def _drop_orphans(rows: list[Row], table: pa.Table, ws: Path) -> int:
    """Delete raw files this run stored for rows that were then rejected (``duplicate_audio``,
    ``duplicate_id``) and that no manifest row points to, so the store holds only referenced audio."""
    cand = {r.decoded["audio_path"] for r in rows if r.reason is not None and r.decoded and r.decoded.get("stored")}
    if not cand:
        return 0
    used = {x["audio_path"] for x in _candidates(table, "audio_path", cand, ["audio_path"])}
    n = 0
    for rel in sorted(cand - used):
        f = ws / rel
        if f.exists():
            f.unlink()
            n += 1
            for d in (f.parent, f.parent.parent):  # raw/<batch>/<h[:2]>, raw/<batch>: when left empty
                if d != ws / RAW_DIR and d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
    return n


def _work(cfg: AsrflowConfig, landing: Landing, fingerprint: str, tmp: Path, fingerprint_s: float = 0.0) -> dict[str, Any]:
    t0 = time.monotonic()
    ic = cfg.ingest
    decoder = f"{DECODER_VERSION}:{ic.target_sample_rate}"
    parse_key = sha256_hex(canonical_json(
        {"text": ic.text, "max_line": ic.max_manifest_line_bytes, "decoder": decoder, "code": CODE_VERSION}
    ))[:16]  # fmt: skip
    ws = DataWorkspace(cfg.paths.data_workspace, cfg.paths.dvc_remote)
    manifests = landing.manifests(ic.manifest_glob)
    log.info("ingest: %d manifest(s) in %s", len(manifests), landing.url)
    if not manifests and not (ws.path / MANIFEST_REL).exists():
        # nothing landed and nothing ingested before: most likely a wrong landing URL
        raise LandingError(f"no manifests matching {ic.manifest_glob!r} in the landing zone {landing.url!r}")

    timings: dict[str, float] = {"fingerprint_s": fingerprint_s}
    t_wait = time.monotonic()
    with ws.lock(ic.lock_timeout_s):
        timings["lock_wait_s"] = time.monotonic() - t_wait
        t1 = time.monotonic()
        ws.ensure()
        (ws.path / RAW_DIR).mkdir(exist_ok=True)
        legacy = ws.legacy_raw()

        def raw_dir(batch: str) -> str:
            return RAW_DIR if legacy else raw_batch_dir(batch)

        manifest_path = ws.path / MANIFEST_REL
        sources_path = ws.path / SOURCES_REL
        existing_table = read_manifest(manifest_path) if manifest_path.exists() else None
        landed = _read_landed(ws.path / LANDED_REL) if existing_table is not None else {}
        keys = sorted(landing.content_ids)
        sigs: dict[str, str | None] = {}
        kept: dict[str, dict[str, Any]] = {}  # manifests not parsed: unchanged since fully ingested
        rows: list[Row] = []
        for m in manifests:
            rel = landing.rel(m)
            sigs[rel] = sig = _folder_signature(keys, landing.content_ids, posixpath.dirname(rel))
            entry = landed.get(rel)
            if sig and entry and entry.get("signature") == sig and entry.get("parse") == parse_key:
                kept[rel] = entry
                continue
            rows.extend(_parse_manifest(landing, m, ic.text, ic.max_manifest_line_bytes))
        # the same id twice in the landing zone: the first occurrence wins
        seen: dict[str, str] = {}
        for r in rows:
            if r.reason is None and r.id is not None:
                if r.id in seen:
                    r.reject("duplicate_id", f"id {r.id!r} already appears at {seen[r.id]}")
                else:
                    seen[r.id] = r.source
        if kept:  # ... and an id of a manifest that was not parsed again: that one was ingested first
            prior = {
                rec["id"]: rec["source"]
                for rec in _candidates(existing_table, "id", set(seen), ["id", "source"])
                if rec["source"].rpartition(":")[0] in kept
            }
            for r in rows:
                if r.reason is None and r.id in prior:
                    r.reject("duplicate_id", f"id {r.id!r} already appears at {prior[r.id]}")
        timings["parse_s"] = time.monotonic() - t1

        t1 = time.monotonic()
        sources = _read_sources(sources_path)
        n_skipped = _skip_known(landing, rows, existing_table, sources, decoder, ws.path)
        timings["skip_s"] = time.monotonic() - t1
        t1 = time.monotonic()
        pending_file = ws.path / PENDING_REL
        try:
            pending = set(json.loads(pending_file.read_text()))
        except (OSError, ValueError, TypeError):
            pending = set()
        touched = {raw_dir(r.batch) for r in rows if r.reason is None and not r.skipped}
        if not legacy and touched - pending:  # so a run killed after decoding still adds them next time
            write_json_atomic(pending_file, sorted(pending | touched))
        _decode_all(landing, rows, cfg, ws.path, raw_dir)
        timings["decode_s"] = time.monotonic() - t1
        t1 = time.monotonic()
        table, n_new = _merge(existing_table, rows, cfg.validate_.max_train_duration_s, ic.target_sample_rate)
        if existing_table is None or not existing_table.equals(table):
            write_parquet_atomic(table, manifest_path)
        new_sources = _update_sources(landing, sources, rows, table, decoder)
        if sources is None or not sources.equals(new_sources):
            write_parquet_atomic(new_sources, sources_path)
        new_landed = _landed_entries(landing, manifests, rows, sigs, landed, kept, parse_key)
        if new_landed != landed or not (ws.path / LANDED_REL).exists():
            write_json_atomic(ws.path / LANDED_REL, {"version": 1, "manifests": new_landed})
        n_orphans = _drop_orphans(rows, table, ws.path)
        timings["merge_s"] = time.monotonic() - t1
        t1 = time.monotonic()
        head_before = ws.head()
        if legacy:
            ws.add([RAW_DIR, MANIFEST_DIR])
        else:
            changed = sorted(d for d in pending | touched if (ws.path / d).is_dir() and any((ws.path / d).iterdir()))
            ws.add([*changed, MANIFEST_DIR])
        outputs = [*ws.raw_outputs(), MANIFEST_DIR]
        timings["dvc_add_s"] = time.monotonic() - t1
        t1 = time.monotonic()
        snapshot_md5 = ws.snapshot_md5(outputs)
        tag = f"snapshot-{snapshot_md5[:12]}"
        batches = sorted({r.batch for r in rows} | {batch_of(rel, landing.root) for rel in kept})
        ws.commit_tag_push(
            outputs,
            f"ingest: snapshot {snapshot_md5[:12]} ({n_new} new rows; batches {', '.join(batches) or '-'})",
            tag=tag,
            push=ic.dvc_push,
        )
        pending_file.unlink(missing_ok=True)
        commit = ws.head()
        timings["dvc_commit_push_s"] = time.monotonic() - t1
        shutil.copyfile(manifest_path, tmp / "manifest.parquet")

    bad = [r for r in rows if r.reason is not None]
    qtable = _quarantine_table(bad, landing, Path(cfg.paths.quarantine_dir), ic.copy_quarantined)
    pq.write_table(qtable, tmp / "quarantine.parquet")
    reasons = dict(sorted(Counter(r.reason for r in bad).items()))
    for r in bad:
        # the message may quote the transcript (personal data): only at DEBUG; it is in quarantine.parquet
        log.warning("ingest: quarantined %s (%s)", _safe_text(r.source), r.reason)
        log.debug("ingest: %s: %s", _safe_text(r.source), _safe_text(r.message))
    return {
        "manifest": "manifest.parquet",
        "manifest_md5": file_md5(tmp / "manifest.parquet"),
        "snapshot_md5": snapshot_md5,
        "dvc_tag": tag,
        "dvc_commit": commit,
        "new_commit": commit != head_before,
        "n_rows": table.num_rows,
        "n_new": n_new,
        "n_landing_rows": len(rows) + sum(int(e.get("rows") or 0) for e in kept.values()),
        "n_skipped": n_skipped,  # ingested before from the same landing bytes: not decoded again
        "n_manifests_unchanged": len(kept),  # fully ingested before and unchanged: not parsed again
        "n_orphans_removed": n_orphans,
        "quarantine": "quarantine.parquet",
        "n_quarantined": len(bad),
        "quarantine_reasons": reasons,
        "batches": batches,
        "workspace": str(ws.path),
        "landing_fingerprint": fingerprint,
        "wall_s": round(time.monotonic() - t0, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def run(cfg: AsrflowConfig, inputs: StepInputs | None = None, force: bool = False) -> IngestResult:
    """Ingest the landing zone (see the module docstring); keyed by the landing zone's content."""
    landing = Landing(cfg.paths.landing_url)
    t0 = time.monotonic()
    # the stat cache lives in the artifact root: a file whose stat is unchanged is not hashed again
    stat_cache = Path(cfg.root) / STEP / f".landing-stat-{sha256_hex(landing.url)[:12]}.json"
    fingerprint = landing.fingerprint(stat_cache if landing.is_local else None)
    fingerprint_s = time.monotonic() - t0
    key = step_key(
        STEP,
        {
            "ingest": cfg.ingest,
            "max_train_duration_s": cfg.validate_.max_train_duration_s,
            "workspace": cfg.paths.data_workspace,
            "dvc_remote": cfg.paths.dvc_remote,
            "quarantine_dir": cfg.paths.quarantine_dir,
        },
        {"landing": fingerprint},
        CODE_VERSION,
    )
    return run_step(cfg.root, STEP, key, lambda tmp: _work(cfg, landing, fingerprint, tmp, fingerprint_s), force=force)

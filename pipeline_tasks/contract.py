"""The step contract: what makes every asrflow step idempotent.

A step's *key* is a hash of its name, its config section, the content hashes of its
inputs (DVC md5s, upstream keys) and the step's code version. Its outputs live in
``<root>/<step>/<key>/``. They are produced in a temporary sibling folder; a
``_SUCCESS.json`` holding the step's result is written into that folder last, and the
folder is then renamed into place in one ``os.replace``. Hence:

* the final folder either does not exist or is complete (it appears with its
  ``_SUCCESS.json`` already inside);
* a step killed half-way leaves only a ``.tmp-*`` folder, which the next attempt
  removes (:func:`cleanup_stale`) before it redoes the work — but only when its owner is
  provably dead: its process is gone (same host), or its heartbeat file, touched every
  :data:`HEARTBEAT_S` seconds while the step runs, has not moved for :data:`DEAD_AFTER_S`
  (another host). A live run on another host is never swept away;
* every file and folder of the output is fsynced before ``_SUCCESS.json`` is written, so
  a power loss cannot leave a success marker over truncated weights or shards;
* a step whose ``_SUCCESS.json`` exists returns that result without recomputing.

Two processes running the same key serialize on a lock file, so the second one waits
(at most ``lock_timeout_s``, default :data:`LOCK_TIMEOUT_S`: a hung holder cannot block
every later run) and then returns the first one's result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from model_code.ds_launch import pid_alive  # one liveness check for heartbeats and launcher ranks

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
TMP_PREFIX = ".tmp-"
KEY_LEN = 16
HEARTBEAT_SUFFIX = ".heartbeat"
HEARTBEAT_S = float(os.environ.get("ASRFLOW_HEARTBEAT_S", "30"))  # a running step touches its heartbeat this often
DEAD_AFTER_S = float(os.environ.get("ASRFLOW_DEAD_AFTER_S", "900"))  # no heartbeat for this long: the owner is dead
# how long a second process waits for a step's lock (a hung holder must not block every later run)
LOCK_TIMEOUT_S = float(os.environ.get("ASRFLOW_STEP_LOCK_TIMEOUT_S", str(24 * 3600)))


class StepLockTimeout(TimeoutError):
    """Another process held a step's lock for longer than the timeout."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the hashing form of configs and records."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json", by_alias=True)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def sha256_hex(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


def step_key(step: str, config: Any, inputs: dict[str, Any], code_version: str) -> str:
    """Hash of (step name, config, input content hashes, code version), 16 hex chars."""
    material = {"step": step, "config": config, "inputs": inputs, "code_version": code_version}
    return sha256_hex(canonical_json(material))[:KEY_LEN]


def file_md5(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(table: Any, path: str | os.PathLike[str]) -> None:
    """Write a pyarrow table to ``path`` via a temp file in the same folder and ``os.replace``; the
    temp file is removed if the write fails."""
    import pyarrow.parquet as pq  # not at import time: the DAG files import this module

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_path(path: Path, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike[str]) -> int:
    """fsync every regular file and every folder under ``folder`` (the folder included); the
    number of entries synced. Symlinks are not followed."""
    folder = Path(folder)
    n = 0
    for dirpath, _dirnames, filenames in os.walk(folder, followlinks=False):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                _fsync_path(p, directory=False)
                n += 1
        _fsync_path(Path(dirpath), directory=True)
        n += 1
    return n


def read_success(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = Path(folder) / SUCCESS
    if not p.exists():
        return None
    return json.loads(p.read_text())


def heartbeat_path(tmp: Path) -> Path:
    """The heartbeat file of a temp folder: a sibling ``<tmp name>.heartbeat``."""
    return tmp.with_name(tmp.name + HEARTBEAT_SUFFIX)


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime
    except OSError:
        return None


def _owner_dead(p: Path, host: str, now: float, dead_after_s: float, max_age_s: float) -> bool:
    """Whether the run that owns temp entry ``p`` is provably dead (see the module docstring)."""
    parts = p.name[len(TMP_PREFIX) :].split("~")
    if len(parts) >= 4 and parts[1] == host:
        with contextlib.suppress(ValueError):
            return not pid_alive(int(parts[2].split(".")[0]))
    beat = _mtime(heartbeat_path(p))
    if beat is not None:  # the owner runs elsewhere: dead only when its heartbeat stopped
        return now - beat > dead_after_s
    mtime = _mtime(p)  # no heartbeat: written by an older version, or a temp file of a save
    return mtime is not None and now - mtime > max_age_s


def cleanup_stale(step_dir: Path, max_age_s: float = 6 * 3600, dead_after_s: float | None = None) -> list[Path]:
    """Remove temp folders left by killed attempts, and nothing that may still be alive.

    A temp folder records its owner (host, pid) in its name and has a heartbeat file beside
    it that the owner touches every :data:`HEARTBEAT_S` seconds. It is removed when its
    owner is on this host and its process no longer exists, or when its heartbeat has not
    moved for ``dead_after_s`` (default :data:`DEAD_AFTER_S`; owner on another host). A temp
    entry without a heartbeat (an older version's) is removed after ``max_age_s``.
    """
    removed: list[Path] = []
    if not step_dir.exists():
        return removed
    dead_after = DEAD_AFTER_S if dead_after_s is None else dead_after_s
    host = socket.gethostname()
    now = time.time()
    for p in step_dir.iterdir():
        if not p.name.startswith(TMP_PREFIX) or p.name.endswith(HEARTBEAT_SUFFIX):
            continue
        if _owner_dead(p, host, now, dead_after, max_age_s):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            heartbeat_path(p).unlink(missing_ok=True)
            removed.append(p)
    for hb in step_dir.glob(f"{TMP_PREFIX}*{HEARTBEAT_SUFFIX}"):  # heartbeats whose folder is gone
        owner = hb.with_name(hb.name[: -len(HEARTBEAT_SUFFIX)])
        if not owner.exists() and (_mtime(hb) or now) < now - dead_after:
            hb.unlink(missing_ok=True)
    return removed


class _Heartbeat:
    """Touches a file every ``interval`` seconds from a daemon thread while a step runs."""

    def __init__(self, path: Path, interval: float | None = None):
        self.path, self.interval = path, HEARTBEAT_S if interval is None else interval
        self._stop = threading.Event()
        self.path.touch()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class StepRun:
    """Where one keyed step writes: its final folder and the lock that serializes it."""

    root: Path
    step: str
    key: str

    @property
    def step_dir(self) -> Path:
        return self.root / self.step

    @property
    def final_dir(self) -> Path:
        return self.step_dir / self.key

    @property
    def lock_path(self) -> Path:
        return self.step_dir / f".lock-{self.key}"

    def done(self) -> dict[str, Any] | None:
        return read_success(self.final_dir)


@contextlib.contextmanager
def _tmp_dir(run: StepRun) -> Iterator[Path]:
    name = f"{TMP_PREFIX}{run.key}~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"
    tmp = run.step_dir / name
    beat = _Heartbeat(heartbeat_path(tmp))  # before the folder exists: no tmp folder without one
    try:
        tmp.mkdir(parents=True)
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        beat.stop()


def run_step(
    root: str | os.PathLike[str],
    step: str,
    key: str,
    fn: Callable[[Path], dict[str, Any]],
    force: bool = False,
    lock_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run ``fn(tmp_dir) -> result`` under the step contract and return the result.

    ``fn`` writes its outputs into ``tmp_dir`` and returns a small JSON-able record;
    paths in it should be relative to the output folder (the folder is renamed after
    ``fn`` returns). The returned record gets ``step``, ``key`` and ``output_dir``
    added. With ``force`` the step recomputes and atomically swaps the old output out.
    Waits at most ``lock_timeout_s`` (default :data:`LOCK_TIMEOUT_S`; negative: forever)
    for another process running the same key, then raises :class:`StepLockTimeout`.
    """
    run = StepRun(Path(root), step, key)
    run.step_dir.mkdir(parents=True, exist_ok=True)
    timeout = LOCK_TIMEOUT_S if lock_timeout_s is None else lock_timeout_s
    lock = FileLock(str(run.lock_path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout as e:
        raise StepLockTimeout(
            f"{step}/{key}: another process has held {run.lock_path} for more than {timeout:.0f}s "
            "(a hung attempt? it is released when that process ends)"
        ) from e
    with contextlib.ExitStack() as stack:
        stack.callback(lock.release)
        cleanup_stale(run.step_dir)
        if not force:
            prev = run.done()
            if prev is not None:
                log.info("%s/%s: already done, returning the published result", step, key)
                return prev
        with _tmp_dir(run) as tmp:
            result = dict(fn(tmp))
            result.update({"step": step, "key": key, "output_dir": str(run.final_dir)})
            json.dumps(result)  # fail here, not later, if the result is not JSON-able
            fsync_tree(tmp)  # the output is on disk before the marker that says it is complete
            write_json_atomic(tmp / SUCCESS, result)
            if run.final_dir.exists():
                # force: swap the old output out first, then drop it
                trash = run.step_dir / f"{TMP_PREFIX}old~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"
                os.replace(run.final_dir, trash)
                os.replace(tmp, run.final_dir)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, run.final_dir)
            _fsync_path(run.step_dir, directory=True)  # the rename itself is durable
        log.info("%s/%s: published %s", step, key, run.final_dir)
        return result


def resolve(result: dict[str, Any], rel: str) -> Path:
    """Absolute path of an output named relative to a step result's folder."""
    return Path(result["output_dir"]) / rel

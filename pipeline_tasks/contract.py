"""The step contract: what makes every asrflow step idempotent.

A step's *key* is a hash of its name, its config section, the content hashes of its
inputs (DVC md5s, upstream keys) and the step's code version. Its outputs live in
``<root>/<step>/<key>/``. They are produced in a temporary sibling folder; a
``_SUCCESS.json`` holding the step's result is written into that folder last, and the
folder is then renamed into place in one ``os.replace``. Hence:

* the final folder either does not exist or is complete (it appears with its
  ``_SUCCESS.json`` already inside);
* a step killed half-way leaves only a ``.tmp-*`` folder, which the next attempt
  removes (:func:`cleanup_stale`) before it redoes the work;
* a step whose ``_SUCCESS.json`` exists returns that result without recomputing.

Two processes running the same key serialize on a lock file, so the second one waits
and then returns the first one's result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
TMP_PREFIX = ".tmp-"
KEY_LEN = 16


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


def read_success(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = Path(folder) / SUCCESS
    if not p.exists():
        return None
    return json.loads(p.read_text())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(step_dir: Path, max_age_s: float = 6 * 3600) -> list[Path]:
    """Remove temp folders left by killed attempts.

    A temp folder records its owner (host, pid) in its name. It is stale when that
    process no longer exists on this host, or when it is older than ``max_age_s``
    (owner on another host: a worker that died elsewhere).
    """
    removed: list[Path] = []
    if not step_dir.exists():
        return removed
    host = socket.gethostname()
    now = time.time()
    for p in step_dir.iterdir():
        if not p.name.startswith(TMP_PREFIX):
            continue
        parts = p.name[len(TMP_PREFIX) :].split("~")
        stale = False
        if len(parts) >= 4 and parts[1] == host:
            with contextlib.suppress(ValueError):
                stale = not _pid_alive(int(parts[2]))
        if not stale:
            with contextlib.suppress(FileNotFoundError):
                stale = now - p.stat().st_mtime > max_age_s
        if stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run_step(
    root: str | os.PathLike[str],
    step: str,
    key: str,
    fn: Callable[[Path], dict[str, Any]],
    force: bool = False,
    lock_timeout_s: float = -1,
) -> dict[str, Any]:
    """Run ``fn(tmp_dir) -> result`` under the step contract and return the result.

    ``fn`` writes its outputs into ``tmp_dir`` and returns a small JSON-able record;
    paths in it should be relative to the output folder (the folder is renamed after
    ``fn`` returns). The returned record gets ``step``, ``key`` and ``output_dir``
    added. With ``force`` the step recomputes and atomically swaps the old output out.
    """
    run = StepRun(Path(root), step, key)
    run.step_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run.lock_path), timeout=lock_timeout_s):
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
            write_json_atomic(tmp / SUCCESS, result)
            if run.final_dir.exists():
                # force: swap the old output out first, then drop it
                trash = run.step_dir / f"{TMP_PREFIX}old~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"
                os.replace(run.final_dir, trash)
                os.replace(tmp, run.final_dir)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, run.final_dir)
        log.info("%s/%s: published %s", step, key, run.final_dir)
        return result


def resolve(result: dict[str, Any], rel: str) -> Path:
    """Absolute path of an output named relative to a step result's folder."""
    return Path(result["output_dir"]) / rel

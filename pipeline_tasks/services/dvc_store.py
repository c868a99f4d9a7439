"""The data workspace: a git + DVC repository that versions every ingested snapshot.

What: :class:`DataWorkspace` wraps one folder that is a git repo with DVC initialised
and a default DVC remote (a folder locally, ``s3://…`` in production). Steps put data
files into it, then call :meth:`DataWorkspace.add_commit_push` to ``dvc add`` them, commit
the ``.dvc`` pointer files to git, tag the commit and push the data to the remote.

Why: a model version must name the exact data it was trained on. The DVC md5 of a
tracked folder is a content hash of everything in it, the git tag names that snapshot,
and ``dvc pull`` at that tag restores the bytes anywhere the remote is reachable.

Idempotency: adding unchanged data leaves the ``.dvc`` files unchanged, so nothing is
staged and no commit is made; a tag that already exists is left alone (tags are named
after content hashes, so an existing tag already names identical data); ``dvc push``
uploads only what the remote lacks. Concurrency: :meth:`DataWorkspace.lock` is a file
lock *beside* the workspace (``<workspace>.lock``, so it exists before the repo does and
is never committed); a second ingest waits for the first rather than failing on DVC's
own lock.

Storage (issue 18): the DVC cache is *linked* to the workspace, not a second copy of every raw
file. :meth:`DataWorkspace.ensure` probes whether the filesystem can reflink (copy-on-write
clones: XFS, Btrfs, APFS) and sets ``cache.type`` in ``.dvc/config.local`` (a property of this
machine's filesystem, so not committed) to ``reflink`` if it can, else ``hardlink,symlink``.
``reflink,hardlink,symlink`` is not used: measured on ext4, DVC then left full copies. DVC makes
linked workspace files read-only (it "protects" them), so an edit in place cannot corrupt the
cache; asrflow never edits a tracked file in place (raw FLACs are written once, the manifest is
replaced atomically). A workspace created before this setting keeps its copies until
``dvc checkout --relink``.

The ``dvc`` and ``git`` command lines are used through ``subprocess`` (``dvc`` is taken
from the same environment as the running Python), which keeps DVC's global state out
of long-lived Airflow workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from pipeline_tasks.contract import write_json_atomic

log = logging.getLogger(__name__)

REMOTE_NAME = "storage"
# layout of the data workspace: what ingest writes, what `asrflow status` reads
RAW_DIR = "raw"
MANIFEST_DIR = "manifests"
MANIFEST_REL = f"{MANIFEST_DIR}/utterances.parquet"  # the cumulative ingested manifest
# what `dvc push` already sent to which remote (per output and md5); under .dvc/tmp, never committed
PUSHED_REL = ".dvc/tmp/asrflow-pushed.json"
# one git/dvc command (a `dvc push` to a hung remote...) fails after this long instead of holding
# the workspace lock, and every later ingest behind it, forever
COMMAND_TIMEOUT_S = float(os.environ.get("ASRFLOW_DVC_TIMEOUT_S", str(4 * 3600)))
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "asrflow",
    "GIT_AUTHOR_EMAIL": "asrflow@localhost",
    "GIT_COMMITTER_NAME": "asrflow",
    "GIT_COMMITTER_EMAIL": "asrflow@localhost",
}


LINK_CACHE_TYPE = "hardlink,symlink"  # when the filesystem cannot reflink
REFLINK_CACHE_TYPE = "reflink"
# ASRFLOW_DVC_CACHE_TYPE=copy (or any DVC cache.type value) overrides the probe
CACHE_TYPE_ENV = "ASRFLOW_DVC_CACHE_TYPE"


def can_reflink(folder: str | os.PathLike[str]) -> bool:
    """Whether the filesystem holding ``folder`` supports reflinks (copy-on-write clones), probed
    by cloning a small file there (``FICLONE`` on Linux, ``clonefile`` on macOS)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f".reflink-probe-{os.getpid()}-src"
    dst = folder / f".reflink-probe-{os.getpid()}-dst"
    try:
        src.write_bytes(b"asrflow reflink probe")
        from dvc_objects.fs.system import reflink

        reflink(str(src), str(dst))
        return dst.read_bytes() == src.read_bytes()
    except Exception:  # noqa: BLE001 - any failure means: no reflinks here
        return False
    finally:
        for p in (src, dst):
            with contextlib.suppress(OSError):
                p.unlink()


class WorkspaceError(RuntimeError):
    """A git or DVC command failed; the message holds the command and its stderr."""


class WorkspaceLockTimeout(WorkspaceError):
    """Another process held the workspace lock for longer than the timeout."""


def raw_batch_dir(batch: str) -> str:
    """The raw store folder of one landing batch, ``raw/<batch>``: each is its own DVC output, so
    a week's ``dvc add`` and ``dvc push`` touch only the batches that changed, not the history."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", batch).lstrip(".") or "_"
    return f"{RAW_DIR}/{safe}"


def dvc_executable() -> str:
    """The ``dvc`` next to the running interpreter (the project venv), else the one on PATH."""
    cand = Path(sys.executable).with_name("dvc")
    if cand.exists():
        return str(cand)
    found = shutil.which("dvc")
    if not found:
        raise WorkspaceError("dvc executable not found next to the Python interpreter nor on PATH")
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k, v in _GIT_IDENTITY.items():
        env.setdefault(k, v)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


class DataWorkspace:
    """A git + DVC repo at ``path`` whose default DVC remote is ``remote`` (folder or URL)."""

    def __init__(self, path: str | os.PathLike[str], remote: str):
        self.path = Path(path).absolute()
        self.remote = str(remote)
        self._lock = FileLock(str(self.path.parent / f".{self.path.name}.lock"))

    # -- process helpers ---------------------------------------------------------
    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(
                args, cwd=self.path, env=_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as e:  # a hung push must not hold the workspace lock forever
            raise WorkspaceError(
                f"`{' '.join(args)}` in {self.path} did not finish within {COMMAND_TIMEOUT_S:.0f}s "
                "(ASRFLOW_DVC_TIMEOUT_S)"
            ) from e
        if check and proc.returncode != 0:
            raise WorkspaceError(
                f"`{' '.join(args)}` failed in {self.path} (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        return proc

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(["git", "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", *args], check=check)

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([dvc_executable(), *args], check=check)

    # -- lifecycle ---------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, timeout_s: float = 600.0) -> Iterator[None]:
        """Hold the workspace's file lock; waits up to ``timeout_s`` (re-entrant in one process)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=timeout_s)
        except Timeout as e:
            raise WorkspaceLockTimeout(
                f"data workspace {self.path} is locked by another process for more than {timeout_s:.0f}s"
            ) from e
        try:
            yield
        finally:
            self._lock.release()

    def _config(self, name: str = "config"):
        """The repo's ``.dvc/config`` (or ``config.local``) as a ConfigObj (the library DVC itself reads it with)."""
        from configobj import ConfigObj

        return ConfigObj(str(self.path / ".dvc" / name))

    def cache_type(self) -> str | None:
        """``cache.type`` as set in ``.dvc/config.local`` (``None``: DVC's default, copies)."""
        if not (self.path / ".dvc" / "config.local").exists():
            return None
        return self._config("config.local").get("cache", {}).get("type")

    def _ensure_cache_type(self) -> None:
        """Link the cache to the workspace (module docstring): reflink where the filesystem can,
        else hardlink, else symlink. Written to ``config.local`` once; later calls only read it."""
        want = os.environ.get(CACHE_TYPE_ENV) or None
        current = self.cache_type()
        if want is None:
            if current:
                return  # probed before (the probe is per workspace, not per call)
            want = REFLINK_CACHE_TYPE if can_reflink(self.path / ".dvc" / "tmp") else LINK_CACHE_TYPE
        if current == want:
            return
        cfg = self._config("config.local")
        cfg.setdefault("cache", {})
        cfg["cache"]["type"] = want
        cfg.write()
        log.info("data workspace %s: DVC cache.type = %s", self.path, want)

    def _remote_url(self) -> str | None:
        if not (self.path / ".dvc" / "config").exists():
            return None
        cfg = self._config()
        if cfg.get("core", {}).get("remote") != REMOTE_NAME:
            return None
        return cfg.get(f'remote "{REMOTE_NAME}"', {}).get("url")

    def ensure(self) -> DataWorkspace:
        """Create the repo if needed: ``git init``, ``dvc init``, default remote. Idempotent.

        Safe to call concurrently (takes the workspace lock); calling it on a ready
        workspace with the same remote changes nothing. A changed remote is rewritten
        and committed.
        """
        with self.lock():
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / ".git").exists():
                self.git("init", "-q")
            if not (self.path / ".dvc").exists():
                self.dvc("init", "-q")
            if self._remote_url() != self.remote:
                # written directly (one `dvc config` process each would cost ~1 s)
                cfg = self._config()
                cfg.setdefault("core", {})
                cfg["core"]["remote"] = REMOTE_NAME
                cfg["core"]["analytics"] = "false"
                cfg[f'remote "{REMOTE_NAME}"'] = {"url": self.remote}
                cfg.write()
            self._ensure_cache_type()
            dvcignore = self.path / ".dvcignore"
            text = dvcignore.read_text() if dvcignore.exists() else ""
            if ".tmp-*" not in text.splitlines():
                # half-written files (atomic-write temporaries of a killed process) are never tracked
                dvcignore.write_text(text + ("" if text.endswith("\n") or not text else "\n") + ".tmp-*\n")
            self.git("add", ".dvc/config", ".dvc/.gitignore", ".dvcignore")
            self._commit_if_staged("asrflow: initialise data workspace")
        return self

    # -- queries -----------------------------------------------------------------
    def head(self) -> str | None:
        """The current commit (hex), or ``None`` in an empty repo."""
        if not (self.path / ".git").exists():
            return None
        proc = self.git("rev-parse", "-q", "--verify", "HEAD", check=False)
        return proc.stdout.strip() or None

    def has_tag(self, tag: str) -> bool:
        return self.git("rev-parse", "-q", "--verify", f"refs/tags/{tag}", check=False).returncode == 0

    def tags(self) -> list[str]:
        return [t for t in self.git("tag", "--list").stdout.split() if t]

    def n_commits(self) -> int:
        if not self.head():
            return 0
        return int(self.git("rev-list", "--count", "HEAD").stdout.strip())

    def md5(self, path: str) -> str:
        """The DVC md5 recorded in ``<path>.dvc`` (directories end in ``.dir``)."""
        dvc_file = self.path / f"{path.rstrip('/')}.dvc"
        if not dvc_file.exists():
            raise WorkspaceError(f"{path!r} is not DVC-tracked in {self.path} (no {dvc_file.name})")
        meta = yaml.safe_load(dvc_file.read_text()) or {}
        outs = meta.get("outs") or []
        if not outs or "md5" not in outs[0]:
            raise WorkspaceError(f"{dvc_file} has no md5 entry")
        return str(outs[0]["md5"])

    def legacy_raw(self) -> bool:
        """Whether ``raw/`` is one DVC output (a workspace made before the per-batch outputs of
        :func:`raw_batch_dir`): it keeps that layout, and each ingest adds the whole folder."""
        return (self.path / f"{RAW_DIR}.dvc").exists()

    def raw_outputs(self) -> list[str]:
        """The DVC outputs of the raw store: ``["raw"]`` (legacy) or every ``raw/<batch>``."""
        if self.legacy_raw():
            return [RAW_DIR]
        folder = self.path / RAW_DIR
        return sorted(f"{RAW_DIR}/{p.name[:-4]}" for p in folder.glob("*.dvc")) if folder.is_dir() else []

    def snapshot_md5(self, paths: list[str]) -> str:
        """One md5 naming the data of the DVC outputs ``paths`` (in that order), from their ``.dvc``
        files: ``md5("<path>:<dvc md5>" lines)``; with ``["raw", "manifests"]`` it is the hash
        earlier versions computed, so their snapshot tags stay valid."""
        return hashlib.md5("\n".join(f"{p}:{self.md5(p)}" for p in paths).encode()).hexdigest()

    def tracked_files(self, path: str) -> set[str] | None:
        """The files (relative to ``path``) that ``<path>.dvc`` records for a DVC-tracked folder,
        read from the ``.dir`` listing in the local DVC cache; ``None`` when ``path`` is not
        tracked yet or its listing is not in the cache (then nobody can tell what it held)."""
        try:
            md5 = self.md5(path)
        except WorkspaceError:
            return None
        if not md5.endswith(".dir"):
            return None
        candidates = [
            self.path / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:],  # DVC 3
            self.path / ".dvc" / "cache" / md5[:2] / md5[2:],  # DVC 2
        ]
        listing = next((c for c in candidates if c.is_file()), None)
        if listing is None:
            cache = self.dvc("cache", "dir", check=False).stdout.strip()
            for c in (Path(cache) / "files" / "md5" / md5[:2] / md5[2:], Path(cache) / md5[:2] / md5[2:]):
                if cache and c.is_file():
                    listing = c
                    break
        if listing is None:
            return None
        try:
            entries = json.loads(listing.read_text())
        except (OSError, ValueError):
            return None
        return {str(e["relpath"]) for e in entries if isinstance(e, dict) and "relpath" in e}

    # -- mutation ----------------------------------------------------------------
    def _commit_if_staged(self, message: str) -> bool:
        if self.head() and self.git("diff", "--cached", "--quiet", check=False).returncode == 0:
            return False
        if not self.head() and not self.git("diff", "--cached", "--name-only").stdout.strip():
            return False
        self.git("commit", "-q", "-m", message)
        return True

    def add(self, paths: list[str]) -> dict[str, str]:
        """``dvc add`` ``paths`` (relative to the workspace) and stage their ``.dvc`` files; path → md5."""
        if not paths:
            raise ValueError("add needs at least one path")
        rel = [str(p).rstrip("/") for p in paths]
        for p in rel:
            if Path(p).is_absolute() or ".." in Path(p).parts:
                raise ValueError(f"path {p!r} must be relative to the workspace and stay inside it")
            if not (self.path / p).exists():
                raise WorkspaceError(f"{p!r} does not exist in {self.path}")
        with self.lock():
            self.dvc("add", "-q", *rel)
            to_stage = [f"{p}.dvc" for p in rel]
            for gi in {str(Path(p).parent / ".gitignore") for p in rel}:
                if (self.path / gi).exists():
                    to_stage.append(gi)
            self.git("add", *to_stage)
            return {p: self.md5(p) for p in rel}

    def commit_tag_push(self, paths: list[str], message: str, tag: str | None = None, push: bool = True) -> bool:
        """Commit what is staged (if anything), create ``tag`` if it does not exist, ``dvc push`` ``paths``.

        Returns whether a new commit was made.
        """
        with self.lock():
            made = self._commit_if_staged(message)
            if made:
                log.info("data workspace %s: committed %s", self.path, self.head())
            if tag and not self.has_tag(tag):
                self.git("tag", "-a", tag, "-m", message)
                log.info("data workspace %s: tagged %s", self.path, tag)
            if push:
                self.push(paths)
            return made

    def _pushed(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads((self.path / PUSHED_REL).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def push(self, paths: list[str]) -> list[str]:
        """``dvc push`` those of ``paths`` not yet pushed to this remote at their current md5.

        A record under ``.dvc/tmp`` (never committed) remembers what each push sent, written only
        after the push succeeded; so a week pushes its new outputs, not the whole history again
        (``dvc push`` of an output still checks every file of it against the remote). A failed
        push is retried by the next call; another remote URL starts from nothing."""
        with self.lock():
            rel = [str(p).rstrip("/") for p in paths]
            record = self._pushed()
            done = record.get(self.remote) if isinstance(record.get(self.remote), dict) else {}
            md5s = {p: self.md5(p) for p in rel}
            todo = [p for p in rel if done.get(p) != md5s[p]]
            if todo:
                self.dvc("push", "-q", *[f"{p}.dvc" for p in todo])
                done = {**done, **{p: md5s[p] for p in todo}}
                record[self.remote] = done
                write_json_atomic(self.path / PUSHED_REL, record)
            return todo

    def add_commit_push(
        self, paths: list[str], message: str, tag: str | None = None, push: bool = True
    ) -> dict[str, str]:
        """``dvc add`` ``paths`` (relative to the workspace), commit, tag, push; returns path → DVC md5.

        Makes a commit only when a ``.dvc`` file changed and a tag only when it does not
        exist yet, so a repeated call on unchanged data changes nothing in git.
        """
        with self.lock():
            md5s = self.add(paths)
            self.commit_tag_push(paths, message, tag, push)
            return md5s

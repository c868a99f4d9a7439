"""pipeline_tasks.services.dvc_store: a real git + DVC repo with a real folder remote."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from pipeline_tasks.services.dvc_store import DataWorkspace, WorkspaceError, WorkspaceLockTimeout


def _remote_files(remote):
    return sorted(p.name for p in remote.rglob("*") if p.is_file())


def test_ensure_add_commit_push_is_idempotent(tmp_path):
    ws = DataWorkspace(tmp_path / "ws", str(tmp_path / "remote"))
    ws.ensure()
    ws.ensure()
    assert ws.n_commits() == 1
    assert (tmp_path / "ws" / ".dvc" / "config").read_text().count(str(tmp_path / "remote")) == 1
    (tmp_path / "ws" / "data").mkdir()
    (tmp_path / "ws" / "data" / "a.txt").write_text("hello")
    md5s = ws.add_commit_push(["data"], "first", tag="snap-1")
    assert md5s["data"].endswith(".dir") and md5s["data"] == ws.md5("data")
    assert ws.n_commits() == 2 and ws.tags() == ["snap-1"]
    pushed = _remote_files(tmp_path / "remote")
    assert len(pushed) == 2  # the file and the .dir listing
    head = ws.head()
    # unchanged data: same md5, no new commit, no new tag
    assert ws.add_commit_push(["data"], "again", tag="snap-1") == md5s
    assert ws.add_commit_push(["data"], "again", tag=None) == md5s
    assert (ws.head(), ws.n_commits(), ws.tags()) == (head, 2, ["snap-1"])
    assert ws.git("status", "--porcelain").stdout.strip() == ""
    # changed data: new md5, new commit, new tag, pushed
    (tmp_path / "ws" / "data" / "b.txt").write_text("world")
    md5s2 = ws.add_commit_push(["data"], "second", tag="snap-2")
    assert md5s2["data"] != md5s["data"]
    assert ws.n_commits() == 3 and ws.tags() == ["snap-1", "snap-2"]
    assert len(_remote_files(tmp_path / "remote")) == 4
    # a temp file left by a killed writer is not tracked
    (tmp_path / "ws" / "data" / ".tmp-c.txt.123").write_text("half")
    assert ws.add_commit_push(["data"], "third", tag=None) == md5s2
    assert ws.n_commits() == 3


def test_bad_paths_are_refused(tmp_path):
    ws = DataWorkspace(tmp_path / "ws", str(tmp_path / "remote")).ensure()
    with pytest.raises(ValueError, match="stay inside"):
        ws.add_commit_push(["../x"], "m")
    with pytest.raises(WorkspaceError, match="does not exist"):
        ws.add_commit_push(["nope"], "m")
    with pytest.raises(WorkspaceError, match="not DVC-tracked"):
        ws.md5("nope")


def test_remote_change_is_recorded(tmp_path):
    ws = DataWorkspace(tmp_path / "ws", str(tmp_path / "r1")).ensure()
    ws2 = DataWorkspace(tmp_path / "ws", str(tmp_path / "r2")).ensure()
    assert ws2.n_commits() == 2
    assert str(tmp_path / "r2") in ws.dvc("remote", "list").stdout


def _hold_lock(path, remote, ready, seconds):
    ws = DataWorkspace(path, remote)
    with ws.lock(5):
        ready.set()
        time.sleep(seconds)


def test_lock_waits_for_another_process_and_times_out(tmp_path):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path / "ws"), str(tmp_path / "r"), ready, 1.5))
    p.start()
    try:
        assert ready.wait(60)
        ws = DataWorkspace(tmp_path / "ws", str(tmp_path / "r"))
        with pytest.raises(WorkspaceLockTimeout, match="locked by another process"):
            with ws.lock(0.1):
                pass
        t0 = time.monotonic()
        with ws.lock(30):
            waited = time.monotonic() - t0
        assert waited > 0.3  # it waited for the holder instead of failing
    finally:
        p.join(30)
    assert p.exitcode == 0


def test_restore_a_snapshot_tag_from_the_remote_into_an_empty_cache(tmp_path, tiny_cfg):
    """What the lineage tags promise: the ingest's ``snapshot-*`` tag plus the DVC remote give
    back the exact audio. A clone of the data workspace, checked out at the tag (while the
    workspace has moved on to a later snapshot), pulls from the folder remote into an empty
    cache; the manifest and every FLAC match the ingest's hashes, and nothing else is there."""
    import hashlib
    import shutil
    import subprocess

    import pyarrow.parquet as pq

    from model_code.audio import load_audio, pcm16_hash
    from pipeline_tasks.contract import file_md5
    from pipeline_tasks.graph import run_until
    from pipeline_tasks.steps.ingest import MANIFEST_DIR, MANIFEST_REL, RAW_DIR

    ing = run_until("ingest", tiny_cfg)["ingest"]
    remote = str(tiny_cfg.paths.dvc_remote)
    # a copy of the session's workspace (its remote stays the session's folder remote) moves on
    # to a later snapshot, committed but not pushed
    work = tmp_path / "workspace"
    shutil.copytree(ing["workspace"], work, symlinks=True)
    ws = DataWorkspace(work, remote).ensure()
    # (the workspace's HEAD may already be past the ingest commit: the golden step commits there too)
    assert ws.has_tag(ing["dvc_tag"])
    (work / RAW_DIR / "zz").mkdir()
    (work / RAW_DIR / "zz" / "later.flac").write_bytes(b"a later snapshot's file")
    ws.add_commit_push([f"{RAW_DIR}/zz"], "a later snapshot", tag="snapshot-later", push=False)
    assert ws.head() != ing["dvc_commit"]

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(work), str(clone)], check=True, capture_output=True)
    restored = DataWorkspace(clone, remote)
    restored.git("checkout", "-q", ing["dvc_tag"])
    assert restored.head() == ing["dvc_commit"]
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    restored.dvc("cache", "dir", "--local", str(cache))
    assert not list(clone.rglob("*.flac")) and not (clone / MANIFEST_REL).exists()  # only pointers in git
    restored.dvc("pull", "-q")
    assert any(p.is_file() for p in cache.rglob("*")), "dvc pull did not fill the empty cache"

    # the snapshot's DVC md5s, the manifest's bytes and every audio file's content hash
    outputs = [*restored.raw_outputs(), MANIFEST_DIR]
    assert f"{RAW_DIR}/zz" not in outputs and len(outputs) >= 2  # the tag's batches, not the later one
    snap = hashlib.md5("\n".join(f"{d}:{restored.md5(d)}" for d in outputs).encode()).hexdigest()
    assert snap == ing["snapshot_md5"] and ing["dvc_tag"] == f"snapshot-{snap[:12]}"
    assert file_md5(clone / MANIFEST_REL) == ing["manifest_md5"]
    rows = pq.read_table(clone / MANIFEST_REL, columns=["audio_path", "audio_hash"]).to_pylist()
    assert len(rows) == ing["n_rows"] > 0
    for r in rows:
        wave, _, _ = load_audio(clone / r["audio_path"], 16000)
        assert pcm16_hash(wave) == r["audio_hash"], r["audio_path"]
    on_disk = {str(p.relative_to(clone)) for p in (clone / RAW_DIR).rglob("*.flac")}
    assert on_disk == {r["audio_path"] for r in rows}  # the tag's files: not the later snapshot's


def _disk_bytes_new(folder, seen):
    """On-disk bytes of the files under ``folder`` whose inode is not in ``seen``."""
    n = 0
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                n += st.st_blocks * 512
    return n


def test_cache_is_linked_not_a_second_copy_and_checkout_still_restores(tmp_path, monkeypatch):
    """Issue 18: the DVC cache holds no second copy of the workspace's files (reflink where the
    filesystem can, else hardlinks); linked files are read-only, and checking out an older tag
    (git + ``dvc checkout``) still restores the exact bytes, without touching the cache."""
    import os

    from pipeline_tasks.services.dvc_store import (
        CACHE_TYPE_ENV,
        LINK_CACHE_TYPE,
        REFLINK_CACHE_TYPE,
        can_reflink,
    )

    monkeypatch.delenv(CACHE_TYPE_ENV, raising=False)
    ws = DataWorkspace(tmp_path / "ws", str(tmp_path / "remote")).ensure()
    reflink = can_reflink(tmp_path)
    assert ws.cache_type() == (REFLINK_CACHE_TYPE if reflink else LINK_CACHE_TYPE)
    assert ws.git("status", "--porcelain").stdout.strip() == ""  # config.local is not committed
    data = tmp_path / "ws" / "data"
    data.mkdir()
    blobs = {f"f{i}.bin": os.urandom(256 * 1024) for i in range(4)}
    for name, b in blobs.items():
        (data / name).write_bytes(b)
    ws.add_commit_push(["data"], "v1", tag="v1")
    cache = tmp_path / "ws" / ".dvc" / "cache"
    seen = {(p.stat().st_dev, p.stat().st_ino) for p in data.iterdir()}
    total = sum(len(b) for b in blobs.values())
    if not reflink:  # hardlinks: each workspace file *is* its cache file
        cache_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in cache.rglob("*") if p.is_file()}
        assert seen <= cache_inodes
        assert all(p.stat().st_nlink == 2 for p in data.iterdir())
    # the cache adds only the small .dir listing, not another megabyte of data (reflinks share extents,
    # which st_blocks does not show, so this is asserted for links only)
    if not reflink:
        assert _disk_bytes_new(cache, seen) < 0.05 * total
        assert all((p.stat().st_mode & 0o222) == 0 for p in data.iterdir())  # DVC protects linked files

    # a new snapshot: one file replaced (atomically, as asrflow writes), one added
    tmp = data / ".tmp-f0"
    tmp.write_bytes(b"replaced")
    os.replace(tmp, data / "f0.bin")
    (data / "f9.bin").write_bytes(b"added")
    ws.add_commit_push(["data"], "v2", tag="v2")
    # back to v1: git checkout + dvc checkout restore the old bytes from the (linked) cache
    ws.git("checkout", "-q", "v1")
    ws.dvc("checkout", "-q")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == blobs
    ws.git("checkout", "-q", "v2")
    ws.dvc("checkout", "-q")
    assert (data / "f0.bin").read_bytes() == b"replaced" and (data / "f9.bin").read_bytes() == b"added"
    assert ws.dvc("status", "-q", check=False).returncode == 0

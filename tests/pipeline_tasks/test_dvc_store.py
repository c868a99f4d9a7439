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

"""Issue 13, item 3: nothing stored is lost or half-written.

The golden step refuses a golden set that overlaps the data workspace and deletes only files the
previous ``golden.dvc`` recorded; a step's output is fsynced before ``_SUCCESS.json``; a ``.tmp-*``
folder is cleaned only when its owner is provably dead (heartbeat); a hung step lock times out.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline_tasks import contract
from pipeline_tasks.config import load_config
from pipeline_tasks.steps import golden
from tests.pipeline_tasks.landing_helpers import tone, write_manifest, write_wav


# ------------------------------------------------------------------------------ golden
def _golden_set(folder: Path, n: int = 2) -> Path:
    entries = []
    for i in range(n):
        p = write_wav(folder / "audio" / f"u{i}.wav", tone(1.0, seed=100 + i), 16000)
        entries.append({"id": f"u{i}", "audio_filepath": f"audio/{p.name}", "text": "a golden line"})
    write_manifest(folder / "manifest.jsonl", entries)
    return folder


@pytest.mark.parametrize("layout", ["golden_in_workspace", "workspace_in_golden"])
def test_golden_refuses_a_golden_dir_that_overlaps_the_workspace(tmp_path, layout):
    ws = tmp_path / "data_repo"
    gdir = ws / "golden" if layout == "golden_in_workspace" else tmp_path / "golden_set"
    if layout == "workspace_in_golden":
        ws = gdir / "data_repo"
    _golden_set(gdir)
    before = sorted((p, p.read_bytes()) for p in gdir.rglob("*") if p.is_file())
    cfg = load_config("tiny", [f"paths.root={tmp_path}", f"paths.golden_dir={gdir}", f"paths.data_workspace={ws}"])
    with pytest.raises(golden.GoldenSetError, match="overlap"):
        golden.run(cfg, {})
    assert sorted((p, p.read_bytes()) for p in gdir.rglob("*") if p.is_file()) == before  # the source set is intact


def test_golden_deletes_only_files_the_previous_golden_dvc_recorded(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "ingest.dvc_push=false"])
    a, b, c = (tone(1.0, seed=s) for s in (1, 2, 3))
    from model_code.audio import pcm16_hash

    ha, hb, hc = (pcm16_hash(w) for w in (a, b, c))
    gdir = Path(cfg.paths.data_workspace) / golden.WORKSPACE_DIR
    golden._store_and_version(cfg, {ha: a, hb: b})
    stray = gdir / "notes" / "curator.txt"  # not written by the golden step, never recorded
    stray.parent.mkdir(parents=True)
    stray.write_text("keep me")
    with pytest.raises(golden.GoldenSetError, match="did not record"):
        golden._store_and_version(cfg, {hb: b, hc: c})
    assert stray.read_text() == "keep me" and (gdir / ha[:2] / f"{ha}.flac").exists()  # nothing deleted
    shutil.move(stray, tmp_path / "curator.txt")
    golden._store_and_version(cfg, {hb: b, hc: c})
    present = sorted(p.relative_to(gdir).as_posix() for p in gdir.rglob("*.flac"))
    assert present == sorted([f"{hb[:2]}/{hb}.flac", f"{hc[:2]}/{hc}.flac"])  # the recorded old file went


# ------------------------------------------------------------------------------ the step contract
def test_output_is_fsynced_before_the_success_marker(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(contract.os, "fsync", spy)

    def work(tmp: Path) -> dict:
        (tmp / "shards" / "a").mkdir(parents=True)
        (tmp / "shards" / "a" / "part-0.parquet").write_bytes(b"x" * 100)
        (tmp / "weights.pt").write_bytes(b"w" * 100)
        return {"ok": True}

    res = contract.run_step(tmp_path, "fs", "k1", work)
    out = Path(res["output_dir"])
    tmp_root = next(
        Path(s) for s in synced if Path(s).parent == tmp_path / "fs" and Path(s).name.startswith(".tmp-k1~")
    )
    success_at = next(i for i, s in enumerate(synced) if Path(s).name.startswith(".tmp-_SUCCESS.json"))
    before = {Path(s).relative_to(tmp_root).as_posix() for s in synced[:success_at] if s.startswith(str(tmp_root))}
    assert {"shards/a/part-0.parquet", "weights.pt", "shards/a", "shards", "."} <= before
    assert str(out.parent) in synced[success_at + 1 :]  # the rename into place is synced too
    assert (out / contract.SUCCESS).exists()


def test_tmp_folders_are_cleaned_only_when_their_owner_is_provably_dead(tmp_path, monkeypatch):
    step_dir = tmp_path / "step"
    step_dir.mkdir()
    old = time.time() - 7 * 24 * 3600

    def tmp_of(host: str, pid: int, beat_age: float | None, mtime: float = old) -> Path:
        p = step_dir / f"{contract.TMP_PREFIX}key~{host}~{pid}~{os.urandom(4).hex()}"
        p.mkdir()
        (p / "data").write_text("x")
        os.utime(p, (mtime, mtime))
        if beat_age is not None:
            hb = contract.heartbeat_path(p)
            hb.touch()
            os.utime(hb, (time.time() - beat_age, time.time() - beat_age))
        return p

    live_elsewhere = tmp_of("other-host", 1, beat_age=5)  # a live run on another host, started a week ago
    dead_elsewhere = tmp_of("other-host", 2, beat_age=3600)  # its heartbeat stopped an hour ago
    dead_here = tmp_of(socket.gethostname(), 2**22 + 12345, beat_age=1)  # no such pid on this host
    alive_here = tmp_of(socket.gethostname(), os.getpid(), beat_age=None)
    legacy = tmp_of("other-host", 3, beat_age=None)  # written before heartbeats: the old age rule
    removed = set(contract.cleanup_stale(step_dir, dead_after_s=600))
    assert removed == {dead_elsewhere, dead_here, legacy}
    assert live_elsewhere.exists() and alive_here.exists()
    assert contract.heartbeat_path(live_elsewhere).exists() and not contract.heartbeat_path(dead_elsewhere).exists()


def test_a_running_step_keeps_its_heartbeat_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(contract, "HEARTBEAT_S", 0.05)
    seen = []

    def work(tmp: Path) -> dict:
        hb = contract.heartbeat_path(tmp)
        t0 = hb.stat().st_mtime
        time.sleep(0.3)
        seen.append(hb.stat().st_mtime - t0)
        return {}

    res = contract.run_step(tmp_path, "hb", "k", work)
    assert seen[0] > 0  # touched while the step ran
    assert not list((tmp_path / "hb").glob("*.heartbeat")) and Path(res["output_dir"]).exists()


@pytest.mark.timeout(120)
def test_a_hung_lock_holder_makes_the_step_time_out_not_wait_forever(tmp_path, monkeypatch):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from filelock import FileLock
            lock = FileLock({str(tmp_path / "s" / ".lock-k")!r}); lock.acquire()
            print("held", flush=True); time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        (tmp_path / "s").mkdir()
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        monkeypatch.setattr(contract, "LOCK_TIMEOUT_S", 0.5)  # the default is finite (24 h); shortened here
        with pytest.raises(contract.StepLockTimeout, match="held"):
            contract.run_step(tmp_path, "s", "k", lambda tmp: {})
        assert time.monotonic() - t0 < 30
    finally:
        holder.kill()
        holder.wait()
    assert contract.run_step(tmp_path, "s", "k", lambda tmp: {"n": 1}, lock_timeout_s=5)["n"] == 1


def test_a_hung_git_or_dvc_command_fails_instead_of_holding_the_workspace_lock(tmp_path, monkeypatch):
    from pipeline_tasks.services import dvc_store

    monkeypatch.setattr(dvc_store, "COMMAND_TIMEOUT_S", 0.5)
    ws = dvc_store.DataWorkspace(tmp_path / "ws", str(tmp_path / "remote"))
    (tmp_path / "ws").mkdir()
    t0 = time.monotonic()
    with pytest.raises(dvc_store.WorkspaceError, match="did not finish"):
        ws._run(["sleep", "30"])  # stands in for a `dvc push` to a remote that never answers
    assert time.monotonic() - t0 < 10

"""The step contract: keyed outputs, atomic publish, skip when done, survive SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline_tasks.contract import (
    SUCCESS,
    TMP_PREFIX,
    cleanup_stale,
    run_step,
    step_key,
    write_json_atomic,
)


def test_step_key_depends_on_every_part():
    base = step_key("s", {"a": 1}, {"in": "md5"}, "1")
    assert len(base) == 16
    assert base == step_key("s", {"a": 1}, {"in": "md5"}, "1")
    assert base != step_key("t", {"a": 1}, {"in": "md5"}, "1")
    assert base != step_key("s", {"a": 2}, {"in": "md5"}, "1")
    assert base != step_key("s", {"a": 1}, {"in": "md6"}, "1")
    assert base != step_key("s", {"a": 1}, {"in": "md5"}, "2")
    # key order of dicts does not matter
    assert step_key("s", {"a": 1, "b": 2}, {}, "1") == step_key("s", {"b": 2, "a": 1}, {}, "1")


def test_publish_then_skip(tmp_path):
    calls = []

    def work(tmp: Path):
        calls.append(tmp)
        (tmp / "out.txt").write_text("hello")
        return {"out": "out.txt", "n": 1}

    r1 = run_step(tmp_path, "demo", "k1", work)
    assert r1["output_dir"] == str(tmp_path / "demo" / "k1")
    assert (tmp_path / "demo" / "k1" / "out.txt").read_text() == "hello"
    assert json.loads((tmp_path / "demo" / "k1" / SUCCESS).read_text()) == r1
    r2 = run_step(tmp_path, "demo", "k1", work)
    assert r2 == r1 and len(calls) == 1
    # force recomputes and swaps atomically
    r3 = run_step(tmp_path, "demo", "k1", work, force=True)
    assert len(calls) == 2 and r3 == r1
    assert not [p for p in (tmp_path / "demo").iterdir() if p.name.startswith(TMP_PREFIX)]


def test_failure_publishes_nothing(tmp_path):
    def boom(tmp: Path):
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        run_step(tmp_path, "demo", "k", boom)
    assert not (tmp_path / "demo" / "k").exists()
    assert [p.name for p in (tmp_path / "demo").iterdir() if not p.name.startswith(".lock")] == []


def test_non_json_result_is_rejected(tmp_path):
    with pytest.raises(TypeError):
        run_step(tmp_path, "demo", "k", lambda tmp: {"x": object()})
    assert not (tmp_path / "demo" / "k").exists()


def test_write_json_atomic(tmp_path):
    write_json_atomic(tmp_path / "a" / "b.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_cleanup_stale_keeps_live_owner(tmp_path):
    import socket

    host = socket.gethostname()
    live = tmp_path / f"{TMP_PREFIX}k~{host}~{os.getpid()}~aaaa"
    dead = tmp_path / f"{TMP_PREFIX}k~{host}~999999999~bbbb"
    live.mkdir()
    dead.mkdir()
    removed = cleanup_stale(tmp_path)
    assert dead in removed and not dead.exists()
    assert live.exists()


WORKER = textwrap.dedent(
    """
    import sys, time, json
    from pathlib import Path
    from pipeline_tasks.contract import run_step

    root, marker, slow = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "slow"

    def work(tmp):
        for i in range(20):
            (tmp / f"part-{i}.txt").write_text(str(i))
            if i == 5:
                marker.write_text("half-way")
                if slow:
                    time.sleep(60)  # killed here
        return {"parts": 20}

    res = run_step(root, "killable", "key123", work)
    print(json.dumps(res))
    """
)


def _spawn(tmp_path: Path, slow: bool) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "root"), str(tmp_path / "marker"), "slow" if slow else "fast"],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_sigkill_half_way_publishes_nothing_then_retry_and_skip(tmp_path):
    # 1) a step process killed with SIGKILL half-way publishes nothing
    p = _spawn(tmp_path, slow=True)
    deadline = time.time() + 60
    while not (tmp_path / "marker").exists():
        assert time.time() < deadline, "worker never reached half-way"
        assert p.poll() is None, "worker exited early"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    step_dir = tmp_path / "root" / "killable"
    assert not (step_dir / "key123").exists()
    leftovers = sorted(x.name for x in step_dir.iterdir() if x.name.startswith(TMP_PREFIX))
    # the half-written temp folder (and its heartbeat file), never the final one
    assert len(leftovers) == 2 and leftovers[1] == leftovers[0] + ".heartbeat"

    # 2) its retry completes (and removes the dead attempt's temp folder)
    (tmp_path / "marker").unlink()
    p2 = _spawn(tmp_path, slow=False)
    out2, _ = p2.communicate(timeout=120)
    assert p2.returncode == 0
    r2 = json.loads(out2.strip().splitlines()[-1])
    assert r2["parts"] == 20
    assert sorted(x.name for x in (step_dir / "key123").iterdir()) == sorted(
        [SUCCESS] + [f"part-{i}.txt" for i in range(20)]
    )
    assert not [x for x in step_dir.iterdir() if x.name.startswith(TMP_PREFIX)]

    # 3) a third run skips and returns the identical result
    mtime = (step_dir / "key123" / SUCCESS).stat().st_mtime_ns
    (tmp_path / "marker").unlink()
    p3 = _spawn(tmp_path, slow=True)  # would sleep if it recomputed
    out3, _ = p3.communicate(timeout=30)
    assert p3.returncode == 0
    assert json.loads(out3.strip().splitlines()[-1]) == r2
    assert not (tmp_path / "marker").exists()
    assert (step_dir / "key123" / SUCCESS).stat().st_mtime_ns == mtime


CONCURRENT = textwrap.dedent(
    """
    import json, logging, os, sys, time
    from pathlib import Path
    from pipeline_tasks.contract import run_step

    root, name = Path(sys.argv[1]), sys.argv[2]
    hs = root / "handshake"

    class Blocked(logging.Handler):
        # filelock says at DEBUG when an acquire attempt finds the lock held by someone else
        def emit(self, record):
            if "not acquired" in record.getMessage():
                (hs / f"blocked-{name}").touch()

    lg = logging.getLogger("filelock")
    lg.setLevel(logging.DEBUG)
    lg.addHandler(Blocked())

    def work(tmp):
        with open(root / "calls.log", "a") as f:
            f.write(f"{name}\\n")
        (hs / f"entered-{name}").touch()
        deadline = time.monotonic() + 120
        while not (hs / "release").exists():  # held until the test says so
            assert time.monotonic() < deadline, "never released"
            time.sleep(0.02)
        return {"v": 42, "by": name}

    (hs / f"ready-{name}").touch()
    print(json.dumps(run_step(root, "c", "k", work)))
    """
)


def _wait_for(cond, what: str, procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"a runner exited early ({p.returncode}): {p.stdout.read()}")
        time.sleep(0.02)


def test_concurrent_runs_of_one_key_compute_once(tmp_path):
    """Two processes run one key at the same time: the second blocks on the step lock while the
    first computes, then returns the first one's result. A file handshake, no sleeps: runner A
    holds its ``work`` open until the test sees runner B either blocked on the lock (filelock's
    own "not acquired" record) or inside ``work`` too (the lock is missing)."""
    root = tmp_path / "r"
    hs = root / "handshake"
    hs.mkdir(parents=True)
    script = tmp_path / "w.py"
    script.write_text(CONCURRENT)

    def spawn(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(root), name], stdout=subprocess.PIPE, text=True)

    procs = [spawn("a")]
    try:
        _wait_for(lambda: (hs / "entered-a").exists(), "runner a to enter its work", procs)
        procs.append(spawn("b"))
        _wait_for(
            lambda: (hs / "blocked-b").exists() or (hs / "entered-b").exists(),
            "runner b to block on the lock (or to enter its work)",
            procs,
        )
        entered_b = (hs / "entered-b").exists()
        (hs / "release").touch()
        outs = [json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not entered_b, "both runners computed the same key at once: the step lock is missing"
    assert (root / "calls.log").read_text().split() == ["a"]
    assert outs[0] == outs[1] and outs[1]["by"] == "a"

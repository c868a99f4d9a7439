"""No orphaned training ranks (issue 13).

torchrun starts each rank in a session of its own, so killing the launcher alone leaves the ranks
running. These tests use a stand-in launcher that does exactly that (ranks with
``start_new_session=True``, running :func:`model_code.ds_launch.rank_guard` like the real ranks)
and check: an interrupted :func:`launch` stops the launcher's group and every rank; a caller
killed with SIGKILL takes its launcher and ranks with it; a retry kills ranks left on this host
and refuses to share the checkpoint folder with ranks alive elsewhere.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from model_code import ds_launch

REPO = Path(__file__).resolve().parents[2]

FAKE_LAUNCHER = textwrap.dedent(
    """
    import json, subprocess, sys, time
    ranks_dir, n, events = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # "outlive": ranks that do not die with this process (a rank whose parent is an intermediate
    # launcher process, as under the deepspeed runner): only stopping the group and the registry helps
    outlive = len(sys.argv) > 4 and sys.argv[4] == "outlive"
    code = ("import sys, time; from model_code.ds_launch import rank_guard, set_parent_death_signal; "
            "rank_guard(sys.argv[1], rank=int(sys.argv[2])); "
            + ("set_parent_death_signal(0); " if outlive else "")
            + "print('ready', flush=True); time.sleep(600)")
    ranks = [subprocess.Popen([sys.executable, "-c", code, ranks_dir, str(i)], start_new_session=True,
                              stdout=subprocess.PIPE, text=True) for i in range(n)]
    for r in ranks:
        assert r.stdout.readline().strip() == "ready"
    with open(events, "a") as f:
        f.write(json.dumps({"type": "ready", "ranks": [r.pid for r in ranks]}) + "\\n")
    time.sleep(600)
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of this process still answers kill(0): look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_dead(pids, timeout: float = 20.0) -> list[int]:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


class _Args:
    def __init__(self, out_dir: Path, ckpt: Path):
        self.out_dir, self.checkpoint_dir = str(out_dir), str(ckpt)

    def to_json(self) -> str:
        return json.dumps({"out_dir": self.out_dir, "checkpoint_dir": self.checkpoint_dir})


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_launcher.py"
    script.write_text(FAKE_LAUNCHER)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    events = out / "events.jsonl"
    monkeypatch.setattr(ds_launch, "launch_command", lambda *a, **k: [sys.executable, str(script), str(ckpt), "2", str(events)])
    return _Args(out, ckpt), script


def test_an_interrupted_launch_stops_the_launcher_group_and_every_rank(fake, monkeypatch):
    args, script = fake
    events = Path(args.out_dir) / "events.jsonl"
    monkeypatch.setattr(
        ds_launch, "launch_command",
        lambda *a, **k: [sys.executable, str(script), args.checkpoint_dir, "2", str(events), "outlive"],
    )  # fmt: skip
    seen: dict = {}

    def on_event(e: dict) -> None:  # the ranks are up: interrupt the caller (as a task timeout would)
        seen.update(e)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ds_launch.launch(args, 2, launcher="torchrun", on_event=on_event, poll_s=0.1)
    ranks = seen["ranks"]
    assert len(ranks) == 2
    assert _wait_dead(ranks) == []
    assert {r["pid"] for r in ds_launch.registered_ranks(args.checkpoint_dir)} <= set(ranks)


def test_a_caller_killed_with_sigkill_takes_its_launcher_and_ranks_along(fake, tmp_path):
    args, script = fake
    caller = tmp_path / "caller.py"
    caller.write_text(textwrap.dedent(f"""
        import sys
        from model_code import ds_launch
        class A:
            out_dir, checkpoint_dir = {args.out_dir!r}, {args.checkpoint_dir!r}
            def to_json(self): return "{{}}"
        ds_launch.launch_command = lambda *a, **k: [sys.executable, {str(script)!r}, {args.checkpoint_dir!r}, "2",
                                                    {str(Path(args.out_dir) / "events.jsonl")!r}]
        ds_launch.launch(A(), 2, launcher="torchrun", poll_s=0.1)
    """))
    proc = subprocess.Popen([sys.executable, str(caller)], cwd=REPO, env=_env())
    events = Path(args.out_dir) / "events.jsonl"
    t_end = time.monotonic() + 60
    while not (events.exists() and events.read_text().strip()):
        assert time.monotonic() < t_end and proc.poll() is None, "the stand-in ranks never came up"
        time.sleep(0.1)
    ranks = json.loads(events.read_text().splitlines()[-1])["ranks"]
    os.kill(proc.pid, signal.SIGKILL)  # the Airflow task process dies without any cleanup
    proc.wait()
    assert _wait_dead(ranks) == [], "ranks survived their caller"


def _start_rank(ranks_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from model_code.ds_launch import rank_guard; rank_guard(sys.argv[1], rank=0); "
            "print('ready', flush=True); time.sleep(600)")  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", code, str(ranks_dir)], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_a_retry_stops_orphans_here_and_refuses_ranks_alive_elsewhere(tmp_path):
    d = tmp_path / "ckpt"
    orphan = _start_rank(d)  # a rank of an earlier attempt, still writing into the folder
    try:
        ds_launch.claim_ranks_dir(d, timeout_s=20)
        assert orphan.wait(timeout=20) != 0
        assert ds_launch.registered_ranks(d) == []
    finally:
        orphan.kill()
        orphan.wait()
    # a rank alive on another host: it holds the run lock and cannot be signalled from here
    (d / ds_launch.RANKS_DIR / "elsewhere~4242").write_text(json.dumps({"host": "elsewhere", "pid": 4242, "rank": 1}))
    fd = os.open(d / ds_launch.RANKS_LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        with pytest.raises(RuntimeError, match="elsewhere:4242"):
            ds_launch.claim_ranks_dir(d, timeout_s=1)
    finally:
        os.close(fd)
    ds_launch.claim_ranks_dir(d, timeout_s=5)  # once it is gone, the retry proceeds


def test_failure_excerpt_keeps_the_ranks_own_error_behind_a_long_launcher_report(tmp_path):
    # a rank's C++ abort message, then torchrun's long traceback and summary
    log = tmp_path / "launch.log"
    rank_msg = "terminate called after throwing an instance of 'gloo::IoException'\n  what():  Connection closed by peer"
    noise = "\n".join(f'  File "torch/distributed/run.py", line {i}, in main' for i in range(400))
    log.write_text("step 1 ok\n" + rank_msg + "\n" + noise + "\nChildFailedError: exitcode -6\n")
    out = ds_launch.failure_excerpt(log, tail_chars=2000)
    assert out.startswith(log.read_text()[-2000:])  # the plain tail comes first
    assert "terminate called after throwing" in out and "what():  Connection closed by peer" in out
    assert "step 1 ok" not in out
    # a short log is its own tail: nothing repeated
    short = tmp_path / "short.log"
    short.write_text(rank_msg)
    assert ds_launch.failure_excerpt(short) == rank_msg
    assert ds_launch.failure_excerpt(tmp_path / "missing.log") == ""

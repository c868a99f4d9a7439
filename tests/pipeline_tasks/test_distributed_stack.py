"""The stack manager's bookkeeping: ``down`` stops exactly what ``up`` started, also after a crash.

Cheap and server-free: the "components" are shell processes with children, started through
:meth:`Stack.spawn` by a manager process that is then SIGKILLed. The full stack (Postgres,
Redis, MLflow, Airflow + Celery) is exercised by tests/integration/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack import distributed_stack as ds
from pipeline_tasks.config import REPO_ROOT

MANAGER = r"""
import sys, time
from pathlib import Path
from devstack.distributed_stack import Stack
st = Stack(dir=Path(sys.argv[1]), ports={"pg": 1, "redis": 2, "mlflow": 3, "api": 4})
# each component has a child of its own (like a Celery worker's task runner)
st.spawn("alpha", ["bash", "-c", "sleep 300 & sleep 300; wait"])
st.spawn("beta", ["bash", "-c", "sleep 300 & sleep 300; wait"])
print("ready", flush=True)
time.sleep(300)
"""


def _pids_in_group(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _wait_gone(pgid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pids_in_group(pgid):
            return True
        time.sleep(0.1)
    return False


def test_down_after_manager_crash_stops_every_group(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    mgr = subprocess.Popen(
        [sys.executable, "-c", MANAGER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        assert mgr.stdout.readline().strip() == "ready"
        state = json.loads((tmp_path / ds.STATE_FILE).read_text())
        groups = {p["name"]: p["pgid"] for p in state["procs"]}
        assert set(groups) == {"alpha", "beta"}
        for pgid in groups.values():
            # the component and its child (bash may not have forked its child yet: wait for it)
            deadline = time.monotonic() + 10
            while len(_pids_in_group(pgid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(_pids_in_group(pgid)) >= 2
        mgr.send_signal(signal.SIGKILL)  # the manager crashes; its components keep running
        mgr.wait(timeout=10)
        assert all(_pids_in_group(g) for g in groups.values())
        st = ds.status(tmp_path)
        assert st["running"] and all(v["alive"] for v in st["procs"].values())

        out = subprocess.run(
            [sys.executable, "-m", "devstack.distributed_stack", "down", "--dir", str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "alpha" in out.stdout and "beta" in out.stdout
        for pgid in groups.values():
            assert _wait_gone(pgid), f"group {pgid} survived down"
        assert json.loads((tmp_path / ds.STATE_FILE).read_text())["procs"] == []
        assert ds.status(tmp_path)["running"] is False
    finally:
        if mgr.poll() is None:
            mgr.kill()
        ds.stop(tmp_path)


def test_down_never_signals_a_recycled_pid(tmp_path):
    """A recorded PID whose start time differs is someone else's process: left alone."""
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        st = ds.Stack(dir=tmp_path, ports={"pg": 1, "redis": 2, "mlflow": 3, "api": 4})
        real = ds._proc_start_time(bystander.pid)
        assert real is not None
        st.procs = [
            ds.Proc("ghost", bystander.pid, bystander.pid, real - 1, ["sleep"], str(tmp_path / "x.log"))
        ]
        st.save()
        assert ds.status(tmp_path)["procs"]["ghost"]["alive"] is False
        ds.stop(tmp_path)
        time.sleep(0.3)
        assert bystander.poll() is None, "down killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()


def test_start_refuses_busy_or_equal_ports(tmp_path):
    with pytest.raises(ValueError):
        ds.start(tmp_path / "a", {"pg": 40001, "redis": 40001, "mlflow": 40002, "api": 40003})
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        ports = ds.free_ports(["pg", "redis", "mlflow"])
        with pytest.raises(RuntimeError, match="already in use"):
            ds.start(tmp_path / "b", {**ports, "api": busy})
    # nothing was started, nothing was recorded as running
    assert ds.status(tmp_path / "b")["running"] is False


def test_worker_hostname_is_the_worker_name(monkeypatch):
    monkeypatch.setenv(ds.WORKER_NAME_ENV, "gpu-7")
    assert ds.worker_hostname() == "gpu-7"
    monkeypatch.delenv(ds.WORKER_NAME_ENV)
    assert ds.worker_hostname()  # falls back to the machine's name


def test_profile_fills_server_urls_from_the_stack_ports(tmp_path):
    st = ds.Stack(dir=tmp_path, ports={"pg": 41001, "redis": 41002, "mlflow": 41003, "api": 41004})
    cfg = st.config()
    assert cfg.tune.storage == "postgresql+psycopg2://asrflow:asrflow@127.0.0.1:41001/optuna"
    assert cfg.registry.tracking_uri == "http://127.0.0.1:41003"
    assert cfg.paths.root == str(tmp_path / "artifacts")
    assert cfg.airflow.train_queue == "gpu" and cfg.tune.n_workers == 2
    # and the process environment is left as it was
    assert os.environ.get("ASRFLOW_DIST_PG_PORT") != "41001"


def test_expand_env_fills_defaults_and_rejects_unset(monkeypatch):
    from pipeline_tasks.config import expand_env

    monkeypatch.setenv("ASRFLOW_TEST_PORT", "4242")
    monkeypatch.delenv("ASRFLOW_TEST_UNSET", raising=False)
    assert expand_env("h:${ASRFLOW_TEST_PORT:-1}/x") == "h:4242/x"
    assert expand_env("h:${ASRFLOW_TEST_UNSET:-15432}/{root}") == "h:15432/{root}"
    with pytest.raises(ValueError, match="ASRFLOW_TEST_UNSET"):
        expand_env("h:${ASRFLOW_TEST_UNSET}")


def test_stop_kills_a_component_that_ignores_sigterm_after_its_grace(tmp_path):
    """``stop`` sends SIGTERM first, waits the component's grace, then SIGKILLs its group.

    File handshakes, no sleeps: the stubborn component says when its TERM trap is installed
    (so the test never races bash's start-up), and the trap logs every SIGTERM it swallows.
    Without the grace (SIGKILL at once) stop returns before the 1 s grace; without the SIGTERM
    the trap logs nothing; without the SIGKILL the group survives."""
    st = ds.Stack(dir=tmp_path, ports={"pg": 1, "redis": 2, "mlflow": 3, "api": 4})
    ready, got_term = tmp_path / "trap-ready", tmp_path / "got-term"
    stubborn = st.spawn(
        "stubborn",
        [
            "bash",
            "-c",
            f"trap 'echo term >> {got_term}' TERM; touch {ready}; "
            "while true; do sleep 300 & wait; done",
        ],
        stop_timeout=1,
    )
    polite = st.spawn("polite", ["sleep", "300"])
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "the stubborn component never installed its trap"
        time.sleep(0.02)
    t0 = time.monotonic()
    st.stop()
    took = time.monotonic() - t0
    assert took >= 1.0, f"stop took {took:.2f}s: it did not wait the 1 s grace before SIGKILL"
    assert got_term.exists() and "term" in got_term.read_text(), "stop never sent SIGTERM"
    assert took < 10, f"stop took {took:.1f}s: the 1 s grace was not honoured"
    assert _wait_gone(stubborn.pgid, 5) and _wait_gone(polite.pgid, 5)

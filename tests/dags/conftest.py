"""Fixtures for the orchestration tests: an artifact root with the tiny corpus, a REST client."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.procs import free_port  # noqa: F401  (used by the tests of this folder)


def make_root(base: Path, landing: Path, golden: Path) -> Path:
    """An artifact root laid out like the tiny profile expects: ``landing/`` and the golden set
    (``paths.golden_dir``, default ``golden_set/``) inside."""
    from pipeline_tasks.config import PathsConfig

    root = base / "root"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(landing, root / "landing", dirs_exist_ok=True)
    shutil.copytree(golden, root / PathsConfig().golden_dir, dirs_exist_ok=True)
    return root


def tiny_root_cfg(root: Path, extra: list[str] | None = None):
    from pipeline_tasks.config import load_config

    return load_config("tiny", [f"paths.root={root}", *(extra or [])])


class AirflowApi:
    """A small client of the Airflow 3 REST API (``/api/v2``) with a JWT from ``POST /auth/token``."""

    def __init__(self, base_url: str, username: str, password: str):
        self.base = base_url.rstrip("/")
        self.s = requests.Session()
        self.s.trust_env = False  # loopback only, never through a proxy
        r = self.s.post(
            f"{self.base}/auth/token", json={"username": username, "password": password}, timeout=30
        )
        assert r.status_code in (200, 201), r.text
        self.token = r.json()["access_token"]
        self.s.headers["Authorization"] = f"Bearer {self.token}"

    def req(self, method: str, path: str, ok=(200,), **kw) -> Any:
        r = self.s.request(method, f"{self.base}/api/v2{path}", timeout=60, **kw)
        assert r.status_code in ok, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json() if r.content else None

    def get(self, path: str, **params) -> Any:
        return self.req("GET", path, params=params)

    def wait_dag(self, dag_id: str, timeout: float = 180) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            r = self.s.get(f"{self.base}/api/v2/dags/{dag_id}", timeout=30)
            if r.status_code == 200:
                return r.json()
            time.sleep(1)
        raise TimeoutError(f"DAG {dag_id} was not parsed in {timeout}s")

    def trigger(self, dag_id: str, conf: dict) -> dict:
        return self.req(
            "POST", f"/dags/{dag_id}/dagRuns", ok=(200,), json={"logical_date": None, "conf": conf}
        )

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100)["task_instances"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 420, stack=None) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            run = self.run(dag_id, run_id)
            if run["state"] in ("success", "failed"):
                return run
            if stack is not None and (dead := stack.dead()):
                raise RuntimeError(f"{dead} died during the run; logs in {stack.log_dir}")
            time.sleep(2)
        states = {t["task_id"]: t["state"] for t in self.task_instances(dag_id, run_id)}
        raise TimeoutError(f"run {run_id} not finished after {timeout}s: {states}")

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1):
        r = self.get(
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}", map_index=map_index
        )
        return r["value"]


def xcom_value(value: Any) -> Any:
    """An XCom value as the REST API returns it (a JSON string or the value itself)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """``(ppid, pgid, start time)`` of a live process, or None (``/proc/<pid>/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2]), int(fields[19])


def descends_from_group(pid: int, pgid: int) -> bool:
    """Whether ``pid`` or one of its ancestors is in process group ``pgid`` (a task runner of a
    stack component: Airflow gives each task runner a group of its own, under its supervisor)."""
    seen = 0
    while pid > 1 and seen < 64:
        st = proc_stat(pid)
        if st is None:
            return False
        if st[1] == pgid:
            return True
        pid, seen = st[0], seen + 1
    return False


def kill_recorded(procs: list[tuple[int, int]]) -> None:
    """SIGKILL the process groups of recorded ``(pid, start time)`` leaders that still run as the
    same process (a recycled PID is left alone): what a killed scheduler left behind."""
    for pid, start in procs:
        st = proc_stat(pid)
        if st is not None and st[2] == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture()
def tiny_root(tmp_path, tiny_landing, tiny_golden) -> Path:
    return make_root(tmp_path, tiny_landing, tiny_golden)


# Every orchestration test that runs the DAG uses these overrides (one trial, one worker, one epoch).
FAST = ["tune.n_trials=1", "tune.n_workers=1", "tune.epochs=1"]


@pytest.fixture(scope="session")
def dags_root(tmp_path_factory, tiny_landing, tiny_golden) -> Path:
    """One tiny artifact root (with its own AIRFLOW_HOME) shared by the DAG-running tests of the session:
    the steps are cached, so each test only pays for what its params change."""
    return make_root(tmp_path_factory.mktemp("dags"), tiny_landing, tiny_golden)

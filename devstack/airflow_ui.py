"""``make airflow-ui``: the Airflow UI + scheduler + dag-processor and the MLflow UI, on loopback.

    python -m devstack.airflow_ui --profile local [--port 8080] [--mlflow-port 5000]

Starts, each in its own process group, with the profile's embedded Airflow environment
(:mod:`devstack.airflow_env`: SQLite metadata DB under the artifact root, LocalExecutor,
``AIRFLOW__CORE__PARALLELISM=2``):

* ``airflow api-server --host 127.0.0.1 --port 8080`` (UI + REST API + task execution API),
* ``airflow scheduler --skip-serve-logs``,
* ``airflow dag-processor``,
* ``mlflow ui --host 127.0.0.1 --backend-store-uri <registry.tracking_uri>``,

waits until the API answers, prints the URLs and the login, and stops everything it started
on Ctrl-C (or when one of them dies). Logs go to ``<root>/airflow/ui-logs/``.
Nothing here imports Airflow.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from devstack.airflow_env import (
    ADMIN_USER,
    admin_password,
    airflow_bin,
    airflow_env,
    airflow_home,
    setup_airflow,
)
from devstack.procs import start_group, stop_group
from pipeline_tasks.config import REPO_ROOT, AsrflowConfig, load_config


@dataclass
class Stack:
    """Processes started for one AIRFLOW_HOME; ``stop()`` ends every one of them (process groups)."""

    env: dict[str, str]
    log_dir: Path
    port: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # own process group: stop() reaches its children (task runners)
        proc = start_group(cmd, env=self.env, cwd=REPO_ROOT, log=self.log_dir / f"{name}.log")
        self.procs[name] = proc
        return proc

    def start_airflow(
        self, components: tuple[str, ...] = ("api-server", "scheduler", "dag-processor")
    ) -> None:
        af = airflow_bin()
        for comp in components:
            self.start_component(comp, af)

    def start_component(self, comp: str, af: str | None = None) -> subprocess.Popen:
        af = af or airflow_bin()
        if comp == "api-server":
            return self.start(comp, [af, "api-server", "--host", "127.0.0.1", "--port", str(self.port)])
        if comp == "scheduler":
            return self.start(comp, [af, "scheduler", "--skip-serve-logs"])
        if comp == "dag-processor":
            return self.start(comp, [af, "dag-processor"])
        raise ValueError(comp)

    def stop_one(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        stop_group(proc, sig, timeout)

    def stop(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop_one(name)

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_http(self, url: str, what: str, timeout: float = 120) -> float:
        """Wait until ``url`` (one of this stack's servers) answers 200; returns the seconds it took.

        Fails early when a component of the stack has exited.
        """
        t0 = time.monotonic()
        last = ""
        while time.monotonic() - t0 < timeout:
            if dead := self.dead():
                raise RuntimeError(f"{', '.join(dead)} exited early; see {self.log_dir}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"{what} did not become healthy in {timeout}s ({last}); see {self.log_dir}")

    def wait_healthy(self, timeout: float = 120) -> float:
        """Wait until the API server answers ``/api/v2/monitor/health``; returns the seconds it took."""
        return self.wait_http(f"{self.url}/api/v2/monitor/health", "the API server", timeout)


def mlflow_bin() -> str:
    cand = Path(sys.executable).parent / "mlflow"
    return str(cand) if cand.exists() else "mlflow"


def start_stack(cfg: AsrflowConfig, port: int = 8080, mlflow_port: int | None = 5000) -> Stack:
    env = airflow_env(cfg, port=port)
    setup_airflow(cfg, env)
    stack = Stack(env=env, log_dir=airflow_home(cfg) / "ui-logs", port=port)
    try:
        stack.start_airflow()
        if mlflow_port:
            uri = cfg.registry.tracking_uri
            if uri.startswith("sqlite:///"):
                Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            cmd = [
                mlflow_bin(),
                "ui",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                uri,
            ]
            stack.start("mlflow", cmd)
    except BaseException:
        stack.stop()
        raise
    return stack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m devstack.airflow_ui", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--profile", default="local")
    ap.add_argument("--port", type=int, default=8080, help="Airflow API server / UI port (127.0.0.1)")
    ap.add_argument(
        "--mlflow-port", type=int, default=5000, help="MLflow UI port (127.0.0.1); 0 = no MLflow UI"
    )
    args = ap.parse_args(argv)

    cfg = load_config(args.profile)
    t0 = time.monotonic()
    print(f"starting Airflow ({cfg.profile} profile, AIRFLOW_HOME={airflow_home(cfg)}) ...", flush=True)
    stack = start_stack(cfg, args.port, args.mlflow_port or None)

    def _term(signum, frame):  # make SIGTERM behave like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        took = stack.wait_healthy()
        if args.mlflow_port:
            stack.wait_http(f"http://127.0.0.1:{args.mlflow_port}/health", "the MLflow server", timeout=120)
        print(
            f"\nAirflow UI   {stack.url}   login: {ADMIN_USER} / {admin_password(cfg)}"
            f"   (healthy after {time.monotonic() - t0:.0f}s; API ready {took:.0f}s after start)\n"
            f"             password file: {cfg.root / 'airflow' / 'simple_auth_manager_passwords.json'}\n"
            + (f"MLflow UI    http://127.0.0.1:{args.mlflow_port}\n" if args.mlflow_port else "")
            + "DAGs         asr_retraining (weekly; Trigger ▶ opens the params form), asr_promote_production (manual)\n"
            f"logs         {stack.log_dir}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        while True:
            if dead := stack.dead():
                print(f"{', '.join(dead)} exited; stopping (see {stack.log_dir})", flush=True)
                return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        stack.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())

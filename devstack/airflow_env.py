"""The embedded Airflow of a profile: its AIRFLOW_HOME, environment, metadata DB and pool.

Nothing here imports Airflow: the environment is a dict of ``AIRFLOW__*`` variables and the
setup drives the ``airflow`` command line through subprocesses, so the pool and the
database are "created by setup, not by hand"::

    env = airflow_env(cfg)          # dict for subprocess.Popen(env=...)
    setup_airflow(cfg, env)         # airflow db migrate + pool (idempotent, cheap when done)

Layout under the artifact root (``<root>/airflow/``): ``airflow.db`` (SQLite metadata DB),
``logs/``, ``simple_auth_manager_passwords.json`` (the UI login), ``secrets.json`` (the
JWT/API secrets every Airflow process of this home must share).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline_tasks.config import REPO_ROOT, AsrflowConfig

log = logging.getLogger(__name__)

DAGS_FOLDER = REPO_ROOT / "dags"
ADMIN_USER = "admin"
DEFAULT_API_PORT = 8080
SETUP_VERSION = "1"  # bump when setup_airflow's work changes (forces a re-run on old homes)


def airflow_home(cfg: AsrflowConfig) -> Path:
    return cfg.root / "airflow"


def airflow_bin() -> str:
    """The ``airflow`` script of this interpreter's environment (falls back to PATH)."""
    cand = Path(sys.executable).parent / "airflow"
    if cand.exists():
        return str(cand)
    found = shutil.which("airflow")
    if not found:
        raise FileNotFoundError("the airflow command is not installed in this environment")
    return found


def _secrets(home: Path) -> dict[str, str]:
    """Secrets shared by every Airflow process of this home, generated once."""
    path = home / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    home.mkdir(parents=True, exist_ok=True)
    data = {"jwt_secret": secrets.token_urlsafe(32), "api_secret_key": secrets.token_urlsafe(32)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return data


def passwords_file(cfg: AsrflowConfig) -> Path:
    return airflow_home(cfg) / "simple_auth_manager_passwords.json"


def admin_password(cfg: AsrflowConfig) -> str:
    """The UI/REST password of ``admin`` (generated once per AIRFLOW_HOME, kept in the passwords file)."""
    path = passwords_file(cfg)
    if path.exists():
        try:
            pw = json.loads(path.read_text() or "{}").get(ADMIN_USER)
            if pw:
                return pw
        except json.JSONDecodeError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    pw = secrets.token_urlsafe(12)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({ADMIN_USER: pw}))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return pw


def airflow_env(
    cfg: AsrflowConfig,
    port: int = DEFAULT_API_PORT,
    base: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of every Airflow process (CLI, api-server, scheduler, dag-processor, tasks)."""
    home = airflow_home(cfg)
    home.mkdir(parents=True, exist_ok=True)
    sec = _secrets(home)
    admin_password(cfg)  # make sure the passwords file exists before any server starts
    env = dict(os.environ if base is None else base)
    # Drop stray AIRFLOW__ settings of the caller's shell: this home is self-contained.
    for k in [k for k in env if k.startswith("AIRFLOW__") or k == "AIRFLOW_CONFIG"]:
        del env[k]
    url = f"http://127.0.0.1:{port}"
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(cfg)),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": sec["api_secret_key"],
            "AIRFLOW__API_AUTH__JWT_SECRET": sec["jwt_secret"],
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            # a small local stack: notice new DAG files quickly, detect dead tasks/schedulers quickly
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "15",
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # what the DAG's tasks need to find this profile's artifacts
            "ASRFLOW_ROOT": str(cfg.root),
            "ASRFLOW_PROFILE": cfg.profile,
            "PYTHONHASHSEED": env.get("PYTHONHASHSEED", "0"),
            "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
            "DO_NOT_TRACK": "1",
            "DVC_NO_ANALYTICS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    env.update(extra or {})
    return env


def airflow_cli(args: list[str], env: dict[str, str], check: bool = True, timeout: float = 600) -> str:
    """Run ``airflow ARGS`` with ``env``; returns stdout (raises with the output on failure)."""
    proc = subprocess.run(
        [airflow_bin(), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT)
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"airflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def _stamp(cfg: AsrflowConfig, env: dict[str, str]) -> dict[str, Any]:
    return {
        "setup_version": SETUP_VERSION,
        "db": env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
        "pool": [cfg.airflow.gpu_pool, cfg.airflow.gpu_pool_size],
        "airflow": _airflow_version(),
    }


def _airflow_version() -> str:
    try:
        from importlib.metadata import version

        return version("apache-airflow")
    except Exception:  # pragma: no cover
        return "unknown"


def setup_airflow(
    cfg: AsrflowConfig, env: dict[str, str] | None = None, force: bool = False
) -> dict[str, str]:
    """Migrate the metadata DB and create the GPU pool (idempotent; a stamp skips it when done)."""
    env = env or airflow_env(cfg)
    home = Path(env["AIRFLOW_HOME"])
    stamp_path = home / ".asrflow-setup.json"
    stamp = _stamp(cfg, env)
    db_file = home / "airflow.db"
    if not force and stamp_path.exists() and db_file.exists():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return env
        except json.JSONDecodeError:
            pass
    log.info("airflow: migrating the metadata DB at %s", db_file)
    airflow_cli(["db", "migrate"], env)
    log.info("airflow: pool %s with %d slot(s)", cfg.airflow.gpu_pool, cfg.airflow.gpu_pool_size)
    airflow_cli(
        [
            "pools",
            "set",
            cfg.airflow.gpu_pool,
            str(cfg.airflow.gpu_pool_size),
            "GPU slots for DeepSpeed training (asrflow train)",
        ],
        env,
    )
    stamp_path.write_text(json.dumps(stamp))
    return env

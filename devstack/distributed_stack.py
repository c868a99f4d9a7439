"""``make distributed-local``: the production topology on loopback, with real servers.

    python -m devstack.distributed_stack up [--dir DIR] [--pg-port N] [--redis-port N]
                                                  [--mlflow-port N] [--api-port N] [--default-workers N]
    python -m devstack.distributed_stack status [--dir DIR]
    python -m devstack.distributed_stack down [--dir DIR]

``up`` starts, each in its own process group, every PID recorded in ``<dir>/state.json``:

* **PostgreSQL** (``initdb`` once; own data dir, own port, unix socket dir inside the folder,
  listening on 127.0.0.1 only) with the databases ``airflow``, ``mlflow`` and ``optuna``
  owned by the role ``asrflow`` (password ``asrflow``: a development default, loopback only);
* **redis-server** (own port and dir, no persistence): the Celery broker;
* an **MLflow tracking server** on the ``mlflow`` database, artifacts served from
  ``<dir>/mlflow/artifacts`` (``--artifacts-destination`` + ``--serve-artifacts``);
* **Airflow 3** with the CeleryExecutor and the Postgres metadata DB (``airflow db migrate``,
  pool ``gpu_pool``): ``api-server``, ``scheduler``, ``dag-processor`` and Celery workers:
  ``--default-workers`` (1) on queue ``default`` and one on queue ``gpu`` (the DAG routes the
  ``train`` task there: ``airflow.train_queue: gpu`` in ``configs/distributed.yaml``).
  Each worker reports its own name as the task instance ``hostname`` (``default-1``,
  ``gpu-1`` ...), so the UI/REST show where every task ran.

``down`` stops exactly what ``up`` started (SIGTERM to each process group, SIGKILL after a
grace period; PostgreSQL gets a fast shutdown), also after the manager itself crashed: the
state file is written after every process start, and a PID is only signalled when its start
time still matches the recorded one (no recycled PID is ever hit).

The state lives in ``$ASRFLOW_DIST_DIR`` or ``<repo>/.local/distributed/``: ``state.json``,
``postgres/`` (data + socket), ``redis/``, ``mlflow/artifacts/``, ``artifacts/`` (the
pipeline's artifact root, ``ASRFLOW_ROOT`` of every Airflow process; AIRFLOW_HOME is its
``airflow/``), ``logs/<component>.log``. Nothing here imports Airflow: it drives the
``airflow``, ``postgres``, ``redis-server`` and ``mlflow`` commands through subprocesses.

Ports default to 15432 (Postgres), 16379 (Redis), 15500 (MLflow), 18380 (Airflow API/UI);
``ASRFLOW_DIST_PG_PORT`` / ``_REDIS_PORT`` / ``_MLFLOW_PORT`` / ``_API_PORT`` or the options change
them; the stack exports the ``ASRFLOW_DIST_*_PORT`` variables to every Airflow process and
``configs/distributed.yaml`` fills its server URLs from them (``${ASRFLOW_DIST_PG_PORT:-15432}``).
The weekly schedule is off unless ``--schedule``: runs are triggered (UI, REST, tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devstack.procs import alive as _alive
from devstack.procs import free_port, free_ports  # noqa: F401  (re-exported for the tests)
from devstack.procs import group_alive as _group_alive
from devstack.procs import proc_start_time as _proc_start_time
from pipeline_tasks.config import REPO_ROOT, load_config

PROFILE = "distributed"
DB_USER = "asrflow"
DB_PASSWORD = "asrflow"  # development default, loopback only (like infra/docker-compose.yaml)
DATABASES = ("airflow", "mlflow", "optuna")
DEFAULT_PORTS = {"pg": 15432, "redis": 16379, "mlflow": 15500, "api": 18380}
PORT_ENV = {
    "pg": "ASRFLOW_DIST_PG_PORT",
    "redis": "ASRFLOW_DIST_REDIS_PORT",
    "mlflow": "ASRFLOW_DIST_MLFLOW_PORT",
    "api": "ASRFLOW_DIST_API_PORT",
}
STATE_FILE = "state.json"
WORKER_NAME_ENV = "ASRFLOW_WORKER_NAME"
HEARTBEAT_TIMEOUT_S = (
    20  # [scheduler] task_instance_heartbeat_timeout: a killed worker's task is failed after this
)


# ------------------------------------------------------------------------------------------------
# used by Airflow itself ([core] hostname_callable of the Celery workers)
# ------------------------------------------------------------------------------------------------


def worker_hostname() -> str:
    """The task-instance ``hostname`` a worker of this stack reports: its name (``gpu-1``...).

    Set as ``AIRFLOW__CORE__HOSTNAME_CALLABLE`` for the Celery workers only; every worker of
    the stack runs on this one machine, and the name is what tells them apart.
    """
    return os.environ.get(WORKER_NAME_ENV) or socket.getfqdn()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def default_dir() -> Path:
    env = os.environ.get("ASRFLOW_DIST_DIR")
    return Path(env).resolve() if env else REPO_ROOT / ".local" / "distributed"


def default_ports() -> dict[str, int]:
    return {k: int(os.environ.get(PORT_ENV[k]) or v) for k, v in DEFAULT_PORTS.items()}


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (make setup installs it)")
    return found


def pg_bindir() -> Path:
    """PostgreSQL server binaries: ``$ASRFLOW_PG_BIN``, else the newest /usr/lib/postgresql/*/bin."""
    env = os.environ.get("ASRFLOW_PG_BIN")
    if env:
        return Path(env)
    cands = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if cands:
        return cands[-1]
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise FileNotFoundError("PostgreSQL server binaries not found (apt-get install postgresql)")


def _http_ok(url: str, timeout: float = 3) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


# ------------------------------------------------------------------------------------------------
# the stack
# ------------------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    pid: int
    pgid: int
    start_time: int | None
    cmd: list[str]
    log: str
    stop_signal: int = int(signal.SIGTERM)
    stop_timeout: float = 20.0  # grace after the stop signal before SIGKILL


@dataclass
class Stack:
    """The servers of one distributed stack; ``stop()`` ends exactly the processes it started."""

    dir: Path
    ports: dict[str, int]
    procs: list[Proc] = field(default_factory=list)
    airflow_env: dict[str, str] = field(default_factory=dict)
    admin_password: str = ""
    schedule: bool = False  # False: [scheduler] use_job_schedule off, only triggered runs (no weekly run)

    # ---- layout ---------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def artifact_root(self) -> Path:
        return self.dir / "artifacts"

    @property
    def pg_data(self) -> Path:
        return self.dir / "postgres" / "data"

    @property
    def pg_socket_dir(self) -> Path:
        return self.dir / "postgres" / "run"

    # ---- URLs --------------------------------------------------------------------------------
    def db_url(self, db: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.ports['pg']}/{db}"

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}/0"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def port_env(self) -> dict[str, str]:
        """``ASRFLOW_DIST_*_PORT``: what ``configs/distributed.yaml`` fills its server URLs from."""
        return {PORT_ENV[k]: str(v) for k, v in self.ports.items()}

    def config(self, extra: list[str] | None = None):
        """The distributed profile as this stack's Airflow tasks see it (their env: ports, ASRFLOW_ROOT)."""
        saved = {k: os.environ.get(k) for k in PORT_ENV.values()}
        os.environ.update(self.port_env())
        try:
            return load_config(PROFILE, [f"paths.root={self.artifact_root}", *(extra or [])])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # ---- state file ------------------------------------------------------------------------
    def save(self) -> None:
        data = {
            "dir": str(self.dir),
            "ports": self.ports,
            "schedule": self.schedule,
            "procs": [asdict(p) for p in self.procs],
            "urls": {"airflow": self.api_url, "mlflow": self.mlflow_url, "postgres": self.db_url("airflow")},
            "manager_pid": os.getpid(),
            "updated": time.time(),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.state_path)

    @classmethod
    def load(cls, dir: Path) -> Stack | None:
        path = Path(dir) / STATE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        st = cls(
            dir=Path(data["dir"]),
            ports={k: int(v) for k, v in data["ports"].items()},
            schedule=bool(data.get("schedule", False)),
        )
        st.procs = [Proc(**p) for p in data.get("procs", [])]
        return st

    # ---- processes -------------------------------------------------------------------------
    def spawn(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str] | None = None,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
        stop_timeout: float = 20.0,
        cwd: Path | None = None,
    ) -> Proc:
        """Start ``cmd`` in its own process group, log to ``logs/<name>.log``, record it at once."""
        if any(p.name == name and _alive(p.pid, p.start_time) for p in self.procs):
            raise RuntimeError(f"{name} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as logf:
            kwargs: dict[str, Any] = {}
            if user is not None:
                kwargs.update(user=user, group=user, extra_groups=[])
            popen = subprocess.Popen(
                cmd,
                env=env if env is not None else os.environ.copy(),
                cwd=str(cwd or REPO_ROOT),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() reaches its children (task runners)
                **kwargs,
            )
        proc = Proc(
            name=name,
            pid=popen.pid,
            pgid=popen.pid,
            start_time=_proc_start_time(popen.pid),
            cmd=cmd,
            log=str(log_path),
            stop_signal=int(stop_signal),
            stop_timeout=float(stop_timeout),
        )
        self._popens[name] = popen
        self.procs = [p for p in self.procs if p.name != name] + [proc]
        self.save()
        return proc

    @property
    def _popens(self) -> dict[str, subprocess.Popen]:
        if not hasattr(self, "_popen_map"):
            self._popen_map: dict[str, subprocess.Popen] = {}
        return self._popen_map

    def proc(self, name: str) -> Proc:
        for p in self.procs:
            if p.name == name:
                return p
        raise KeyError(name)

    def alive(self, name: str) -> bool:
        p = self.proc(name)
        self._reap(name)
        return _alive(p.pid, p.start_time)

    def _reap(self, name: str) -> None:
        popen = self._popens.get(name)
        if popen is not None:
            popen.poll()

    def dead(self) -> list[str]:
        return [p.name for p in self.procs if not self.alive(p.name)]

    def kill(self, name: str, sig: int = signal.SIGKILL, reap_s: float = 5.0) -> None:
        """Signal a component's whole process group (the fault test uses SIGKILL) and reap its leader."""
        p = self.proc(name)
        if _alive(p.pid, p.start_time):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pgid, sig)
        deadline = time.monotonic() + reap_s
        while time.monotonic() < deadline and _alive(p.pid, p.start_time):
            self._reap(name)
            time.sleep(0.1)

    def stop_one(self, name: str, timeout: float = 20) -> None:
        self._stop_many([name], timeout)

    def _stop_many(self, names: list[str], timeout: float = 20) -> None:
        """SIGTERM every group at once (postgres: SIGINT, a fast shutdown), wait, then SIGKILL what is left."""
        procs = [self.proc(n) for n in names]
        ours = {p.name: _alive(p.pid, p.start_time) for p in procs}
        for p in procs:
            if not ours[p.name]:
                continue
            with contextlib.suppress(ProcessLookupError):
                if p.stop_signal == signal.SIGTERM:
                    os.killpg(p.pgid, signal.SIGTERM)
                else:  # postgres: the postmaster alone gets the signal and stops its backends itself
                    os.kill(p.pid, p.stop_signal)
        t0 = time.monotonic()
        deadline = {p.name: t0 + min(timeout, p.stop_timeout) for p in procs}
        while any(
            ours[p.name] and _alive(p.pid, p.start_time) and time.monotonic() < deadline[p.name]
            for p in procs
        ):
            for p in procs:
                self._reap(p.name)
            time.sleep(0.2)
        late = [p.name for p in procs if ours[p.name] and _alive(p.pid, p.start_time)]
        if late:
            print(
                f"distributed_stack: {', '.join(late)} still running after the grace period: SIGKILL",
                file=sys.stderr,
            )
        for p in procs:
            # The group may outlive its leader (task runners, pool processes). Only signal it when
            # the leader was ours: a group id whose leader is gone and was never seen alive here
            # may be a recycled id (process group ids are pids).
            if ours[p.name] or _proc_start_time(p.pid) is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pgid, signal.SIGKILL)
            self._reap(p.name)
            popen = self._popens.pop(p.name, None)
            if popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=10)

    def stop(self, timeout: float = 20) -> None:
        """Stop every recorded process: the servers that use the databases first, then redis and postgres."""
        infra = ("redis", "postgres")
        first = [p.name for p in self.procs if p.name not in infra]
        for batch in (first, [n for n in infra if any(p.name == n for p in self.procs)]):
            try:
                self._stop_many(batch, timeout)
            except Exception as e:  # keep stopping the others
                print(f"stopping {', '.join(batch)}: {e}", file=sys.stderr)
        self.procs = []
        if self.dir.exists():
            self.save()

    # ---- postgres --------------------------------------------------------------------------
    def _pg_user(self) -> str | None:
        """Postgres refuses to run as root: as root, the server runs as the ``postgres`` user."""
        return "postgres" if os.geteuid() == 0 else None

    def start_postgres(self) -> None:
        bindir = pg_bindir()
        user = self._pg_user()
        pg_root = self.pg_data.parent
        pg_root.mkdir(parents=True, exist_ok=True)
        self.pg_socket_dir.mkdir(parents=True, exist_ok=True)
        if user:
            import pwd

            pw = pwd.getpwnam(user)
            for p in (pg_root, self.pg_socket_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chmod(pg_root, 0o700)
            # the server user must be able to reach its data dir
            probe = subprocess.run(
                ["runuser", "-u", user, "--", "test", "-w", str(pg_root)], capture_output=True
            )
            if probe.returncode != 0:
                raise PermissionError(
                    f"{user} cannot write {pg_root}: choose a stack dir whose parents are traversable "
                    "(e.g. under the repo's .local/, not under a 0700 temp dir)"
                )
        if not (self.pg_data / "PG_VERSION").exists():
            pwfile = pg_root / "pwfile"
            pwfile.write_text(DB_PASSWORD + "\n")
            if user:
                import pwd

                pw = pwd.getpwnam(user)
                os.chown(pwfile, pw.pw_uid, pw.pw_gid)
            os.chmod(pwfile, 0o600)
            cmd = [
                str(bindir / "initdb"),
                "-D",
                str(self.pg_data),
                "-U",
                DB_USER,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
            kwargs: dict[str, Any] = {"user": user, "group": user, "extra_groups": []} if user else {}
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(pg_root), **kwargs)
            pwfile.unlink(missing_ok=True)
            if res.returncode != 0:
                raise RuntimeError(f"initdb failed:\n{res.stdout}\n{res.stderr}")
        sock = str(self.pg_socket_dir)
        if len(sock) > 90:  # the socket path limit is 107 bytes: go TCP-only rather than fail
            sock = ""
        cmd = [
            str(bindir / "postgres"),
            "-D",
            str(self.pg_data),
            "-p",
            str(self.ports["pg"]),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={sock}",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=64MB",
            # a disposable local stack: trade crash durability for speed on slow disks
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        self.spawn("postgres", cmd, user=user, stop_signal=signal.SIGINT, cwd=pg_root)
        self._wait(lambda: self._pg_ready(), "postgres", timeout=60)
        self._create_databases()

    def _pg_connect(self, db: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.ports["pg"],
            user=DB_USER,
            password=DB_PASSWORD,
            dbname=db,
            connect_timeout=3,
        )

    def _pg_ready(self) -> bool:
        try:
            self._pg_connect().close()
            return True
        except Exception:
            return False

    def _create_databases(self) -> None:
        con = self._pg_connect()
        try:
            con.autocommit = True
            with con.cursor() as cur:
                for db in DATABASES:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                    if cur.fetchone() is None:
                        cur.execute(f'CREATE DATABASE "{db}" OWNER {DB_USER}')
        finally:
            con.close()

    # ---- redis / mlflow --------------------------------------------------------------------
    def start_redis(self) -> None:
        rdir = self.dir / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(self.ports["redis"]),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(rdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        self.spawn("redis", cmd)
        self._wait(lambda: self._redis_ping(), "redis", timeout=30)

    def _redis_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ports["redis"]), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start_mlflow(self) -> None:
        art = self.dir / "mlflow" / "artifacts"
        art.mkdir(parents=True, exist_ok=True)
        cmd = [
            _bin("mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports["mlflow"]),
            "--workers",
            "1",
            "--backend-store-uri",
            self.db_url("mlflow"),
            "--artifacts-destination",
            str(art),
            "--serve-artifacts",
        ]
        env = dict(os.environ, MLFLOW_ENABLE_ASYNC_LOGGING="false", DO_NOT_TRACK="1")
        # stateless (Postgres + files written synchronously); its server waits for clients' keep-alive
        # connections on SIGTERM, so it gets a short grace
        self.spawn("mlflow", cmd, env=env, stop_timeout=5)

    def wait_mlflow(self, timeout: float = 180) -> None:
        self._wait(lambda: _http_ok(f"{self.mlflow_url}/health"), "mlflow", timeout=timeout)

    # ---- airflow ---------------------------------------------------------------------------
    def make_airflow_env(self) -> dict[str, str]:
        from devstack.airflow_env import ADMIN_USER, admin_password, airflow_env

        cfg = self.config()
        env = airflow_env(
            cfg,
            port=self.ports["api"],
            extra={
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url("airflow"),
                "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": self.db_url("airflow", driver="db+postgresql+psycopg2"),
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
                # Celery's default prefork pool runs tasks in daemonic processes, and a daemonic
                # process may not start children: every step that uses a process pool (ingest
                # decoding, featurize) would fail with "daemonic processes are not allowed to have
                # children". solo: the worker's main process runs (supervises) one task at a time.
                "AIRFLOW__CELERY__POOL": "solo",
                "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
                # a killed worker's task is noticed quickly and handed to the retry machinery
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
                "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True" if self.schedule else "False",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "20",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
                "ASRFLOW_PROFILE": PROFILE,
                "ASRFLOW_ROOT": str(self.artifact_root),
                "MLFLOW_TRACKING_URI": self.mlflow_url,
                **self.port_env(),
            },
        )
        # every Airflow process (task runners included) imports the code of this checkout, also
        # when the venv's editable install points at another one
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.admin_password = admin_password(cfg)
        self.admin_user = ADMIN_USER
        self.airflow_env = env
        return env

    def _airflow_cli(self, args: list[str], timeout: float = 600) -> str:
        res = subprocess.run(
            [_bin("airflow"), *args],
            env=self.airflow_env,
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"airflow {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            )
        return res.stdout

    def migrate_airflow(self) -> None:
        """``airflow db migrate`` once per Airflow version (a stamp in the stack dir skips it after)."""
        from importlib.metadata import version

        stamp = self.dir / ".airflow-migrated"
        want = f"{version('apache-airflow')}:{self.ports['pg']}"
        if stamp.exists() and stamp.read_text() == want:
            return
        self._airflow_cli(["db", "migrate"])
        stamp.write_text(want)

    def start_airflow(self, default_workers: int = 1, gpu_workers: int = 1) -> None:
        af = _bin("airflow")
        env = self.airflow_env
        self.spawn(
            "api-server", [af, "api-server", "--host", "127.0.0.1", "--port", str(self.ports["api"])], env=env
        )
        self.spawn("scheduler", [af, "scheduler", "--skip-serve-logs"], env=env)
        self.spawn("dag-processor", [af, "dag-processor"], env=env)
        for i in range(1, default_workers + 1):
            self.start_worker(f"default-{i}", "default")
        for i in range(1, gpu_workers + 1):  # > 1: a multi-node training (train.nnodes) has a worker per node
            self.start_worker(f"gpu-{i}", "gpu")

    def start_worker(self, name: str, queues: str, concurrency: int = 1) -> Proc:
        """A Celery worker on ``queues``; task instances it runs report ``hostname == name``."""
        env = dict(self.airflow_env)
        env[WORKER_NAME_ENV] = name
        env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] = "devstack.distributed_stack.worker_hostname"
        pidfile = self.dir / "run" / f"worker-{name}.pid"
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            _bin("airflow"),
            "celery",
            "worker",
            "--queues",
            queues,
            "--concurrency",
            str(concurrency),
            "--celery-hostname",
            f"{name}@%h",
            "--pid",
            str(pidfile),
            "--skip-serve-logs",
            "--without-gossip",
        ]
        return self.spawn(f"worker-{name}", cmd, env=env)

    def worker_names(self) -> list[str]:
        return [p.name[len("worker-") :] for p in self.procs if p.name.startswith("worker-")]

    # ---- REST ------------------------------------------------------------------------------
    def token(self) -> str:
        import requests

        if not self.admin_password:
            from devstack.airflow_env import admin_password

            self.admin_password = admin_password(self.config())
        r = requests.post(
            f"{self.api_url}/auth/token",
            json={"username": "admin", "password": self.admin_password},
            timeout=30,
        )
        r.raise_for_status()
        return r.json()["access_token"]

    def api(self, method: str, path: str, token: str | None = None, **kw):
        import requests

        headers = {"Authorization": f"Bearer {token or self.token()}"}
        r = requests.request(method, f"{self.api_url}/api/v2{path}", headers=headers, timeout=30, **kw)
        return r

    def ensure_pool(self, cfg, slots: int | None = None) -> None:
        """Create (or resize) the GPU pool: ``slots`` or the profile's ``airflow.gpu_pool_size``."""
        tok = self.token()
        body = {
            "name": cfg.airflow.gpu_pool,
            "slots": int(slots or cfg.airflow.gpu_pool_size),
            "description": "GPU slots for DeepSpeed training (asrflow train)",
            "include_deferred": False,
        }
        r = self.api("POST", "/pools", tok, json=body)
        if r.status_code == 409:
            r = self.api("PATCH", f"/pools/{cfg.airflow.gpu_pool}", tok, json=body)
        if r.status_code >= 300:
            raise RuntimeError(f"creating pool {cfg.airflow.gpu_pool}: {r.status_code} {r.text}")

    def wait_dag(self, dag_id: str, timeout: float = 180) -> dict[str, Any]:
        """Wait until the dag-processor has serialized ``dag_id``; raise with the import errors if it never does."""
        tok = self.token()
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            r = self.api("GET", f"/dags/{dag_id}", tok)
            if r.status_code == 200:
                return r.json()
            time.sleep(1)
        errors = self.api("GET", "/importErrors", tok).json().get("import_errors", [])
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout:.0f}s; import errors: {errors}")

    def wait_api(self, timeout: float = 240) -> None:
        self._wait(lambda: _http_ok(f"{self.api_url}/api/v2/monitor/health"), "api-server", timeout=timeout)

    def celery_ping(self, timeout: float = 3) -> dict[str, Any]:
        """Ask the workers over the broker (``celery inspect ping``): ``{nodename: reply}``."""
        from celery import Celery

        app = Celery(broker=self.broker_url)
        try:
            replies = app.control.ping(timeout=timeout) or []
        finally:
            app.close()
        out: dict[str, Any] = {}
        for item in replies:
            out.update(item)
        return out

    def wait_workers(self, timeout: float = 180) -> dict[str, Any]:
        want = set(self.worker_names())
        seen: dict[str, Any] = {}

        def ok() -> bool:
            nonlocal seen
            seen = self.celery_ping()
            return want <= {n.split("@", 1)[0] for n in seen}

        self._wait(ok, f"celery workers {sorted(want)}", timeout=timeout)
        return seen

    def wait_scheduler(self, timeout: float = 180) -> None:
        def ok() -> bool:
            try:
                with urllib.request.urlopen(f"{self.api_url}/api/v2/monitor/health", timeout=3) as r:
                    health = json.loads(r.read())
            except (urllib.error.URLError, OSError, ValueError):
                return False
            return (health.get("scheduler") or {}).get("status") == "healthy" and (
                health.get("dag_processor") or {}
            ).get("status") == "healthy"

        self._wait(ok, "scheduler + dag-processor", timeout=timeout)

    # ---- waiting -----------------------------------------------------------------------------
    def _wait(self, ok, what: str, timeout: float) -> float:
        t0 = time.monotonic()
        while True:
            if ok():
                return time.monotonic() - t0
            if dead := self.dead():
                logs = "\n".join(f"--- {n}: ...{_tail(self.proc(n).log)}" for n in dead)
                raise RuntimeError(f"waiting for {what}: {', '.join(dead)} exited\n{logs}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{what} not ready after {timeout:.0f}s; logs in {self.log_dir}")
            time.sleep(0.5)


def _tail(path: str, n: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return ""


# ------------------------------------------------------------------------------------------------
# start / stop / status
# ------------------------------------------------------------------------------------------------


def start(
    dir: str | os.PathLike[str] | None = None,
    ports: dict[str, int] | None = None,
    default_workers: int = 1,
    gpu_workers: int = 1,
    schedule: bool = False,
    log=print,
) -> Stack:
    """Bring the whole stack up (idempotent on a stopped dir: data is kept). Raises if any part fails,
    after stopping what it started."""
    d = Path(dir).resolve() if dir else default_dir()
    prev = Stack.load(d)
    if prev is not None and any(_alive(p.pid, p.start_time) for p in prev.procs):
        raise RuntimeError(
            f"a stack is already running from {d} (stop it: python -m {__spec__.name} down --dir {d})"
        )
    st = Stack(dir=d, ports={**default_ports(), **(ports or {})}, schedule=schedule)
    if len(set(st.ports.values())) != len(st.ports):
        raise ValueError(f"the stack's ports must differ: {st.ports}")
    busy = [f"{k}={v}" for k, v in st.ports.items() if port_open(v)]
    if busy:
        raise RuntimeError(f"port(s) already in use on 127.0.0.1: {', '.join(busy)}")
    d.mkdir(parents=True, exist_ok=True)
    st.artifact_root.mkdir(parents=True, exist_ok=True)
    st.save()
    t0 = time.monotonic()
    try:
        st.start_postgres()
        log(
            f"  postgres   127.0.0.1:{st.ports['pg']}  databases {', '.join(DATABASES)}  ({time.monotonic() - t0:.0f}s)"
        )
        st.start_redis()
        log(f"  redis      127.0.0.1:{st.ports['redis']}  ({time.monotonic() - t0:.0f}s)")
        st.start_mlflow()  # starts its migrations while Airflow migrates
        st.make_airflow_env()
        st.migrate_airflow()
        log(f"  airflow    metadata DB migrated  ({time.monotonic() - t0:.0f}s)")
        st.start_airflow(default_workers=default_workers, gpu_workers=gpu_workers)
        st.wait_mlflow()
        log(f"  mlflow     {st.mlflow_url}  ({time.monotonic() - t0:.0f}s)")
        st.wait_api()
        cfg = st.config()
        # one train_node task per GPU worker may hold its slots at once (train.nnodes up to gpu_workers)
        st.ensure_pool(cfg, max(cfg.airflow.gpu_pool_size, gpu_workers * cfg.train.gpu_pool_slots))
        log(f"  api-server {st.api_url}  pool {st.config().airflow.gpu_pool}  ({time.monotonic() - t0:.0f}s)")
        workers = st.wait_workers()
        log(f"  workers    {', '.join(sorted(workers))}  ({time.monotonic() - t0:.0f}s)")
        st.wait_scheduler()
        log(f"  scheduler + dag-processor healthy  ({time.monotonic() - t0:.0f}s)")
    except BaseException:
        st.stop()
        raise
    return st


def stop(dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Stop what the stack in ``dir`` started (works from any process: reads the state file)."""
    d = Path(dir).resolve() if dir else default_dir()
    st = Stack.load(d)
    if st is None:
        return []
    names = [p.name for p in st.procs if _alive(p.pid, p.start_time) or _group_alive(p.pgid)]
    st.stop()
    return names


def status(dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    d = Path(dir).resolve() if dir else default_dir()
    st = Stack.load(d)
    if st is None:
        return {"dir": str(d), "running": False, "procs": {}}
    procs = {p.name: {"pid": p.pid, "alive": _alive(p.pid, p.start_time), "log": p.log} for p in st.procs}
    out: dict[str, Any] = {
        "dir": str(d),
        "running": any(v["alive"] for v in procs.values()),
        "procs": procs,
        "ports": st.ports,
        "airflow": st.api_url,
        "mlflow": st.mlflow_url,
    }
    if out["running"]:
        out["api_healthy"] = _http_ok(f"{st.api_url}/api/v2/monitor/health")
        out["mlflow_healthy"] = _http_ok(f"{st.mlflow_url}/health")
    return out


def _print_login(st: Stack) -> None:
    print(
        f"\nAirflow UI/API  {st.api_url}   login: admin / {st.admin_password}\n"
        f"MLflow          {st.mlflow_url}\n"
        f"Postgres        127.0.0.1:{st.ports['pg']}  user {DB_USER} / {DB_PASSWORD}  (databases: {', '.join(DATABASES)})\n"
        f"Celery broker   {st.broker_url}   workers: {', '.join(st.worker_names())}\n"
        f"artifact root   {st.artifact_root}\n"
        f"logs            {st.log_dir}\n"
        "Trigger asr_retraining with profile=distributed (UI: Trigger ▶), or:\n"
        f"  curl -X POST {st.api_url}/api/v2/dags/asr_retraining/dagRuns -H 'Authorization: Bearer <token>' "
        '-H \'Content-Type: application/json\' -d \'{"logical_date": null, "conf": {"profile": "distributed"}}\'\n'
        f"  (token: curl -X POST {st.api_url}/auth/token -H 'Content-Type: application/json' "
        f'-d \'{{"username": "admin", "password": "..."}}\')\n'
        + (
            ""
            if st.schedule
            else "the weekly schedule is off ([scheduler] use_job_schedule; up --schedule turns it on)\n"
        )
        + f"stop:           make distributed-stop   (python -m devstack.distributed_stack down --dir {st.dir})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m devstack.distributed_stack", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument(
        "--dir", default=None, help="state folder (default $ASRFLOW_DIST_DIR or <repo>/.local/distributed)"
    )
    for k in DEFAULT_PORTS:
        ap.add_argument(
            f"--{k}-port", type=int, default=None, help=f"default ${PORT_ENV[k]} or {DEFAULT_PORTS[k]}"
        )
    ap.add_argument("--default-workers", type=int, default=1, help="Celery workers on the default queue")
    ap.add_argument(
        "--gpu-workers", type=int, default=1,
        help="Celery workers on the gpu queue (2: a week with train.nnodes=2 trains on two of them)",
    )  # fmt: skip
    ap.add_argument("--schedule", action="store_true", help="let the scheduler create the weekly runs too")
    args = ap.parse_args(argv)
    if args.action == "down":
        names = stop(args.dir)
        print(f"stopped: {', '.join(names) if names else 'nothing was running'}")
        return 0
    if args.action == "status":
        print(json.dumps(status(args.dir), indent=2))
        return 0
    ports = {k: getattr(args, f"{k}_port") for k in DEFAULT_PORTS if getattr(args, f"{k}_port")}
    print(f"starting the distributed stack in {args.dir or default_dir()} ...", flush=True)
    t0 = time.monotonic()
    st = start(
        args.dir,
        ports,
        default_workers=args.default_workers,
        gpu_workers=args.gpu_workers,
        schedule=args.schedule,
        log=lambda m: print(m, flush=True),
    )
    print(f"up in {time.monotonic() - t0:.0f}s", flush=True)
    _print_login(st)
    return 0


if __name__ == "__main__":
    sys.exit(main())

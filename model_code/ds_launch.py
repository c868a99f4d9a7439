"""Multi-process entry point and launcher for :func:`model_code.training.train`.

Child side (one process per rank)::

    python -m torch.distributed.run --nproc_per_node N -m model_code.ds_launch --args args.json
    deepspeed --num_gpus N --module model_code.ds_launch --args args.json     (GPU hosts)

Each rank reads the same :class:`~model_code.training.TrainArgs` JSON, initialises
torch.distributed from the env vars the launcher sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and trains; rank 0 writes ``<out_dir>/result.json``.

Parent side: :func:`launch` starts the launcher, tails rank 0's ``events.jsonl`` (so the caller
can log metrics live, e.g. to MLflow) and returns rank 0's result once every rank exited 0.

No orphaned ranks (issue 13). torchrun starts each rank in its own session, so killing the
launcher alone would leave the ranks running (holding GPUs, writing checkpoints). Therefore:

* the launcher runs in its own process group and session, with a parent-death signal
  (SIGTERM when the process that called :func:`launch` dies, even by SIGKILL), and when
  :func:`launch` is interrupted (an Airflow timeout, a kill) it stops the whole group and
  every rank registered for the run: SIGTERM, a grace period, then SIGKILL;
* every rank (:func:`rank_guard`) dies with its launcher (``PR_SET_PDEATHSIG``), registers
  itself in ``<checkpoint dir>/.ranks/<host>~<pid>`` and holds a shared ``flock`` on
  ``<checkpoint dir>/.ranks.lock`` for as long as it lives;
* before starting, :func:`launch` claims that lock exclusively (:func:`claim_ranks_dir`):
  registered ranks of an earlier attempt still alive on this host are killed first, and
  ranks alive on another host make the retry fail instead of writing into the same
  checkpoint folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RANKS_DIR = ".ranks"
RANKS_LOCK = ".ranks.lock"
RANKS_DIR_ENV = "ASRFLOW_RANKS_DIR"  # where a rank registers (set by launch; default: the checkpoint folder)
NODE_ENV = "ASRFLOW_NODE_INDEX"  # the node (mapped train_node task) a rank runs on (multi-node launches)
_PR_SET_PDEATHSIG = 1
_guard_fd: int | None = None  # the shared flock a rank holds for its whole life


# ------------------------------------------------------------------------------ process hygiene
def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (``PR_SET_PDEATHSIG``).
    False where that is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _launcher_preexec() -> None:  # runs in the launcher child between fork and exec
    set_parent_death_signal(signal.SIGTERM)  # torchrun/deepspeed forward SIGTERM to their ranks


def _pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def registered_ranks(ranks_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The ranks registered in ``ranks_dir`` (``host``, ``pid``, ``rank``), oldest first."""
    out = []
    for p in sorted((Path(ranks_dir) / RANKS_DIR).glob("*~*")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        rec["file"] = str(p)
        out.append(rec)
    return out


def _signal_local_ranks(ranks_dir: Path, sig: int) -> list[int]:
    """Send ``sig`` to the registered ranks alive on this host (checked to be ds_launch processes)."""
    host, hit = socket.gethostname(), []
    for rec in registered_ranks(ranks_dir):
        pid = int(rec.get("pid", 0))
        if rec.get("host") != host or pid <= 1 or pid == os.getpid():
            continue
        if pid_alive(pid) and "ds_launch" in _pid_cmdline(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                hit.append(pid)
        elif not pid_alive(pid):
            Path(rec["file"]).unlink(missing_ok=True)
    return hit


def rank_guard(ranks_dir: str | os.PathLike[str], rank: int | None = None) -> None:
    """Rank side: die with the launcher, register this process, hold the shared run lock.

    Called by :func:`main` in every rank before training starts."""
    import fcntl

    global _guard_fd
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the launcher died before the signal was armed (we were re-parented)
        os._exit(1)
    d = Path(ranks_dir)
    (d / RANKS_DIR).mkdir(parents=True, exist_ok=True)
    fd = os.open(d / RANKS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _guard_fd = fd
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank, "started": time.time()}
    (d / RANKS_DIR / f"{rec['host']}~{rec['pid']}").write_text(json.dumps(rec))


def claim_ranks_dir(ranks_dir: str | os.PathLike[str], timeout_s: float = 60.0) -> None:
    """Parent side, before a launch: make sure no rank of an earlier attempt still uses ``ranks_dir``.

    Takes the run lock exclusively. While it is held (shared) by live ranks, those on this
    host are killed; ranks alive elsewhere make this raise ``RuntimeError`` after ``timeout_s``
    rather than let two trainings write one checkpoint folder. Then the registry is cleared."""
    import fcntl

    d = Path(ranks_dir)
    (d / RANKS_DIR).mkdir(parents=True, exist_ok=True)
    fd = os.open(d / RANKS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        sig = signal.SIGTERM
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                alive = [f"{r.get('host')}:{r.get('pid')}" for r in registered_ranks(d)]
                raise RuntimeError(
                    f"ranks of an earlier training attempt still use {d} ({', '.join(alive) or 'unregistered'}); "
                    "they run on another host or could not be stopped: stop them before retrying"
                )
            killed = _signal_local_ranks(d, sig)
            if killed:
                sig = signal.SIGKILL  # a second round does not ask politely
            time.sleep(0.2)
        for p in (d / RANKS_DIR).glob("*~*"):
            p.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the exclusive lock: the new ranks take it shared


def stop_launch(proc: subprocess.Popen, ranks_dir: str | os.PathLike[str] | None, grace_s: float = 10.0) -> None:
    """Stop a launcher started by :func:`launch`: its whole process group and every registered
    rank on this host (ranks live in sessions of their own), SIGTERM first, SIGKILL after ``grace_s``."""
    d = Path(ranks_dir) if ranks_dir is not None else None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        if d is not None:
            _signal_local_ranks(d, sig)
        t_end = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < t_end:
            ranks_alive = d is not None and any(
                r.get("host") == socket.gethostname() and pid_alive(int(r.get("pid", 0))) for r in registered_ranks(d)
            )
            if proc.poll() is not None and not ranks_alive:
                break
            time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torchrun's c10d handler caches the first round's bootstrap store address (TCPStore sharing):
# after an elastic restart, a replacement node waits for a MASTER_ADDR the survivors never write
# again in the new round's store and the re-rendezvous hangs (torch 2.11). Without sharing, rank 0
# of every round publishes it afresh.
NODE_LAUNCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def node_command(
    args_path: Path | None, nproc_per_node: int, node: dict[str, Any], entry: list[str] | None = None
) -> list[str]:
    """torchrun for one node of a multi-node training: c10d rendezvous at ``node["endpoint"]``.

    ``node``: ``nnodes``, ``node_rank``, ``endpoint`` (``host:port``), ``rdzv_id``, ``is_host``
    (node 0 hosts the c10d store), ``join_timeout_s`` (a node that never comes fails the
    rendezvous after this) and ``max_restarts`` (elastic: after a node died, the survivors
    restart their ranks and wait for it, or its replacement, in a new rendezvous round; the
    ranks resume from the last checkpoint). ``--node-rank`` only names the node in the logs:
    c10d assigns the ranks, so rank 0 may run on any node (it writes to the shared ``out_dir``).
    ``entry``: what each rank runs (default ``-m model_code.ds_launch --args <args_path>``).
    """
    n = int(node["nnodes"])
    conf = f"is_host={'true' if node.get('is_host') else 'false'},join_timeout={int(node.get('join_timeout_s', 600))}"
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", f"{n}:{n}", "--nproc-per-node", str(nproc_per_node), "--node-rank", str(int(node["node_rank"])),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", str(node["endpoint"]), "--rdzv-id", str(node["rdzv_id"]),
        "--rdzv-conf", conf, "--max-restarts", str(int(node.get("max_restarts", 0))), "--monitor-interval", "1",
        *(entry or ["-m", "model_code.ds_launch", "--args", str(args_path)]),
    ]  # fmt: skip


def launch_command(
    args_path: Path, world_size: int, launcher: str, master_port: int, max_restarts: int = 0
) -> list[str]:
    """The command line that starts ``world_size`` ranks of :mod:`model_code.ds_launch`.

    ``max_restarts`` (torchrun only): when a rank dies, torchrun stops the others and starts the
    whole group again, up to this many times; the ranks resume from the last checkpoint. A rank
    that aborts inside gloo's connection setup (seen on loaded CI machines) costs one restart
    instead of the training. DeepSpeed's local launcher has no restarts. torchrun runs
    ``--standalone`` (a c10d rendezvous on a port it binds itself, no port picked here and
    lost to a race) with :data:`NODE_LAUNCH_ENV`: with static rendezvous, a restarted group
    reads the dead group's gloo addresses from the agent's store and hangs in DeepSpeed's
    ``new_group`` (torch 2.11); without store sharing every round gets a fresh store.
    ``master_port`` is used by the deepspeed launcher only.
    """
    if launcher == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", "--nnodes", "1", "--nproc_per_node", str(world_size),
            "--max-restarts", str(int(max_restarts)), "--monitor-interval", "1",
            "-m", "model_code.ds_launch", "--args", str(args_path),
        ]  # fmt: skip
    if launcher == "deepspeed":
        return [
            sys.executable, "-m", "deepspeed.launcher.runner",
            "--num_gpus", str(world_size), "--master_addr", "127.0.0.1", "--master_port", str(master_port),
            "--module", "model_code.ds_launch", "--args", str(args_path),
        ]  # fmt: skip
    if launcher == "inprocess":  # one rank in a child process (used by the crash/resume tests)
        return [sys.executable, "-m", "model_code.ds_launch", "--args", str(args_path)]
    raise ValueError(f"unknown launcher {launcher!r}")


def launch(
    args,
    world_size: int,
    launcher: str = "torchrun",
    on_event: Callable[[dict[str, Any]], None] | None = None,
    poll_s: float = 1.0,
    env: dict[str, str] | None = None,
    node: dict[str, Any] | None = None,
    ranks_dir: str | os.PathLike[str] | None = None,
    before_start: Callable[[], None] | None = None,
    result_wait_s: float = 120.0,
    max_restarts: int = 0,
) -> dict[str, Any]:
    """Run ``args`` (a ``TrainArgs``) on ``world_size`` local processes; wait; return rank 0's result.

    ``on_event`` gets every new JSON line of ``<out_dir>/events.jsonl`` while the ranks run.
    Output of the ranks goes to ``<out_dir>/launch.log``. Raises ``RuntimeError`` (with the log's
    tail) if the launcher exits non-zero or rank 0 wrote no result. The launcher runs in its own
    process group; if this call is interrupted, the group and every rank are stopped (see the
    module docstring), and ranks of an earlier attempt are stopped before it starts.

    Multi-node (``node``, see :func:`node_command`): this call starts this node's ``world_size``
    ranks with torchrun's c10d rendezvous; ``out_dir`` must be on storage every node shares
    (rank 0, wherever c10d puts it, writes ``result.json`` and the model there). Node 0 writes
    the arguments file and clears the old result (``before_start`` runs after that, before
    torchrun starts: node 0 publishes the rendezvous there); the other nodes only read the
    arguments file node 0 wrote, log to ``launch-node<i>.log`` and return
    ``{"node_rank", "returncode"}``. ``ranks_dir`` (default: the checkpoint folder) is where
    this launch registers its ranks (one per node, so nodes on one host do not kill each other's).
    ``max_restarts``: see :func:`launch_command` (multi-node takes ``node["max_restarts"]``).
    """
    out_dir = Path(args.out_dir)
    ranks_dir = Path(ranks_dir or args.checkpoint_dir or args.out_dir)
    claim_ranks_dir(ranks_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args_path = out_dir / "train_args.json"
    result_path = out_dir / "result.json"
    lead = node is None or int(node["node_rank"]) == 0
    if lead:
        args_path.write_text(args.to_json())
        result_path.unlink(missing_ok=True)
    if before_start is not None:
        before_start()
    events_path = out_dir / "events.jsonl"
    offset = events_path.stat().st_size if events_path.exists() else 0  # events of earlier attempts
    if node is not None:
        cmd = node_command(args_path, world_size, node)
    else:
        cmd = launch_command(args_path, world_size, launcher, _free_port(), max_restarts=max_restarts)
    penv = {**os.environ, **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        penv.pop(k, None)  # an in-process run of the parent must not leak its rank into the children
    penv["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), penv.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    penv[RANKS_DIR_ENV] = str(ranks_dir)
    if node is not None:
        penv[NODE_ENV] = str(int(node["node_rank"]))
    if node is not None or launcher == "torchrun":
        penv.update(NODE_LAUNCH_ENV)
    if launcher == "deepspeed":
        penv.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    log_path = out_dir / ("launch.log" if node is None else f"launch-node{int(node['node_rank'])}.log")

    drain = EventTail(events_path, on_event, offset)

    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            cmd,
            cwd=str(REPO_ROOT),
            env=penv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_launch signals all of it
            preexec_fn=_launcher_preexec,  # noqa: PLW1509 - only prctl, no locks taken
        )
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                drain()
        except BaseException:
            stop_launch(proc, ranks_dir)
            raise
    drain()
    if proc.returncode == 0 and not lead:
        return {"node_rank": int(node["node_rank"]), "returncode": 0}  # type: ignore[index]
    if proc.returncode == 0 and node is not None:
        # rank 0 may run on another node and write its result a moment after our ranks left
        t_end = time.monotonic() + result_wait_s
        while not result_path.exists() and time.monotonic() < t_end:
            time.sleep(0.2)
    drain()
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(
            f"training launcher exited with {proc.returncode}: {' '.join(cmd)}\n{failure_excerpt(log_path)}"
        )
    return json.loads(result_path.read_text())


# lines of a rank's own failure (a C++ abort, a Python exception), as opposed to the launcher's report
_RANK_ERROR = re.compile(r"terminate called|what\(\)|Error|Exception|Traceback|Aborted|Segmentation fault")


def failure_excerpt(log_path: Path, tail_chars: int = 4000, max_error_lines: int = 20) -> str:
    """The end of a failed launch's log, then the log's last error-looking lines.

    torchrun ends a failed launch with its own long traceback and summary, which can push the
    rank's message (``terminate called ... what(): ...`` before a SIGABRT, a Python exception)
    out of a plain tail; the error lines are therefore repeated after the tail, in log order.
    """
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    tail = text[-tail_chars:]
    head_lines = text[: max(0, len(text) - tail_chars)].splitlines()
    errors = [ln for ln in head_lines if _RANK_ERROR.search(ln)][-max_error_lines:]
    if not errors:
        return tail
    return tail + "\n--- error lines from earlier in the log ---\n" + "\n".join(errors)


class EventTail:
    """Calls ``on_event`` for every complete new JSON line of rank 0's ``events.jsonl``.

    Call it (no arguments) as often as wanted; it reads from where the last call stopped
    (``offset``: bytes already seen, e.g. the events of an earlier attempt), and leaves a line
    that is still being written for the next call."""

    def __init__(self, path: Path, on_event: Callable[[dict[str, Any]], None] | None, offset: int = 0) -> None:
        self.path, self.on_event, self.offset = Path(path), on_event, int(offset)

    def __call__(self) -> None:
        if self.on_event is None or not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break
                self.offset += len(line.encode())
                self.on_event(json.loads(line))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--args", required=True, help="TrainArgs JSON file")
    p.add_argument("--local_rank", type=int, default=None, help="(set by the deepspeed launcher)")
    ns, _ = p.parse_known_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model_code.training import TrainArgs, shutdown_distributed, train

    args = TrainArgs.from_json(Path(ns.args).read_text())
    ranks_dir = os.environ.get(RANKS_DIR_ENV) or args.checkpoint_dir or args.out_dir
    rank_guard(Path(ranks_dir), rank=int(os.environ.get("RANK", "0")))
    try:
        train(args)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The dev stack's one process supervisor: start in a process group, check, stop, free ports.

Every server or runner the dev stack starts (``local_run``'s ``airflow dags test``, the UI
stack, the distributed loopback stack) runs in its own session, so one signal to its process
group reaches its children too (task runners, pool processes). A PID is only trusted together
with its start time (``/proc/<pid>/stat`` field 22), so a recorded process that died and whose
PID was reused by something else is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    return free_ports(["port"])["port"]


def free_ports(names) -> dict[str, int]:
    """Distinct free ports, one per name (all sockets are held open until every port is picked)."""
    socks = []
    try:
        for _ in names:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return {n: s.getsockname()[1] for n, s in zip(names, socks, strict=True)}
    finally:
        for s in socks:
            s.close()


def proc_start_time(pid: int) -> int | None:
    """Start time of a process (clock ticks since boot), or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces: split after its closing parenthesis
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 overall: starttime


def alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, given ``start_time``, is still the same process."""
    st = proc_start_time(pid)
    if st is None:
        return False
    if start_time is not None and st != start_time:
        return False  # the PID was recycled: not ours
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_group(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                log: str | os.PathLike[str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (process group); output to ``log`` (appended) or inherited."""
    logf = open(log, "ab") if log is not None else None  # noqa: SIM115  (closed below; the child keeps its copy)
    try:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=None if cwd is None else str(cwd),
            stdout=logf,
            stderr=subprocess.STDOUT if logf is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if logf is not None:
            logf.close()


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Signal ``proc``'s process group, wait up to ``timeout`` s, then SIGKILL whatever is left.

    The group may outlive its leader (task runners), so it is killed even when the leader has
    exited; the leader is reaped.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)


def wait_gone(pid: int, start_time: int | None, timeout: float) -> bool:
    """Wait until the process is gone; returns whether it is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid, start_time):
            return True
        time.sleep(0.1)
    return not alive(pid, start_time)

"""How the nodes of one multi-node training find each other: a rendezvous record on shared storage.

torchrun's c10d rendezvous needs one endpoint (``host:port``) that every node can reach and that
is known before the nodes start. Node 0 chooses it when it starts (a free port, or a fixed one)
and publishes it, with a rendezvous id, in a small JSON file on the storage every node shares
(the train step's checkpoint folder)::

    <folder>/rendezvous.json   {"endpoint": "host:port", "rdzv_id": "...", "nnodes": 2,
                                "generation": 3, "published": <unix time>, ...}

Node 0's torchrun then hosts the c10d store on that port (``--rdzv-conf is_host=true``); every
other node waits (:func:`wait_endpoint`) until the record exists *and* the endpoint accepts
connections, then starts its torchrun against it. Each start of node 0 (a task retry) writes a
new record with a new ``generation`` and rendezvous id, so a node never joins a dead attempt's
store for long: it re-reads the record while it waits, and a torchrun that lost its store exits
non-zero (its task fails and is retried).

A node that never comes: node 0's torchrun gives up after the join timeout
(``--rdzv-conf join_timeout=...``), the others after :func:`wait_endpoint`'s ``timeout_s``;
both fail with an error that says so, instead of hanging.

Plain arguments only (paths, numbers); no config objects.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

RECORD = "rendezvous.json"


class RendezvousTimeout(TimeoutError):
    """The rendezvous endpoint did not appear (or did not answer) within the join timeout."""


def free_port(host: str = "") -> int:
    """A TCP port free right now on this host (bound on all interfaces, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_host() -> str:
    """The address other nodes reach this one at: its FQDN (a pod's DNS name, a host name)."""
    return socket.getfqdn()


def endpoint_open(endpoint: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def read_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        rec = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("endpoint") else None


def publish_endpoint(
    folder: str | os.PathLike[str],
    nnodes: int,
    host: str = "",
    port: int = 0,
    run_key: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Node 0: choose the endpoint (``port`` 0: a free one) and publish the record atomically.

    Returns the record: ``endpoint``, ``rdzv_id`` (``<run_key>-g<generation>-<random>``: unique
    per start, so a retry never joins a previous attempt's rendezvous), ``generation``,
    ``nnodes``, ``published``, ``host_pid`` and whatever ``extra`` holds (e.g. the path of the
    training arguments)."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    prev = read_record(d) or {}
    gen = int(prev.get("generation", 0)) + 1
    host = host or default_host()
    port = int(port) or free_port()
    rec = {
        **(extra or {}),
        "endpoint": f"{host}:{port}",
        "rdzv_id": f"{run_key or 'asrflow'}-g{gen}-{uuid.uuid4().hex[:8]}",
        "generation": gen,
        "nnodes": int(nnodes),
        "published": time.time(),
        "host": socket.gethostname(),
        "host_pid": os.getpid(),
    }
    tmp = d / f".tmp-{RECORD}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(rec, sort_keys=True))
    os.replace(tmp, d / RECORD)
    return rec


def wait_endpoint(
    folder: str | os.PathLike[str],
    timeout_s: float,
    poll_s: float = 0.5,
    not_before: float | None = None,
    on_wait=None,
) -> dict[str, Any]:
    """Node i > 0: wait for node 0's record whose endpoint answers; return it.

    The record is re-read on every poll (node 0 may have restarted and published a new one).
    ``not_before``: ignore records published earlier (unix time). Raises
    :class:`RendezvousTimeout` after ``timeout_s`` with what was seen."""
    deadline = time.monotonic() + float(timeout_s)
    seen: dict[str, Any] | None = None
    while True:
        rec = read_record(folder)
        if rec is not None and (not_before is None or float(rec.get("published", 0)) >= not_before):
            seen = rec
            if endpoint_open(rec["endpoint"]):
                return rec
        if time.monotonic() >= deadline:
            what = (
                f"the record names {seen['endpoint']} (generation {seen.get('generation')}) but nothing answers there"
                if seen
                else f"no record {Path(folder) / RECORD}"
            )
            raise RendezvousTimeout(
                f"node 0 of this training did not open its rendezvous within {timeout_s:.0f}s: {what} "
                "(fewer free GPU workers than train.nnodes, or node 0 failed)"
            )
        if on_wait is not None:
            on_wait(seen)
        time.sleep(poll_s)

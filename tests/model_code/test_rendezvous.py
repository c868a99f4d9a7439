"""The multi-node rendezvous on one machine, with real torchrun processes (issue 15).

Node 0 publishes its c10d endpoint in a record on the shared folder
(:mod:`model_code.rendezvous`) and starts torchrun hosting the store; node 1 waits for the
record and an endpoint that answers, then starts its torchrun (:func:`model_code.ds_launch.node_command`).
A tiny gloo worker stands in for the training (the full DeepSpeed run is in
``tests/integration/test_distributed.py``):

* two nodes meet and all-reduce across them;
* a node alone fails after the join timeout instead of hanging, and a waiting node gives up
  with :class:`RendezvousTimeout`;
* elastic recovery: node 1 is SIGKILLed mid-run, a replacement joins the next rendezvous round,
  node 0's torchrun restarts its rank, and the run resumes from its last "checkpoint".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from model_code import ds_launch
from model_code.rendezvous import RendezvousTimeout, publish_endpoint, read_record, wait_endpoint

REPO = Path(__file__).resolve().parents[2]

# each rank: all-reduce ones `steps` times (a step per 0.2 s), rank 0 saving its position in a
# "checkpoint" after every step and resuming from it; writes what it saw at the end
WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import torch, torch.distributed as dist
    from model_code.ds_launch import set_parent_death_signal
    set_parent_death_signal()  # like a real rank (ds_launch.rank_guard): dies with its torchrun
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ck = out / "ckpt.json"
    start = json.loads(ck.read_text())["step"] if ck.exists() else 0
    box = [start]
    dist.broadcast_object_list(box, src=0)
    start = box[0]
    total = 0.0
    for step in range(start, steps):
        t = torch.ones(1)
        dist.all_reduce(t)
        total = float(t[0])
        if rank == 0:
            tmp = out / f".ck.{os.getpid()}"
            tmp.write_text(json.dumps({"step": step + 1}))
            os.replace(tmp, ck)
        (out / f"progress-node{os.environ.get('ASRFLOW_NODE_INDEX', '?')}").write_text(str(step + 1))
        time.sleep(0.2)
    dist.barrier()
    rec = {"rank": rank, "world": world, "sum": total, "start": start, "steps": steps,
           "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
           "node": os.environ.get("ASRFLOW_NODE_INDEX")}
    (out / f"rank{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()
    """
)


def _start(cmd: list[str], log: Path, node: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), ds_launch.NODE_ENV: str(node), **ds_launch.NODE_LAUNCH_ENV}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _node(shared: Path, node_rank: int, rec: dict, join_timeout_s: float = 60, max_restarts: int = 0) -> dict:
    return {
        "nnodes": 2, "node_rank": node_rank, "is_host": node_rank == 0, "endpoint": rec["endpoint"],
        "rdzv_id": rec["rdzv_id"], "join_timeout_s": join_timeout_s, "max_restarts": max_restarts,
    }  # fmt: skip


@pytest.fixture()
def shared(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "out").mkdir()
    return tmp_path


def _entry(shared: Path, steps: int) -> list[str]:
    return [str(shared / "worker.py"), str(shared / "out"), str(steps)]


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def test_wait_endpoint_fails_cleanly_when_node_0_never_comes(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RendezvousTimeout, match="did not open its rendezvous"):
        wait_endpoint(tmp_path, timeout_s=1.0, poll_s=0.1)
    # a record whose endpoint nobody serves (node 0 died) is not joined either
    publish_endpoint(tmp_path, 2, host="127.0.0.1", run_key="k")
    with pytest.raises(RendezvousTimeout, match="nothing answers"):
        wait_endpoint(tmp_path, timeout_s=1.0, poll_s=0.1)
    assert time.monotonic() - t0 < 10
    # every start of node 0 publishes a new generation and rendezvous id
    first = read_record(tmp_path)
    second = publish_endpoint(tmp_path, 2, host="127.0.0.1", run_key="k")
    assert second["generation"] == first["generation"] + 1 and second["rdzv_id"] != first["rdzv_id"]


@pytest.mark.timeout(180)
def test_two_nodes_meet_through_the_published_endpoint(shared):
    rec = publish_endpoint(shared, 2, host="127.0.0.1", run_key="meet")
    n0 = _start(ds_launch.node_command(None, 1, _node(shared, 0, rec), entry=_entry(shared, 3)), shared / "n0.log", 0)
    try:
        seen = wait_endpoint(shared, timeout_s=60)  # node 1: the record, once node 0's store answers
        assert seen["rdzv_id"] == rec["rdzv_id"]
        n1 = _start(ds_launch.node_command(None, 1, _node(shared, 1, seen), entry=_entry(shared, 3)), shared / "n1.log", 1)
        try:
            assert n0.wait(timeout=150) == 0, (shared / "n0.log").read_text()[-3000:]
            assert n1.wait(timeout=60) == 0, (shared / "n1.log").read_text()[-3000:]
        finally:
            _kill(n1)
    finally:
        _kill(n0)
    ranks = [json.loads((shared / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["world"] for r in ranks} == {2}
    assert {r["sum"] for r in ranks} == {2.0}  # the all-reduce went across both nodes
    assert sorted(r["node"] for r in ranks) == ["0", "1"]


@pytest.mark.timeout(180)
def test_a_node_alone_fails_after_the_join_timeout(shared):
    rec = publish_endpoint(shared, 2, host="127.0.0.1", run_key="alone")
    t0 = time.monotonic()
    n0 = _start(
        ds_launch.node_command(None, 1, _node(shared, 0, rec, join_timeout_s=5), entry=_entry(shared, 3)),
        shared / "n0.log", 0,
    )  # fmt: skip
    try:
        rc = n0.wait(timeout=90)  # join timeout 5 s + start-up; the default (600 s) would hang here
    finally:
        _kill(n0)
    log = (shared / "n0.log").read_text()
    assert rc != 0
    assert "RendezvousTimeoutError" in log, log[-3000:]
    assert time.monotonic() - t0 < 90
    assert not list((shared / "out").glob("rank*.json"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_elastic_a_killed_node_is_replaced_and_the_run_resumes(shared):
    steps = 40
    rec = publish_endpoint(shared, 2, host="127.0.0.1", run_key="elastic")
    spec0 = _node(shared, 0, rec, join_timeout_s=120, max_restarts=3)
    n0 = _start(ds_launch.node_command(None, 1, spec0, entry=_entry(shared, steps)), shared / "n0.log", 0)
    procs = [n0]
    try:
        seen = wait_endpoint(shared, timeout_s=60)
        spec1 = _node(shared, 1, seen, join_timeout_s=120, max_restarts=3)
        n1 = _start(ds_launch.node_command(None, 1, spec1, entry=_entry(shared, steps)), shared / "n1.log", 1)
        procs.append(n1)
        progress = shared / "out" / "progress-node1"
        t_end = time.monotonic() + 120
        while not (progress.exists() and int(progress.read_text() or 0) >= 5) and time.monotonic() < t_end:
            time.sleep(0.1)
        assert progress.exists(), (shared / "n1.log").read_text()[-3000:]
        _kill(n1)  # node 1 dies mid-run: launcher and rank, SIGKILL
        at_kill = json.loads((shared / "out" / "ckpt.json").read_text())["step"]
        assert at_kill < steps
        # its replacement (the retried train_node task) reads the record and joins the next round
        seen = wait_endpoint(shared, timeout_s=60)
        n1b = _start(ds_launch.node_command(None, 1, spec1, entry=_entry(shared, steps)), shared / "n1b.log", 1)
        procs.append(n1b)
        assert n0.wait(timeout=240) == 0, (shared / "n0.log").read_text()[-4000:]
        assert n1b.wait(timeout=60) == 0, (shared / "n1b.log").read_text()[-4000:]
    finally:
        for p in procs:
            _kill(p)
    ranks = [json.loads((shared / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["world"] for r in ranks} == {2} and {r["sum"] for r in ranks} == {2.0}
    # the survivor's rank was restarted by its torchrun and resumed from the checkpoint, not from 0
    by_node = {r["node"]: r for r in ranks}
    assert by_node["0"]["restart"] >= 1
    assert 0 < by_node["0"]["start"] <= steps and by_node["0"]["start"] >= at_kill - 1

"""Multi-node training from the DAG: one mapped ``train_node`` task per node, a real rendezvous.

With ``train.nnodes = N > 1`` the ``asr_retraining`` DAG runs ``train_plan`` → ``train_node``
(mapped, N tasks on the ``gpu`` queue, each holding ``train.gpu_pool_slots`` of ``gpu_pool``) →
``train`` (which then only gathers and publishes). Everything lives in the train step's
checkpoint folder ``<root>/checkpoints/train/<key>/``, on the storage every node shares:

    rendezvous.json    node 0's c10d endpoint + rendezvous id (model_code.rendezvous)
    work/              the training's out_dir: train_args.json, events.jsonl, result.json,
                       model/, history.json, curve.png (rank 0 writes them, on whichever node)
    work/lead.json     node 0's fit record (what ``train`` publishes)
    nodes/<i>/         node i's rank registry (model_code.ds_launch: a retry kills its own
                       leftover ranks, never another node's)
    step*/ latest.json the exact-resume checkpoints (model_code.checkpoint)

* **Node 0** writes the arguments, chooses the endpoint (``train.rdzv_host`` or its FQDN,
  ``train.rdzv_port`` or a free port), publishes it, then starts torchrun hosting the c10d store;
  it tails ``events.jsonl`` into MLflow like a one-node run.
* **Node i > 0** waits for the record and an endpoint that answers (at most
  ``train.rdzv_join_timeout_s``), then starts its torchrun against it.
* **A node that never comes**: node 0's rendezvous times out after the join timeout, the others'
  wait does too; the tasks fail with a message that says so and Airflow retries them (while
  fewer than N GPU workers are free, the queued ones wait in the pool and the running ones time
  out: no half-started training hangs forever).
* **Elastic recovery**: ``--max-restarts train.max_restarts``. When a node dies mid-training, the
  survivors' ranks fail on the broken collective, their torchrun restarts them into a new
  rendezvous round, the dead node's task is retried by Airflow and joins that round, and all ranks
  resume from the last checkpoint (at most one checkpoint interval lost).
* ``train`` then publishes node 0's record and the model under the normal step contract.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import write_json_atomic

log = logging.getLogger(__name__)

WORK = "work"
LEAD_RECORD = "lead.json"


def work_dir(ckdir: Path) -> Path:
    return Path(ckdir) / WORK


def ranks_dir(ckdir: Path, node_rank: int) -> Path:
    return Path(ckdir) / "nodes" / str(int(node_rank))


def plan(cfg: AsrflowConfig, key: str) -> list[dict[str, Any]]:
    """What ``train_node`` maps over: one item per node, or ``[]`` for one node (``train`` trains)."""
    n = int(cfg.train.nnodes)
    if n <= 1:
        return []
    return [{"node_rank": i, "nnodes": n, "key": key} for i in range(n)]


def _node_spec(cfg: AsrflowConfig, node_rank: int) -> dict[str, Any]:
    t = cfg.train
    return {
        "nnodes": int(t.nnodes),
        "node_rank": int(node_rank),
        "is_host": node_rank == 0,
        "join_timeout_s": float(t.rdzv_join_timeout_s),
        "max_restarts": int(t.max_restarts),
    }


def lead_node(cfg: AsrflowConfig, ckdir: Path, key: str) -> dict[str, Any]:
    """Keyword arguments of :func:`model_code.ds_launch.launch` for node 0 (``fit(..., node=...)``).

    ``before_start`` publishes the rendezvous record once the arguments file is written, and fills
    in the endpoint and rendezvous id of the node spec torchrun is started with."""
    from model_code.rendezvous import publish_endpoint

    spec = _node_spec(cfg, 0)
    work = work_dir(ckdir)

    def before_start() -> None:
        rec = publish_endpoint(
            ckdir, int(cfg.train.nnodes), host=cfg.train.rdzv_host, port=cfg.train.rdzv_port, run_key=key,
            extra={"args": str(work / "train_args.json")},
        )  # fmt: skip
        spec.update(endpoint=rec["endpoint"], rdzv_id=rec["rdzv_id"])
        log.info("train node 0: rendezvous %s (id %s) published in %s", rec["endpoint"], rec["rdzv_id"], ckdir)

    return {"node": spec, "ranks_dir": ranks_dir(ckdir, 0), "before_start": before_start}


def join_node(cfg: AsrflowConfig, ckdir: Path, node_rank: int) -> dict[str, Any]:
    """Node ``node_rank`` > 0: wait for node 0's rendezvous, start this node's ranks, wait for them."""
    from model_code.ds_launch import launch
    from model_code.rendezvous import wait_endpoint
    from model_code.training import TrainArgs

    t0 = time.monotonic()
    last = {"t": 0.0}

    def waiting(seen: dict[str, Any] | None) -> None:
        if time.monotonic() - last["t"] > 30:
            last["t"] = time.monotonic()
            log.info("train node %d: waiting for node 0's rendezvous (seen: %s)", node_rank, seen)

    rec = wait_endpoint(ckdir, timeout_s=float(cfg.train.rdzv_join_timeout_s), on_wait=waiting)
    log.info("train node %d: joining %s (id %s) after %.0fs", node_rank, rec["endpoint"], rec["rdzv_id"],
             time.monotonic() - t0)  # fmt: skip
    args = TrainArgs.from_json(Path(rec["args"]).read_text())
    spec = {**_node_spec(cfg, node_rank), "endpoint": rec["endpoint"], "rdzv_id": rec["rdzv_id"]}
    out = launch(args, int(cfg.train.world_size), node=spec, ranks_dir=ranks_dir(ckdir, node_rank))
    return {**out, "endpoint": rec["endpoint"], "rdzv_id": rec["rdzv_id"], "wall_s": time.monotonic() - t0}


def write_lead_record(ckdir: Path, record: dict[str, Any]) -> None:
    write_json_atomic(work_dir(ckdir) / LEAD_RECORD, record)


def read_lead_record(ckdir: Path) -> dict[str, Any]:
    p = work_dir(ckdir) / LEAD_RECORD
    if not p.exists():
        raise RuntimeError(f"node 0 of the multi-node training left no record at {p}: train_node[0] did not finish")
    return json.loads(p.read_text())


def copy_outputs(ckdir: Path, dest: Path, names: tuple[str, ...] = ("model", "history.json", "curve.png")) -> None:
    """Copy what the nodes produced in the shared work folder into the step's temp folder."""
    src = work_dir(ckdir)
    for name in names:
        p = src / name
        if p.is_dir():
            shutil.copytree(p, dest / name)
        elif p.exists():
            shutil.copy2(p, dest / name)


# ---------------------------------------------------------------------------------------------
# throughput accounting
# ---------------------------------------------------------------------------------------------
def throughput(rank_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-node and per-rank throughput of a training session from its ranks' figures
    (``model_code.training``: each rank times its own optimizer steps, its wait for the next
    batch, and DeepSpeed's gradient all-reduce).

    ``nodes``: per node, ``audio_s_per_s`` = audio seconds of its ranks' batches / the longest
    step time of its ranks; ``ranks``: per rank, ``data_wait_share`` and ``allreduce_share`` of
    its step time; totals: ``audio_s_per_s`` (sum over nodes), ``data_wait_share`` and
    ``allreduce_share`` (means over ranks). ``{}`` without figures."""
    if not rank_stats:
        return {}
    nodes: dict[int, list[dict[str, Any]]] = {}
    for r in rank_stats:
        nodes.setdefault(int(r.get("node", 0)), []).append(r)
    node_recs = []
    for n, rs in sorted(nodes.items()):
        step_s = max(float(r["step_s"]) for r in rs)
        node_recs.append(
            {
                "node": n,
                "host": rs[0].get("host"),
                "ranks": sorted(int(r["rank"]) for r in rs),
                "audio_s": sum(float(r["audio_s"]) for r in rs),
                "step_s": step_s,
                "audio_s_per_s": sum(float(r["audio_s"]) for r in rs) / max(step_s, 1e-9),
            }
        )
    ranks = [
        {
            k: r.get(k)
            for k in ("rank", "node", "local_rank", "host", "steps", "audio_s_per_s", "data_wait_share", "allreduce_share")
        }
        for r in sorted(rank_stats, key=lambda r: int(r["rank"]))
    ]
    return {
        "nnodes": len(node_recs),
        "world_size": len(ranks),
        "audio_s_per_s": sum(n["audio_s_per_s"] for n in node_recs),
        "data_wait_share": sum(float(r["data_wait_share"]) for r in ranks) / len(ranks),
        "allreduce_share": sum(float(r["allreduce_share"]) for r in ranks) / len(ranks),
        "nodes": node_recs,
        "ranks": ranks,
        "method": "per rank: wall time of its optimizer steps (data wait included); data wait = time "
        "blocked on the next batch; all-reduce = time in DeepSpeed's engine.allreduce_gradients "
        "(device-synchronized, includes waiting for the slowest rank); figures of the last session",
    }


def throughput_metrics(tput: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of :func:`throughput` (``throughput/...``)."""
    out = {
        "throughput/audio_s_per_s": float(tput["audio_s_per_s"]),
        "throughput/data_wait_share": float(tput["data_wait_share"]),
        "throughput/allreduce_share": float(tput["allreduce_share"]),
        "throughput/nnodes": float(tput["nnodes"]),
    }
    for n in tput["nodes"]:
        out[f"throughput/node{n['node']}_audio_s_per_s"] = float(n["audio_s_per_s"])
    for r in tput["ranks"]:
        out[f"throughput/rank{r['rank']}_data_wait_share"] = float(r["data_wait_share"])
        out[f"throughput/rank{r['rank']}_allreduce_share"] = float(r["allreduce_share"])
    return out

"""Multi-node training on loopback: 1 node × 2 ranks versus 2 nodes × 1 rank (issue 15).

    .venv/bin/python bench/train_scaling.py [--profile tiny] [--steps 40] [--utterances 400]
                                            [--threads 1] [--json bench/results/train_scaling.json]

Both layouts run the real training (:func:`model_code.training.train` under torchrun, DeepSpeed
on gloo; NCCL on a GPU machine) on the same synthetic feature index (``train_throughput.py``'s)
for ``--steps`` optimizer steps with the same global batch:

* ``1x2``: one torchrun with two ranks (``train.world_size=2``, what one ``train`` task runs);
* ``2x1``: two torchruns ("nodes") with one rank each, meeting in the c10d rendezvous node 0
  publishes (``model_code.rendezvous``), as the mapped ``train_node`` tasks do.

Figures (from the ranks' own accounting, ``pipeline_tasks.services.multinode.throughput``):
audio-seconds per second summed over nodes and per node, the mean data-wait and all-reduce
shares of step time, and the wall time including start-up and rendezvous. On one machine both
layouts share the same cores: the difference is the overhead of the rendezvous and the second
process group, not a scaling figure (that needs real nodes). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _args(cfg, index: Path, out: Path, steps: int):
    from model_code.dataset import FeatureTable
    from pipeline_tasks.services.fitting import make_tokenizer, train_args

    tok = make_tokenizer(cfg, FeatureTable(index, in_memory=False).texts())
    args = train_args(cfg, index, None, out, tok, epochs=1000)
    args.max_steps = steps
    args.save_model = False
    args.max_minutes = None
    args.lm_texts = False
    return args


def one_node(cfg, index: Path, tmp: Path, steps: int) -> dict:
    from model_code.ds_launch import launch

    args = _args(cfg, index, tmp / "1x2", steps)
    t0 = time.perf_counter()
    res = launch(args, 2, launcher="torchrun", poll_s=0.2)
    return {"result": res, "wall_s": time.perf_counter() - t0}


def two_nodes(cfg, index: Path, tmp: Path, steps: int) -> dict:
    from model_code.ds_launch import launch
    from model_code.rendezvous import publish_endpoint, wait_endpoint

    shared = tmp / "2x1"
    args = _args(cfg, index, shared / "work", steps)
    spec = {"nnodes": 2, "join_timeout_s": 120, "max_restarts": 0}
    spec0 = {**spec, "node_rank": 0, "is_host": True}
    out: dict = {}

    def publish() -> None:
        rec = publish_endpoint(shared, 2, host="127.0.0.1", run_key="bench", extra={"args": str(shared / "work" / "train_args.json")})
        spec0.update(endpoint=rec["endpoint"], rdzv_id=rec["rdzv_id"])

    def node1() -> None:
        from model_code.training import TrainArgs

        rec = wait_endpoint(shared, timeout_s=120)
        a = TrainArgs.from_json(Path(rec["args"]).read_text())
        spec1 = {**spec, "node_rank": 1, "is_host": False, "endpoint": rec["endpoint"], "rdzv_id": rec["rdzv_id"]}
        out["node1"] = launch(a, 1, node=spec1, ranks_dir=shared / "nodes" / "1", poll_s=0.2)

    t0 = time.perf_counter()
    th = threading.Thread(target=node1, daemon=True)
    th.start()
    res = launch(args, 1, node=spec0, ranks_dir=shared / "nodes" / "0", before_start=publish, poll_s=0.2)
    th.join(timeout=300)
    return {"result": res, "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="tiny")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--utterances", type=int, default=400, help="synthetic utterances")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ns = p.parse_args(argv)

    from train_throughput import synthetic_index

    from pipeline_tasks.config import load_config
    from pipeline_tasks.services.multinode import throughput

    cfg = load_config(ns.profile, [*ns.overrides, f"train.torch_threads={ns.threads}", "train.num_workers=0"])
    tmp = Path(tempfile.mkdtemp(prefix="asrflow-bench-scaling-"))
    rows = []
    try:
        index = synthetic_index(tmp, ns.utterances, cfg.features.n_mels)
        for layout, fn in (("1x2", one_node), ("2x1", two_nodes)):
            r = fn(cfg, index, tmp, ns.steps)
            tput = throughput(r["result"]["rank_stats"])
            rows.append(
                {
                    "layout": layout,
                    "nnodes": tput["nnodes"],
                    "ranks": tput["world_size"],
                    "steps": r["result"]["steps"],
                    "audio_s_per_s": tput["audio_s_per_s"],
                    "per_node_audio_s_per_s": [round(n["audio_s_per_s"], 2) for n in tput["nodes"]],
                    "data_wait_share": tput["data_wait_share"],
                    "allreduce_share": tput["allreduce_share"],
                    "wall_s_incl_startup": r["wall_s"],
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmd = " ".join([".venv/bin/python", "bench/train_scaling.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"# train scaling on loopback — profile {ns.profile}, {ns.steps} optimizer steps, {ns.threads} thread(s)/rank, "
          f"synthetic data ({ns.utterances} utts); cores={os.cpu_count()}; load average at end={os.getloadavg()[0]:.1f}")
    hdr = ["layout", "nnodes", "ranks", "steps", "audio_s_per_s", "per_node_audio_s_per_s", "data_wait_share",
           "allreduce_share", "wall_s_incl_startup"]  # fmt: skip
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in hdr))
    print(f"# command: {cmd}")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps({"command": cmd, "profile": ns.profile, "cores": os.cpu_count(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

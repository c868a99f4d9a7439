"""Multi-node training through the train step's node functions, without Airflow (issue 15).

Two processes play the two mapped ``train_node`` tasks (``train.nnodes=2``, ``train.world_size=1``):
node 0 publishes the rendezvous and trains with DeepSpeed on gloo, node 1 joins it; then
``finalize_nodes`` (the ``train`` task's job in that case) publishes the step's result. Its
weights equal those of the same run on one node with two ranks (``nnodes=1, world_size=2``: the
same global batch and seed), and the record carries the per-node throughput.
The same flow through the scheduler and Celery GPU workers is in tests/integration/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline_tasks.config import REPO_ROOT, with_overrides
from pipeline_tasks.contract import resolve
from pipeline_tasks.graph import run_until
from pipeline_tasks.steps import train as train_step

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NODE = (
    "import json,sys; from pipeline_tasks.config import config_from_dict; from pipeline_tasks.steps import train;"
    "cfg = config_from_dict(json.load(open(sys.argv[1]))); inputs = json.load(open(sys.argv[2]));"
    "node = json.load(open(sys.argv[3]));"
    "out = train.run_node(cfg, inputs, node); open(sys.argv[4], 'w').write(json.dumps(out))"
)


@pytest.fixture(scope="module")
def split(tiny_cfg):
    return run_until("split", tiny_cfg)["split"]


def _weights(res) -> dict[str, torch.Tensor]:
    return torch.load(resolve(res, res["model_dir"]) / "weights.pt", map_location="cpu", weights_only=True)


def test_two_nodes_train_like_one_node_with_two_ranks(tiny_cfg, split, tmp_path):
    # one thread per rank in both layouts (the default divides the cores among a node's ranks,
    # and a different thread count changes the float summation order)
    common = {"train.init_from": "scratch", "train.epochs": 1, "train.checkpoint_every_steps": 2, "train.torch_threads": 1}
    cfg2 = with_overrides(
        tiny_cfg,
        {**common, "train.nnodes": 2, "train.world_size": 1, "train.rdzv_host": "127.0.0.1",
         "train.rdzv_join_timeout_s": 180},
    )  # fmt: skip
    inputs = {"split": split, "tune": {"best_overrides": {}}}
    assert train_step.plan(tiny_cfg, inputs) == []  # one node: the train task trains, no mapped nodes
    nodes = train_step.plan(cfg2, inputs)
    assert [n["node_rank"] for n in nodes] == [0, 1] and {n["nnodes"] for n in nodes} == {2}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg2.dump()))
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    procs = []
    for n in nodes:  # node 1 first: it waits for node 0's rendezvous record
        i = n["node_rank"]
        (tmp_path / f"node{i}.json").write_text(json.dumps(n))
        args = [str(tmp_path / x) for x in ("cfg.json", "inputs.json", f"node{i}.json", f"out{i}.json")]
        log = open(tmp_path / f"node{i}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen([sys.executable, "-c", NODE, *args], cwd=REPO_ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, env={**os.environ}))  # fmt: skip
    for i, p in enumerate(procs):
        assert p.wait(timeout=600) == 0, (tmp_path / f"node{i}.log").read_text()[-4000:]
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in (0, 1)]
    assert outs[1]["endpoint"].startswith("127.0.0.1:")
    res = train_step.finalize_nodes(cfg2, inputs, outs)
    assert res["nnodes"] == 2 and res["world_size"] == 2 and res["steps"] > 0
    assert [n["node_rank"] for n in res["nodes"]] == [0, 1]
    tput = res["throughput"]
    assert [n["node"] for n in tput["nodes"]] == [0, 1] and all(n["audio_s_per_s"] > 0 for n in tput["nodes"])
    assert len(tput["ranks"]) == 2
    assert all(0 <= r["data_wait_share"] < 1 and 0 < r["allreduce_share"] < 1 for r in tput["ranks"])
    assert not train_step.checkpoint_dir_for(tiny_cfg, res["key"]).exists()  # rendezvous + work folder gone
    assert train_step.finalize_nodes(cfg2, inputs, outs) == res  # published once: cached
    # the same training on one node with two ranks
    cfg1 = with_overrides(tiny_cfg, {**common, "train.nnodes": 1, "train.world_size": 2, "train.launcher": "torchrun"})
    ref = train_step.run(cfg1, inputs)
    assert ref["key"] != res["key"] and ref["steps"] == res["steps"] and ref["world_size"] == 2
    w2, w1 = _weights(res), _weights(ref)
    assert w2.keys() == w1.keys()
    diff = max(float((w2[k] - w1[k]).abs().max()) for k in w1)
    assert diff <= 1e-6, f"max |Δw| = {diff}"

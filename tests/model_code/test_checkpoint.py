"""Atomic checkpoints and exact resume after SIGKILL (real DeepSpeed engine, CPU, gloo)."""

from __future__ import annotations

import json
import random
import signal

import numpy as np
import pytest
import torch

from model_code.checkpoint import LATEST, CheckpointManager, capture_rng, restore_rng, tag_for_step
from model_code.ds_launch import launch
from model_code.training import train
from tests.model_code.train_helpers import tiny_args


def test_rng_state_roundtrips_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(capture_rng()))  # plain JSON: nothing to unpickle
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    restore_rng(state)
    b = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert a == b


def _run_child(args, fault: str | None):
    """One training attempt in its own process; with ``fault`` it SIGKILLs itself there."""
    env = {"ASRFLOW_TRAIN_FAULT": fault} if fault else {}
    return launch(args, world_size=1, launcher="inprocess", env=env, poll_s=0.2)


def test_sigkill_and_restart_follows_the_same_loss_curve(tmp_path):
    # reference: uninterrupted, no checkpoints (deterministic mode, 1 thread)
    ref = train(tiny_args(tmp_path / "ref"))
    ref_losses = [row[1] for row in ref["step_log"]]
    total = ref["steps"]  # 2 epochs of the sampler's batches (~9-10 per epoch)
    assert total >= 16 and len(ref_losses) == total and ref_losses[-1] < ref_losses[0]

    args = tiny_args(tmp_path / "crash", checkpoint_dir=str(tmp_path / "crash" / "ckpt"))
    ckdir = tmp_path / "crash" / "ckpt"
    # attempt 1: killed (SIGKILL) half-way through writing the step-8 checkpoint
    with pytest.raises(RuntimeError, match=f"exited with -{int(signal.SIGKILL)}"):
        _run_child(args, "mid_checkpoint:8")
    assert json.loads((ckdir / LATEST).read_text())["tag"] == tag_for_step(4)  # the half-written one is not latest
    assert (ckdir / f".tmp-{tag_for_step(8)}").exists()
    # attempt 2: resumes from step 4 (lost < one interval), killed after step 14 (checkpoint at 12)
    with pytest.raises(RuntimeError, match="exited with"):
        _run_child(args, "after_step:14")
    assert json.loads((ckdir / LATEST).read_text())["step"] == 12
    assert not (ckdir / f".tmp-{tag_for_step(8)}").exists()  # stale temp removed on restart
    # attempt 3: the same command, no fault: resumes from 12 and finishes
    res = _run_child(args, None)
    assert res["resumed_from"] == 12
    losses = [row[1] for row in res["step_log"]]
    assert [row[0] for row in res["step_log"]] == list(range(1, total + 1))
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-6)
    assert res["params_sha256"] == ref["params_sha256"]  # bitwise-identical final weights
    # every attempt logged its steps; the third one only the steps after its checkpoint
    steps = [json.loads(line) for line in (tmp_path / "crash" / "out" / "events.jsonl").read_text().splitlines()]
    starts = [e for e in steps if e["type"] == "start"]
    assert [s["resumed_from"] for s in starts] == [None, 4, 12]
    # keep_checkpoints=2: only the two newest complete checkpoints remain
    saved = sorted({s for s in range(4, total + 1, 4)} | {h["step"] for h in ref["history"]})
    assert CheckpointManager(ckdir).tags() == [tag_for_step(s) for s in saved[-2:]]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_world_size_2_ranks_see_disjoint_batches_and_end_identical(tmp_path, launcher):
    args = tiny_args(tmp_path, epochs=1, record_batches=True, num_workers=1, checkpoint_dir=str(tmp_path / "ck"),
                     checkpoint_every_steps=3)
    res = launch(args, world_size=2, launcher=launcher, poll_s=0.5)
    out = tmp_path / "out"
    assert res["world_size"] == 2 and res["steps"] > 1
    seen = {}
    for r in (0, 1):
        rows = [json.loads(x) for x in (out / f"batches_rank{r}.jsonl").read_text().splitlines()]
        seen[r] = {row["step"]: set(row["idx"]) for row in rows}
    assert seen[0].keys() == seen[1].keys()
    for step in seen[0]:
        assert not seen[0][step] & seen[1][step], f"step {step}: ranks share utterances"
    all0 = set().union(*seen[0].values())
    all1 = set().union(*seen[1].values())
    assert not all0 & all1 and len(all0 | all1) >= 36  # 40 utterances; whole steps only
    digests = [json.loads((out / f"rank{r}.json").read_text())["params_sha256"] for r in (0, 1)]
    assert digests[0] == digests[1] == res["params_sha256"]
    # both ranks wrote their trainer state into each checkpoint
    last = json.loads((tmp_path / "ck" / LATEST).read_text())["tag"]
    assert {p.name for p in (tmp_path / "ck" / last).glob("trainer_rank*.json")} == {
        "trainer_rank0.json",
        "trainer_rank1.json",
    }


def test_a_rank_that_dies_is_restarted_by_torchrun_and_resumes_exactly(tmp_path):
    # both ranks SIGKILL themselves after step 4 of the first attempt only; torchrun restarts the
    # group (max_restarts=1) and the ranks resume from the step-3 checkpoint
    kw = dict(epochs=1, num_workers=1, checkpoint_every_steps=3)
    ref = launch(tiny_args(tmp_path / "ref", checkpoint_dir=str(tmp_path / "ref" / "ck"), **kw), 2, poll_s=0.5)
    args = tiny_args(tmp_path / "crash", checkpoint_dir=str(tmp_path / "crash" / "ck"), **kw)
    env = {"ASRFLOW_TRAIN_FAULT": "after_step:4", "ASRFLOW_TRAIN_FAULT_ATTEMPT": "0"}
    res = launch(args, 2, env=env, poll_s=0.5, max_restarts=1)
    events = [json.loads(x) for x in (tmp_path / "crash" / "out" / "events.jsonl").read_text().splitlines()]
    assert [e["resumed_from"] for e in events if e["type"] == "start"] == [None, 3]
    assert res["steps"] == ref["steps"] > 4
    assert res["params_sha256"] == ref["params_sha256"]  # the restart changed nothing

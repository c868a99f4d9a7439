"""Checkpoints are never lost in the crash window of a save (issue 13), with a stand-in engine
(the real DeepSpeed engine is exercised by test_checkpoint.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model_code import checkpoint
from model_code.checkpoint import LATEST, CheckpointManager


class FakeEngine:
    """Writes/reads one file per tag, like DeepSpeed's save_checkpoint/load_checkpoint."""

    def __init__(self, value: int = 0):
        self.value = value

    def save_checkpoint(self, root, tag, client_state=None, save_latest=False):
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_text(json.dumps({"value": self.value}))

    def load_checkpoint(self, root, tag):
        p = Path(root) / tag / "mp_rank_00_model_states.pt"
        self.value = json.loads(p.read_text())["value"]
        return str(p), {}


class Crash(Exception):
    pass


def test_a_crash_while_a_tag_is_replaced_keeps_the_complete_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(root, keep=1)
    mgr.save(FakeEngine(10), 10, {"epoch": 0})
    mgr.save(FakeEngine(20), 20, {"epoch": 0})  # keep=1: step 10 is pruned, step 20 is the only one

    def crash_at(point: str) -> None:
        if point == "replace_checkpoint:20":
            raise Crash(point)

    monkeypatch.setattr(checkpoint, "_fault", crash_at)
    with pytest.raises(Crash):  # the same step saved again (epoch end), killed half-way through the swap
        mgr.save(FakeEngine(21), 20, {"epoch": 1})
    monkeypatch.undo()

    restarted = CheckpointManager(root, keep=1)  # a retry: repairs the interrupted swap
    rec = restarted.latest()
    assert rec is not None and rec["tag"] == "step00000020", rec
    engine = FakeEngine()
    state = restarted.load(engine)
    assert engine.value == 20 and state["epoch"] == 0  # the complete old copy, not step 0
    assert not [p for p in root.iterdir() if p.name.startswith((".old-", ".tmp-"))]


def test_latest_pointing_at_nothing_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(root, keep=3)
    for step in (5, 10, 15):
        mgr.save(FakeEngine(step), step, {"epoch": step // 5})
    shutil.rmtree(root / "step00000015")  # latest.json now names a folder that is gone
    rec = mgr.latest()
    assert (rec["tag"], rec["step"], rec["epoch"], rec["fallback"]) == ("step00000010", 10, 2, True)
    engine = FakeEngine()
    assert mgr.load(engine)["epoch"] == 2 and engine.value == 10
    (root / LATEST).write_text("{not json")  # a torn pointer reads the same way
    assert mgr.latest()["tag"] == "step00000010"
    for tag in ("step00000005", "step00000010"):
        shutil.rmtree(root / tag)
    assert mgr.latest() is None  # nothing complete left: a fresh start

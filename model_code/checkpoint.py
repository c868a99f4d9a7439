"""Atomic, resumable training checkpoints around DeepSpeed's ``save_checkpoint``.

Layout of a checkpoint folder (``root``, e.g. ``<artifact root>/checkpoints/train/<step key>/``)::

    root/latest.json                 {"tag": "step00000120", "step": 120, ...}  (os.replace'd: atomic)
    root/step00000120/               one complete checkpoint (a DeepSpeed tag folder)
        mp_rank_00_model_states.pt   DeepSpeed: module, optimizer (ZeRO 0), LR scheduler
        zero_pp_rank_*_optim_states.pt  DeepSpeed, ZeRO >= 1: each rank's optimizer partition
        trainer_rank0.json           ours: epoch, sampler state, global step, history, RNG state
        trainer_rank1.json           ...one per rank
    root/.tmp-step00000180/          a save in progress (or killed half-way): never read, removed

Why this shape: DeepSpeed writes a *folder* per tag and its files are plain ``torch.save``
calls (not atomic). Every rank therefore saves into the temporary tag ``.tmp-<tag>``; after a
barrier rank 0 fsyncs the files, renames the folder to ``<tag>`` (one ``os.replace``) and only
then moves the ``latest.json`` pointer (another ``os.replace``). A process killed at any point
leaves either the previous checkpoint as ``latest`` or the new one, never a half-written one.
Saving a tag that already exists (the same step saved twice) first renames the old folder to
``.old-<tag>`` and deletes it only after the new one is in place; a crash in that window is
repaired on the next start (the ``.old-`` folder is renamed back). If ``latest.json`` points at
nothing (or cannot be read), :meth:`CheckpointManager.latest` falls back to the newest complete
checkpoint folder rather than starting again from step 0.

Nothing here unpickles: the trainer state, including the RNG states, is JSON (python's
``random`` state as lists of ints, numpy's MT19937 state as a list of uint32, torch's CPU/CUDA
generator states as lists of byte values). The model/optimizer files are read by DeepSpeed's own
loader (``engine.load_checkpoint``), only from folders this code wrote.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"  # a complete checkpoint being replaced by a new save of the same tag
_TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for_step(step: int) -> str:
    """Checkpoint tag of optimizer step ``step`` (sortable: ``step00000120``)."""
    return f"step{int(step):08d}"


# ------------------------------------------------------------------ RNG state (JSON-able)
def capture_rng() -> dict[str, Any]:
    """The python, numpy and torch (CPU + every CUDA device) RNG states as plain JSON data."""
    py = random.getstate()  # (version, tuple of 625 ints, gauss_next)
    np_state = np.random.get_state()  # ('MT19937', uint32 (624,), pos, has_gauss, cached_gaussian)
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "kind": str(np_state[0]),
            "keys": [int(x) for x in np_state[1]],
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch_cpu": torch.get_rng_state().tolist(),
        "torch_cuda": [],
    }
    if torch.cuda.is_available():
        out["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(x) for x in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    cuda = state.get("torch_cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


# ------------------------------------------------------------------ helpers
def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fault(point: str) -> None:
    """Test hook: ``ASRFLOW_TRAIN_FAULT=<point>`` SIGKILLs this process at that point.

    Used by the crash/resume tests to kill a run deterministically at an exact place (e.g. half
    way through writing a checkpoint), which an external ``kill -9`` can only hit by chance.
    ``ASRFLOW_TRAIN_FAULT_ATTEMPT=<n>`` limits it to torchrun's attempt ``n``
    (``TORCHELASTIC_RESTART_COUNT``), so a restarted worker group runs through.
    """
    attempt = os.environ.get("ASRFLOW_TRAIN_FAULT_ATTEMPT")
    if attempt is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != attempt:
        return
    if os.environ.get("ASRFLOW_TRAIN_FAULT") == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointManager:
    """Saves and restores DeepSpeed engine + trainer state atomically (see module docstring).

    Every rank creates one with the same ``root``; :meth:`save` and :meth:`load` are collective
    (all ranks must call them, like ``engine.save_checkpoint``).
    """

    def __init__(self, root: str | os.PathLike[str], rank: int = 0, world_size: int = 1, keep: int = 2) -> None:
        self.root = Path(root)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.keep = max(int(keep), 1)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remove_stale()
        _barrier(self.world_size)

    # -------------------------------------------------------------- queries
    def latest(self) -> dict[str, Any] | None:
        """The ``latest.json`` record (``tag``, ``step``...) or None when there is no checkpoint.

        When the pointer is missing, unreadable or names a folder that is gone, the newest
        complete checkpoint folder is used instead (``fallback: True`` in the record)."""
        p = self.root / LATEST
        rec = None
        if p.exists():
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                rec = None
        if isinstance(rec, dict) and isinstance(rec.get("tag"), str) and _TAG_RE.match(rec["tag"]):
            if (self.root / rec["tag"]).is_dir():
                return rec
        tags = self.tags()
        if not tags:
            return None
        tag = tags[-1]  # tags sort by step (zero-padded)
        epoch = None
        try:
            epoch = json.loads((self.root / tag / "trainer_rank0.json").read_text()).get("epoch")
        except (OSError, ValueError):
            pass
        return {"tag": tag, "step": int(_TAG_RE.match(tag).group(1)), "epoch": epoch, "fallback": True}

    def tags(self) -> list[str]:
        """Complete checkpoint tags, oldest first."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _TAG_RE.match(p.name))

    def remove_stale(self) -> list[Path]:
        """Delete ``.tmp-*`` leftovers of saves that were killed half-way (rank 0, no save running).

        A ``.old-<tag>`` folder is a complete checkpoint whose replacement was interrupted: it is
        renamed back to ``<tag>`` when that folder is missing, else deleted."""
        removed = []
        for p in sorted(self.root.iterdir()) if self.root.exists() else []:
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
            elif p.name.startswith(OLD_PREFIX) and p.is_dir():
                tag = p.name[len(OLD_PREFIX) :]
                if _TAG_RE.match(tag) and not (self.root / tag).exists():
                    os.replace(p, self.root / tag)  # the new copy never landed: keep the old one
                else:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed

    # -------------------------------------------------------------- save / load
    def save(self, engine, step: int, trainer_state: dict[str, Any], client_state: dict[str, Any] | None = None) -> str:
        """Collective: write the engine (module, optimizer, scheduler) and this rank's trainer state.

        ``trainer_state`` must be JSON-able; the RNG states are added here (captured *before*
        anything else runs, so they are exactly the state at this step boundary). ``client_state``
        (tensors allowed, e.g. the weight average) goes into DeepSpeed's model-states file.
        """
        tag = tag_for_step(step)
        tmp_tag = f"{TMP_PREFIX}{tag}"
        state = dict(trainer_state)
        state["rng"] = capture_rng()
        state["rank"] = self.rank
        state["world_size"] = self.world_size
        if self.rank == 0 and (self.root / tmp_tag).exists():
            shutil.rmtree(self.root / tmp_tag)
        _barrier(self.world_size)
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state or {}, save_latest=False)
        with open(self.root / tmp_tag / f"trainer_rank{self.rank}.json", "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        _barrier(self.world_size)
        if self.rank == 0:
            _fault(f"mid_checkpoint:{step}")
            _fsync_tree(self.root / tmp_tag)
            final = self.root / tag
            old = self.root / f"{OLD_PREFIX}{tag}"
            if final.exists():  # same step saved again (e.g. epoch end right after an interval save)
                # never delete a complete checkpoint before its replacement is in place
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                _fault(f"replace_checkpoint:{step}")
            os.replace(self.root / tmp_tag, final)
            _fsync_dir(self.root)
            _write_json_atomic(self.root / LATEST, {"tag": tag, "step": int(step), "epoch": state.get("epoch")})
            _fsync_dir(self.root)
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
            self._prune(keep_tag=tag)
        _barrier(self.world_size)
        return tag

    def _prune(self, keep_tag: str) -> None:
        tags = [t for t in self.tags() if t != keep_tag]
        for t in tags[: max(len(tags) - (self.keep - 1), 0)]:
            shutil.rmtree(self.root / t, ignore_errors=True)

    def load(self, engine) -> dict[str, Any] | None:
        """Collective: restore the latest checkpoint into ``engine`` and this rank's RNG.

        Returns this rank's trainer state (without ``rng``; DeepSpeed's client state under
        ``client_state``), or None when there is no checkpoint.
        """
        rec = self.latest()
        if rec is None:
            return None
        tag = rec["tag"]
        path, client_state = engine.load_checkpoint(str(self.root), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        state = json.loads((self.root / tag / f"trainer_rank{self.rank}.json").read_text())
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise RuntimeError(
                f"checkpoint {tag} was written with world_size {state.get('world_size')}, now {self.world_size}"
            )
        restore_rng(state.pop("rng"))
        state["client_state"] = client_state or {}
        return state

    def delete_all(self) -> None:
        """Remove the whole checkpoint folder (rank 0; after the model has been published)."""
        if self.rank == 0:
            shutil.rmtree(self.root, ignore_errors=True)

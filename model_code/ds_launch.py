"""Multi-process entry point and launcher for :func:`model_code.training.train`.

Child side (one process per rank)::

    python -m torch.distributed.run --nproc_per_node N -m model_code.ds_launch --args args.json
    deepspeed --num_gpus N --module model_code.ds_launch --args args.json     (GPU hosts)

Each rank reads the same :class:`~model_code.training.TrainArgs` JSON, initialises
torch.distributed from the env vars the launcher sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and trains; rank 0 writes ``<out_dir>/result.json``.

Parent side: :func:`launch` starts the launcher, tails rank 0's ``events.jsonl`` (so the caller
can log metrics live, e.g. to MLflow) and returns rank 0's result once every rank exited 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(args_path: Path, world_size: int, launcher: str, master_port: int) -> list[str]:
    """The command line that starts ``world_size`` ranks of :mod:`model_code.ds_launch`."""
    if launcher == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "1", "--nproc_per_node", str(world_size),
            "--master_addr", "127.0.0.1", "--master_port", str(master_port),
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
) -> dict[str, Any]:
    """Run ``args`` (a ``TrainArgs``) on ``world_size`` local processes; wait; return rank 0's result.

    ``on_event`` gets every new JSON line of ``<out_dir>/events.jsonl`` while the ranks run.
    Output of the ranks goes to ``<out_dir>/launch.log``. Raises ``RuntimeError`` (with the log's
    tail) if the launcher exits non-zero or rank 0 wrote no result.
    """
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args_path = out_dir / "train_args.json"
    args_path.write_text(args.to_json())
    result_path = out_dir / "result.json"
    result_path.unlink(missing_ok=True)
    events_path = out_dir / "events.jsonl"
    offset = events_path.stat().st_size if events_path.exists() else 0
    cmd = launch_command(args_path, world_size, launcher, _free_port())
    penv = {**os.environ, **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        penv.pop(k, None)  # an in-process run of the parent must not leak its rank into the children
    penv["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), penv.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if launcher == "deepspeed":
        penv.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    log_path = out_dir / "launch.log"

    def drain() -> None:
        nonlocal offset
        if on_event is None or not events_path.exists():
            return
        with open(events_path) as f:
            f.seek(offset)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break
                offset += len(line.encode())
                on_event(json.loads(line))

    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=penv, stdout=logf, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                drain()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    drain()
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"training launcher exited with {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return json.loads(result_path.read_text())


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
    try:
        train(args)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

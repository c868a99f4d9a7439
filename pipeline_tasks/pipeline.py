"""The step graph, independent of Airflow.

Each step module in :mod:`pipeline_tasks` exposes ``run(cfg, inputs) -> result`` where
``inputs`` maps upstream step names to their (small, JSON-able) results. Because every
step is keyed and cached (:mod:`pipeline_tasks.contract`), resolving a step's inputs by
running its upstream steps is cheap once they have run: ``asrflow train`` on a warm
artifact root only reads a handful of ``_SUCCESS.json`` files before it trains.

The Airflow DAG (``dags/asr_retraining.py``) wires the same functions, fanning out the
steps that map (featurize shards, tuning workers); this module is the single-process
path used by the CLI and tests.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from pipeline_tasks.config import AsrflowConfig

log = logging.getLogger(__name__)

# step -> upstream steps whose results it takes as inputs
GRAPH: dict[str, list[str]] = {
    "ingest": [],
    "validate": ["ingest"],
    "featurize": ["validate"],
    "golden": [],
    "split": ["featurize"],
    "tune": ["split"],
    "train": ["split", "tune"],
    "evaluate": ["train", "golden"],
    "export": ["train", "golden", "evaluate"],
    "promote": ["export", "evaluate"],
}

ORDER = list(GRAPH)


def step_module(step: str):
    if step not in GRAPH:
        raise KeyError(f"unknown step {step!r}; steps: {', '.join(ORDER)}")
    return importlib.import_module(f"pipeline_tasks.{step}")


def run_one(step: str, cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]], force: bool = False) -> dict[str, Any]:
    mod = step_module(step)
    t0 = time.monotonic()
    log.info("step %s: start", step)
    result = mod.run(cfg, inputs, force=force)
    log.info("step %s: done in %.1fs", step, time.monotonic() - t0)
    return result


def run_until(
    target: str,
    cfg: AsrflowConfig,
    force: bool | set[str] = False,
    results: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``target`` and, first, everything it depends on. Returns all results by step."""
    results = {} if results is None else results
    force_set = set(GRAPH) if force is True else (force or set())

    def visit(step: str) -> None:
        if step in results:
            return
        for up in GRAPH[step]:
            visit(up)
        inputs = {up: results[up] for up in GRAPH[step]}
        results[step] = run_one(step, cfg, inputs, force=step in force_set)

    visit(target)
    return results

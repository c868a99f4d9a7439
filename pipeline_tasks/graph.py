"""The step graph, written once and independent of Airflow.

Each step module in :mod:`pipeline_tasks.steps` exposes ``run(cfg, inputs) -> result`` where
``inputs`` maps upstream step names to their (small, JSON-able) results. Because every step is
keyed and cached (:mod:`pipeline_tasks.contract`), resolving a step's inputs by running its
upstream steps is cheap once they have run: ``asrflow train`` on a warm artifact root only reads
a handful of ``_SUCCESS.json`` files before it trains.

Everything that needs the graph reads it from here: :func:`run_until` (the CLI and tests), the
local runner's summary (``devstack.local_run``), and the DAG integrity test, which checks that
the Airflow DAG (``dags/asr_retraining.py``) wires exactly :func:`airflow_task_graph`. A step
that fans out in Airflow (``fan_out``) runs there as three tasks: ``<step>_<plan>`` (what to map
over), ``<step>_<part>`` (one mapped task per item) and ``<step>_finalize`` (the step's result);
a ``gated`` step has a short-circuit task ``<step>_gate`` in front of it. A step with ``nodes``
(train) keeps its own task, which holds the result, and runs two tasks in front of it:
``<step>_<plan>`` (the nodes; none when the run uses one node, and ``<step>`` trains) and
``<step>_<node>`` (one mapped task per node of a multi-node training; ``<step>`` then gathers).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from pipeline_tasks.config import AsrflowConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepSpec:
    """One step: its upstream steps (whose results are its inputs) and how Airflow runs it."""

    name: str
    upstream: tuple[str, ...] = ()
    fan_out: tuple[str, str] | None = None  # (plan task suffix, mapped task suffix)
    gated: bool = False
    nodes: tuple[str, str] | None = None  # (plan task suffix, mapped per-node task suffix)

    @property
    def result_task(self) -> str:
        """The Airflow task whose XCom return value is this step's result record."""
        return f"{self.name}_finalize" if self.fan_out else self.name

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every Airflow task that makes up this step, in order."""
        gate = (f"{self.name}_gate",) if self.gated else ()
        if self.fan_out:
            plan, part = self.fan_out
            return (*gate, f"{self.name}_{plan}", f"{self.name}_{part}", f"{self.name}_finalize")
        if self.nodes:
            return (*gate, *(f"{self.name}_{x}" for x in self.nodes), self.name)
        return (*gate, self.name)


STEPS: tuple[StepSpec, ...] = (
    StepSpec("ingest"),
    StepSpec("validate", ("ingest",)),
    StepSpec("featurize", ("validate",), fan_out=("plan", "shard")),
    StepSpec("golden"),
    StepSpec("split", ("featurize", "golden")),
    StepSpec("tune", ("split",), fan_out=("prepare", "worker")),
    StepSpec("train", ("split", "tune"), nodes=("plan", "node")),
    StepSpec("export", ("train", "golden")),
    StepSpec("evaluate", ("train", "golden", "export")),  # the gate judges the exported file
    StepSpec("promote", ("export", "evaluate"), gated=True),
)

SPECS: dict[str, StepSpec] = {s.name: s for s in STEPS}
# step -> upstream steps whose results it takes as inputs
GRAPH: dict[str, list[str]] = {s.name: list(s.upstream) for s in STEPS}
ORDER: list[str] = [s.name for s in STEPS]


def _check() -> None:
    seen: set[str] = set()
    for s in STEPS:
        missing = [u for u in s.upstream if u not in seen]
        if missing:
            raise AssertionError(f"step graph: {s.name} lists {missing} before they are defined")
        seen.add(s.name)


_check()


def airflow_task_graph() -> dict[str, list[str]]:
    """Airflow task id -> sorted upstream task ids, as ``dags/asr_retraining.py`` must wire them."""
    out: dict[str, list[str]] = {}
    for s in STEPS:
        ups = {SPECS[u].result_task for u in s.upstream}
        if s.gated:
            # the gate reads the step's inputs; the step runs after the gate and its inputs
            out[f"{s.name}_gate"] = sorted(ups)
            ups = ups | {f"{s.name}_gate"}
        if s.fan_out:
            plan, part = (f"{s.name}_{x}" for x in s.fan_out)
            out[plan] = sorted(ups)
            out[part] = sorted(ups | {plan})
            out[s.result_task] = sorted(ups | {part})
        elif s.nodes:
            plan, node = (f"{s.name}_{x}" for x in s.nodes)
            out[plan] = sorted(ups)
            out[node] = sorted(ups | {plan})
            out[s.name] = sorted(ups | {node})
        else:
            out[s.name] = sorted(ups)
    return out


def step_module(step: str):
    if step not in SPECS:
        raise KeyError(f"unknown step {step!r}; steps: {', '.join(ORDER)}")
    return importlib.import_module(f"pipeline_tasks.steps.{step}")


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

"""
### asr_promote_production — move `staging` to `production` (or roll back)

**Manual trigger only** (no schedule). Run it after `asr_retraining` has put a candidate on
the MLflow alias **`staging`** and you want it to serve.

* `rollback` **off** (default): `canary_check` loads the `staging` model (ONNX) and checks it
  on the newest week's dev data (WER must stay under `registry.canary_max_wer`; the task fails
  otherwise); then `promote_production` points the alias **`production`** at the `staging`
  version (the version it replaces gets the alias `previous-production`).
* `rollback` **on**: `rollback` points `production` back to `previous-production`;
  the canary/promote tasks are skipped.

**Params**: `profile` — configs/&lt;name&gt;.yaml (its registry settings are used); `rollback` — see
above; `overrides` — extra `key.sub=value` config overrides, one per line.
Both registry calls are retried with exponential backoff; both are idempotent.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime

# DAG-side helpers live next to this file (dags/_common.py); make them importable however the
# file is loaded (dag-processor, task runner, a DagBag on another folder in tests).
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import DEFAULT_PROFILE, default_args, profiles, retry_kwargs, run_config
from airflow.sdk import Asset, Param, dag, task

PRODUCTION_MODEL = Asset("asrflow://model-production")


@dag(
    dag_id="asr_promote_production",
    schedule=None,
    start_date=datetime(2026, 1, 5, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["asrflow", "promotion"],
    default_args=default_args(),  # finite execution_timeout on every task (airflow.execution_timeout_s)
    params={
        "profile": Param(
            DEFAULT_PROFILE,
            type="string",
            enum=profiles(),
            title="Profile",
            description="Configuration profile (configs/<name>.yaml) whose MLflow registry is used.",
        ),
        "rollback": Param(
            False,
            type="boolean",
            title="Roll back",
            description="On: point `production` back to the previous production version instead of promoting.",
        ),
        "overrides": Param(
            [],
            type="array",
            items={"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_.]*=.*$"},
            title="Config overrides",
            description="Extra config overrides, one `key.sub=value` per line.",
        ),
    },
)
def asr_promote_production():
    @task.branch(task_id="choose_action")
    def choose_action(**context) -> str:
        action = "rollback" if context["params"].get("rollback") else "canary_check"
        print(f"asr_promote_production: {action}")
        return action

    @task(task_id="canary_check", multiple_outputs=False, **retry_kwargs(task="canary_check"))
    def canary_check() -> dict:
        """WER of the `staging` version on the newest week's dev rows; fails the run if too high."""
        from airflow.sdk.exceptions import AirflowFailException  # fail now: retrying will not help

        from pipeline_tasks.steps import promote

        try:
            res = promote.canary_check(run_config())
        except promote.CanaryFailed as e:
            raise AirflowFailException(str(e)) from e
        print(res["verdict"])
        return res

    @task(task_id="promote_production", multiple_outputs=False, outlets=[PRODUCTION_MODEL], **retry_kwargs(task="promote_production"))
    def promote_production(canary: dict) -> dict:
        from pipeline_tasks.steps import promote

        return promote.promote_production(run_config())

    @task(task_id="rollback", multiple_outputs=False, outlets=[PRODUCTION_MODEL], **retry_kwargs(task="rollback"))
    def rollback() -> dict:
        from pipeline_tasks.steps import promote

        return promote.rollback(run_config())

    action = choose_action()
    canary = canary_check()
    action >> [canary, rollback()]
    promote_production(canary)


asr_promote_production()

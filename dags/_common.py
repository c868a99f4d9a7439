"""DAG-side helpers shared by the asrflow DAG files (listed in ``.airflowignore``: not a DAG file).

Only wiring lives here: the run parameters (with their UI form schema), how a task turns
the run's params into a typed config, and the static task settings read from the default
profile. Everything heavy (torch, DVC, MLflow, the step modules) is imported inside task
bodies, so parsing the DAG files stays fast and touches no database.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from functools import lru_cache
from typing import Any

from airflow.sdk import Param

log = logging.getLogger("asrflow.dags")

# The profile a scheduled run uses; the scheduler's environment may change it (tests use "tiny").
DEFAULT_PROFILE = os.environ.get("ASRFLOW_PROFILE", "local")

# The weekly schedule of asr_retraining. ASRFLOW_RETRAIN_SCHEDULE may replace it (another cron
# expression) or switch it off ("none": manual triggers only, e.g. a dev or test stack where
# unpausing must not start the latest missed Monday run).
WEEKLY = "0 3 * * 1"


def retrain_schedule() -> str | None:
    value = os.environ.get("ASRFLOW_RETRAIN_SCHEDULE", WEEKLY).strip()
    return None if value.lower() in ("", "none", "manual") else value


def profiles() -> list[str]:
    """Profile names offered in the trigger form: ``configs/*.yaml``."""
    from pipeline_tasks.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    return names or [DEFAULT_PROFILE]


@lru_cache(maxsize=1)
def task_settings() -> dict[str, Any]:
    """Static per-task settings (pool, queue, retries) from the default profile's ``airflow`` section.

    They must be known when the DAG is parsed, so they come from the profile named by
    ``ASRFLOW_PROFILE`` (default ``local``), not from a run's params. Reading a YAML file is
    all this does: no database, no network.
    """
    from pipeline_tasks.config import load_config

    cfg = load_config(DEFAULT_PROFILE)
    a = cfg.airflow
    return {
        "gpu_pool": a.gpu_pool,
        "gpu_pool_slots": cfg.train.gpu_pool_slots,
        "train_queue": a.train_queue,
        "retries": a.retries,
        "retry_delay": timedelta(seconds=a.retry_delay_s),
    }


def retry_kwargs(retries: int | None = None) -> dict[str, Any]:
    """Retries with exponential backoff for steps that can fail for transient reasons."""
    s = task_settings()
    return {
        "retries": s["retries"] if retries is None else retries,
        "retry_delay": s["retry_delay"],
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
    }


def run_params() -> dict[str, Param]:
    """The trigger form of ``asr_retraining``. A scheduled run uses these defaults."""
    return {
        "profile": Param(
            DEFAULT_PROFILE,
            type="string",
            enum=profiles(),
            title="Profile",
            description="Configuration profile (configs/<name>.yaml): local = embedded default stack, "
            "tiny = tests/CI, prod = the production stack.",
        ),
        "landing_url": Param(
            None,
            type=["null", "string"],
            title="Landing zone",
            description="Folder or fsspec URL (file://, s3://, gs://) with the new speech batches. "
            "Empty: the profile's paths.landing_url.",
        ),
        "n_trials": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=1000,
            title="Tuning trials",
            description="Optuna trials for this run (tune.n_trials). Empty: the profile's value.",
        ),
        "epochs": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=1000,
            title="Training epochs",
            description="Epochs of the full training run (train.epochs). Empty: the profile's value.",
        ),
        "force": Param(
            False,
            type="boolean",
            title="Force full recompute",
            description="Recompute every step even if its cached output exists (normally unchanged "
            "inputs are skipped).",
        ),
        "promote": Param(
            True,
            type="boolean",
            title="Promote to staging",
            description="If the gate passes, register the model and move the `staging` alias to it. "
            "Off: only train, evaluate and export (the promote task is skipped).",
        ),
        "overrides": Param(
            [],
            type="array",
            items={"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_.]*=.*$"},
            title="Config overrides",
            description="Extra config overrides, one `key.sub=value` per line, e.g. `tune.enabled=false` "
            "or `train.lr=0.001` (same syntax as `asrflow --set`).",
        ),
    }


def overrides_from_params(params: dict[str, Any]) -> list[str]:
    """The config overrides a run's params stand for (the order matters: explicit overrides last)."""
    out: list[str] = []
    if params.get("landing_url"):
        out.append(f"paths.landing_url={params['landing_url']}")
    if params.get("n_trials") is not None:
        out.append(f"tune.n_trials={int(params['n_trials'])}")
    if params.get("epochs") is not None:
        out.append(f"train.epochs={int(params['epochs'])}")
    for item in params.get("overrides") or []:
        item = str(item).strip()
        if item:
            out.append(item)
    return out


def run_config(params: dict[str, Any] | None = None):
    """The typed config of the running task: ``load_config(params.profile, overrides)``.

    ``ASRFLOW_ROOT`` in the worker's environment points the profile at an artifact root.
    """
    from pipeline_tasks.config import load_config

    if params is None:
        from airflow.sdk import get_current_context

        params = get_current_context()["params"]
    overrides = overrides_from_params(params)
    cfg = load_config(params.get("profile") or DEFAULT_PROFILE, overrides)
    log.info("asrflow config: profile=%s root=%s overrides=%s", cfg.profile, cfg.root, overrides)
    return cfg


def force_flag(params: dict[str, Any] | None = None) -> bool:
    if params is None:
        from airflow.sdk import get_current_context

        params = get_current_context()["params"]
    return bool(params.get("force", False))


def run_step(step: str, inputs: dict[str, dict]) -> dict:
    """Run one pipeline step with the run's config; returns its small result record (the XCom)."""
    from pipeline_tasks.graph import run_one

    cfg = run_config()
    return run_one(step, cfg, inputs, force=force_flag())

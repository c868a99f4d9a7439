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
    """Profile names offered in the trigger form: ``configs/*.yaml``, limited to the default
    profile's ``airflow.trigger_profiles`` when it lists any (prod: only ``prod``)."""
    from pipeline_tasks.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    allowed = task_settings()["trigger_profiles"]
    if allowed:
        names = [n for n in names if n in allowed]
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
        "execution_timeout": timedelta(seconds=a.execution_timeout_s),
        "long_execution_timeout": timedelta(seconds=a.long_execution_timeout_s),
        "trigger_profiles": list(a.trigger_profiles),
    }


# tasks that may legitimately run for days on a big corpus: airflow.long_execution_timeout_s
LONG_TASKS = frozenset({"train", "train_node", "tune_worker"})


def task_timeout(task_id: str | None = None) -> timedelta:
    """The ``execution_timeout`` of a task: ``airflow.long_execution_timeout_s`` for the long tasks
    (:data:`LONG_TASKS`) and when the task is not named, ``airflow.execution_timeout_s`` otherwise.

    A finite timeout on every task means one hung task (a stuck mount, a dead NFS server, a hung
    collective) fails and is retried instead of blocking every later run (``max_active_runs=1``)."""
    s = task_settings()
    return s["long_execution_timeout"] if task_id is None or task_id in LONG_TASKS else s["execution_timeout"]


def default_args() -> dict[str, Any]:
    """``default_args`` for the DAGs: no retries unless a task asks, and a finite execution timeout."""
    return {"owner": "asrflow", "retries": 0, "execution_timeout": task_timeout("default")}


def retry_kwargs(retries: int | None = None, task: str | None = None) -> dict[str, Any]:
    """Retries with exponential backoff for steps that can fail for transient reasons, and the
    task's finite ``execution_timeout`` (:func:`task_timeout`; without ``task``, the long one)."""
    s = task_settings()
    return {
        "retries": s["retries"] if retries is None else retries,
        "retry_delay": s["retry_delay"],
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
        "execution_timeout": task_timeout(task),
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


def _form_overrides(params: dict[str, Any]) -> list[str]:
    """Overrides of the form's own typed, bounded fields (not allow-listed)."""
    out: list[str] = []
    if params.get("n_trials") is not None:
        out.append(f"tune.n_trials={int(params['n_trials'])}")
    if params.get("epochs") is not None:
        out.append(f"train.epochs={int(params['epochs'])}")
    return out


def _user_overrides(params: dict[str, Any]) -> list[str]:
    """The free-form ``overrides`` lines (checked against the profile's allow-list)."""
    return [str(item).strip() for item in params.get("overrides") or [] if str(item).strip()]


def overrides_from_params(params: dict[str, Any]) -> list[str]:
    """The config overrides a run's params stand for (the order matters: explicit overrides last)."""
    out: list[str] = []
    if params.get("landing_url"):
        out.append(f"paths.landing_url={params['landing_url']}")
    return out + _form_overrides(params) + _user_overrides(params)


def run_config(params: dict[str, Any] | None = None):
    """The typed config of the running task, from the run's params.

    A trigger is not a shell: the free-form ``overrides`` may only set the keys the profile's
    ``airflow.trigger_override_allow`` lists, ``landing_url`` must fall under
    ``airflow.allowed_landing_prefixes``, and no param value is ``${VAR}``-expanded
    (:func:`pipeline_tasks.config.load_trigger_config`). A refused param fails the task at once
    (no retries) with the reason in the task log. ``ASRFLOW_ROOT`` in the worker's environment
    points the profile at an artifact root.
    """
    from pipeline_tasks.config import TriggerOverrideError, load_trigger_config, redact_override

    if params is None:
        from airflow.sdk import get_current_context

        params = get_current_context()["params"]
    profile = params.get("profile") or DEFAULT_PROFILE
    shown = [redact_override(o) for o in overrides_from_params(params)]
    try:
        if str(profile) not in profiles():
            raise TriggerOverrideError(f"profile {profile!r} may not be triggered here (allowed: {profiles()})")
        cfg = load_trigger_config(
            profile,
            overrides=_user_overrides(params),
            landing_url=params.get("landing_url") or None,
            form_overrides=_form_overrides(params),
        )
    except TriggerOverrideError as e:
        from airflow.sdk.exceptions import AirflowFailException  # retrying will not help

        log.error("asrflow: refused trigger params (profile=%s, overrides=%s): %s", profile, shown, e)
        raise AirflowFailException(f"refused trigger params: {e}") from e
    log.info("asrflow config: profile=%s root=%s overrides=%s", cfg.profile, cfg.root, shown)
    return cfg


def force_flag(params: dict[str, Any] | None = None) -> bool:
    if params is None:
        from airflow.sdk import get_current_context

        params = get_current_context()["params"]
    return bool(params.get("force", False))


def run_step(step: str, inputs: dict[str, dict]) -> dict:
    """Run one pipeline step with the run's config; returns its small result record (the XCom),
    with any credential in it masked (:func:`pipeline_tasks.config.redact_secrets`)."""
    from pipeline_tasks.config import redact_secrets
    from pipeline_tasks.graph import run_one

    cfg = run_config()
    return redact_secrets(run_one(step, cfg, inputs, force=force_flag()))

"""MLflow helpers shared by the steps that track (train, tune, evaluate, export, promote).

One failure policy for what is only tracking (params, metrics, plots, run bookkeeping):
:func:`mlflow_call` retries a few times, then logs a warning and returns ``None``; a
tracking outage never fails a training or tuning run. The registry (promote, the gate's
champion look-up) is not tracking: its errors propagate, and the task's retries handle them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline_tasks.config import REPO_ROOT, AsrflowConfig, redact_secrets

log = logging.getLogger(__name__)


def mlflow_call(what: str, fn: Callable[[], Any], retries: int = 3) -> Any:
    """``fn()``, retried ``retries`` times with a short backoff; ``None`` (and a warning) if it keeps failing."""
    for attempt in range(retries):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if attempt == retries - 1:
                log.warning("MLflow %s failed (tracking only; going on): %s", what, e)
                return None
            time.sleep(0.5 * (attempt + 1))
    return None


def mlflow_setup(cfg: AsrflowConfig) -> str:
    """Point MLflow at the profile's tracking URI and return the experiment id (created once)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    uri = cfg.registry.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        loc = cfg.registry.artifact_location
        if "://" not in loc:
            Path(loc).mkdir(parents=True, exist_ok=True)
            loc = Path(loc).resolve().as_uri()
        try:
            exp_id = client.create_experiment(cfg.registry.experiment, artifact_location=loc)
        except Exception:  # created concurrently by another worker
            exp_id = client.get_experiment_by_name(cfg.registry.experiment).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    """The code's git commit (``unknown`` outside a git checkout); ``+dirty`` if modified."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config dict to ``a.b.c -> str`` for ``mlflow.log_params``, credentials
    masked (:func:`pipeline_tasks.config.redact_secrets`: URL userinfo such as the Optuna
    storage's password, any key named like a secret). MLflow params are readable by everyone
    with access to the experiment and cannot be deleted."""
    out: dict[str, str] = {}
    for k, v in redact_secrets(d).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out

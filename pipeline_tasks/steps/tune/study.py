"""The tune step's shared Optuna study: its name (what it is keyed by), storage, sampler, pruner, MLflow parent run."""

from __future__ import annotations

import logging
import sqlite3
import warnings
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig, redact_url
from pipeline_tasks.contract import (
    canonical_json,
    sha256_hex,
)
from pipeline_tasks.services.tracking import mlflow_call

log = logging.getLogger(__name__)


STEP = "tune"
CODE_VERSION = "1"


# TuneConfig fields that change how the search is *run*, not what it computes: excluded from
# the step key and the study name (more workers or a longer timeout continue the same study).
_OPERATIONAL_FIELDS = (
    "n_workers",
    "storage",
    "heartbeat_interval_s",
    "grace_period_s",
    "timeout_s",
    "max_retry",
    "n_trials",
    "fidelity_check_top_k",
    "fidelity_epochs_factor",
    "trial_max_minutes",
    "enabled",
    "plots",
    "max_consecutive_failures",
)
# train fields that do not change a trial's result (or are set by the tune step itself)
_TRAIN_OPERATIONAL = (
    "epochs",
    "max_minutes",
    "checkpoint_every_steps",
    "checkpoint_every_minutes",
    "keep_checkpoints",
    "world_size",
    "nnodes",
    "launcher",
    "pytorchjob",
    "rdzv_host",
    "rdzv_port",
    "rdzv_join_timeout_s",
    "max_restarts",
    "gpu_pool_slots",
    "num_workers",
    "torch_threads",
    "zero_stage",
)

def _search_identity(cfg: AsrflowConfig) -> dict[str, Any]:
    """Everything that decides what a trial computes, except the data (hashed separately)."""
    tune = {k: v for k, v in cfg.tune.model_dump(mode="json").items() if k not in _OPERATIONAL_FIELDS}
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _TRAIN_OPERATIONAL}
    return {
        "tune": tune,
        "model": cfg.model.model_dump(mode="json"),
        "train": train,
        "features": cfg.features.model_dump(mode="json"),
    }


def _parent_identity(inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The warm-start parent of the trials (None: from scratch): a new parent, a new study."""
    p = inputs.get("parent")
    if not p or not p.get("model_dir"):
        return None
    return {"version": p.get("version"), "weights_md5": p.get("weights_md5")}


def space_hash(cfg: AsrflowConfig) -> str:
    """Hash of the search space alone (12 hex chars)."""
    return sha256_hex(canonical_json({k: v.model_dump(mode="json") for k, v in cfg.tune.space.items()}))[:12]


def study_name(cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]]) -> str:
    """``asrflow-tune-<proxy md5[:10]>-<space hash>-<settings hash>``: same inputs, same study."""
    split = inputs["split"]
    settings = sha256_hex(
        canonical_json({"identity": _search_identity(cfg), "dev_md5": split.get("dev_md5"),
                        "parent": _parent_identity(inputs)})
    )
    return f"asrflow-tune-{split['proxy_md5'][:10]}-{space_hash(cfg)}-{settings[:10]}"


def step_key_for(cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]]) -> str:
    from pipeline_tasks.contract import step_key

    if not cfg.tune.enabled:
        return step_key(STEP, {"enabled": False}, {}, CODE_VERSION)
    split = inputs["split"]
    fin = {"top_k": cfg.tune.fidelity_check_top_k, "factor": cfg.tune.fidelity_epochs_factor}
    return step_key(
        STEP,
        {"identity": _search_identity(cfg), "n_trials": cfg.tune.n_trials, "fidelity": fin},
        {"proxy_md5": split["proxy_md5"], "dev_md5": split.get("dev_md5"), "parent": _parent_identity(inputs)},
        CODE_VERSION,
    )


def redact(url: str) -> str:
    """A storage URL with its credentials replaced by ``***`` (userinfo, secret query params)."""
    return redact_url(str(url))


def _quiet_optuna() -> None:
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*multivariate.*")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_storage(cfg: AsrflowConfig, heartbeat: bool = True):
    """The study's RDB storage, with heartbeat + retry of stale trials.

    SQLite: WAL journal (readers do not block the writer) and a 60 s busy timeout, so
    several worker processes can share the file. Postgres/MySQL: ``pool_pre_ping``.
    """
    import optuna

    _quiet_optuna()
    url = cfg.tune.storage
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(path, timeout=60)
            try:
                con.execute("PRAGMA journal_mode=WAL")
            finally:
                con.close()
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(
            heartbeat_interval=max(1, int(cfg.tune.heartbeat_interval_s)),
            grace_period=max(1, int(cfg.tune.grace_period_s)),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=cfg.tune.max_retry
            ),
        )
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


def make_sampler(cfg: AsrflowConfig, seed: int):
    """TPE (multivariate, grouped for conditional spaces, constant liar for parallel workers)."""
    import optuna

    n_startup = cfg.tune.n_startup_trials
    if n_startup is None:
        n_startup = max(2, cfg.tune.n_trials // 4)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, group=True, constant_liar=True)


def make_pruner(cfg: AsrflowConfig):
    """The pruner named by ``tune.pruner``; resources are epochs (steps reported 1..epochs)."""
    import optuna

    t = cfg.tune
    if t.multi_objective or t.pruner == "none":
        return optuna.pruners.NopPruner()
    if t.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=t.min_resource, reduction_factor=t.reduction_factor
        )
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=t.min_resource, max_resource=t.epochs, reduction_factor=t.reduction_factor
        )
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=max(0, t.min_resource - 1))


def _directions(cfg: AsrflowConfig) -> list[str]:
    return ["minimize", "minimize"] if cfg.tune.multi_objective else ["minimize"]


def _worker_seed(cfg: AsrflowConfig, worker_index: int, n_existing: int) -> int:
    """Distinct per worker and per resumption, yet reproducible from the study's state."""
    return int(sha256_hex(f"{cfg.tune.sampler_seed}:{worker_index}:{n_existing}")[:8], 16)


def open_study(cfg: AsrflowConfig, name: str, worker_index: int = 0, heartbeat: bool = True):
    import optuna

    storage = make_storage(cfg, heartbeat=heartbeat)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=_directions(cfg),
        sampler=make_sampler(cfg, cfg.tune.sampler_seed),
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )
    n_existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(cfg, _worker_seed(cfg, worker_index, n_existing))
    return study


def _counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    out["finished"] = out["complete"] + out["pruned"]
    return out


def _parent_run_id(cfg: AsrflowConfig, study, prepare_if_missing: bool) -> str | None:
    rid = study.user_attrs.get("mlflow_parent_run_id")
    if rid or not prepare_if_missing:
        return rid
    import mlflow

    from pipeline_tasks.services.tracking import git_commit, mlflow_setup

    def create() -> str:
        exp_id = mlflow_setup(cfg)
        client = mlflow.MlflowClient()
        run = client.create_run(
            exp_id,
            run_name=f"tune-{study.study_name}",
            tags={"asrflow.step": STEP, "optuna.study": study.study_name, "git_commit": git_commit()},
        )
        client.log_param(run.info.run_id, "study_name", study.study_name)
        return run.info.run_id

    rid = mlflow_call("create parent run", create)
    if rid:
        study.set_user_attr("mlflow_parent_run_id", rid)
    return rid

"""The ``tune`` step: hyperparameter search on the proxy split with Optuna + ASHA.

The package: :mod:`.space` (the search space), :mod:`.study` (naming, storage, sampler,
pruner), :mod:`.objective` (one trial; :class:`~.objective.TrialRunner` is a worker's Optuna
objective), :mod:`.report` (plots, importances, fidelity check); this module holds the step's
entry points (``prepare`` → ``run_worker`` × n → ``finalize``, and ``run``).

What it does
------------
Each Optuna trial trains the model with :func:`pipeline_tasks.services.fitting.fit` on the *proxy*
split (``tune.proxy_fraction`` of its rows, at most ``tune.epochs`` epochs) and reports the
dev WER after every epoch (``trial.report(wer, epoch)``); the pruner (ASHA =
``SuccessiveHalvingPruner``, Hyperband, median or none) stops unpromising trials early.
The search space is ``tune.space``: dotted config paths (``train.lr``, ``model.d_model``,
``train.specaugment.freq_mask_width``...) mapped to :class:`SearchParam`; a param with a
``condition`` (``{other.param: value or [values]}``) is only sampled when that other param
(sampled earlier, or the base config's value when it is not in the space) matches.

Derived settings (recorded per trial in the ``overrides`` user attribute, which is what
``best_overrides`` returns, so the train step applies exactly what was evaluated):

* **LR vs batch duration.** When ``train.sampler.max_duration_s`` (audio seconds per batch)
  is sampled, the (sampled or base) ``train.lr`` is read as the LR *at the base config's batch
  duration* B0 and scaled to the sampled B: ``lr * sqrt(B/B0)`` (``tune.lr_scaling: sqrt``,
  the usual rule for Adam-type optimizers), ``lr * B/B0`` (``linear``, the SGD rule) or not at
  all (``none``). TPE thus searches a batch-size-independent LR multiplier.
* **Heads.** ``model.n_heads`` is lowered to the largest divisor of ``model.d_model`` not above
  it, so every sampled width is valid for multi-head attention.
* **Parameter budget.** With ``tune.max_params`` set, a sampled (d_model, n_layers, ...) combo
  whose model is bigger is *rejected*: the trial is marked PRUNED after 0 epochs with the user
  attribute ``rejected = "param_budget"`` (cheap, and counted, so a space that is mostly over
  budget cannot loop forever).

Parallel workers and idempotency
--------------------------------
N worker processes (Airflow mapped tasks in production, spawned processes in :func:`run`)
share one study in Optuna RDB storage (``tune.storage``: SQLite with WAL + busy timeout
locally, Postgres in production). The study name is derived from the proxy data's md5, the
dev md5 and a hash of the space, sampler/pruner/fidelity settings and the base model/train
sections, so a rerun on the same inputs *continues* the same study (``load_if_exists``):
workers run trials only until the study holds ``n_trials`` finished (COMPLETE + PRUNED)
trials. Every trial records its worker id (``worker`` user attr). The storage runs a
heartbeat: a worker killed mid-trial leaves a RUNNING trial whose heartbeat goes stale;
the next worker that asks for a trial (or polls while waiting) fails it and
``RetryHeartbeatStaleTrialCallback`` re-queues its params as a WAITING trial that another
worker runs (``tune.max_retry`` times at most). Workers that find all remaining trials
already running wait and keep checking heartbeats, so a dead worker's trial is not lost.
Two workers that start the last trial at the same instant would overshoot ``n_trials``;
the later-numbered one notices at its start and ends as FAIL with user attr
``surplus=True`` (FAIL trials do not count), so the count stops exactly at ``n_trials``.

MLflow: one parent run per study (its id is kept in the study's user attrs, so every worker
finds it), one nested run per trial with its params, the dev WER per epoch, whether it was
pruned and its final value. :func:`finalize` logs the plots (optimization history,
intermediate values, parameter importances; HTML via plotly and PNG via matplotlib), the
fANOVA importances JSON, the best config and, optionally, the proxy-fidelity check.

Multi-objective (``tune.multi_objective``): objectives (dev WER, decoding latency in ms per
audio second on the dev set); Optuna does not support pruning for multi-objective studies
(``trial.report`` raises), so every trial runs all epochs and the pruner is not used. The
Pareto front is saved and ``best_overrides`` is the Pareto point with the lowest WER.

Airflow mapping: ``prepare`` → ``run_worker`` × n (mapped over worker indices) → ``finalize``.
:func:`run` does the same in one call with spawned processes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig, config_from_dict, with_overrides
from pipeline_tasks.contract import (
    StepRun,
    run_step,
    write_json_atomic,
)
from pipeline_tasks.services.tracking import mlflow_call
from pipeline_tasks.steps.tune.objective import (  # noqa: F401  (re-exported: the step's API)
    _POLL_S,
    TrialContext,
    TrialFn,
    TrialRunner,
    _load_trial_fn,
    _SurplusTrial,
    _trial_cfg,
    fit_trial,
    measure_latency_ms_per_s,
    proxy_subset,
)
from pipeline_tasks.steps.tune.report import _fidelity_check, _importances, _plots  # noqa: F401
from pipeline_tasks.steps.tune.space import (  # noqa: F401
    derive_overrides,
    estimate_params,
    sample_params,
    validate_space,
)
from pipeline_tasks.steps.tune.study import (  # noqa: F401
    _OPERATIONAL_FIELDS,
    _TRAIN_OPERATIONAL,
    CODE_VERSION,
    STEP,
    _counts,
    _directions,
    _parent_run_id,
    _quiet_optuna,
    _search_identity,
    make_pruner,
    make_sampler,
    make_storage,
    open_study,
    redact,
    space_hash,
    step_key_for,
    study_name,
)

log = logging.getLogger(__name__)


def with_parent(cfg: AsrflowConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` plus ``parent``: the model the trials start from (the one train will start from).

    In warm mode every proxy trial fine-tunes the same parent, so the trials' dev scores are a
    real signal, and the parent is part of the study's identity (a new parent, a new study).
    """
    if "parent" in inputs:
        return inputs
    from pipeline_tasks.services.parent import parent_for_split

    parent = parent_for_split(cfg, inputs["split"])
    return {**inputs, "parent": parent.record()}


def effective_config(cfg: AsrflowConfig, inputs: dict[str, Any]) -> AsrflowConfig:
    """``tune.metric: auto`` resolved: ``dev_wer`` for warm-started trials, else ``dev_loss``."""
    if cfg.tune.metric != "auto":
        return cfg
    warm = bool((inputs.get("parent") or {}).get("model_dir"))
    return with_overrides(cfg, {"tune.metric": "dev_wer" if warm else "dev_loss"})


def prepare(cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Create (or load) the study and its MLflow parent run. Idempotent.

    With ``tune.enabled: false`` it touches no storage and says so (``enabled: False``).
    """
    if not cfg.tune.enabled:
        return {
            "study_name": None,
            "storage": redact(cfg.tune.storage),
            "n_trials": 0,
            "n_finished": 0,
            "mlflow_parent_run_id": None,
            "enabled": False,
        }
    validate_space(cfg)
    inputs = with_parent(cfg, inputs)
    cfg = effective_config(cfg, inputs)
    name = study_name(cfg, inputs)
    study = open_study(cfg, name, heartbeat=False)
    if "space" not in study.user_attrs:
        study.set_user_attr("space", {k: v.model_dump(mode="json") for k, v in cfg.tune.space.items()})
        study.set_user_attr("proxy_md5", inputs["split"]["proxy_md5"])
        study.set_user_attr("space_hash", space_hash(cfg))
    parent = _parent_run_id(cfg, study, prepare_if_missing=True)
    counts = _counts(study)
    log.info("tune: study %s (%d finished of %d)", name, counts["finished"], cfg.tune.n_trials)
    return {
        "study_name": name,
        "storage": redact(cfg.tune.storage),
        "n_trials": cfg.tune.n_trials,
        "n_finished": counts["finished"],
        "mlflow_parent_run_id": parent,
        "enabled": True,
    }


def run_worker(
    cfg: AsrflowConfig,
    inputs: dict[str, dict[str, Any]],
    worker_index: int,
    *,
    trial_fn: TrialFn | str | None = None,
) -> dict[str, Any]:
    """Run trials of the shared study until it holds ``n_trials`` finished trials.

    Returns this worker's counts: ``{"worker", "complete", "pruned", "failed", "surplus"}``.
    """
    import optuna
    from optuna.trial import TrialState

    if not cfg.tune.enabled:
        return {"worker": worker_index, "complete": 0, "pruned": 0, "failed": 0, "surplus": 0}
    validate_space(cfg)
    inputs = with_parent(cfg, inputs)
    cfg = effective_config(cfg, inputs)
    name = study_name(cfg, inputs)
    study = open_study(cfg, name, worker_index=worker_index)
    parent = _parent_run_id(cfg, study, prepare_if_missing=True)
    fn = _load_trial_fn(trial_fn)
    t = cfg.tune
    n_trials = t.n_trials
    mine = {
        "worker": worker_index,
        "complete": 0,
        "pruned": 0,
        "failed": 0,
        "surplus": 0,
        "host": socket.gethostname(),
    }
    if parent is not None:
        from pipeline_tasks.services.tracking import mlflow_setup

        mlflow_call("setup", lambda: mlflow_setup(cfg))
    objective = TrialRunner(cfg, inputs, study, name, worker_index, parent, fn)
    consecutive_failures = 0

    def count(study_, frozen) -> None:
        nonlocal consecutive_failures
        if frozen.user_attrs.get("surplus"):
            mine["surplus"] += 1
        elif frozen.state == TrialState.COMPLETE:
            mine["complete"] += 1
            consecutive_failures = 0
        elif frozen.state == TrialState.PRUNED:
            mine["pruned"] += 1
            consecutive_failures = 0
        else:
            mine["failed"] += 1
            consecutive_failures += 1

    def budget_failures() -> int:
        """Failed trials that use up the budget: not surplus, not re-run by the stale-trial retry.
        Without this, a study whose trials all fail (NaN scores) with pruner none or
        multi-objective and no timeout_s would start new trials forever."""
        from optuna.storages import RetryFailedTrialCallback

        trials = study.get_trials(deepcopy=False)
        retried = {RetryFailedTrialCallback.retried_trial_number(x) for x in trials} - {None}
        return sum(
            1
            for x in trials
            if x.state == TrialState.FAIL and not x.user_attrs.get("surplus") and x.number not in retried
        )

    deadline = None if t.timeout_s is None else time.monotonic() + float(t.timeout_s)
    stop = optuna.study.MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    while True:
        optuna.storages.fail_stale_trials(study)
        c = _counts(study)
        if c["finished"] >= n_trials:
            break
        failed = budget_failures()
        if c["finished"] + failed >= n_trials:
            log.warning(
                "tune: worker %d stops: %d finished + %d failed trials use up n_trials=%d",
                worker_index, c["finished"], failed, n_trials,
            )
            break
        if consecutive_failures >= t.max_consecutive_failures:
            log.warning(
                "tune: worker %d stops after %d failed trials in a row (tune.max_consecutive_failures)",
                worker_index, consecutive_failures,
            )
            break
        if deadline is not None and time.monotonic() > deadline:
            log.warning("tune: worker %d reached timeout_s=%s", worker_index, t.timeout_s)
            break
        if c["finished"] + failed + c["running"] + c["waiting"] >= n_trials and c["waiting"] == 0:
            # The remaining trials are running in other workers: wait, and keep failing
            # (and thereby re-queueing) trials whose worker stopped sending heartbeats.
            time.sleep(_POLL_S)
            continue
        study.optimize(objective, n_trials=1, callbacks=[count, stop], catch=(_SurplusTrial,))
    mine["study_name"] = name
    return mine


def _worker_entry(
    cfg_dict: dict[str, Any], inputs: dict[str, Any], idx: int, trial_fn: str | None, out: str
) -> None:
    """Spawned-process entry point: run one worker and write its result JSON to ``out``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = run_worker(config_from_dict(cfg_dict), inputs, idx, trial_fn=trial_fn)
    write_json_atomic(out, res)


def _finalize_work(
    cfg: AsrflowConfig,
    inputs: dict[str, dict[str, Any]],
    worker_results: list[dict[str, Any]],
    tmp: Path,
    trial_fn: TrialFn | str | None,
) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    name = study_name(cfg, inputs)
    study = open_study(cfg, name, heartbeat=False)
    counts = _counts(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(
            f"tune: study {name} has no complete trial ({counts}); raise tune.n_trials or tune.timeout_s"
        )
    pareto: list[dict[str, Any]] | None = None
    if cfg.tune.multi_objective:
        front = sorted(study.best_trials, key=lambda x: (x.values[0], x.values[1]))
        best = front[0]
        pareto = [
            {
                "trial": x.number,
                cfg.tune.metric: x.values[0],
                "latency_ms_per_s": x.values[1],
                "overrides": x.user_attrs.get("overrides", x.params),
            }
            for x in front
        ]
        write_json_atomic(tmp / "pareto_front.json", pareto)
    else:
        best = study.best_trial
    overrides = best.user_attrs.get("overrides", dict(best.params))
    no_signal = None
    values = [x.values[0] for x in complete]
    distinct = {json.dumps(x.user_attrs.get("overrides", x.params), sort_keys=True, default=str) for x in complete}
    if not cfg.tune.multi_objective and len(distinct) > 1 and max(values) - min(values) < 1e-9:
        # every trial scored the same (e.g. all at WER 1.0): the "best" is an arbitrary draw, so
        # train with the profile's own config instead
        no_signal = (
            f"all {len(values)} complete trials scored {values[0]:.4f} ({cfg.tune.metric}): no signal "
            "at this fidelity; training uses the profile's config (raise tune.epochs / proxy_fraction, "
            "or set tune.metric=dev_loss)"
        )
        log.warning("tune: %s", no_signal)
        overrides = {}
    cers = [x.user_attrs.get("dev_cer") for x in complete]
    if no_signal is None and cers and all(c is not None and c >= cfg.tune.plateau_cer for c in cers):
        # every complete trial (even a single one, the rest pruned) still decodes to (nearly) nothing:
        # its loss differences are noise, not a ranking, and its config an arbitrary draw
        no_signal = (
            f"no complete trial left the CTC plateau (dev CER {min(cers):.3f}..{max(cers):.3f} >= "
            f"tune.plateau_cer {cfg.tune.plateau_cer}): training uses the profile's config"
        )
        log.warning("tune: %s", no_signal)
        overrides = {}
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    workers = sorted({int(x.user_attrs["worker"]) for x in finished if "worker" in x.user_attrs})
    best_cfg = {
        "study_name": name,
        "trial": best.number,
        "value": best.values[0],
        "values": list(best.values),
        "params": dict(best.params),
        "overrides": overrides,
        "derived": best.user_attrs.get("derived", {}),
        "proxy_md5": inputs["split"]["proxy_md5"],
        "fidelity": {"epochs": cfg.tune.epochs, "proxy_fraction": cfg.tune.proxy_fraction},
        "metric": cfg.tune.metric,
        "no_signal": no_signal,
    }
    write_json_atomic(tmp / "best_config.json", best_cfg)
    importances = _importances(study, cfg)
    write_json_atomic(tmp / "importances.json", importances)
    plots = _plots(study, cfg, tmp / "plots") if cfg.tune.plots else []
    trials_table = [
        {
            "number": x.number,
            "state": x.state.name,
            "values": x.values,
            "worker": x.user_attrs.get("worker"),
            "epochs": x.user_attrs.get("epochs_done"),
            "intermediate": {str(k): v for k, v in x.intermediate_values.items()},
            "params": x.params,
            "retried_from": optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(x),
            "rejected": x.user_attrs.get("rejected"),
        }
        for x in study.get_trials(deepcopy=False)
    ]
    write_json_atomic(tmp / "trials.json", trials_table)
    parent = _parent_run_id(cfg, study, prepare_if_missing=True)
    fidelity = None
    if cfg.tune.fidelity_check_top_k > 0:
        fidelity = _fidelity_check(cfg, inputs, study, _load_trial_fn(trial_fn), parent)
        write_json_atomic(tmp / "fidelity_check.json", fidelity)
    trial_epochs = sum(int(x.user_attrs.get("epochs_done", len(x.intermediate_values))) for x in finished)
    result = {
        "best_overrides": overrides,
        "no_signal": no_signal,
        "metric": cfg.tune.metric,
        "best_value": best.values[0],
        "best_values": list(best.values),
        "best_trial": best.number,
        "study_name": name,
        "storage": redact(cfg.tune.storage),
        "n_trials_complete": counts["complete"],
        "n_trials_pruned": counts["pruned"],
        "n_trials_failed": counts["fail"],
        "trial_epochs": trial_epochs,
        "best_config": "best_config.json",
        "importances": "importances.json",
        "trials": "trials.json",
        "plots": [f"plots/{p}" for p in plots],
        "pareto_front": "pareto_front.json" if pareto is not None else None,
        "workers": workers,
        "worker_results": worker_results,
        "fidelity_check": fidelity,
        "fidelity_spearman": None if fidelity is None else fidelity["spearman_rho"],
        "mlflow_run_id": parent,
        "enabled": True,
    }
    if parent:
        import mlflow

        def log_parent() -> None:
            from pipeline_tasks.services.tracking import mlflow_setup

            mlflow_setup(cfg)
            client = mlflow.MlflowClient()
            metrics = {
                f"best_{cfg.tune.metric}": best.values[0],
                "n_trials_complete": counts["complete"],
                "n_trials_pruned": counts["pruned"],
                "trial_epochs": trial_epochs,
            }
            if fidelity and fidelity["spearman_rho"] is not None:
                metrics["fidelity_spearman"] = fidelity["spearman_rho"]
            for k, v in metrics.items():
                client.log_metric(parent, k, float(v))
            client.set_tag(parent, "best_overrides", json.dumps(overrides, sort_keys=True)[:5000])
            for f in (
                "best_config.json",
                "importances.json",
                "trials.json",
                "pareto_front.json",
                "fidelity_check.json",
            ):
                if (tmp / f).exists():
                    client.log_artifact(parent, str(tmp / f))
            if (tmp / "plots").exists():
                client.log_artifacts(parent, str(tmp / "plots"), artifact_path="plots")
            client.set_terminated(parent)

        mlflow_call("log parent", log_parent, retries=2)
    return result


def finalize(
    cfg: AsrflowConfig,
    inputs: dict[str, dict[str, Any]],
    worker_results: list[dict[str, Any]],
    force: bool = False,
    *,
    trial_fn: TrialFn | str | None = None,
) -> dict[str, Any]:
    """Publish the study's outcome under the step contract (best config, plots, importances)."""
    if not cfg.tune.enabled:
        return run(cfg, inputs, force=force)
    inputs = with_parent(cfg, inputs)
    cfg = effective_config(cfg, inputs)
    key = step_key_for(cfg, inputs)
    return run_step(
        cfg.root,
        STEP,
        key,
        lambda tmp: _finalize_work(cfg, inputs, list(worker_results), tmp, trial_fn),
        force=force,
    )


def _disabled_work(cfg: AsrflowConfig, tmp: Path) -> dict[str, Any]:
    write_json_atomic(tmp / "best_config.json", {"overrides": {}, "enabled": False})
    return {
        "best_overrides": {},
        "best_value": None,
        "study_name": None,
        "storage": redact(cfg.tune.storage),
        "n_trials_complete": 0,
        "n_trials_pruned": 0,
        "best_config": "best_config.json",
        "workers": [],
        "enabled": False,
    }


def run(
    cfg: AsrflowConfig,
    inputs: dict[str, dict[str, Any]],
    force: bool = False,
    *,
    trial_fn: str | None = None,
) -> dict[str, Any]:
    """prepare + ``tune.n_workers`` parallel worker processes + finalize.

    ``trial_fn`` (``"module:function"``, importable in a spawned process) replaces the real
    ``fit`` trial; tests use it to exercise the storage and worker logic quickly.
    """
    if not cfg.tune.enabled:
        key = step_key_for(cfg, inputs)
        return run_step(cfg.root, STEP, key, lambda tmp: _disabled_work(cfg, tmp), force=force)
    inputs = with_parent(cfg, inputs)
    cfg = effective_config(cfg, inputs)
    key = step_key_for(cfg, inputs)
    if not force:
        done = StepRun(cfg.root, STEP, key).done()
        if done is not None:
            return done
    prep = prepare(cfg, inputs)
    n = cfg.tune.n_workers
    results: list[dict[str, Any]] = []
    if prep["n_finished"] < cfg.tune.n_trials:
        if n == 1:
            results.append(run_worker(cfg, inputs, 0, trial_fn=trial_fn))
        else:
            results = _run_processes(cfg, inputs, n, trial_fn)
    return finalize(cfg, inputs, results, force=force, trial_fn=trial_fn)


def _run_processes(
    cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]], n: int, trial_fn: str | None
) -> list[dict[str, Any]]:
    """Run ``n`` workers as spawned processes; if one dies, the survivors finish its trials."""
    ctx = mp.get_context("spawn")
    out_dir = cfg.root / STEP / "_work" / f"workers-{os.getpid()}-{int(time.time() * 1000)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for i in range(n):
            p = ctx.Process(
                target=_worker_entry,
                args=(cfg.dump(), inputs, i, trial_fn, str(out_dir / f"worker-{i}.json")),
                name=f"tune-worker-{i}",
            )
            p.start()
            procs.append(p)
        for p in procs:
            p.join()
        results = []
        for i, p in enumerate(procs):
            f = out_dir / f"worker-{i}.json"
            if f.exists():
                results.append(json.loads(f.read_text()))
            else:
                results.append({"worker": i, "exitcode": p.exitcode, "error": "worker process died"})
        if any("error" in r for r in results):
            # A worker died: its stale trial is retried by this in-process pass.
            results.append(run_worker(cfg, inputs, n, trial_fn=trial_fn))
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(out_dir, ignore_errors=True)

"""One tune trial: its context, the production trial function (fit on the proxy split), and the
Optuna objective of a worker (:class:`TrialRunner`)."""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig, with_overrides
from pipeline_tasks.contract import (
    resolve,
)
from pipeline_tasks.services.parent import Parent, incompatibilities
from pipeline_tasks.services.tracking import mlflow_call
from pipeline_tasks.steps.tune.space import derive_overrides, estimate_params, sample_params
from pipeline_tasks.steps.tune.study import STEP

log = logging.getLogger(__name__)

_POLL_S = 0.5

# A trial function runs one configuration: ``fn(trial_cfg, ctx, on_epoch_end) -> dict`` with
# at least ``dev_wer`` (and ``latency_ms_per_s`` for multi-objective studies).
TrialFn = Callable[[AsrflowConfig, "TrialContext", Callable[[int, dict[str, float]], None]], dict[str, Any]]


@dataclass(frozen=True)
class TrialContext:
    """Where one trial reads and writes: proxy/dev indexes, a scratch folder, its fidelity."""

    proxy_index: Path
    dev_index: Path
    out_dir: Path
    epochs: int
    multi_objective: bool
    latency_max_utts: int
    trial_number: int
    parent: dict[str, Any] | None = None  # services.parent.Parent.record(): warm-started trials
    # factor -> the speed copy of proxy_index (same rows), for trials with train.augment.speed_perturb
    proxy_speed: dict[str, Path] | None = None


class _SurplusTrial(Exception):
    """Raised at a trial's start when the study already has ``n_trials`` live trials."""


def proxy_subset(
    cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]], fraction: float | None = None, speed: str | None = None
) -> Path:
    """The proxy index at ``tune.proxy_fraction``: a deterministic, hash-ordered row sample.

    Written once per (proxy md5, fraction) under ``<root>/tune/_work/`` (atomic rename), so
    every worker and every rerun trains on the same rows. ``speed`` (a factor of split's
    ``proxy_speed``, e.g. ``"0.9"``): the same rows of that speed copy.
    """
    split = inputs["split"]
    if speed is None:
        src, md5 = resolve(split, split["proxy"]), split["proxy_md5"]
    else:
        src, md5 = resolve(split, split["proxy_speed"][speed]), split["proxy_speed_md5"][speed]
    frac = cfg.tune.proxy_fraction if fraction is None else fraction
    if frac >= 1.0:
        return src
    import hashlib

    import pyarrow.parquet as pq

    out = cfg.root / STEP / "_work" / f"proxy-{md5[:16]}-{frac:.4f}.parquet"
    if out.exists():
        return out
    table = pq.read_table(src)
    ids = table.column("id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha1(f"tune:{ids[i]}".encode()).hexdigest())
    n = max(1, math.ceil(frac * len(ids)))
    sub = table.take(sorted(order[:n]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}.{os.getpid()}")
    pq.write_table(sub, tmp)
    os.replace(tmp, out)
    return out


def proxy_speed_subsets(
    cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]], fraction: float | None = None
) -> dict[str, Path] | None:
    """factor → :func:`proxy_subset` of each speed copy split wrote (None when it wrote none)."""
    factors = inputs["split"].get("proxy_speed") or {}
    return {f: proxy_subset(cfg, inputs, fraction, speed=f) for f in factors} or None


def measure_latency_ms_per_s(model_dir: Path, dev_index: Path, max_utts: int) -> float:
    """Greedy decoding latency on dev utterances: wall ms per second of audio (1 thread)."""
    import numpy as np
    import torch

    from model_code.dataset import FeatureTable
    from model_code.decoding import greedy_decode
    from model_code.packaging import load_model_dir

    model, tokenizer, _ = load_model_dir(model_dir)
    model.eval()
    table = FeatureTable(dev_index)
    durations = list(table.durations())
    n = min(len(table), max_utts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total_s = 0.0
        audio_s = 0.0
        with torch.inference_mode():
            for i in range(n):
                feats = torch.from_numpy(np.asarray(table.features(i), dtype=np.float32))[None]
                lens = torch.tensor([feats.shape[1]])
                t0 = time.perf_counter()
                lp, out_lens = model(feats, lens)
                greedy_decode(lp.numpy(), out_lens.numpy(), tokenizer)
                total_s += time.perf_counter() - t0
                audio_s += float(durations[i])
    finally:
        torch.set_num_threads(threads)
    return 1000.0 * total_s / max(audio_s, 1e-9)


def _objective_value(metrics: dict[str, Any], metric: str) -> float:
    """The value a trial reports to Optuna: ``metrics[tune.metric]`` (dev_wer, dev_cer or dev_loss)."""
    if metrics.get(metric) is None:
        raise KeyError(f"tune.metric={metric!r} but the trial reported only {sorted(metrics)}")
    return float(metrics[metric])


def fit_trial(trial_cfg: AsrflowConfig, ctx: TrialContext, on_epoch_end) -> dict[str, Any]:
    """The production trial: :func:`pipeline_tasks.services.fitting.fit` on the proxy split."""
    from pipeline_tasks.services.fitting import fit

    res = fit(
        trial_cfg,
        ctx.proxy_index,
        ctx.dev_index,
        ctx.out_dir,
        epochs=ctx.epochs,
        on_epoch_end=on_epoch_end,
        mlflow_nested=False,  # log into the trial's run (active when MLflow is on)
        max_minutes=trial_cfg.tune.trial_max_minutes,
        mlflow_tags={"asrflow.tune_trial": str(ctx.trial_number)},
        parent=Parent.from_record(ctx.parent) if ctx.parent else None,
        speed_indexes=ctx.proxy_speed,
    )
    out = {"dev_wer": float(res["dev_wer"]), "dev_cer": res.get("dev_cer"), "dev_loss": res.get("dev_loss")}
    if ctx.multi_objective:
        model_dir = res.get("model_dir")
        model_dir = Path(model_dir) if model_dir else ctx.out_dir / "model"
        if not model_dir.is_absolute():
            model_dir = ctx.out_dir / model_dir
        out["latency_ms_per_s"] = measure_latency_ms_per_s(model_dir, ctx.dev_index, ctx.latency_max_utts)
    return out


def _load_trial_fn(trial_fn: TrialFn | str | None) -> TrialFn:
    if trial_fn is None:
        return fit_trial
    if isinstance(trial_fn, str):
        mod, _, attr = trial_fn.partition(":")
        return getattr(importlib.import_module(mod), attr)
    return trial_fn


def _trial_cfg(cfg: AsrflowConfig, overrides: dict[str, Any], epochs: int) -> AsrflowConfig:
    extra: dict[str, Any] = {"train.epochs": epochs, "train.max_minutes": cfg.tune.trial_max_minutes}
    if cfg.train.torch_threads == 0:
        extra["train.torch_threads"] = max(1, (os.cpu_count() or 1) // max(1, cfg.tune.n_workers))
    return with_overrides(cfg, {**overrides, **extra})

class TrialRunner:
    """The Optuna objective of one tune worker: one call of the instance runs one trial.

    For each trial it claims a slot (a trial past ``n_trials`` ends as a surplus FAIL), samples
    the space, derives the overrides, rejects configs over the parameter budget, runs the trial
    function with an ``on_epoch_end`` that reports ``tune.metric`` to Optuna (and prunes), and
    keeps the trial's nested MLflow run (best effort: ``mlflow_call``).
    """

    def __init__(
        self,
        cfg: AsrflowConfig,
        inputs: dict[str, dict[str, Any]],
        study,
        name: str,
        worker_index: int,
        parent_run_id: str | None,
        trial_fn: TrialFn,
    ):
        self.cfg = cfg
        self.t = cfg.tune
        self.inputs = inputs
        self.study = study
        self.name = name
        self.worker_index = worker_index
        self.parent = parent_run_id
        self.fn = trial_fn
        split = inputs["split"]
        self.dev_index = resolve(split, split["dev"])
        self.work_dir = cfg.root / STEP / "_work" / name
        self.tracking = parent_run_id is not None

    # -- the objective -----------------------------------------------------------------
    def __call__(self, trial):
        import optuna

        self._claim(trial)
        overrides, trial_cfg = self._configure(trial)
        ctx = TrialContext(
            proxy_index=proxy_subset(self.cfg, self.inputs),
            dev_index=self.dev_index,
            out_dir=self.work_dir / f"trial-{trial.number:04d}",
            epochs=self.t.epochs,
            multi_objective=self.t.multi_objective,
            latency_max_utts=self.t.latency_max_utts,
            trial_number=trial.number,
            parent=self.inputs.get("parent"),
            proxy_speed=proxy_speed_subsets(self.cfg, self.inputs),
        )
        shutil.rmtree(ctx.out_dir, ignore_errors=True)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        scores: list[float] = []
        # The trial's nested MLflow run is the *active* run while fit trains, so fit logs its
        # params, per-epoch dev metrics and curve into it. The tune step adds
        # "trial/<tune.metric>" per epoch, "pruned" and "final_<tune.metric>", and closes the
        # run: FINISHED, KILLED (pruned) or FAILED.
        logging_on = self._start_run(trial) is not None
        status = "FAILED"
        try:
            if logging_on:
                self._log("log params", "log_params",
                          {**{k: str(v) for k, v in overrides.items()}, "tune.worker": self.worker_index})
            res = self.fn(trial_cfg, ctx, self._epoch_callback(trial, scores, logging_on))
            value = self._final_value(trial, res, scores, logging_on)
            status = "FINISHED"
            return value
        except optuna.TrialPruned:
            status = "KILLED"
            if logging_on:
                last = scores[-1] if scores else float("nan")
                self._log("log pruned", "log_metrics", {f"final_{self.t.metric}": last, "pruned": 1.0})
            raise
        finally:
            if logging_on:
                import mlflow

                mlflow_call("end trial run", lambda: mlflow.end_run(status=status), retries=1)
            shutil.rmtree(ctx.out_dir, ignore_errors=True)

    # -- parts ---------------------------------------------------------------------------
    def _claim(self, trial) -> None:
        """End a trial past ``n_trials`` (two workers started the last one at once) as surplus."""
        from optuna.trial import TrialState

        live = sorted(
            x.number
            for x in self.study.get_trials(
                deepcopy=False,
                states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING),
            )
        )
        if trial.number in live and live.index(trial.number) >= self.t.n_trials:
            trial.set_user_attr("surplus", True)
            raise _SurplusTrial(f"trial {trial.number}: study already has {self.t.n_trials} trials")
        trial.set_user_attr("worker", self.worker_index)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())

    def _configure(self, trial) -> tuple[dict[str, Any], AsrflowConfig]:
        import optuna

        params = sample_params(trial, self.cfg, warm=Parent.from_record(self.inputs.get("parent")).warm)
        overrides, info = derive_overrides(self.cfg, params)
        trial.set_user_attr("overrides", overrides)
        if info:
            trial.set_user_attr("derived", info)
        trial_cfg = _trial_cfg(self.cfg, overrides, self.t.epochs)
        if self.t.max_params is not None:
            n_params = estimate_params(trial_cfg)
            trial.set_user_attr("n_params", n_params)
            if n_params > self.t.max_params:
                trial.set_user_attr("rejected", "param_budget")
                raise optuna.TrialPruned(f"{n_params} parameters > budget {self.t.max_params}")
        parent = Parent.from_record(self.inputs.get("parent"))
        if parent.warm:
            bad = incompatibilities(trial_cfg, parent.info())
            if bad:  # e.g. a sampled width: the trial cannot start from the parent's weights
                trial.set_user_attr("rejected", "incompatible_with_parent")
                raise optuna.TrialPruned(f"does not fit the parent model: {'; '.join(bad)}")
        return overrides, trial_cfg

    def _start_run(self, trial):
        if not self.tracking:
            return None
        import mlflow

        retried = self.study._storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
        return mlflow_call(
            "start trial run",
            lambda: mlflow.start_run(
                run_name=f"trial-{trial.number:04d}",
                parent_run_id=self.parent,
                tags={
                    "asrflow.step": STEP,
                    "optuna.study": self.name,
                    "optuna.trial": str(trial.number),
                    "worker": str(self.worker_index),
                    "retried_from": "" if retried is None else str(retried),
                },
            ),
        )

    def _log(self, what: str, method: str, payload: dict[str, Any], **kw: Any) -> None:
        import mlflow

        mlflow_call(what, lambda: getattr(mlflow, method)(payload, **kw))

    def _epoch_callback(self, trial, scores: list[float], logging_on: bool):
        import optuna

        t = self.t

        def on_epoch_end(epoch: int, metrics: dict[str, Any]) -> None:
            step = len(scores) + 1
            score = _objective_value(metrics, t.metric)
            scores.append(score)
            trial.set_user_attr("epochs_done", step)
            if logging_on:
                self._log("log epoch", "log_metrics", {f"trial/{t.metric}": score}, step=step)
            if t.multi_objective:
                trial.set_user_attr("wer_per_epoch", scores)
                return
            trial.report(score, step)
            if step < t.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {step} ({t.metric} {score:.4f})")

        return on_epoch_end

    def _final_value(self, trial, res: dict[str, Any], scores: list[float], logging_on: bool) -> Any:
        t = self.t
        score = _objective_value(res, t.metric)
        trial.set_user_attr("epochs_done", len(scores) or t.epochs)
        if res.get("dev_cer") is not None:  # finalize: did any trial leave the CTC plateau?
            trial.set_user_attr("dev_cer", float(res["dev_cer"]))
        value: Any = score
        m = {f"final_{t.metric}": score, "pruned": 0.0}
        if t.multi_objective:
            lat = float(res["latency_ms_per_s"])
            trial.set_user_attr("latency_ms_per_s", lat)
            value = (score, lat)
            m["latency_ms_per_s"] = lat
        if logging_on:
            self._log("log final", "log_metrics", m)
        return value

"""The ``tune`` step: hyperparameter search on the proxy split with Optuna + ASHA.

What it does
------------
Each Optuna trial trains the model with :func:`pipeline_tasks.train.fit` on the *proxy*
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

import contextlib
import importlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import socket
import sqlite3
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig, SearchParam, config_from_dict
from pipeline_tasks.contract import (
    StepRun,
    canonical_json,
    resolve,
    run_step,
    sha256_hex,
    write_json_atomic,
)

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
    "gpu_pool_slots",
    "num_workers",
    "torch_threads",
    "zero_stage",
)
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


class _SurplusTrial(Exception):
    """Raised at a trial's start when the study already has ``n_trials`` live trials."""


# ---------------------------------------------------------------------------------------
# search space
# ---------------------------------------------------------------------------------------


def _get_dotted(d: dict[str, Any], key: str) -> Any:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise KeyError(key)
        node = node[part]
    if parts[-1] not in node:
        raise KeyError(key)
    node[parts[-1]] = value


def apply_overrides(cfg: AsrflowConfig, overrides: dict[str, Any]) -> AsrflowConfig:
    """A copy of ``cfg`` with dotted ``overrides`` applied and validated (unknown keys raise)."""
    d = cfg.dump()
    for k, v in overrides.items():
        try:
            _set_dotted(d, k, v)
        except KeyError as e:
            raise ValueError(f"tune: {k!r} is not a config key") from e
    return config_from_dict(d)


def validate_space(cfg: AsrflowConfig) -> None:
    """Fail early, with a readable message, on space keys or conditions that cannot work."""
    d = cfg.dump()
    for name, p in cfg.tune.space.items():
        try:
            base = _get_dotted(d, name)
        except KeyError as e:
            raise ValueError(f"tune.space: {name!r} is not a config key") from e
        if isinstance(base, dict):
            raise ValueError(f"tune.space: {name!r} is a config section, not a value")
        for dep in p.condition or {}:
            if dep == name:
                raise ValueError(f"tune.space: {name!r} is conditioned on itself")
            if dep not in cfg.tune.space:
                try:
                    _get_dotted(d, dep)
                except KeyError as e:
                    raise ValueError(f"tune.space: condition of {name!r} names unknown key {dep!r}") from e
    _sampling_order(cfg.tune.space)  # raises on cyclic conditions


def _sampling_order(space: dict[str, SearchParam]) -> list[str]:
    """Params in an order where every condition's params come before the params they gate."""
    order: list[str] = []
    pending = dict(space)
    while pending:
        ready = [n for n, p in pending.items() if not any(dep in pending for dep in (p.condition or {}))]
        if not ready:
            raise ValueError(f"tune.space: cyclic conditions among {sorted(pending)}")
        for n in ready:
            order.append(n)
            del pending[n]
    return order


def _matches(value: Any, want: Any) -> bool:
    if isinstance(want, list):
        return any(_matches(value, w) for w in want)
    if isinstance(value, float) or isinstance(want, float):
        with contextlib.suppress(TypeError, ValueError):
            return math.isclose(float(value), float(want), rel_tol=1e-9, abs_tol=1e-12)
    return value == want


def _suggest(trial, name: str, p: SearchParam) -> Any:
    if p.type == "float":
        return trial.suggest_float(name, float(p.low), float(p.high), log=p.log, step=p.step)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_categorical(name, list(p.choices))


def sample_params(trial, cfg: AsrflowConfig) -> dict[str, Any]:
    """Sample ``tune.space`` into ``{dotted key: value}``; conditional params only when active.

    A condition ``{dep: want}`` holds when ``dep``'s value (sampled, or the base config's when
    ``dep`` is not in the space) equals ``want`` (or is one of ``want`` when it is a list).
    """
    space = cfg.tune.space
    base = cfg.dump()
    values: dict[str, Any] = {}
    for name in _sampling_order(space):
        p = space[name]
        active = True
        for dep, want in (p.condition or {}).items():
            if dep in space:
                if dep not in values or not _matches(values[dep], want):
                    active = False
            elif not _matches(_get_dotted(base, dep), want):
                active = False
        if active:
            values[name] = _suggest(trial, name, p)
    return values


def derive_overrides(cfg: AsrflowConfig, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Turn sampled params into the config overrides a trial (and the train step) applies.

    Returns ``(overrides, info)``; ``info`` says what was derived (lr scale, heads change).
    """
    overrides = dict(params)
    info: dict[str, Any] = {}
    if "train.sampler.max_duration_s" in params and cfg.tune.lr_scaling != "none":
        b0 = float(cfg.train.sampler.max_duration_s)
        ratio = float(params["train.sampler.max_duration_s"]) / b0
        scale = math.sqrt(ratio) if cfg.tune.lr_scaling == "sqrt" else ratio
        lr = float(params.get("train.lr", cfg.train.lr))
        overrides["train.lr"] = lr * scale
        info["lr_scale"] = scale
        info["lr_unscaled"] = lr
    d_model = int(overrides.get("model.d_model", cfg.model.d_model))
    heads = int(overrides.get("model.n_heads", cfg.model.n_heads))
    if d_model % heads:
        new_heads = max(h for h in range(1, heads + 1) if d_model % h == 0)
        overrides["model.n_heads"] = new_heads
        info["n_heads_adjusted"] = [heads, new_heads]
    return overrides, info


def _model_kwargs(cfg: AsrflowConfig, vocab_size: int) -> dict[str, Any]:
    m = cfg.model
    return dict(
        n_mels=cfg.features.n_mels,
        vocab_size=vocab_size,
        d_model=m.d_model,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        ff_mult=m.ff_mult,
        conv_kernel=m.conv_kernel,
        dropout=m.dropout,
        subsampling_channels=m.subsampling_channels,
    )


def estimate_params(cfg: AsrflowConfig, vocab_size: int | None = None) -> int:
    """Parameter count of the model ``cfg`` describes.

    Exact when ``model_code.conformer`` is importable (the model is built on torch's ``meta``
    device: no memory, no time); otherwise a close analytic count of a Conformer-CTC.
    """
    if vocab_size is None:
        vocab_size = cfg.model.bpe_vocab_size if cfg.model.vocab == "bpe" else 32
    kw = _model_kwargs(cfg, vocab_size)
    try:
        import torch

        from model_code.conformer import ConformerCTC

        with torch.device("meta"):
            model = ConformerCTC(**kw)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - fall back to the analytic count
        pass
    d, f, k, c, n = kw["d_model"], kw["ff_mult"], kw["conv_kernel"], kw["subsampling_channels"], kw["n_mels"]
    ffn = 2 * (d * f * d + f * d + f * d * d + d + 2 * d)
    mhsa = 4 * (d * d + d) + 2 * d
    conv = (2 * d * d + 2 * d) + (k * d + d) + 4 * d + (d * d + d) + 2 * d
    layer = ffn + mhsa + conv + 2 * d
    sub = (9 * c + c) + (9 * c * c + c) + c * ((n + 3) // 4) * d + d
    return int(sub + kw["n_layers"] * layer + d * vocab_size + vocab_size)


# ---------------------------------------------------------------------------------------
# naming, storage, sampler, pruner
# ---------------------------------------------------------------------------------------


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


def space_hash(cfg: AsrflowConfig) -> str:
    """Hash of the search space alone (12 hex chars)."""
    return sha256_hex(canonical_json({k: v.model_dump(mode="json") for k, v in cfg.tune.space.items()}))[:12]


def study_name(cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]]) -> str:
    """``asrflow-tune-<proxy md5[:10]>-<space hash>-<settings hash>``: same inputs, same study."""
    split = inputs["split"]
    settings = sha256_hex(
        canonical_json({"identity": _search_identity(cfg), "dev_md5": split.get("dev_md5")})
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
        {"proxy_md5": split["proxy_md5"], "dev_md5": split.get("dev_md5")},
        CODE_VERSION,
    )


def redact(url: str) -> str:
    """A storage URL with its password replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL
        return url


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


# ---------------------------------------------------------------------------------------
# MLflow (best effort: a tracking hiccup must not lose a trial's training)
# ---------------------------------------------------------------------------------------


def _mlflow_call(what: str, fn: Callable[[], Any], retries: int = 3) -> Any:
    for attempt in range(retries):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if attempt == retries - 1:
                log.warning("tune: MLflow %s failed: %s", what, e)
                return None
            time.sleep(0.5 * (attempt + 1))
    return None


def _parent_run_id(cfg: AsrflowConfig, study, prepare_if_missing: bool) -> str | None:
    rid = study.user_attrs.get("mlflow_parent_run_id")
    if rid or not prepare_if_missing:
        return rid
    import mlflow

    from pipeline_tasks.tracking import git_commit, mlflow_setup

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

    rid = _mlflow_call("create parent run", create)
    if rid:
        study.set_user_attr("mlflow_parent_run_id", rid)
    return rid


# ---------------------------------------------------------------------------------------
# the real trial: fit on the proxy split
# ---------------------------------------------------------------------------------------


def proxy_subset(
    cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]], fraction: float | None = None
) -> Path:
    """The proxy index at ``tune.proxy_fraction``: a deterministic, hash-ordered row sample.

    Written once per (proxy md5, fraction) under ``<root>/tune/_work/`` (atomic rename), so
    every worker and every rerun trains on the same rows.
    """
    split = inputs["split"]
    src = resolve(split, split["proxy"])
    frac = cfg.tune.proxy_fraction if fraction is None else fraction
    if frac >= 1.0:
        return src
    import hashlib

    import pyarrow.parquet as pq

    out = cfg.root / STEP / "_work" / f"proxy-{split['proxy_md5'][:16]}-{frac:.4f}.parquet"
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
    """The production trial: :func:`pipeline_tasks.train.fit` on the proxy split."""
    from pipeline_tasks.train import fit

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
    return apply_overrides(cfg, {**overrides, **extra})


# ---------------------------------------------------------------------------------------
# prepare / run_worker / finalize / run
# ---------------------------------------------------------------------------------------


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
    name = study_name(cfg, inputs)
    study = open_study(cfg, name, worker_index=worker_index)
    parent = _parent_run_id(cfg, study, prepare_if_missing=True)
    fn = _load_trial_fn(trial_fn)
    t = cfg.tune
    n_trials = t.n_trials
    split = inputs["split"]
    dev_index = resolve(split, split["dev"])
    work_dir = cfg.root / STEP / "_work" / name
    mine = {
        "worker": worker_index,
        "complete": 0,
        "pruned": 0,
        "failed": 0,
        "surplus": 0,
        "host": socket.gethostname(),
    }

    tracking = parent is not None
    if tracking:
        from pipeline_tasks.tracking import mlflow_setup

        _mlflow_call("setup", lambda: mlflow_setup(cfg))

    def objective(trial):
        import mlflow

        live = sorted(
            x.number
            for x in study.get_trials(
                deepcopy=False,
                states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING),
            )
        )
        if trial.number in live and live.index(trial.number) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise _SurplusTrial(f"trial {trial.number}: study already has {n_trials} trials")
        trial.set_user_attr("worker", worker_index)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = sample_params(trial, cfg)
        overrides, info = derive_overrides(cfg, params)
        trial.set_user_attr("overrides", overrides)
        if info:
            trial.set_user_attr("derived", info)
        trial_cfg = _trial_cfg(cfg, overrides, t.epochs)
        if t.max_params is not None:
            n_params = estimate_params(trial_cfg)
            trial.set_user_attr("n_params", n_params)
            if n_params > t.max_params:
                trial.set_user_attr("rejected", "param_budget")
                raise optuna.TrialPruned(f"{n_params} parameters > budget {t.max_params}")
        retried = study._storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
        ctx = TrialContext(
            proxy_index=proxy_subset(cfg, inputs),
            dev_index=dev_index,
            out_dir=work_dir / f"trial-{trial.number:04d}",
            epochs=t.epochs,
            multi_objective=t.multi_objective,
            latency_max_utts=t.latency_max_utts,
            trial_number=trial.number,
        )
        shutil.rmtree(ctx.out_dir, ignore_errors=True)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        scores: list[float] = []
        # The trial's nested MLflow run is the *active* run while fit trains, so fit logs its
        # params, per-epoch dev metrics and curve into it (fit's mlflow_nested=False: no extra
        # level). The tune step adds "trial/<tune.metric>" (the value reported to Optuna per
        # epoch), "pruned" and "final_<tune.metric>", and closes the run: FINISHED, KILLED (pruned) or FAILED.
        trial_run = None
        if tracking:
            trial_run = _mlflow_call(
                "start trial run",
                lambda: mlflow.start_run(
                    run_name=f"trial-{trial.number:04d}",
                    parent_run_id=parent,
                    tags={
                        "asrflow.step": STEP,
                        "optuna.study": name,
                        "optuna.trial": str(trial.number),
                        "worker": str(worker_index),
                        "retried_from": "" if retried is None else str(retried),
                    },
                ),
            )
        logging_on = trial_run is not None

        def on_epoch_end(epoch: int, metrics: dict[str, Any]) -> None:
            step = len(scores) + 1
            score = _objective_value(metrics, t.metric)
            scores.append(score)
            trial.set_user_attr("epochs_done", step)
            if logging_on:
                _mlflow_call("log epoch", lambda: mlflow.log_metric(f"trial/{t.metric}", score, step=step))
            if t.multi_objective:
                trial.set_user_attr("wer_per_epoch", scores)
                return
            trial.report(score, step)
            if step < t.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {step} ({t.metric} {score:.4f})")

        status = "FAILED"
        try:
            if logging_on:
                _mlflow_call(
                    "log params",
                    lambda: mlflow.log_params(
                        {**{k: str(v) for k, v in overrides.items()}, "tune.worker": worker_index}
                    ),
                )
            res = fn(trial_cfg, ctx, on_epoch_end)
            score = _objective_value(res, t.metric)
            trial.set_user_attr("epochs_done", len(scores) or t.epochs)
            if t.multi_objective:
                lat = float(res["latency_ms_per_s"])
                trial.set_user_attr("latency_ms_per_s", lat)
                value: Any = (score, lat)
            else:
                value = score
            if logging_on:
                m = {f"final_{t.metric}": score, "pruned": 0.0}
                if t.multi_objective:
                    m["latency_ms_per_s"] = lat
                _mlflow_call("log final", lambda: mlflow.log_metrics(m))
            status = "FINISHED"
            return value
        except optuna.TrialPruned:
            status = "KILLED"
            if logging_on:
                last = scores[-1] if scores else float("nan")
                _mlflow_call("log pruned", lambda: mlflow.log_metrics({f"final_{t.metric}": last, "pruned": 1.0}))
            raise
        finally:
            if logging_on:
                _mlflow_call("end trial run", lambda: mlflow.end_run(status=status), retries=1)
            shutil.rmtree(ctx.out_dir, ignore_errors=True)

    def count(study_, frozen) -> None:
        if frozen.user_attrs.get("surplus"):
            mine["surplus"] += 1
        elif frozen.state == TrialState.COMPLETE:
            mine["complete"] += 1
        elif frozen.state == TrialState.PRUNED:
            mine["pruned"] += 1
        else:
            mine["failed"] += 1

    deadline = None if t.timeout_s is None else time.monotonic() + float(t.timeout_s)
    stop = optuna.study.MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    while True:
        optuna.storages.fail_stale_trials(study)
        c = _counts(study)
        if c["finished"] >= n_trials:
            break
        if deadline is not None and time.monotonic() > deadline:
            log.warning("tune: worker %d reached timeout_s=%s", worker_index, t.timeout_s)
            break
        if c["finished"] + c["running"] + c["waiting"] >= n_trials and c["waiting"] == 0:
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


def _plots(study, cfg: AsrflowConfig, out: Path) -> list[str]:
    """Optimization history, intermediate values, importances (+ Pareto front): HTML + PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vmpl

    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    mo = cfg.tune.multi_objective
    wer_target = (lambda t: t.values[0]) if mo else None
    plots: dict[str, tuple[Callable, Callable, dict[str, Any]]] = {
        "optimization_history": (
            vis.plot_optimization_history,
            vmpl.plot_optimization_history,
            {"target": wer_target, "target_name": "dev WER"} if mo else {"target_name": "dev WER"},
        ),
        "param_importances": (
            vis.plot_param_importances,
            vmpl.plot_param_importances,
            {"target": wer_target, "target_name": "dev WER"} if mo else {"target_name": "dev WER"},
        ),
    }
    if not mo:
        plots["intermediate_values"] = (vis.plot_intermediate_values, vmpl.plot_intermediate_values, {})
    else:
        plots["pareto_front"] = (
            vis.plot_pareto_front,
            vmpl.plot_pareto_front,
            {"target_names": ["dev WER", "latency ms/s"]},
        )
    for name, (html_fn, png_fn, kw) in plots.items():
        try:
            fig = html_fn(study, **kw)
            p = out / f"{name}.html"
            fig.write_html(str(p), include_plotlyjs="directory")
            written.append(p.name)
        except Exception as e:  # noqa: BLE001 - e.g. importances need 2+ complete trials
            log.warning("tune: %s.html not written: %s", name, e)
        try:
            ax = png_fn(study, **kw)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            p = out / f"{name}.png"
            fig.savefig(p, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(p.name)
        except Exception as e:  # noqa: BLE001
            log.warning("tune: %s.png not written: %s", name, e)
    return written


def _importances(study, cfg: AsrflowConfig) -> dict[str, Any]:
    import optuna

    target = (lambda t: t.values[0]) if cfg.tune.multi_objective else None
    out: dict[str, Any] = {}
    for label, ev in (
        ("fanova", lambda: optuna.importance.FanovaImportanceEvaluator(seed=cfg.tune.sampler_seed)),
        (
            "mean_decrease_impurity",
            lambda: optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=cfg.tune.sampler_seed),
        ),
    ):
        try:
            out[label] = optuna.importance.get_param_importances(study, evaluator=ev(), target=target)
        except Exception as e:  # noqa: BLE001 - fewer than 2 complete trials, or a constant param
            out[label] = None
            out[f"{label}_error"] = str(e)
    return out


def _fidelity_check(
    cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]], study, fn: TrialFn, parent: str | None
) -> dict[str, Any]:
    """Retrain the top-k proxy configs at higher fidelity; Spearman rho of the two rankings.

    Higher fidelity = ``ceil(fidelity_epochs_factor * tune.epochs)`` epochs on the *full* proxy
    split (``proxy_fraction`` ignored). A rho near 1 says the proxy ranks configs like the
    bigger run would; near 0 or negative says the proxy is too cheap to be trusted.
    """
    from optuna.trial import TrialState
    from scipy.stats import spearmanr

    t = cfg.tune
    done = [x for x in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    done.sort(key=lambda x: x.values[0])
    top = done[: t.fidelity_check_top_k]
    epochs = math.ceil(t.epochs * t.fidelity_epochs_factor)
    split = inputs["split"]
    rows = []
    for x in top:
        overrides = x.user_attrs.get("overrides", x.params)
        ctx = TrialContext(
            proxy_index=proxy_subset(cfg, inputs, fraction=1.0),
            dev_index=resolve(split, split["dev"]),
            out_dir=cfg.root / STEP / "_work" / study.study_name / f"fidelity-{x.number:04d}",
            epochs=epochs,
            multi_objective=False,
            latency_max_utts=t.latency_max_utts,
            trial_number=x.number,
        )
        shutil.rmtree(ctx.out_dir, ignore_errors=True)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        run = None
        if parent:
            import mlflow

            run = _mlflow_call(
                "start fidelity run",
                lambda n=x.number: mlflow.start_run(
                    run_name=f"fidelity-{n:04d}",
                    parent_run_id=parent,
                    tags={
                        "asrflow.step": STEP,
                        "optuna.study": study.study_name,
                        "fidelity_of_trial": str(n),
                    },
                ),
            )
        status = "FAILED"
        try:
            res = fn(_trial_cfg(cfg, overrides, epochs), ctx, lambda e, m: None)
            status = "FINISHED"
        finally:
            if run is not None:
                _mlflow_call("end fidelity run", lambda s=status: mlflow.end_run(status=s), retries=1)
            shutil.rmtree(ctx.out_dir, ignore_errors=True)
        rows.append({"trial": x.number, "proxy_wer": x.values[0], "hifi_wer": float(res["dev_wer"])})
    rho = p = None
    if len(rows) >= 2:
        r = spearmanr([r["proxy_wer"] for r in rows], [r["hifi_wer"] for r in rows])
        rho = None if math.isnan(r.statistic) else float(r.statistic)
        p = None if math.isnan(r.pvalue) else float(r.pvalue)
    return {"k": len(rows), "epochs": epochs, "trials": rows, "spearman_rho": rho, "p_value": p}


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
            from pipeline_tasks.tracking import mlflow_setup

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

        _mlflow_call("log parent", log_parent, retries=2)
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
    key = step_key_for(cfg, inputs)
    if not cfg.tune.enabled:
        return run_step(cfg.root, STEP, key, lambda tmp: _disabled_work(cfg, tmp), force=force)
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

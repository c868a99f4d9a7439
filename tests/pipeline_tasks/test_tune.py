"""Tests of the tune step: a shared Optuna study over real RDB storage (SQLite), real MLflow.

Most tests exercise the storage/worker logic (parallel workers, reruns, heartbeat retry,
conditional params, naming) with a quick synthetic trial function instead of training, so
they run in seconds; ``test_real_fit_on_tiny_proxy`` runs the production objective
(``train.fit`` on the tiny proxy split).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from pipeline_tasks.config import load_config, with_overrides
from pipeline_tasks.contract import resolve
from pipeline_tasks.steps import tune

QUICK = "tests.pipeline_tasks.test_tune:quick_trial"
HANG = "tests.pipeline_tasks.test_tune:hang_trial"


def quick_trial(trial_cfg, ctx, on_epoch_end):
    """A fast stand-in for ``fit``: a deterministic learning curve of (lr, dropout)."""
    lr = trial_cfg.train.lr
    drop = trial_cfg.model.dropout
    floor = 0.2 + 0.3 * abs(math.log10(lr) - math.log10(0.002)) + 0.5 * (drop - 0.05) ** 2
    wer = 1.0
    for epoch in range(1, ctx.epochs + 1):
        wer = floor + (1.0 - floor) * math.exp(-epoch / 1.5)
        time.sleep(float(os.environ.get("TUNE_TEST_SLEEP", "0.02")))
        on_epoch_end(epoch, {"dev_wer": wer, "dev_cer": wer / 2, "dev_loss": 3 * wer, "loss": wer})
    return {"dev_wer": wer, "dev_cer": wer / 2, "latency_ms_per_s": 10.0 * trial_cfg.model.d_model / 32}


def flat_trial(trial_cfg, ctx, on_epoch_end):
    """Every configuration scores WER 1.0 (an undertrained proxy), CER still informative."""
    cer = 0.5 + abs(math.log10(trial_cfg.train.lr) - math.log10(0.002))
    for epoch in range(1, ctx.epochs + 1):
        on_epoch_end(epoch, {"dev_wer": 1.0, "dev_cer": cer, "dev_loss": 2 * cer, "loss": 1.0})
    return {"dev_wer": 1.0, "dev_cer": cer, "dev_loss": 2 * cer}


def plateau_trial(trial_cfg, ctx, on_epoch_end):
    """From-scratch trials still on the CTC plateau: all decode to blanks (CER 1.0), while their dev
    losses differ a little (what a fresh week-1 study on the local profile measured)."""
    loss = 2.96 + 0.01 * abs(math.log10(trial_cfg.train.lr) - math.log10(0.002))
    for epoch in range(1, ctx.epochs + 1):
        on_epoch_end(epoch, {"dev_wer": 1.0, "dev_cer": 1.0, "dev_loss": loss, "loss": 1.0})
    return {"dev_wer": 1.0, "dev_cer": 1.0, "dev_loss": loss}


def barrier_trial(trial_cfg, ctx, on_epoch_end):
    """``quick_trial``, but the first trial of each worker process waits until
    ``TUNE_TEST_BARRIER_N`` worker processes have started a trial (a file per process in
    ``TUNE_TEST_BARRIER``): the workers provably run trials of the study at the same time."""
    barrier = Path(os.environ["TUNE_TEST_BARRIER"])
    mine = barrier / f"worker-pid-{os.getpid()}"
    if not mine.exists():
        mine.write_text(str(ctx.trial_number))
        want = int(os.environ.get("TUNE_TEST_BARRIER_N", "2"))
        deadline = time.monotonic() + 60
        while len(list(barrier.glob("worker-pid-*"))) < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"barrier: only {len(list(barrier.glob('worker-pid-*')))} of {want} workers started")
            time.sleep(0.05)
    return quick_trial(trial_cfg, ctx, on_epoch_end)


def ranked_trial(trial_cfg, ctx, on_epoch_end):
    """Every later trial is worse than every earlier one at every epoch (trial 0 best): with
    ASHA (reduction factor 3) each trial after the first trails the rung-1 leader and must be
    stopped after its first epoch; without pruning every trial runs all its epochs."""
    value = 0.1 + 0.1 * ctx.trial_number
    for epoch in range(1, ctx.epochs + 1):
        on_epoch_end(epoch, {"dev_wer": value, "dev_cer": value / 2, "dev_loss": 3 * value, "loss": value})
    return {"dev_wer": value, "dev_cer": value / 2, "dev_loss": 3 * value}


def speed_trial(trial_cfg, ctx, on_epoch_end):
    """``quick_trial`` that checks what a trial gets for speed perturbation: the speed copies of its
    proxy subset, row for row, and the sampled ``train.augment`` values in its config."""
    import pyarrow.parquet as pq

    ids = pq.read_table(ctx.proxy_index).column("id").to_pylist()
    assert sorted(ctx.proxy_speed) == ["0.9", "1.1"]
    for f, path in ctx.proxy_speed.items():
        t = pq.read_table(path)
        assert t.column("id").to_pylist() == ids and t.column("speed").to_pylist() == [f] * len(ids)
    with open(os.environ["TUNE_TEST_SPEED_LOG"], "a") as log:
        a = trial_cfg.train.augment
        log.write(json.dumps([len(ids), a.speed_perturb, a.noise_prob, a.reverb_prob]) + "\n")
    wer = 0.3 + 0.2 * a.noise_prob + 0.1 * a.reverb_prob - 0.05 * a.speed_perturb
    for epoch in range(1, ctx.epochs + 1):
        on_epoch_end(epoch, {"dev_wer": wer, "dev_cer": wer / 2, "dev_loss": 3 * wer, "loss": wer})
    return {"dev_wer": wer, "dev_cer": wer / 2}


def hang_trial(trial_cfg, ctx, on_epoch_end):
    """A trial that never ends by itself: the test kills its worker mid-trial."""
    Path(os.environ["TUNE_TEST_MARKER"]).write_text(str(ctx.trial_number))
    time.sleep(600)
    raise AssertionError("unreachable")


_MLFLOW_DIR: Path | None = None


@pytest.fixture(scope="module", autouse=True)
def shared_mlflow(tmp_path_factory):
    """One MLflow store for this module: creating a fresh SQLite MLflow DB costs seconds."""
    global _MLFLOW_DIR
    _MLFLOW_DIR = tmp_path_factory.mktemp("tune-mlflow")
    yield _MLFLOW_DIR
    _MLFLOW_DIR = None


def make_cfg(root: Path, extra: list[str] | None = None):
    """A tiny-profile config with its own root (own Optuna storage); no corpus needed."""
    mlflow_dir = _MLFLOW_DIR or root
    return load_config(
        "tiny",
        [
            f"paths.root={root}",
            f"registry.tracking_uri=sqlite:///{mlflow_dir}/mlflow.db",
            f"registry.artifact_location={mlflow_dir}/mlruns",
            "tune.heartbeat_interval_s=1",
            "tune.grace_period_s=2",
            "tune.plots=false",
            "tune.metric=dev_wer",  # quick_trial's learning curves are in WER
            *(extra or []),
        ],
    )


def fake_split(root: Path, proxy_md5: str = "0" * 32) -> dict:
    """A split result whose proxy/dev files are never read (proxy_fraction=1, quick trial fn);
    its train index holds only the ``batch`` column the parent-model lookup reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / "split" / "fake"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"batch": ["week-001"]}), out / "train.parquet")
    return {
        "split": {
            "output_dir": str(out),
            "train": "train.parquet",
            "proxy": "proxy.parquet",
            "dev": "dev.parquet",
            "proxy_md5": proxy_md5,
            "dev_md5": "1" * 32,
        }
    }


def _study(cfg, inputs):
    return tune.open_study(cfg, tune.study_name(cfg, inputs), heartbeat=False)


def test_two_parallel_workers_share_one_study(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, ["tune.n_trials=6", "tune.n_workers=2", "tune.epochs=3", "tune.plots=true"])
    inputs = fake_split(tmp_path)
    # a barrier, not a sleep: each worker's first trial waits until the other worker has started
    # one, so the test fails (barrier timeout) if the workers do not run side by side on the study
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setenv("TUNE_TEST_BARRIER", str(barrier))
    monkeypatch.setenv("TUNE_TEST_BARRIER_N", "2")
    res = tune.run(cfg, inputs, trial_fn="tests.pipeline_tasks.test_tune:barrier_trial")
    assert len(list(barrier.glob("worker-pid-*"))) == 2
    assert res["workers"] == [0, 1]
    assert res["n_trials_complete"] + res["n_trials_pruned"] == 6
    assert {r["worker"] for r in res["worker_results"]} == {0, 1}
    assert sum(r["complete"] + r["pruned"] for r in res["worker_results"]) == 6
    # both workers finished trials of the one study (not one worker running them all)
    assert all(r["complete"] + r["pruned"] >= 1 for r in res["worker_results"]), res["worker_results"]
    from optuna.trial import TrialState

    finished = _study(cfg, inputs).get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 6 and {t.user_attrs["worker"] for t in finished} == {0, 1}
    assert len({t.user_attrs["pid"] for t in finished}) == 2
    assert set(res["best_overrides"]) == {"train.lr", "model.dropout"}
    best = json.loads(resolve(res, res["best_config"]).read_text())
    assert best["overrides"] == res["best_overrides"]
    assert best["value"] == pytest.approx(res["best_value"])
    assert res["storage"].startswith("sqlite:///")
    # plots and importances were produced (HTML via plotly, PNG via matplotlib)
    out = Path(res["output_dir"])
    assert (out / "plots" / "optimization_history.png").exists()
    assert (out / "plots" / "intermediate_values.html").exists()
    imp = json.loads((out / "importances.json").read_text())
    assert set(imp["fanova"]) == {"train.lr", "model.dropout"}
    # MLflow: a parent run with one nested run per executed trial
    import mlflow

    client = mlflow.MlflowClient(cfg.registry.tracking_uri)
    parent = client.get_run(res["mlflow_run_id"])
    assert parent.data.metrics["best_dev_wer"] == pytest.approx(res["best_value"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 6
    # pruned trials end KILLED, complete ones FINISHED; each logged its per-epoch WER
    statuses = sorted(c.info.status for c in children)
    assert statuses.count("KILLED") == res["n_trials_pruned"]
    assert statuses.count("FINISHED") == res["n_trials_complete"]
    for c in children:
        hist = client.get_metric_history(c.info.run_id, "trial/dev_wer")
        assert len(hist) == (3 if c.info.status == "FINISHED" else len(hist)) and hist
        assert c.data.params["tune.worker"] in ("0", "1")


def test_asha_prunes_the_trials_that_trail_at_the_first_rung(tmp_path):
    """ASHA really stops trials: on a study built to prune (every trial worse than the first),
    every trial after the first ends PRUNED after one epoch. A no-op pruner fails this."""
    cfg = make_cfg(
        tmp_path,
        ["tune.n_trials=4", "tune.n_workers=1", "tune.epochs=3", "tune.pruner=asha",
         "tune.min_resource=1", "tune.reduction_factor=3"],
    )
    res = tune.run(cfg, fake_split(tmp_path), trial_fn="tests.pipeline_tasks.test_tune:ranked_trial")
    assert (res["n_trials_complete"], res["n_trials_pruned"]) == (1, 3)
    trials = {t["number"]: t for t in json.loads(resolve(res, res["trials"]).read_text())}
    assert trials[0]["state"] == "COMPLETE" and sorted(trials[0]["intermediate"]) == ["1", "2", "3"]
    for n in (1, 2, 3):
        assert trials[n]["state"] == "PRUNED", trials[n]
        assert sorted(trials[n]["intermediate"]) == ["1"]  # stopped at the first rung
    assert res["best_value"] == pytest.approx(0.1)


def test_rerun_continues_the_same_study(tmp_path):
    cfg3 = make_cfg(tmp_path, ["tune.n_trials=3", "tune.n_workers=1"])
    inputs = fake_split(tmp_path)
    first = tune.run(cfg3, inputs, trial_fn=QUICK)
    assert first["n_trials_complete"] + first["n_trials_pruned"] == 3
    # same inputs, same settings: the cached result comes back, nothing new runs
    again = tune.run(cfg3, inputs, trial_fn=QUICK)
    assert again == first
    # more trials asked for: the same study continues up to 5 finished trials, not beyond
    cfg5 = make_cfg(tmp_path, ["tune.n_trials=5", "tune.n_workers=1"])
    assert tune.study_name(cfg5, inputs) == first["study_name"]
    second = tune.run(cfg5, inputs, trial_fn=QUICK)
    assert second["study_name"] == first["study_name"]
    assert second["n_trials_complete"] + second["n_trials_pruned"] == 5
    assert second["worker_results"][0]["complete"] + second["worker_results"][0]["pruned"] == 2
    # a worker started on a finished study runs nothing
    extra = tune.run_worker(cfg5, inputs, 7, trial_fn=QUICK)
    assert extra["complete"] + extra["pruned"] == 0
    import optuna

    summaries = optuna.study.get_all_study_summaries(tune.make_storage(cfg5, heartbeat=False))
    assert [s.study_name for s in summaries] == [first["study_name"]]
    assert len(_study(cfg5, inputs).trials) == 5


def test_killed_worker_trial_is_retried_via_heartbeat(tmp_path):
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    cfg = make_cfg(tmp_path, ["tune.n_trials=3", "tune.n_workers=2"])
    inputs = fake_split(tmp_path)
    tune.prepare(cfg, inputs)
    marker = tmp_path / "hang-started"
    os.environ["TUNE_TEST_MARKER"] = str(marker)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        target=tune._worker_entry, args=(cfg.dump(), inputs, 1, HANG, str(tmp_path / "w1.json"))
    )
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.is_alive() and time.monotonic() < deadline, "hanging worker never started its trial"
            time.sleep(0.2)
        hung = int(marker.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        os.environ.pop("TUNE_TEST_MARKER")
        if proc.is_alive():
            proc.kill()
            proc.join()
    study = _study(cfg, inputs)
    assert study.trials[hung].state == TrialState.RUNNING  # dead, but nobody knows yet
    res = tune.run_worker(cfg, inputs, 0, trial_fn=QUICK)
    study = _study(cfg, inputs)
    assert study.trials[hung].state == TrialState.FAIL
    retried = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == hung]
    assert len(retried) == 1
    assert retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried[0].params == study.trials[hung].params  # same config, re-run
    assert retried[0].user_attrs["worker"] == 0
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 3
    assert res["complete"] + res["pruned"] == 3


def test_conditional_params_and_derived_overrides(tmp_path):
    import optuna

    space = {
        "train.schedule": {"type": "categorical", "choices": ["cosine", "noam"]},
        "train.min_lr_ratio": {
            "type": "float",
            "low": 0.01,
            "high": 0.2,
            "condition": {"train.schedule": "cosine"},
        },
        "train.warmup_steps": {
            "type": "int",
            "low": 10,
            "high": 50,
            "step": 10,
            "condition": {"train.schedule": ["noam"]},
        },
        "model.d_model": {"type": "categorical", "choices": [30, 32, 48]},
        "train.sampler.max_duration_s": {"type": "categorical", "choices": [20, 80]},
        "train.lr": {"type": "float", "low": 0.001, "high": 0.004, "log": True},
    }
    cfg = make_cfg(tmp_path, [f"tune.space={json.dumps(space)}", "model.n_heads=4"])
    tune.validate_space(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params = tune.sample_params(trial, cfg)
        sched = params["train.schedule"]
        seen.add(sched)
        assert ("train.min_lr_ratio" in params) == (sched == "cosine")
        assert ("train.warmup_steps" in params) == (sched == "noam")
        overrides, info = tune.derive_overrides(cfg, params)
        # lr is scaled by sqrt(sampled batch duration / base 40 s)
        ratio = params["train.sampler.max_duration_s"] / 40
        assert overrides["train.lr"] == pytest.approx(params["train.lr"] * math.sqrt(ratio))
        heads = overrides.get("model.n_heads", 4)
        assert params["model.d_model"] % heads == 0
        trial_cfg = with_overrides(cfg, overrides)  # validates against the real config
        assert trial_cfg.model.d_model == params["model.d_model"]
        study.tell(trial, 0.5)
    assert seen == {"cosine", "noam"}
    assert tune.derive_overrides(cfg, {"model.d_model": 30})[0]["model.n_heads"] == 3
    # bad spaces are refused with a readable message
    with pytest.raises(ValueError, match="not a config key"):
        tune.validate_space(make_cfg(tmp_path, ['tune.space={"train.nope": {type: int, low: 1, high: 2}}']))
    with pytest.raises(ValueError, match="cyclic"):
        tune.validate_space(
            make_cfg(
                tmp_path,
                [
                    'tune.space={"train.lr": {type: float, low: 0.1, high: 0.2, condition: {model.dropout: 0.1}},'
                    ' "model.dropout": {type: float, low: 0.0, high: 0.2, condition: {train.lr: 0.1}}}'
                ],
            )
        )


def test_trials_sample_augmentation_and_get_the_speed_copies_of_their_proxy_subset(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline_tasks.contract import file_md5

    space = {
        "train.augment.speed_perturb": {"type": "categorical", "choices": [False, True]},
        "train.augment.noise_prob": {"type": "float", "low": 0.0, "high": 0.5},
        "train.augment.reverb_prob": {"type": "float", "low": 0.0, "high": 0.5},
    }
    extra = [f"tune.space={json.dumps(space)}", "tune.n_trials=4", "tune.n_workers=1", "tune.proxy_fraction=0.5"]
    with pytest.raises(ValueError, match="speed_factors"):  # speed_perturb needs the cached copies
        tune.validate_space(make_cfg(tmp_path / "none", extra))
    cfg = make_cfg(tmp_path, [*extra, "features.speed_factors=[0.9, 1.0, 1.1]"])
    inputs = fake_split(tmp_path)
    out = Path(inputs["split"]["output_dir"])
    ids = [f"u{i:02d}" for i in range(10)]
    pq.write_table(pa.table({"id": ids, "speed": ["1"] * 10}), out / "proxy.parquet")
    inputs["split"]["proxy_md5"] = file_md5(out / "proxy.parquet")
    for f in ("0.9", "1.1"):
        pq.write_table(pa.table({"id": ids, "speed": [f] * 10}), out / f"proxy_sp{f}.parquet")
        inputs["split"].setdefault("proxy_speed", {})[f] = f"proxy_sp{f}.parquet"
        inputs["split"].setdefault("proxy_speed_md5", {})[f] = file_md5(out / f"proxy_sp{f}.parquet")
    monkeypatch.setenv("TUNE_TEST_SPEED_LOG", str(tmp_path / "speed.jsonl"))
    res = tune.run(cfg, inputs, trial_fn="tests.pipeline_tasks.test_tune:speed_trial")
    logged = [json.loads(x) for x in (tmp_path / "speed.jsonl").read_text().splitlines()]
    assert len(logged) == 4 and all(n == 5 for n, *_ in logged)  # the proxy subset, in every copy
    assert all(0.0 <= nz <= 0.5 and 0.0 <= rv <= 0.5 for _, _, nz, rv in logged)
    assert set(res["best_overrides"]) == set(space)  # what train applies
    with_overrides(cfg, res["best_overrides"])  # and it validates


def test_param_budget_rejects_big_models(tmp_path):
    space = {"model.d_model": {"type": "categorical", "choices": [16, 256]}}
    small = make_cfg(tmp_path, ["model.d_model=16"])
    budget = (
        tune.estimate_params(small) + tune.estimate_params(make_cfg(tmp_path, ["model.d_model=256"]))
    ) // 2
    cfg = make_cfg(
        tmp_path,
        [
            f"tune.space={json.dumps(space)}",
            f"tune.max_params={budget}",
            "tune.n_trials=6",
            "tune.n_workers=1",
            "tune.pruner=none",
        ],
    )
    inputs = fake_split(tmp_path)
    res = tune.run(cfg, inputs, trial_fn=QUICK)
    trials = json.loads(resolve(res, res["trials"]).read_text())
    rejected = [t for t in trials if t["rejected"] == "param_budget"]
    assert rejected and all(t["params"]["model.d_model"] == 256 and t["state"] == "PRUNED" for t in rejected)
    assert res["best_overrides"]["model.d_model"] == 16


def test_study_name_tracks_space_and_proxy_md5(tmp_path):
    cfg = make_cfg(tmp_path)
    a = tune.study_name(cfg, fake_split(tmp_path, "a" * 32))
    assert a == tune.study_name(cfg, fake_split(tmp_path, "a" * 32))
    assert a != tune.study_name(cfg, fake_split(tmp_path, "b" * 32))
    space = {k: v.model_dump() for k, v in cfg.tune.space.items()}
    space["train.lr"]["low"] = 0.0001
    wider = make_cfg(tmp_path, [f"tune.space={json.dumps(space)}"])
    assert tune.study_name(wider, fake_split(tmp_path, "a" * 32)) != a
    assert tune.study_name(make_cfg(tmp_path, ["tune.pruner=median"]), fake_split(tmp_path, "a" * 32)) != a
    # operational settings continue the same study
    assert (
        tune.study_name(
            make_cfg(tmp_path, ["tune.n_workers=5", "tune.n_trials=50"]), fake_split(tmp_path, "a" * 32)
        )
        == a
    )


def test_disabled_returns_empty_overrides(tmp_path):
    cfg = make_cfg(tmp_path, ["tune.enabled=false"])
    assert tune.prepare(cfg, fake_split(tmp_path))["enabled"] is False
    assert not (tmp_path / "optuna.db").exists()  # no study was opened
    res = tune.run(cfg, fake_split(tmp_path))
    assert res["best_overrides"] == {}
    assert (Path(res["output_dir"]) / "_SUCCESS.json").exists()


def test_tied_trials_fall_back_to_the_profile_config_and_cer_breaks_the_tie(tmp_path):
    flat = "tests.pipeline_tasks.test_tune:flat_trial"
    cfg = make_cfg(tmp_path / "wer", ["tune.n_trials=4", "tune.n_workers=1", "tune.pruner=none"])
    res = tune.run(cfg, fake_split(tmp_path / "wer"), trial_fn=flat)
    # every trial scored 1.0: no trial is better, so training keeps the profile's own config
    assert res["best_value"] == 1.0 and res["best_overrides"] == {} and "no signal" in res["no_signal"]
    best = json.loads((Path(res["output_dir"]) / "best_config.json").read_text())
    assert best["no_signal"] and best["metric"] == "dev_wer"
    # the same study on dev CER has a signal: a real best, and a different study
    cfg_c = make_cfg(tmp_path / "cer", ["tune.n_trials=4", "tune.n_workers=1", "tune.pruner=none",
                                         "tune.metric=dev_cer"])
    assert tune.study_name(cfg_c, fake_split(tmp_path / "cer")) != tune.study_name(cfg, fake_split(tmp_path / "wer"))
    res_c = tune.run(cfg_c, fake_split(tmp_path / "cer"), trial_fn=flat)
    assert res_c["no_signal"] is None and res_c["best_overrides"] and res_c["metric"] == "dev_cer"
    trials = json.loads((Path(res_c["output_dir"]) / "trials.json").read_text())
    values = [t["values"][0] for t in trials if t["state"] == "COMPLETE"]
    assert res_c["best_value"] == min(values) < 1.0


def test_trials_that_never_left_the_ctc_plateau_fall_back_to_the_profile_config(tmp_path):
    cfg = make_cfg(tmp_path, ["tune.n_trials=4", "tune.n_workers=1", "tune.pruner=none", "tune.metric=dev_loss"])
    res = tune.run(cfg, fake_split(tmp_path), trial_fn="tests.pipeline_tasks.test_tune:plateau_trial")
    assert res["best_overrides"] == {} and "plateau" in res["no_signal"]
    # one complete trial, the rest pruned (what a fresh local week 1 did): still no ranking
    one = make_cfg(tmp_path / "one", ["tune.n_trials=1", "tune.n_workers=1", "tune.pruner=none", "tune.metric=dev_loss"])
    res1 = tune.run(one, fake_split(tmp_path / "one"), trial_fn="tests.pipeline_tasks.test_tune:plateau_trial")
    assert res1["best_overrides"] == {} and "plateau" in res1["no_signal"]
    # the same losses with one trial that decodes something: a real ranking
    cfg2 = make_cfg(tmp_path / "b", ["tune.n_trials=4", "tune.n_workers=1", "tune.pruner=none",
                                     "tune.metric=dev_loss", "tune.plateau_cer=1.0"])
    res2 = tune.run(cfg2, fake_split(tmp_path / "b"), trial_fn="tests.pipeline_tasks.test_tune:flat_trial")
    assert res2["no_signal"] is None and res2["best_overrides"]


def test_multi_objective_pareto_front(tmp_path):
    space = {
        "model.d_model": {"type": "categorical", "choices": [16, 32, 64]},
        "train.lr": {"type": "float", "low": 0.0005, "high": 0.005, "log": True},
    }
    cfg = make_cfg(
        tmp_path,
        [
            f"tune.space={json.dumps(space)}",
            "tune.multi_objective=true",
            "tune.n_trials=6",
            "tune.n_workers=1",
            "tune.epochs=2",
        ],
    )
    res = tune.run(cfg, fake_split(tmp_path), trial_fn=QUICK)
    front = json.loads(resolve(res, res["pareto_front"]).read_text())
    assert front and res["best_value"] == pytest.approx(min(p["dev_wer"] for p in front))
    assert res["best_overrides"] == front[0]["overrides"]
    # no Pareto point is dominated by another
    for p in front:
        assert not any(
            q["dev_wer"] <= p["dev_wer"] and q["latency_ms_per_s"] < p["latency_ms_per_s"] for q in front
        )
    assert res["n_trials_pruned"] == 0  # pruning is off for multi-objective studies


def test_fidelity_check_spearman(tmp_path):
    cfg = make_cfg(
        tmp_path, ["tune.n_trials=5", "tune.n_workers=1", "tune.pruner=none", "tune.fidelity_check_top_k=3"]
    )
    res = tune.run(cfg, fake_split(tmp_path), trial_fn=QUICK)
    fc = res["fidelity_check"]
    assert fc["k"] == 3 and fc["epochs"] == 2
    # the quick curve's ranking does not change with more epochs
    assert res["fidelity_spearman"] == pytest.approx(1.0)


@pytest.mark.slow
def test_real_fit_on_tiny_proxy(tiny_cfg):
    """The production objective: ``train.fit`` on the tiny proxy split, WER reported per epoch."""
    import mlflow

    from pipeline_tasks.graph import run_until

    split = run_until("split", tiny_cfg)["split"]
    cfg = with_overrides(
        tiny_cfg, {"tune.n_trials": 2, "tune.n_workers": 1, "tune.epochs": 2, "tune.plots": False}
    )
    res = tune.run(cfg, {"split": split})
    assert res["n_trials_complete"] + res["n_trials_pruned"] == 2
    assert res["n_trials_complete"] >= 1  # ASHA always lets the first trial finish
    best = json.loads((Path(res["output_dir"]) / "best_config.json").read_text())
    assert set(best["params"]) == set(cfg.tune.space)  # the trial sampled the whole space
    # 2-epoch tiny trials still decode to blanks: no ranking, training keeps the profile's config
    if best["no_signal"]:
        assert "plateau" in best["no_signal"] and res["best_overrides"] == {}
    else:
        assert set(res["best_overrides"]) == set(cfg.tune.space)
    assert math.isfinite(res["best_value"]) and res["best_value"] >= 0
    trials = json.loads(resolve(res, res["trials"]).read_text())
    first = next(t for t in trials if t["number"] == 0)
    assert first["state"] == "COMPLETE" and sorted(first["intermediate"]) == ["1", "2"]
    assert first["values"][0] == pytest.approx(first["intermediate"]["2"])
    # fit logged into the trial's nested run: its config params and its own epoch metrics
    client = mlflow.MlflowClient(cfg.registry.tracking_uri)
    parent = client.get_run(res["mlflow_run_id"])
    child = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`optuna.trial` = '0'",
    )[0]
    assert float(child.data.params["train.lr"]) == pytest.approx(first["params"]["train.lr"])
    assert child.data.params["train.epochs"] == "2"
    assert cfg.tune.metric == "dev_loss"  # the tiny profile's: its trials never leave the blank stage
    assert child.data.metrics["final_dev_loss"] == pytest.approx(first["values"][0])

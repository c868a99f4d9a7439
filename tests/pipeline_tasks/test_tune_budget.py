"""Tuning whose trials all fail ends (issue 13): failed trials count toward ``tune.n_trials`` and a
worker stops after ``tune.max_consecutive_failures`` failures in a row, even with ``pruner: none``
or multi-objective and no ``timeout_s`` (before, such a worker started new trials forever)."""

from __future__ import annotations

import threading

import pytest

from pipeline_tasks.steps import tune
from tests.pipeline_tasks.test_tune import fake_split, make_cfg, shared_mlflow  # noqa: F401 - one MLflow store


def nan_trial(trial_cfg, ctx, on_epoch_end):
    """Every trial diverges: its score is NaN, which Optuna records as a failed trial."""
    on_epoch_end(1, {"dev_wer": float("nan"), "dev_cer": float("nan"), "dev_loss": float("nan"), "loss": float("nan")})
    return {"dev_wer": float("nan"), "dev_cer": float("nan"), "dev_loss": float("nan"), "latency_ms_per_s": float("nan")}


def _run_bounded(fn, timeout_s: float = 120.0):
    """Run ``fn`` in a thread; fail the test (instead of hanging the suite) if it loops."""
    out: dict = {}

    def target():
        try:
            out["res"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["err"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), "the tune worker never stopped: failed trials do not count toward the budget"
    if "err" in out:
        raise out["err"]
    return out["res"]


@pytest.mark.parametrize(
    ("extra", "expect_failed"),
    [
        (["tune.pruner=none", "tune.n_trials=3", "tune.max_consecutive_failures=10"], 3),  # the budget ends it
        (["tune.multi_objective=true", "tune.n_trials=20", "tune.max_consecutive_failures=2"], 2),  # the cap ends it
    ],
)
def test_failing_trials_end_the_worker(tmp_path, extra, expect_failed):
    cfg = make_cfg(tmp_path, ["tune.epochs=1", "tune.timeout_s=null", *extra])
    assert cfg.tune.timeout_s is None
    inputs = {**fake_split(tmp_path), "parent": {}}  # trials from scratch (no warm-start parent to look up)
    tune.prepare(cfg, inputs)
    res = _run_bounded(lambda: tune.run_worker(cfg, inputs, 0, trial_fn=nan_trial))
    assert (res["complete"], res["pruned"], res["failed"]) == (0, 0, expect_failed)

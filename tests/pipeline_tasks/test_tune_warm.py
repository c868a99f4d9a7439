"""Tuning in warm mode: warm-only params, the auto metric, the parent in the study's identity (no training)."""

from __future__ import annotations

import optuna

from pipeline_tasks.config import load_config
from pipeline_tasks.steps import tune
from pipeline_tasks.steps.tune.study import study_name


def _cfg(tmp_path):
    return load_config("local", [f"paths.root={tmp_path}"])


def test_warm_only_params_are_sampled_only_for_warm_trials(tmp_path):
    cfg = _cfg(tmp_path)
    warm_only = {k for k, p in cfg.tune.space.items() if p.warm_only}
    assert warm_only == {"train.finetune_lr_factor", "train.replay_share", "train.augment.speed_perturb",
                         "train.augment.noise_prob", "train.augment.reverb_prob", "train.augment.vtlp_prob"}
    study = optuna.create_study()
    cold = tune.sample_params(study.ask(), cfg, warm=False)
    warm = tune.sample_params(study.ask(), cfg, warm=True)
    assert not warm_only & set(cold) and warm_only <= set(warm)


def test_auto_metric_and_parent_identity(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.tune.metric == "auto"
    split = {"proxy_md5": "p" * 32, "dev_md5": "d" * 32}
    scratch = {"split": split, "parent": {"source": "scratch", "model_dir": None}}
    warm = {"split": split, "parent": {"source": "staging", "model_dir": "/m", "version": "3", "weights_md5": "w1"}}
    assert tune.effective_config(cfg, scratch).tune.metric == "dev_loss"
    assert tune.effective_config(cfg, warm).tune.metric == "dev_wer"
    # a new parent is a new study; the same parent the same study
    other = {**warm, "parent": {**warm["parent"], "version": "4", "weights_md5": "w2"}}
    names = {study_name(cfg, x) for x in (scratch, warm, other)}
    assert len(names) == 3 and study_name(cfg, warm) == study_name(cfg, dict(warm))

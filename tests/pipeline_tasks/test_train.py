"""The train step: keyed + cached, MLflow-tracked (real MLflow on SQLite), resumable after SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import optuna
import pytest

from model_code.packaging import load_model_dir
from pipeline_tasks.config import REPO_ROOT, with_overrides
from pipeline_tasks.contract import resolve
from pipeline_tasks.graph import run_until
from pipeline_tasks.services.tracking import mlflow_setup
from pipeline_tasks.steps import train as train_step


@pytest.fixture(scope="module")
def split(tiny_cfg):
    return run_until("split", tiny_cfg)["split"]


def _runs_with_key(cfg, key):
    exp = mlflow_setup(cfg)
    return mlflow.search_runs(
        experiment_ids=[exp], filter_string=f"tags.`asrflow.key` = '{key}'", output_format="list"
    )


def test_train_step_publishes_model_history_curve_and_tracks_mlflow(tiny_cfg, split):
    tune = {"best_overrides": {"train.lr": 0.003, "train.epochs": 2}}
    res = train_step.run(tiny_cfg, {"split": split, "tune": tune})
    assert res["applied_overrides"] == tune["best_overrides"]
    assert res["epochs"] == 2 and res["steps"] > 0 and res["train_md5"] == split["train_md5"]
    assert 0.0 <= res["dev_cer"] <= 1.5 and res["dev_wer"] is not None
    model, tok, info = load_model_dir(resolve(res, res["model_dir"]))
    assert info["lm"] is not None  # lexicon + LM from the training transcripts ship with the model
    assert info["model_kwargs"]["d_model"] == tiny_cfg.model.d_model
    assert resolve(res, "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = json.loads(resolve(res, "history.json").read_text())
    assert len(hist["epochs"]) == 2 and len(hist["steps"]) == res["steps"]
    # MLflow: params (overrides applied), per-step metrics, per-epoch dev metrics, tags, artifacts
    client = mlflow.MlflowClient(tiny_cfg.registry.tracking_uri)
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert float(run.data.params["train.lr"]) == 0.003
    assert run.data.tags["train_md5"] == split["train_md5"] and run.data.tags["git_commit"]
    # the precision the tiny profile's fp32 resolved to, in the record and on the run
    assert res["precision"] == "fp32" and run.data.tags["asrflow.precision"] == "fp32"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == res["steps"]
    assert len(client.get_metric_history(run.info.run_id, "epoch/dev_cer")) == 2
    assert {"curve.png", "history.json", "ds_config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # cached: the same inputs return the published result, no second run; checkpoints removed
    again = train_step.run(tiny_cfg, {"split": split, "tune": tune})
    assert again == res
    assert len(_runs_with_key(tiny_cfg, res["key"])) == 1
    assert not train_step.checkpoint_dir_for(tiny_cfg, res["key"]).exists()
    # different overrides → a different key
    other = with_overrides(tiny_cfg, {"train.lr": 0.001})
    assert train_step.train_key(other, split, {"train.lr": 0.001}) != res["key"]


def test_killed_step_attempt_resumes_from_its_checkpoint(tiny_cfg, split, tmp_path):
    tune = {"best_overrides": {"train.epochs": 3, "train.checkpoint_every_steps": 2}}
    cfg_file, inputs_file = tmp_path / "cfg.json", tmp_path / "inputs.json"
    cfg_file.write_text(json.dumps(tiny_cfg.dump()))
    inputs = {"split": split, "tune": tune}
    inputs_file.write_text(json.dumps(inputs))
    code = (
        "import json,sys; from pipeline_tasks.config import config_from_dict; from pipeline_tasks.steps import train;"
        "train.run(config_from_dict(json.load(open(sys.argv[1]))), json.load(open(sys.argv[2])))"
    )
    env = {**os.environ, "ASRFLOW_TRAIN_FAULT": "after_step:5"}
    proc = subprocess.run([sys.executable, "-c", code, str(cfg_file), str(inputs_file)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL mid-training
    from pipeline_tasks.services.parent import parent_for_split

    tcfg = with_overrides(tiny_cfg, tune["best_overrides"])
    key = train_step.train_key(tcfg, split, tune["best_overrides"], parent_for_split(tcfg, split))
    ckdir = train_step.checkpoint_dir_for(tiny_cfg, key)
    assert json.loads((ckdir / "latest.json").read_text())["step"] == 4  # outside the temp folder: survived
    assert [r.info.status for r in _runs_with_key(tiny_cfg, key)] == ["RUNNING"]  # killed, never closed
    # the retry (same inputs) resumes at step 4 in the same MLflow run and publishes
    res = train_step.run(tiny_cfg, inputs)
    assert res["key"] == key and res["resumed_from"] == 4 and res["epochs"] == 3 and res["steps"] > 5
    runs = _runs_with_key(tiny_cfg, key)
    assert [r.info.run_id for r in runs] == [res["mlflow_run_id"]] and runs[0].info.status == "FINISHED"
    assert not ckdir.exists()
    assert not [p for p in (tiny_cfg.root / "train").iterdir() if p.name.startswith(".tmp-")]


def test_fit_logs_into_a_nested_run_and_lets_pruning_propagate(tiny_cfg, tmp_path):
    from tests.model_code.train_helpers import write_synthetic_index

    tr = write_synthetic_index(tmp_path / "d", 24, seed=3, name="train")
    dv = write_synthetic_index(tmp_path / "d", 6, seed=4, name="dev")
    seen = []

    def prune(epoch, rec):
        seen.append((epoch, rec["dev_cer"], rec["loss"]))
        raise optuna.TrialPruned()

    mlflow_setup(tiny_cfg)
    with mlflow.start_run(run_name="study") as parent:
        with pytest.raises(optuna.TrialPruned):
            train_step.fit(tiny_cfg, tr, dv, tmp_path / "trial", epochs=3, on_epoch_end=prune, mlflow_nested=True)
        assert mlflow.active_run().info.run_id == parent.info.run_id  # the nested run was closed
    assert [e for e, _, _ in seen] == [0]
    client = mlflow.MlflowClient(tiny_cfg.registry.tracking_uri)
    child = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(child) == 1 and child[0].info.status == "KILLED"
    assert child[0].data.metrics["epoch/dev_cer"] == pytest.approx(seen[0][1])


def test_fit_trains_on_the_speed_copies_with_feature_noise_and_reverb(tmp_path):
    """train.augment reaches the training loop: with speed_perturb, split's train_sp<f> indexes are
    the variant indexes (ascending factor), VTLP / noise / reverb go to FeatureAugment; a one-epoch fit runs."""
    from pathlib import Path

    from pipeline_tasks.config import load_config
    from pipeline_tasks.services.fitting import make_tokenizer, train_args
    from pipeline_tasks.steps import featurize, golden, split
    from tests.pipeline_tasks.featurize_helpers import make_rows, write_golden_dir, write_validate_result

    write_golden_dir(tmp_path / "gsrc", ["gold-a", "gold-b"], sr=16000, channels=1)
    cfg = load_config("tiny", [
        f"paths.root={tmp_path / 'art'}", f"paths.golden_dir={tmp_path / 'gsrc'}", "features.jobs=1",
        "features.speed_factors=[0.9, 1.0, 1.1]", "split.dev_share=0.2", "train.epochs=1",
        "train.augment.speed_perturb=true", "train.augment.noise_prob=0.5", "train.augment.reverb_prob=0.5",
        "train.augment.vtlp_prob=0.5", "train.build_lm=false",
    ])
    rows = make_rows(Path(cfg.paths.data_workspace), [f"u{i:02d}" for i in range(16)])
    f = featurize.run(cfg, {"validate": write_validate_result(tmp_path / "v", rows)})
    s = split.run(cfg, {"featurize": f, "golden": golden.run(cfg, {})})
    speed = {k: resolve(s, v) for k, v in s["train_speed"].items()}
    tok = make_tokenizer(cfg, ["a b"])
    a = train_args(cfg, resolve(s, s["train"]), None, tmp_path / "o", tok, speed_indexes=dict(reversed(speed.items())))
    assert a.variant_indexes == [str(speed["0.9"]), str(speed["1.1"])]
    assert a.augment == {"noise_prob": 0.5, "noise_snr_db": [5.0, 30.0], "reverb_prob": 0.5, "reverb_t60_s": [0.2, 0.8],
                         "vtlp_prob": 0.5, "vtlp_alpha": [0.9, 1.1]}
    with pytest.raises(ValueError, match="no speed-perturbed indexes"):
        train_args(cfg, resolve(s, s["train"]), None, tmp_path / "o", tok)
    off = with_overrides(cfg, {"train.augment.speed_perturb": False})
    assert train_args(off, resolve(s, s["train"]), None, tmp_path / "o", tok, speed_indexes=speed).variant_indexes == []
    # the train step's key follows the copies it trains on
    assert train_step.train_key(cfg, s, {}) != train_step.train_key(cfg, {**s, "train_speed_md5": {"0.9": "x"}}, {})
    assert train_step.train_key(off, s, {}) == train_step.train_key(off, {**s, "train_speed_md5": {"0.9": "x"}}, {})
    res = train_step.fit(cfg, resolve(s, s["train"]), resolve(s, s["dev"]), tmp_path / "fit", speed_indexes=speed)
    assert res["epochs"] == 1 and res["steps"] > 0 and Path(res["model_dir"]).is_dir()

"""Issue 13, item 2: the trigger form is an operator's tool, not a root shell.

The ``overrides`` a trigger may set are allow-listed per profile (prod strictly), ``landing_url``
must fall under an allowed prefix, only the profiles the scheduler's profile allows can be picked,
no param value is ``${VAR}``-expanded, and credentials are masked in what is logged, pushed to
XCom and sent to MLflow. Plus: every task that retries has a finite ``execution_timeout``.
"""

from __future__ import annotations

import logging
import sys
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRET = "hunter2-do-not-leak"


@pytest.fixture()
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "dags"))
    sys.modules.pop("_common", None)
    import _common

    _common.task_settings.cache_clear()
    yield _common
    _common.task_settings.cache_clear()
    sys.modules.pop("_common", None)


def _refused(common, params):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException) as ei:
        common.run_config(params)
    return str(ei.value)


def test_prod_allow_list_refuses_gate_paths_registry_and_storage(common):
    for item in (
        "gate.absolute_wer_ceiling=1.0",
        "gate.min_probability=0",
        "paths.golden_dir=/tmp/other",
        "registry.canary_max_wer=1.5",
        "paths.dvc_remote=s3://attacker/bucket",
        "tune.storage=sqlite:////tmp/x.db",
        "train.init_from=/tmp/evil",
        "airflow.trigger_override_allow=['*']",
        " gate..absolute_wer_ceiling =1",  # spelled oddly: the key that would be set is what counts
    ):
        msg = _refused(common, {"profile": "prod", "overrides": [item]})
        assert "may not set" in msg and "trigger_override_allow" in msg, (item, msg)
    cfg = common.run_config({"profile": "prod", "overrides": ["train.lr=0.0005", "tune.n_trials=4"], "epochs": 3})
    assert (cfg.train.lr, cfg.tune.n_trials, cfg.train.epochs) == (0.0005, 4, 3)


def test_default_allow_list_is_training_model_and_tuning_budget():
    from pipeline_tasks.config import (
        AirflowConfig,
        TriggerOverrideError,
        check_trigger_overrides,
        load_config,
    )

    base = load_config("tiny").model_copy(update={"airflow": AirflowConfig()})  # the built-in default list
    check_trigger_overrides(base, ["train.lr=1", "model.d_model=8", "tune.n_trials=2", "tune.timeout_s=60"])
    for item in ("gate.min_probability=0", "registry.model_name=x", "paths.root=/", "tune.space.x=1", "validate.max_quarantine_share=1"):
        with pytest.raises(TriggerOverrideError):
            check_trigger_overrides(base, [item])


def test_landing_url_must_fall_under_an_allowed_prefix(common):
    ok = common.run_config({"profile": "prod", "landing_url": "s3://asrflow-landing/incoming/week-9"})
    assert ok.paths.landing_url == "s3://asrflow-landing/incoming/week-9"
    for url in ("s3://asrflow-landing-evil/x", "s3://other/x", "s3://asrflow-landing/../other", "/etc", "file:///etc"):
        assert "allowed landing prefix" in _refused(common, {"profile": "prod", "landing_url": url}), url


def test_landing_prefix_default_is_the_profiles_own_landing_zone(tmp_path):
    from pipeline_tasks.config import TriggerOverrideError, check_landing_url, load_config

    base = load_config("tiny", [f"paths.root={tmp_path}", "airflow.allowed_landing_prefixes=[]"])
    inside = load_config("tiny", [f"paths.root={tmp_path}", f"paths.landing_url={tmp_path}/landing/week-3"])
    check_landing_url(inside, base)
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "out").symlink_to("/etc")
    for url in (f"{tmp_path}/landing/../elsewhere", f"{tmp_path}/landing/out", "/etc", "s3://b/x"):
        with pytest.raises(TriggerOverrideError):
            check_landing_url(load_config("tiny", [f"paths.root={tmp_path}", f"paths.landing_url={url}"]), base)


def test_prod_scheduler_offers_only_the_prod_profile(common, monkeypatch):
    monkeypatch.setattr(common, "DEFAULT_PROFILE", "prod")
    common.task_settings.cache_clear()
    assert common.profiles() == ["prod"]
    # a developer profile's allow-list is "*": picking it from a prod trigger would bypass prod's list
    assert "may not be triggered" in _refused(common, {"profile": "tiny", "overrides": ["gate.absolute_wer_ceiling=9"]})
    assert "may not be triggered" in _refused(common, {"profile": "/tmp/evil.yaml"})


def test_no_env_expansion_of_params_or_overrides(common, monkeypatch, tmp_path):
    from pipeline_tasks.config import load_config

    monkeypatch.setenv("ASRFLOW_TEST_SECRET", SECRET)
    cfg = common.run_config(
        {"profile": "tiny", "overrides": [f"paths.root={tmp_path}", "tune.storage=sqlite:///${ASRFLOW_TEST_SECRET}.db",
                                          "registry.tracking_uri=${ASRFLOW_TEST_SECRET}"]}
    )
    assert SECRET not in cfg.model_dump_json() and "${ASRFLOW_TEST_SECRET}" in cfg.tune.storage
    cfg = load_config("tiny", ["registry.artifact_location=${ASRFLOW_TEST_SECRET}"])  # the CLI path too
    assert cfg.registry.artifact_location.endswith("${ASRFLOW_TEST_SECRET}")
    # a profile file's own values are still expanded (distributed.yaml: ports from the environment)
    monkeypatch.setenv("ASRFLOW_DIST_PG_PORT", "17777")
    assert ":17777/" in load_config("distributed").tune.storage
    # {root} is filled by replacement, not str.format (which would evaluate attribute lookups)
    odd = load_config("tiny", [f"paths.root={tmp_path}", "registry.artifact_location={root.__class__}/x"])
    assert odd.registry.artifact_location == "{root.__class__}/x"


def test_credentials_are_masked_in_mlflow_params_xcom_and_logs(common, monkeypatch, caplog, tmp_path):
    import mlflow

    from pipeline_tasks.config import load_config, redact_secrets
    from pipeline_tasks.services.tracking import flat_params
    from pipeline_tasks.steps.tune.study import redact

    monkeypatch.setenv("ASRFLOW_OPTUNA_DB_PASSWORD", SECRET)
    prod = load_config("prod")
    assert SECRET in prod.tune.storage  # the config itself holds it (the worker connects with it)
    # MLflow params: logged into a real tracking store and read back
    params = flat_params({**prod.dump(), "extra": {"aws_secret_access_key": SECRET, "url": f"https://u:{SECRET}@h/p"}})
    assert SECRET not in str(params) and params["tune.storage"].startswith("postgresql+psycopg2://asrflow:***@postgres")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        mlflow.log_params(params)
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    assert logged["extra.aws_secret_access_key"] == "***" and SECRET not in str(logged)
    # the tune step's reported storage, and every step result pushed to XCom by the DAG helper
    assert SECRET not in redact(prod.tune.storage)
    monkeypatch.setattr("pipeline_tasks.graph.run_one", lambda *a, **k: {"storage": prod.tune.storage, "key": "abc"})
    monkeypatch.setattr(common, "run_config", lambda params=None: prod)
    monkeypatch.setattr(common, "force_flag", lambda params=None: False)
    xcom = common.run_step("tune", {})
    assert xcom == {"storage": redact(prod.tune.storage), "key": "abc"}
    assert redact_secrets({"db_password": SECRET, "n_tokens": 3}) == {"db_password": "***", "n_tokens": 3}


def test_refused_and_accepted_triggers_log_without_secrets(common, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("ASRFLOW_OPTUNA_DB_PASSWORD", SECRET)
    caplog.set_level(logging.INFO, logger="asrflow.dags")
    common.run_config(
        {"profile": "tiny", "overrides": [f"paths.root={tmp_path}", f"tune.storage=sqlite:///x.db?password={SECRET}"]}
    )
    _refused(common, {"profile": "prod", "overrides": [f"tune.storage=postgresql://a:{SECRET}@h/db"]})
    assert "refused trigger params" in caplog.text and SECRET not in caplog.text


def test_retrying_tasks_have_a_finite_execution_timeout(common):
    from pipeline_tasks.config import load_config

    a = load_config(common.DEFAULT_PROFILE).airflow
    assert common.retry_kwargs()["execution_timeout"] == timedelta(seconds=a.long_execution_timeout_s)
    assert common.retry_kwargs(1, task="train")["execution_timeout"] == timedelta(seconds=a.long_execution_timeout_s)
    assert common.retry_kwargs(task="ingest")["execution_timeout"] == timedelta(seconds=a.execution_timeout_s)
    assert common.default_args()["execution_timeout"] == timedelta(seconds=a.execution_timeout_s)
    assert timedelta(0) < common.task_timeout() < timedelta(days=7)  # finite, and shorter than a week's period

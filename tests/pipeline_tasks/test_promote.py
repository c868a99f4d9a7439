"""Registry flow: staging on a passed gate, idempotent reruns, canary, production promotion, rollback.

One registry (SQLite under tmp_path) goes through the life of three candidates:
1. the noised model, first ever: passes the ceiling → v1 `staging`; canary at the default threshold
   fails, at a loose one passes → v1 `production`;
2. the trained model beats it → v2 `staging` → `production`, v1 `previous-production`;
3. the noised model again, now against the trained champion → gate fails → nothing registered;
then a rerun registers nothing, rollback restores v1, and the rolled-back v2 is never re-promoted.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from pipeline_tasks.contract import SUCCESS, resolve, write_json_atomic
from pipeline_tasks.services.registry import alias_version
from pipeline_tasks.steps import promote
from tests.conftest import make_tiny_cfg
from tests.pipeline_tasks.gate_helpers import export_and_evaluate


def _fake_split(cfg, golden_res) -> dict:
    """A published split result whose dev rows are the golden rows, in two weeks (the canary must take week-002)."""
    t = pq.read_table(resolve(golden_res, golden_res["index"]))
    n = t.num_rows
    batches = ["week-001"] * (n // 2) + ["week-002"] * (n - n // 2)
    t = t.set_column(t.schema.get_field_index("batch"), "batch", pa.array(batches))
    out = cfg.root / "split" / "fakesplitkey0001"
    out.mkdir(parents=True)
    pq.write_table(t, out / "dev.parquet")
    res = {"step": "split", "key": "fakesplitkey0001", "output_dir": str(out), "dev": "dev.parquet"}
    write_json_atomic(out / SUCCESS, res)
    return res


def _pipeline(cfg, model_res, golden_res, force=False):
    ex, ev = export_and_evaluate(cfg, model_res, golden_res)
    return ev, ex, promote.run(cfg, {"export": ex, "evaluate": ev}, force=force)


def test_registry_lifecycle(tmp_path, tiny_landing, tiny_golden, golden_res, models, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2026-01-01")
    cfg = make_tiny_cfg(tmp_path / "art", tiny_landing, tiny_golden,
                        ["gate.absolute_wer_ceiling=10", "registry.canary_max_wer=0.6"])
    loose = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"canary_max_wer": 10.0})})
    split = _fake_split(cfg, golden_res)
    assert promote.latest_split(cfg)["key"] == split["key"]
    # registry_uri explicitly: MlflowClient(tracking_uri) alone takes the process-global registry URI
    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri, registry_uri=cfg.registry.tracking_uri)
    name = cfg.registry.model_name

    # 1. first candidate (the noised model): registered, staged
    ev1, ex1, p1 = _pipeline(cfg, models["bad"], golden_res)
    assert ev1["passed"] and p1["registered"] and p1["new_version_created"] and p1["alias"] == "staging"
    v1 = p1["version"]
    assert p1["airflow_run_id"] == "manual__2026-01-01", {k: v for k, v in os.environ.items() if "AIRFLOW" in k}
    mv = client.get_model_version(name, v1)
    assert mv.tags["asrflow.candidate_key"] == ex1["key"]
    assert mv.tags["asrflow.golden_md5"] == golden_res["golden_md5"] and mv.tags["asrflow.train_md5"] == "train-data-bad"
    assert mv.tags["asrflow.optuna_study"] == "study-bad"
    assert mv.tags.get("asrflow.airflow_run_id") == "manual__2026-01-01"
    assert mv.tags["asrflow.git_commit"] and float(mv.tags["asrflow.gate_candidate_wer"]) == pytest.approx(ev1["candidate_wer"])
    assert mv.tags["asrflow.onnx_file"] == ("int8" if ex1["int8_kept"] else "fp32")
    # the registered artifact is an ONNX-flavor model that onnxruntime runs on CPU
    from mlflow.models import Model

    mlmodel = Model.load(f"models:/{name}/{v1}")
    assert mlmodel.flavors["onnx"]["providers"] == ["CPUExecutionProvider"]
    assert [s.name for s in mlmodel.signature.inputs.inputs] == ["features", "lengths"]

    # canary: a 0.6 ceiling rejects the noised model, newest week only
    out = promote.promote_production(cfg)
    assert not out["promoted"] and "canary failed" in out["reason"]
    assert out["canary_batch"] == "week-002" and out["canary_n_utts"] == golden_res["n_utts"] - golden_res["n_utts"] // 2
    assert alias_version(cfg, "production") is None
    out = promote.promote_production(loose)
    assert out["promoted"] and out["version"] == v1 and out["previous_version"] is None
    again = promote.promote_production(loose)
    assert not again["promoted"] and again["already_production"]
    assert promote.rollback(cfg)["rolled_back"] is False  # nothing to roll back to yet

    # 2. the trained model beats the production model
    ev2, ex2, p2 = _pipeline(cfg, models["good"], golden_res)
    assert ev2["passed"] and ev2["champion_version"] == v1, ev2["reason"]
    v2 = p2["version"]
    assert p2["registered"] and v2 != v1 and str(alias_version(cfg, "staging").version) == v2
    out = promote.promote_production(loose)
    assert out["promoted"] and out["version"] == v2 and out["previous_version"] == v1
    assert str(alias_version(cfg, "previous-production").version) == v1

    # 3. the noised model against the trained champion: never promoted
    ev3, ex3, p3 = _pipeline(cfg, models["bad"], golden_res)
    assert ev3["champion_version"] == v2 and not ev3["passed"]
    assert p3["registered"] is False and p3["version"] is None and "gate failed" in p3["reason"]
    assert str(alias_version(cfg, "staging").version) == v2 and str(alias_version(cfg, "production").version) == v2

    # rerun of step 2's promote (forced, past the step cache): no new version, no alias moved
    n_versions = len(client.search_model_versions(f"name='{name}'"))
    client.set_registered_model_alias(name, "staging", v1)  # someone staged something else meanwhile
    rerun = promote.run(cfg, {"export": ex2, "evaluate": ev2}, force=True)
    assert rerun["version"] == v2 and not rerun["new_version_created"] and not rerun["alias_moved"]
    assert len(client.search_model_versions(f"name='{name}'")) == n_versions
    assert str(alias_version(cfg, "staging").version) == v1
    client.set_registered_model_alias(name, "staging", v2)

    # rollback: production back to v1, v2 tagged; idempotent; v2 never re-promoted
    rb = promote.rollback(cfg)
    assert rb["rolled_back"] and rb["version"] == v1 and rb["rolled_back_version"] == v2
    assert str(alias_version(cfg, "production").version) == v1
    assert client.get_model_version(name, v2).tags[promote.TAG_ROLLED_BACK] == "true"
    assert promote.rollback(cfg)["rolled_back"] is False
    again = promote.promote_production(loose)
    assert not again["promoted"] and "rolled back" in again["reason"]
    assert str(alias_version(cfg, "production").version) == v1


def test_the_canary_is_never_looser_than_the_gate_by_default(tiny_cfg):
    from pipeline_tasks.config import canary_limit

    assert tiny_cfg.registry.canary_max_wer is None
    assert canary_limit(tiny_cfg) == tiny_cfg.gate.absolute_wer_ceiling
    strict = tiny_cfg.model_copy(update={"registry": tiny_cfg.registry.model_copy(update={"canary_max_wer": 0.3})})
    assert canary_limit(strict) == 0.3

"""``asrflow status``: each view read from real stores (MLflow SQLite registry, a landing folder,
an ingested manifest, a SQLite ``dag_run`` table), and the CLI's text and JSON forms."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from pipeline_tasks.cli import app
from pipeline_tasks.config import load_config
from pipeline_tasks.services import status


def _cfg(tmp_path: Path):
    root = tmp_path / "root"
    return load_config("tiny", [f"paths.root={root}", f"paths.landing_url={tmp_path / 'landing'}",
                                f"paths.data_workspace={tmp_path / 'data_repo'}"])


def _landing(tmp_path: Path, cfg) -> None:
    """week-001 ingested, week-002 landed only, week-003 landed with every row quarantined."""
    for b in ("week-001", "week-002", "week-003", ".trash"):
        d = tmp_path / "landing" / b
        d.mkdir(parents=True)
        (d / "manifest.jsonl").write_text('{"audio_filepath": "a.wav", "duration": 1.0, "text": "a"}\n')
    man = Path(cfg.paths.data_workspace) / "manifests" / "utterances.parquet"
    man.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["u1", "u2"], "batch": ["week-001", "week-001"]}), man)
    (Path(cfg.paths.quarantine_dir) / "week-003").mkdir(parents=True)


def test_landing_lists_batches_not_ingested(tmp_path):
    cfg = _cfg(tmp_path)
    _landing(tmp_path, cfg)
    land = status.landing_status(cfg)
    assert land["batches"] == 3  # the hidden folder is not a batch, as for ingest
    assert land["ingested"] == 1
    assert land["pending"] == ["week-002"]
    assert land["quarantined"] == ["week-003"]


def test_dag_runs_last_run_and_real_duration(tmp_path):
    db = tmp_path / "airflow.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE dag_run (id INTEGER PRIMARY KEY, dag_id TEXT, run_id TEXT, state TEXT, run_type TEXT,"
                  " logical_date TIMESTAMP, start_date TIMESTAMP, end_date TIMESTAMP)")
        c.executemany("INSERT INTO dag_run VALUES (?,?,?,?,?,?,?,?)", [
            (1, "asr_retraining", "r1", "success", "manual", "2026-01-05 00:00:00", "2026-12-01 10:00:00", "2026-12-01 10:20:00"),
            (2, "asr_retraining", "r2", "failed", "manual", "2026-01-12 00:00:00", "2026-12-01 11:00:00", "2026-12-01 11:05:30"),
            (3, "asr_rollback", "b1", "running", "manual", "2026-01-12 00:00:00", "2026-12-01 12:00:00", None),
        ])
    runs = status.dag_runs_status(f"sqlite:///{db}")["dags"]
    assert runs["asr_retraining"]["run_id"] == "r2" and runs["asr_retraining"]["state"] == "failed"
    assert runs["asr_retraining"]["duration_s"] == 330.0
    assert runs["asr_rollback"]["duration_s"] is None
    text = status.render({"profile": "tiny", "root": "/r", "registry": {"model": "asr", "versions": 0, "aliases": {}},
                          "dag_runs": {"db": "x", "dags": runs}, "landing": {"error": "x"}, "storage": {}})
    assert "5m30s" in text and "running" in text


def test_registry_aliases_with_figures(tmp_path):
    cfg = _cfg(tmp_path)
    from pipeline_tasks.services.registry import registry_client

    client = registry_client(cfg)
    assert status.registry_status(cfg, client) == {"model": "asr", "versions": 0, "aliases": {}}
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.onnx").write_bytes(b"x")
    client.create_registered_model("asr")
    v1 = client.create_model_version("asr", str(src), tags={"asrflow.parent_version": "scratch",
                                                          "asrflow.gate_candidate_wer": "0.41",
                                                          "asrflow.gate_passed": "true"})
    v2 = client.create_model_version("asr", str(src), tags={"asrflow.parent_version": str(v1.version),
                                                          "asrflow.gate_candidate_wer": "0.35"})
    client.set_registered_model_alias("asr", "production", v1.version)
    client.set_registered_model_alias("asr", "staging", v2.version)
    reg = status.registry_status(cfg, client)
    assert reg["versions"] == 2
    assert reg["aliases"]["production"]["version"] == str(v1.version)
    assert reg["aliases"]["production"]["golden_wer"] == "0.41"
    assert reg["aliases"]["staging"]["parent"] == str(v1.version)
    assert "previous-production" not in reg["aliases"]


def test_storage_counts_hard_links_once_and_folders_outside_the_root(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.root.mkdir(parents=True)
    (cfg.root / "a.bin").write_bytes(b"x" * 1000)
    os.link(cfg.root / "a.bin", cfg.root / "b.bin")
    (cfg.root / "sub").mkdir()
    (cfg.root / "sub" / "c.bin").write_bytes(b"y" * 24)
    ws = Path(cfg.paths.data_workspace)
    ws.mkdir(parents=True)
    (ws / "d.bin").write_bytes(b"z" * 7)
    sto = status.storage_status(cfg)
    assert sto["artifact_root"]["bytes"] == 1024 and sto["artifact_root"]["files"] == 2
    assert sto["data_workspace"]["bytes"] == 7
    assert "quarantine_dir" not in sto  # under the root: counted in artifact_root


def test_cli_status_text_and_json(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    _landing(tmp_path, cfg)
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", raising=False)
    args = ["status", "--profile", "tiny", "--set", f"paths.root={cfg.root}",
            "--set", f"paths.landing_url={cfg.paths.landing_url}", "--set", f"paths.data_workspace={cfg.paths.data_workspace}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "not ingested yet: week-002" in res.output
    assert "no alias set yet" in res.output and "no Airflow metadata DB yet" in res.output
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["landing"]["pending"] == ["week-002"]
    assert st["dag_runs"] == {"db": None, "dags": {}}
    assert st["storage"]["artifact_root"]["files"] >= 1  # the MLflow DB the registry view created

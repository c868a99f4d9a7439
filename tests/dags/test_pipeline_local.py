"""End to end: ``make pipeline-local``'s driver runs the whole ``asr_retraining`` DAG through
``airflow dags test`` on the tiny profile, then again: the second run recomputes nothing
(same step keys, byte-identical outputs, untouched ``_SUCCESS.json``) and registers no new
model version (MLflow registry queried)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from pipeline_tasks.contract import SUCCESS
from tests.dags.conftest import FAST, tiny_root_cfg

pytestmark = pytest.mark.slow

STEPS = (
    "ingest",
    "validate",
    "featurize",
    "golden",
    "split",
    "tune",
    "train",
    "evaluate",
    "export",
    "promote",
)


def snapshot(root: Path) -> dict[str, dict[str, tuple[str, int]]]:
    """step -> key -> (sha256 over the output folder's files, mtime of _SUCCESS.json)."""
    out: dict[str, dict[str, tuple[str, int]]] = {}
    for step in STEPS:
        for d in sorted((root / step).glob("*/")):
            marker = d / SUCCESS
            if d.name.startswith(".") or not marker.exists():
                continue
            h = hashlib.sha256()
            for f in sorted(p for p in d.rglob("*") if p.is_file()):
                h.update(str(f.relative_to(d)).encode())
                h.update(f.read_bytes())
            out.setdefault(step, {})[d.name] = (h.hexdigest(), marker.stat().st_mtime_ns)
    return out


def model_versions(cfg) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri, registry_uri=cfg.registry.tracking_uri)
    return sorted(v.version for v in client.search_model_versions(f"name='{cfg.registry.model_name}'"))


def test_pipeline_local_twice_is_identical(dags_root, monkeypatch, capsys):
    from devstack import local_run
    from devstack.airflow_env import airflow_env

    monkeypatch.setenv("ASRFLOW_ROOT", str(dags_root))
    cfg = tiny_root_cfg(dags_root)
    args = ["--profile", "tiny", *[a for o in FAST for a in ("--set", o)]]

    assert local_run.main(args) == 0
    out1 = capsys.readouterr().out
    assert "▶ ingest" in out1 and "✔ train: success" in out1, out1[-3000:]
    first = snapshot(dags_root)
    assert set(first) == set(STEPS), f"steps without output: {set(STEPS) - set(first)}"
    versions = model_versions(cfg)
    assert versions, "the first run registered no model version"

    t0 = time.monotonic()
    assert local_run.main(args) == 0
    second_s = time.monotonic() - t0
    out2 = capsys.readouterr().out
    print(f"second run (all cached): {second_s:.0f}s")
    second = snapshot(dags_root)
    assert second == first  # same keys, same bytes, no _SUCCESS.json rewritten
    assert model_versions(cfg) == versions
    assert "steps recomputed in this run: none" in out2, out2[-3000:]
    assert "nothing new registered" in out2 or "promote skipped" in out2

    # the run went through Airflow: its metadata DB holds both runs of the same logical date
    from devstack.local_run import state_db

    runs = state_db(airflow_env(cfg)).dag_runs("asr_retraining")
    rows = [(r["state"], r["logical_date"]) for r in runs if (r["logical_date"] or "").startswith("2026-01-05")]
    assert rows and all(state == "success" for state, _ in rows)

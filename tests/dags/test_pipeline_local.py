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


def test_two_weeks_warm_start_then_a_rerun_is_identical(dags_root, tiny_landing, monkeypatch, capsys):
    """``make pipeline-local WEEKS=2`` on the tiny profile: week 2's model starts from week 1's
    (lineage in the registry), and the same command again recomputes and registers nothing."""
    import shutil

    from devstack import local_run
    from devstack.airflow_env import airflow_env

    monkeypatch.setenv("ASRFLOW_ROOT", str(dags_root))
    landing = dags_root / "landing-weeks"  # its own landing zone: week 2 is synthesized into it
    shutil.copytree(tiny_landing, landing, dirs_exist_ok=True)
    cfg = tiny_root_cfg(dags_root, [f"paths.landing_url={landing}"])
    # a tiny model cannot beat the last one with 90 % confidence: a gate that lets week 2 through
    lenient = ["gate.min_wer_improvement=-10", "gate.max_slice_regression=10"]
    args = ["--profile", "tiny", "--weeks", "2", "--set", f"paths.landing_url={landing}",
            *[a for o in [*FAST, *lenient] for a in ("--set", o)]]

    assert local_run.main(args) == 0
    cap = capsys.readouterr()
    out1 = cap.out
    # week 2 is synthesized after Airflow's logging came into this process: one summary line, not
    # the corpus generator's per-100-utterance INFO lines
    assert "corpus week-002:" not in cap.out + cap.err and "synthesizing week 2" in out1
    assert "━━ week 2 ━━" in out1 and "══ weeks ══" in out1, out1[-3000:]
    assert out1.count("✔ train: success") == 2, out1[-3000:]
    first = snapshot(dags_root)
    assert set(first) == set(STEPS), f"steps without output: {set(STEPS) - set(first)}"
    versions = model_versions(cfg)
    assert len(versions) == 2, versions
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri, registry_uri=cfg.registry.tracking_uri)
    v1, v2 = (client.get_model_version(cfg.registry.model_name, v) for v in versions)
    assert v1.tags["asrflow.parent_version"] == "scratch"
    assert v2.tags["asrflow.parent_version"] == str(v1.version)  # week 2 fine-tuned week 1's model
    assert v2.tags["asrflow.new_batches"] == "week-002"
    assert v2.tags["asrflow.batches"] == "week-001,week-002"
    assert v2.tags["asrflow.data_snapshot_tag"] != v1.tags["asrflow.data_snapshot_tag"]
    # the table that ends the run: one row per week, week 2's parent is week 1's version
    table = out1[out1.index("══ weeks ══"):]
    row2 = next(line.split() for line in table.splitlines() if line.strip().startswith("2 "))
    assert row2[1] == str(v2.version) and row2[2] == str(v1.version)

    t0 = time.monotonic()
    assert local_run.main(args) == 0
    second_s = time.monotonic() - t0
    out2 = capsys.readouterr().out
    print(f"second run (all cached): {second_s:.0f}s")
    second = snapshot(dags_root)
    assert second == first  # same keys, same bytes, no _SUCCESS.json rewritten
    assert model_versions(cfg) == versions
    assert out2.count("steps recomputed in this run: none") == 2, out2[-3000:]

    # the runs went through Airflow: its metadata DB holds them, one logical date per week
    from devstack.local_run import state_db

    runs = state_db(airflow_env(cfg)).dag_runs("asr_retraining")
    dates = {(r["logical_date"] or "")[:10] for r in runs if r["state"] == "success"}
    assert {"2026-01-05", "2026-01-12"} <= dates
    # what the UI shows is true: each run lasted minutes, not the months since its logical date
    for r in runs:
        took = (r["end_date"] - r["start_date"]).total_seconds()
        assert 0 < took < 3600, (r["run_id"], r["start_date"], r["end_date"])

    # `asrflow status` reads the same stores: aliases, the last run, nothing pending
    from pipeline_tasks.services.status import collect, render

    st = collect(cfg)
    assert st["registry"]["versions"] == 2
    assert str(v2.version) in {a["version"] for a in st["registry"]["aliases"].values()}
    last = st["dag_runs"]["dags"]["asr_retraining"]
    assert last["state"] == "success" and 0 < last["duration_s"] < 3600, last
    assert st["landing"]["pending"] == [] and st["landing"]["ingested"] == 2, st["landing"]
    assert "not ingested yet: none" in render(st)

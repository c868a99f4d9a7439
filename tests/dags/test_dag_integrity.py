"""DAG integrity: the DAG files parse with no import errors and no database access, and the
DAGs have the tasks, dependencies, schedule, pools and params the pipeline specifies.

The DagBag is filled in a subprocess whose metadata DB points at a path that cannot exist,
with a SQLAlchemy hook counting every statement: parsing must not touch the database.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_PARSE = textwrap.dedent(
    """
    import json, sys
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    queries = []
    event.listen(Engine, "before_cursor_execute", lambda *a, **k: queries.append(a[2]))
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=sys.argv[1], safe_mode=True)
    out = {"import_errors": bag.import_errors, "queries": queries, "dags": {}}
    for dag_id, dag in bag.dags.items():
        tasks = {}
        for t in dag.tasks:
            tasks[t.task_id] = {
                "upstream": sorted(t.upstream_task_ids),
                "pool": t.pool, "pool_slots": t.pool_slots, "queue": t.queue,
                "retries": t.retries, "backoff": float(t.retry_exponential_backoff or 0),
                "trigger_rule": getattr(t.trigger_rule, "value", str(t.trigger_rule)), "mapped": bool(getattr(t, "is_mapped", False)),
                "outlets": [getattr(o, "uri", str(o)).rstrip("/") for o in (t.outlets or [])],
                "operator": type(t).__name__,
            }
        out["dags"][dag_id] = {
            "timetable": type(dag.timetable).__name__,
            "cron": getattr(dag.timetable, "expression", None) or getattr(dag.timetable, "_expression", None),
            "catchup": dag.catchup, "max_active_runs": dag.max_active_runs,
            "doc_md": dag.doc_md or "", "tasks": tasks,
            "params": {k: dag.params.get_param(k).schema | {"default": dag.params.get_param(k).value,
                       "description": dag.params.get_param(k).description} for k in dag.params},
        }
    print("@@" + json.dumps(out, default=str))
    """
)


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "AIRFLOW_HOME": str(home),
        # a metadata DB that cannot be opened: any query at parse time would raise
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////nonexistent-asrflow/deny/airflow.db",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "ASRFLOW_PROFILE": "local",
        "PYTHONHASHSEED": "0",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _PARSE, str(REPO / "dags")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=str(home),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])


def test_no_import_errors_and_no_db_at_parse_time(parsed):
    assert parsed["import_errors"] == {}
    assert set(parsed["dags"]) == {"asr_retraining", "asr_promote_production"}
    assert parsed["queries"] == [], "parsing the DAG files must not query the metadata DB"
    assert not Path("/nonexistent-asrflow").exists()


def test_retraining_structure(parsed):
    d = parsed["dags"]["asr_retraining"]
    assert d["cron"] == "0 3 * * 1"
    assert d["catchup"] is False
    assert d["max_active_runs"] == 1
    t = d["tasks"]
    # the DAG wires exactly the step graph of pipeline_tasks/graph.py (written once)
    from pipeline_tasks.graph import airflow_task_graph

    expected_upstream = airflow_task_graph()
    assert expected_upstream["split"] == ["featurize_finalize", "golden"]
    assert expected_upstream["promote"] == ["evaluate", "export", "promote_gate"]
    assert {k: v["upstream"] for k, v in t.items()} == expected_upstream
    # dynamic task mapping for shards and tuning workers
    assert t["featurize_shard"]["mapped"] and t["tune_worker"]["mapped"]
    assert not t["train"]["mapped"]
    # finalize steps still run when a mapping is empty (nothing new to featurize / tuning off)
    assert "none_failed" in t["featurize_finalize"]["trigger_rule"]
    assert "none_failed" in t["tune_finalize"]["trigger_rule"]
    # train on the GPU pool, slots and queue from the profile
    from pipeline_tasks.config import load_config

    cfg = load_config("local")
    assert t["train"]["pool"] == cfg.airflow.gpu_pool == "gpu_pool"
    assert t["train"]["pool_slots"] == cfg.train.gpu_pool_slots
    assert t["train"]["queue"] == cfg.airflow.train_queue
    # multi-node training (issue 15): train_plan -> train_node (mapped, one per node; none when
    # train.nnodes is 1) -> train (trains itself for one node, else gathers); the nodes hold the pool too
    assert t["train_node"]["mapped"] and not t["train_plan"]["mapped"]
    assert t["train_node"]["upstream"] == ["split", "train_plan", "tune_finalize"]
    assert "train_node" in t["train"]["upstream"]
    assert t["train_node"]["pool"] == t["train"]["pool"] and t["train_node"]["queue"] == cfg.airflow.train_queue
    assert t["train_node"]["pool_slots"] == cfg.train.gpu_pool_slots
    assert t["train_node"]["retries"] >= 1  # a node lost mid-training is retried and rejoins
    assert "none_failed" in t["train"]["trigger_rule"]  # runs when train_node was skipped (one node)
    # retries with exponential backoff where failures can be transient
    for tid in ("ingest", "tune_worker", "evaluate", "promote"):
        assert t[tid]["retries"] >= 1 and t[tid]["backoff"] > 1, tid
    assert t["validate"]["retries"] == 0  # a broken data contract is not transient
    # the gate is a short-circuit in front of promote
    assert "ShortCircuit" in t["promote_gate"]["operator"]
    # outputs published as assets
    assert "asrflow://features" in t["featurize_finalize"]["outlets"]
    assert "asrflow://candidate-model" in t["export"]["outlets"]
    assert "asrflow://model-staging" in t["promote"]["outlets"]
    assert "promote_gate" in d["doc_md"] and "Params" in d["doc_md"]


def test_retraining_params_form(parsed):
    p = parsed["dags"]["asr_retraining"]["params"]
    assert set(p) == {"profile", "landing_url", "n_trials", "epochs", "force", "promote", "overrides"}
    profiles = sorted(x.stem for x in (REPO / "configs").glob("*.yaml"))
    assert p["profile"]["enum"] == profiles and p["profile"]["default"] == "local"
    assert p["n_trials"]["type"] == ["null", "integer"] and p["n_trials"]["minimum"] == 1
    assert p["epochs"]["type"] == ["null", "integer"] and p["epochs"]["minimum"] == 1
    assert p["force"]["type"] == "boolean" and p["force"]["default"] is False
    assert p["promote"]["type"] == "boolean" and p["promote"]["default"] is True
    assert p["overrides"]["type"] == "array" and p["overrides"]["items"]["type"] == "string"
    for name, schema in p.items():
        assert schema.get("title") and schema.get("description"), name


def test_promote_production_structure(parsed):
    d = parsed["dags"]["asr_promote_production"]
    assert d["cron"] is None and d["timetable"] == "NullTimetable"  # schedule=None: manual only
    t = d["tasks"]
    assert t["canary_check"]["upstream"] == ["choose_action"]
    assert t["promote_production"]["upstream"] == ["canary_check"]
    assert t["rollback"]["upstream"] == ["choose_action"]
    assert d["params"]["rollback"]["type"] == "boolean" and d["params"]["rollback"]["default"] is False
    assert "rollback" in d["doc_md"] and "canary" in d["doc_md"]


def test_overrides_from_params():
    sys.path.insert(0, str(REPO / "dags"))
    try:
        from _common import overrides_from_params
    finally:
        sys.path.remove(str(REPO / "dags"))
    params = {"landing_url": "s3://b/in", "n_trials": 3, "epochs": None, "overrides": ["train.lr=0.01", " "]}
    assert overrides_from_params(params) == [
        "paths.landing_url=s3://b/in",
        "tune.n_trials=3",
        "train.lr=0.01",
    ]
    from pipeline_tasks.config import load_config

    cfg = load_config("tiny", overrides_from_params(params))
    assert cfg.tune.n_trials == 3 and cfg.train.lr == 0.01 and cfg.paths.landing_url == "s3://b/in"

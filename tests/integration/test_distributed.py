"""Distributed mode, for real: Postgres + Redis + MLflow server + Airflow (CeleryExecutor) on loopback.

One module-scoped stack (``devstack.distributed_stack``: own data dirs under
``<repo>/.local/``, free ports, torn down in a ``finally`` also when a test fails) and one run of
``asr_retraining`` on the tiny-sized ``distributed`` profile, triggered through the REST API
and executed by the scheduler and three Celery workers: ``default-1`` and ``default-2`` (queue
``default``) and ``gpu-1`` (queue ``gpu``, the only one that may run ``train``).

While the run is going, the worker that runs ``FAULT_TASK`` is SIGKILLed (its whole process
group, task included). The scheduler notices the dead task through the missing heartbeats
(``task_instance_heartbeat_timeout`` = 20 s in the stack), the task's retry lands on the other
default worker, and the run still succeeds with one Optuna study and one model version.

Every check reads a real server: the REST API (task instances, hostnames, queues, tries), the
Optuna study on Postgres, the MLflow server's registry, the broker (``celery inspect``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from devstack import distributed_stack as ds
from pipeline_tasks.config import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DAG_ID = "asr_retraining"
FAULT_TASK = "evaluate"  # a default-queue task after tuning and training, retried by the DAG
RUN_TIMEOUT_S = 600
N_TUNE_WORKERS = 2


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack():
    (REPO_ROOT / ".local").mkdir(exist_ok=True)
    # not under pytest's 0700 temp dir: the postgres server user must reach its data dir
    d = Path(tempfile.mkdtemp(prefix="dist-test-", dir=REPO_ROOT / ".local"))
    d.chmod(0o755)  # mkdtemp makes it 0700
    ports = ds.free_ports(list(ds.DEFAULT_PORTS))

    started: list[ds.Stack] = []

    def teardown() -> None:
        t = time.monotonic()
        for st in started:
            st.stop()  # the live object also reaps its children
        ds.stop(d)  # from the state file: exactly what start() launched, also if start() failed half-way
        shutil.rmtree(d, ignore_errors=True)
        print(f"stack down in {time.monotonic() - t:.0f}s", flush=True)

    atexit.register(teardown)  # a crash of the test process between here and the finally
    t0 = time.monotonic()
    try:
        st = ds.start(d, ports, default_workers=2, log=lambda m: print(m, flush=True))
        started.append(st)
        st.startup_s = time.monotonic() - t0
        print(f"stack up in {st.startup_s:.0f}s: {st.api_url} {st.mlflow_url}", flush=True)
        yield st
    finally:
        teardown()
        atexit.unregister(teardown)


def _tis(st: ds.Stack, tok: str, run_id: str) -> list[dict[str, Any]]:
    r = st.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", tok, params={"limit": 100})
    r.raise_for_status()
    return r.json()["task_instances"]


def _failure_report(st: ds.Stack, tis: list[dict[str, Any]], run_id: str) -> str:
    """The tail of every failed task's log (what to read when the run did not succeed)."""
    lines = []
    logs = st.artifact_root / "airflow" / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}"
    for ti in tis:
        if ti["state"] in ("failed", "up_for_retry", "upstream_failed"):
            lines.append(f"{ti['task_id']}[{ti['map_index']}]: {ti['state']} on {ti.get('hostname')}")
            for f in sorted(logs.glob(f"task_id={ti['task_id']}/**/*.log"))[-1:]:
                lines.append(f.read_text(errors="replace")[-3000:])
    for name in ("scheduler", "worker-default-1", "worker-default-2", "worker-gpu-1"):
        with_path = st.log_dir / f"{name}.log"
        if with_path.exists():
            lines.append(f"--- {name}.log\n" + with_path.read_text(errors="replace")[-1500:])
    return "\n".join(lines)


@pytest.fixture(scope="module")
def dag_run(stack, tiny_landing, tiny_golden):
    """One asr_retraining run through the scheduler and the Celery workers, with a worker killed mid-task."""
    st = stack
    tok = st.token()
    conf = {
        "profile": "distributed",
        "landing_url": str(tiny_landing),
        "overrides": [f"paths.golden_dir={tiny_golden}", f"tune.n_workers={N_TUNE_WORKERS}"],
    }
    st.wait_dag(DAG_ID)
    r = st.api("PATCH", f"/dags/{DAG_ID}", tok, json={"is_paused": False})
    assert r.status_code == 200, r.text
    r = st.api("POST", f"/dags/{DAG_ID}/dagRuns", tok, json={"logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]

    t0 = time.monotonic()
    kill: dict[str, Any] = {}
    state = "queued"
    tis: list[dict[str, Any]] = []
    tok_t = time.monotonic()
    while time.monotonic() - t0 < RUN_TIMEOUT_S:
        if time.monotonic() - tok_t > 300:
            tok, tok_t = st.token(), time.monotonic()
        tis = _tis(st, tok, run_id)
        if not kill:
            target = next((t for t in tis if t["task_id"] == FAULT_TASK and t["state"] == "running"), None)
            if target and target.get("hostname"):
                worker = target["hostname"]
                proc = st.proc(f"worker-{worker}")
                st.kill(f"worker-{worker}", signal.SIGKILL)  # the worker, its task supervisor and the task
                kill = {
                    "worker": worker,
                    "pgid": proc.pgid,
                    "try_number": target["try_number"],
                    "task_pid": target.get("pid"),
                    "at_s": time.monotonic() - t0,
                }
                print(
                    f"killed worker {worker} (pgid {proc.pgid}) while it ran {FAULT_TASK}: {kill}", flush=True
                )
        dr = st.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}", tok).json()
        state = dr["state"]
        if state in ("success", "failed"):
            break
        time.sleep(1.0)
    wall = time.monotonic() - t0
    tis = _tis(st, st.token(), run_id)
    print(f"run {run_id}: {state} in {wall:.0f}s", flush=True)
    for t in sorted(tis, key=lambda t: t.get("start_date") or ""):
        print(
            f"  {t['task_id']}[{t['map_index']}] {t['state']} on {t.get('hostname')} queue={t.get('queue')} "
            f"try={t.get('try_number')} {t.get('duration')}",
            flush=True,
        )
    return {
        "run_id": run_id,
        "state": state,
        "tis": tis,
        "kill": kill,
        "wall_s": wall,
        "failure": ("" if state == "success" else _failure_report(st, tis, run_id)),
    }


def _xcom(st: ds.Stack, tok: str, run_id: str, task_id: str, map_index: int = -1) -> Any:
    r = st.api(
        "GET",
        f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
        tok,
        params={"map_index": map_index},
    )
    assert r.status_code == 200, r.text
    value = r.json()["value"]
    return json.loads(value) if isinstance(value, str) else value


def _by_task(tis: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return sorted((t for t in tis if t["task_id"] == task_id), key=lambda t: t["map_index"])


# ------------------------------------------------------------------------------------------------
# the stack itself
# ------------------------------------------------------------------------------------------------


def test_stack_is_up_on_loopback_with_routed_workers(stack):
    st = stack
    health = st.api("GET", "/monitor/health").json()
    assert health["metadatabase"]["status"] == "healthy"
    assert health["scheduler"]["status"] == "healthy"
    # the Celery workers answer over the broker and consume exactly their queues
    from celery import Celery

    app = Celery(broker=st.broker_url)
    try:
        queues = app.control.inspect(timeout=5).active_queues() or {}
    finally:
        app.close()
    by_worker = {node.split("@", 1)[0]: sorted(q["name"] for q in qs) for node, qs in queues.items()}
    assert by_worker == {"default-1": ["default"], "default-2": ["default"], "gpu-1": ["gpu"]}
    # Postgres holds the three databases; the MLflow server answers
    con = st._pg_connect()
    try:
        with con.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            dbs = {r[0] for r in cur.fetchall()}
    finally:
        con.close()
    assert {"airflow", "mlflow", "optuna"} <= dbs
    assert ds._http_ok(f"{st.mlflow_url}/health")
    # every recorded process is alive and every port is bound on 127.0.0.1
    assert st.dead() == []
    for port in st.ports.values():
        assert ds.port_open(port, "127.0.0.1")
    state = json.loads(st.state_path.read_text())
    assert {p["name"] for p in state["procs"]} >= {
        "postgres",
        "redis",
        "mlflow",
        "api-server",
        "scheduler",
        "dag-processor",
        "worker-gpu-1",
    }
    # the profile the tasks load points at this stack's servers
    cfg = st.config()
    assert cfg.tune.storage == st.db_url("optuna")
    assert cfg.registry.tracking_uri == st.mlflow_url
    assert cfg.airflow.train_queue == "gpu"


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def test_run_succeeds_through_celery_workers(dag_run, stack):
    assert dag_run["state"] == "success", dag_run["failure"]
    tis = dag_run["tis"]
    ran = [t for t in tis if t["state"] == "success"]
    assert ran, "no task ran"
    workers = set(stack.worker_names())
    # every task that ran was executed by one of the stack's Celery workers
    assert {t["hostname"] for t in ran} <= workers
    # train: routed to the gpu queue and run by the gpu worker; nothing else ran there
    (train,) = _by_task(tis, "train")
    assert train["state"] == "success"
    assert train["queue"] == "gpu" and train["hostname"] == "gpu-1"
    assert train["pool"] == "gpu_pool"
    assert all(t["hostname"] != "gpu-1" for t in ran if t["task_id"] != "train")
    # the tune step fanned out over the requested number of mapped workers
    tune_workers = _by_task(tis, "tune_worker")
    assert [t["map_index"] for t in tune_workers] == list(range(N_TUNE_WORKERS))
    assert all(t["state"] == "success" for t in tune_workers)
    assert _by_task(tis, "promote")[0]["state"] == "success"


def test_tune_workers_share_one_study_on_postgres(dag_run, stack):
    import optuna

    assert dag_run["state"] == "success", dag_run["failure"]
    storage = stack.db_url("optuna")
    summaries = optuna.get_all_study_summaries(storage=storage)
    assert len(summaries) == 1, [s.study_name for s in summaries]  # one study, even with a killed worker
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    finished = [
        t
        for t in study.trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        and not t.user_attrs.get("surplus")
    ]
    cfg = stack.config()
    in_study: dict[int, int] = {}
    for t in finished:
        in_study[int(t.user_attrs["worker"])] = in_study.get(int(t.user_attrs["worker"]), 0) + 1
    assert set(in_study) <= set(range(N_TUNE_WORKERS)), in_study
    # What each mapped tune_worker says it finished is exactly what the Postgres study holds under its
    # index: a worker on a study of its own would report trials the shared study does not have. (How
    # the n_trials split between the workers depends on when each one started, so it is not checked.)
    tok = stack.token()
    reports = [_xcom(stack, tok, dag_run["run_id"], "tune_worker", i) for i in range(N_TUNE_WORKERS)]
    for i, rep in enumerate(reports):
        assert rep["worker"] == i and rep["study_name"] == study.study_name, rep
        assert rep["complete"] + rep["pruned"] == in_study.get(i, 0), (rep, in_study)
    # together they stopped at n_trials: each one counted the other's trials, not only its own
    assert sum(r["complete"] + r["pruned"] for r in reports) == len(finished) == cfg.tune.n_trials
    # the study name the tune step reports is the one on Postgres
    value = _xcom(stack, tok, dag_run["run_id"], "tune_finalize")
    assert value["study_name"] == study.study_name
    assert "asrflow:asrflow@" not in value["storage"]  # the reported storage URL is redacted


def test_model_lands_in_mlflow_server_registry_as_staging(dag_run, stack):
    from mlflow import MlflowClient

    assert dag_run["state"] == "success", dag_run["failure"]
    cfg = stack.config()
    client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
    mv = client.get_model_version_by_alias(cfg.registry.model_name, "staging")
    versions = client.search_model_versions(f"name='{cfg.registry.model_name}'")
    assert [v.version for v in versions] == [mv.version]  # exactly one version: no duplicate registration
    # the artifacts went through the server (--serve-artifacts) into the stack's artifact folder
    served = list((stack.dir / "mlflow" / "artifacts").rglob("*.onnx"))
    assert served, "no ONNX file under the MLflow server's --artifacts-destination"
    run = client.get_run(mv.run_id) if mv.run_id else None
    if run is not None:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")


def test_killed_worker_task_is_retried_on_the_other_worker(dag_run, stack):
    kill = dag_run["kill"]
    assert kill, f"{FAULT_TASK} was never seen running: the fault was not injected"
    killed = kill["worker"]
    assert killed in ("default-1", "default-2")
    # the killed worker's whole process group is gone
    assert not stack.alive(f"worker-{killed}")
    assert not ds._group_alive(kill["pgid"])
    assert dag_run["state"] == "success", dag_run["failure"]
    (ti,) = _by_task(dag_run["tis"], FAULT_TASK)
    assert ti["state"] == "success"
    assert ti["try_number"] > kill["try_number"]
    other = ({"default-1", "default-2"} - {killed}).pop()
    assert ti["hostname"] == other
    # the attempt on the killed worker was failed by the scheduler (missed heartbeats), not left running
    r = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{dag_run['run_id']}/taskInstances/{FAULT_TASK}/tries")
    assert r.status_code == 200, r.text
    tries = {t["try_number"]: t for t in r.json()["task_instances"]}
    first = tries[kill["try_number"]]
    assert first["hostname"] == killed
    assert first["state"] in ("failed", "up_for_retry")
    assert tries[ti["try_number"]]["state"] == "success"
    # no duplicated side effects: one study (checked above too) and one registered model version
    import optuna
    from mlflow import MlflowClient

    assert len(optuna.get_all_study_summaries(storage=stack.db_url("optuna"))) == 1
    cfg = stack.config()
    client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
    assert len(client.search_model_versions(f"name='{cfg.registry.model_name}'")) == 1


# ------------------------------------------------------------------------------------------------
# multi-node training (issue 15): train.nnodes=2 on two Celery GPU workers
# ------------------------------------------------------------------------------------------------

# the same global batch, seed and threads in both layouts; from scratch (no registry parent)
COMMON_TRAIN = ["train.init_from=scratch", "train.torch_threads=1", "train.checkpoint_every_steps=2"]
TWO_NODES = ["train.nnodes=2", "train.world_size=1", "train.rdzv_host=127.0.0.1", "train.rdzv_join_timeout_s=180"]


@pytest.fixture(scope="module")
def two_node_run(dag_run, stack, tiny_landing, tiny_golden):
    """A week with train.nnodes=2, train.world_size=1: a second GPU worker, a pool of two slots,
    two mapped train_node tasks that meet in the c10d rendezvous, then train gathers."""
    st = stack
    st.start_worker("gpu-2", "gpu")
    t_end = time.monotonic() + 180  # (not wait_workers: the fault test killed a default worker on purpose)
    while not any(n.startswith("gpu-2@") for n in st.celery_ping()):
        assert time.monotonic() < t_end and st.alive("worker-gpu-2"), "worker gpu-2 did not come up"
        time.sleep(1.0)
    st.ensure_pool(st.config(), slots=2)
    tok = st.token()
    conf = {
        "profile": "distributed",
        "landing_url": str(tiny_landing),
        "promote": False,
        "overrides": [f"paths.golden_dir={tiny_golden}", "tune.enabled=false", *COMMON_TRAIN, *TWO_NODES],
    }
    r = st.api("POST", f"/dags/{DAG_ID}/dagRuns", tok, json={"logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    t0 = time.monotonic()
    state = "queued"
    while time.monotonic() - t0 < RUN_TIMEOUT_S:
        state = st.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}", tok).json()["state"]
        if state in ("success", "failed"):
            break
        time.sleep(2.0)
    tis = _tis(st, st.token(), run_id)
    print(f"two-node run {run_id}: {state} in {time.monotonic() - t0:.0f}s", flush=True)
    for t in sorted(tis, key=lambda t: t.get("start_date") or ""):
        print(f"  {t['task_id']}[{t['map_index']}] {t['state']} on {t.get('hostname')} queue={t.get('queue')}", flush=True)
    return {"run_id": run_id, "state": state, "tis": tis,
            "failure": "" if state == "success" else _failure_report(st, tis, run_id)}  # fmt: skip


def test_two_train_node_tasks_on_two_gpu_workers_rendezvous_and_train(two_node_run, stack):
    assert two_node_run["state"] == "success", two_node_run["failure"]
    tis = two_node_run["tis"]
    nodes = _by_task(tis, "train_node")
    assert [t["map_index"] for t in nodes] == [0, 1]
    assert all(t["state"] == "success" and t["queue"] == "gpu" and t["pool"] == "gpu_pool" for t in nodes)
    assert {t["hostname"] for t in nodes} == {"gpu-1", "gpu-2"}  # one node per GPU worker
    (train,) = _by_task(tis, "train")
    assert train["state"] == "success" and train["queue"] == "gpu"
    tok = stack.token()
    res = _xcom(stack, tok, two_node_run["run_id"], "train")
    assert res["nnodes"] == 2 and res["world_size"] == 2 and res["steps"] > 0
    assert [n["node_rank"] for n in res["nodes"]] == [0, 1]
    tput = res["throughput"]
    assert [n["node"] for n in tput["nodes"]] == [0, 1] and all(n["audio_s_per_s"] > 0 for n in tput["nodes"])
    assert all(0 < r["allreduce_share"] < 1 for r in tput["ranks"])
    # the MLflow run (server) holds the per-node figures; export/evaluate ran on the gathered model
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_url)
    metrics = client.get_run(res["mlflow_run_id"]).data.metrics
    assert metrics["throughput/node0_audio_s_per_s"] > 0 and metrics["throughput/node1_audio_s_per_s"] > 0
    assert "throughput/rank1_allreduce_share" in metrics
    assert _by_task(tis, "evaluate")[0]["state"] == "success"
    # the step's checkpoint folder (rendezvous record, shared work folder) is gone once published
    assert not (stack.artifact_root / "checkpoints" / "train" / res["key"]).exists()


def test_two_nodes_give_the_weights_of_one_node_with_two_ranks(two_node_run, stack):
    import torch

    from pipeline_tasks.contract import resolve
    from pipeline_tasks.steps import train as train_step

    assert two_node_run["state"] == "success", two_node_run["failure"]
    tok = stack.token()
    run_id = two_node_run["run_id"]
    two = _xcom(stack, tok, run_id, "train")
    inputs = {"split": _xcom(stack, tok, run_id, "split"), "tune": _xcom(stack, tok, run_id, "tune_finalize")}
    cfg1 = stack.config([*COMMON_TRAIN, "train.nnodes=1", "train.world_size=2", "train.launcher=torchrun"])
    one = train_step.run(cfg1, inputs)  # the same week on one node, two ranks
    assert one["key"] != two["key"] and one["steps"] == two["steps"]

    def weights(res):
        return torch.load(resolve(res, res["model_dir"]) / "weights.pt", map_location="cpu", weights_only=True)

    w2, w1 = weights(two), weights(one)
    assert w2.keys() == w1.keys()
    diff = max(float((w2[k] - w1[k]).abs().max()) for k in w1)
    print(f"two nodes vs one node × two ranks: max |Δw| = {diff}", flush=True)
    assert diff <= 1e-6, diff


@pytest.fixture(scope="module")
def killed_node_run(two_node_run, stack, tiny_landing, tiny_golden):
    """A two-node week whose node-1 GPU worker is SIGKILLed mid-training (after a checkpoint):
    node 0's torchrun restarts its rank into a new rendezvous round, the scheduler fails the lost
    attempt (missed heartbeats), its retry runs on a fresh GPU worker and joins, and all ranks
    resume from the last checkpoint."""
    st = stack
    tok = st.token()
    conf = {
        "profile": "distributed",
        "landing_url": str(tiny_landing),
        "promote": False,
        "overrides": [
            f"paths.golden_dir={tiny_golden}", "tune.enabled=false", *COMMON_TRAIN, *TWO_NODES,
            "train.epochs=12", "train.max_restarts=3", "train.rdzv_join_timeout_s=300",
        ],
    }  # fmt: skip
    ck_root = st.artifact_root / "checkpoints" / "train"
    earlier = set(ck_root.glob("*"))  # a folder an earlier failed run left is not this run's
    r = st.api("POST", f"/dags/{DAG_ID}/dagRuns", tok, json={"logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    t0 = time.monotonic()
    kill: dict[str, Any] = {}
    state = "queued"
    while time.monotonic() - t0 < RUN_TIMEOUT_S:
        tis = _tis(st, tok, run_id)
        if not kill:
            node1 = next((t for t in tis if t["task_id"] == "train_node" and t["map_index"] == 1), None)
            latest = [json.loads(p.read_text()) for p in ck_root.glob("*/latest.json") if p.parent not in earlier]
            ckpt_step = max((int(x["step"]) for x in latest), default=0)
            if node1 and node1["state"] == "running" and node1.get("hostname") and ckpt_step >= 4:
                worker = node1["hostname"]
                # the node dies: its Celery worker and the task runner, which Airflow puts in a
                # process group of its own (the launcher follows it: parent-death signal)
                st.kill(f"worker-{worker}", signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.killpg(os.getpgid(int(node1["pid"])), signal.SIGKILL)
                kill = {"worker": worker, "try_number": node1["try_number"], "ckpt_step": ckpt_step,
                        "at_s": time.monotonic() - t0}  # fmt: skip
                print(f"killed GPU worker {worker} while it ran train_node[1]: {kill}", flush=True)
                st.start_worker("gpu-3", "gpu")  # a replacement GPU worker for the retry
        state = st.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}", tok).json()["state"]
        if state in ("success", "failed"):
            break
        time.sleep(1.0)
    tis = _tis(st, st.token(), run_id)
    print(f"killed-node run {run_id}: {state} in {time.monotonic() - t0:.0f}s", flush=True)
    for t in sorted(tis, key=lambda t: t.get("start_date") or ""):
        print(f"  {t['task_id']}[{t['map_index']}] {t['state']} on {t.get('hostname')} try={t.get('try_number')}", flush=True)
    return {"run_id": run_id, "state": state, "tis": tis, "kill": kill,
            "failure": "" if state == "success" else _failure_report(st, tis, run_id)}  # fmt: skip


def test_a_node_killed_mid_training_is_replaced_and_training_resumes(killed_node_run, stack):
    kill = killed_node_run["kill"]
    assert kill, (
        "train_node[1] was never seen running after a checkpoint: the fault was not injected; "
        f"run {killed_node_run['state']}\n{killed_node_run['failure']}"
    )
    assert killed_node_run["state"] == "success", killed_node_run["failure"]
    tis = killed_node_run["tis"]
    n0, n1 = _by_task(tis, "train_node")
    assert n0["try_number"] == 1 and n0["state"] == "success"  # node 0 survived: its torchrun restarted the rank
    assert n1["state"] == "success" and n1["try_number"] > kill["try_number"] and n1["hostname"] != kill["worker"]
    res = _xcom(stack, stack.token(), killed_node_run["run_id"], "train")
    # resumed from a checkpoint, not from step 0; at most one checkpoint interval (2 steps) redone
    assert res["resumed_from"] is not None and res["resumed_from"] >= kill["ckpt_step"]
    assert res["nnodes"] == 2 and res["epochs"] == 12
    # the step published once: one output folder for its key, no temp folder left
    step_dir = stack.artifact_root / "train"
    assert [p.name for p in step_dir.glob(f"{res['key']}*")] == [res["key"]]
    assert not [p for p in step_dir.iterdir() if p.name.startswith(".tmp-")]
    assert not (stack.artifact_root / "checkpoints" / "train" / res["key"]).exists()

"""The DAGs on a real Airflow stack, as a UI user drives them, faults included.

One stack for the module (api-server, scheduler ``--skip-serve-logs`` and dag-processor on
loopback, LocalExecutor, SQLite) on a FRESH tiny artifact root with its own AIRFLOW_HOME and
MLflow registry, shared by the tests below. They run in file order and build on each other:

1. the first run computes every step, and the scheduler's whole process group is SIGKILLed
   while ``train`` runs: the run still succeeds, ``train`` is retried or resumed, and no step
   finished before the kill is redone; it stages version 1 (the tiny ceiling passes);
2. a REST trigger whose params differ from the profile (epochs, an override, ``promote=false``)
   on a fresh train key: the steps used them, and ``promote`` is skipped with its reason;
3. a headless Chromium logs in and triggers with a changed param (that run is then failed at
   once: the form is what is tested);
4. a gate that fails (an unreachable WER ceiling, on a registered model with no champion):
   ``promote`` skipped, ``skip_reason`` set, the registry untouched;
5. ``asr_promote_production``: canary, then ``production`` = version 1;
6. the running ``train`` task's process is SIGKILLed: the retry resumes from the checkpoint;
   that run stages version 2;
7. version 2 goes to production, then ``rollback=true`` puts 1 back and tags 2; a second rollback is a
   no-op.

Trains are made long enough to be caught mid-run with trigger params (more epochs, a checkpoint
every optimizer step), never with sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.dags.conftest import (
    FAST,
    AirflowApi,
    descends_from_group,
    free_port,
    kill_recorded,
    make_root,
    proc_stat,
    tiny_root_cfg,
    xcom_value,
)

DAG = "asr_retraining"
PROMOTE_DAG = "asr_promote_production"

# trigger params of the fault runs: a train long enough to be killed mid-way (tiny: 1 epoch, a
# checkpoint every 5 steps)
KILL_SCHEDULER_CONF = {
    "profile": "tiny",
    "epochs": 6,
    "overrides": [*FAST, "train.checkpoint_every_steps=1"],
}
# with a champion in the registry, these make any candidate pass the gate
GATE_PASSES = ["gate.min_probability=0", "gate.max_slice_regression=10"]
KILL_TASK_CONF = {
    "profile": "tiny",
    "epochs": 5,  # another train key than the first run's
    "overrides": [*FAST, "train.checkpoint_every_steps=1", *GATE_PASSES],
}
# the steps whose result names an output folder with a _SUCCESS.json
STEP_TASKS = ("ingest", "validate", "featurize_finalize", "golden", "split", "tune_finalize")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_landing, tiny_golden):
    from devstack.airflow_env import (
        ADMIN_USER,
        admin_password,
        airflow_env,
        airflow_home,
        setup_airflow,
    )
    from devstack.airflow_ui import Stack

    root = make_root(tmp_path_factory.mktemp("ui-stack"), tiny_landing, tiny_golden)
    cfg = tiny_root_cfg(root)
    port = free_port()
    env = airflow_env(
        cfg,
        port=port,
        extra={
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # manual runs only: unpausing must not start the latest missed Monday run on top of ours
            "ASRFLOW_RETRAIN_SCHEDULE": "none",
            # a task whose supervisor died with the scheduler is noticed after 20 s, not 60
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        },
    )
    setup_airflow(cfg, env)
    st = Stack(env=env, log_dir=airflow_home(cfg) / "test-logs", port=port)
    st.cfg = cfg  # type: ignore[attr-defined]
    st.leftovers = []  # type: ignore[attr-defined]  # (pid, start time) of orphaned task runners
    try:
        st.start_airflow()
        st.wait_healthy(timeout=180)
        api = AirflowApi(st.url, ADMIN_USER, admin_password(cfg))
        api.wait_dag(DAG)
        api.req("PATCH", f"/dags/{DAG}", json={"is_paused": False})
        st.api = api  # type: ignore[attr-defined]
        yield st
    finally:
        st.stop()
        kill_recorded(st.leftovers)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _runs(api: AirflowApi) -> list[dict]:
    return api.get(f"/dags/{DAG}/dagRuns", order_by="-run_after", limit=50)["dag_runs"]


def _x(api: AirflowApi, run_id: str, task: str, key: str = "return_value", dag: str = DAG):
    return xcom_value(api.xcom(dag, run_id, task, key))


def _tis(api: AirflowApi, run_id: str, dag: str = DAG) -> dict[tuple[str, int], dict]:
    return {(t["task_id"], t["map_index"]): t for t in api.task_instances(dag, run_id)}


def _registry(cfg):
    """``(number of versions, staging version, production version)`` of the profile's model."""
    from mlflow import MlflowClient

    from pipeline_tasks.services.registry import alias_version

    name = cfg.registry.model_name
    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri, registry_uri=cfg.registry.tracking_uri)
    n = len(client.search_model_versions(f"name = '{name}'"))
    versions = []
    for alias in ("staging", "production"):
        mv = alias_version(cfg, alias, name)
        versions.append(None if mv is None else str(mv.version))
    return (n, *versions)


def _wait_train_checkpointed(api: AirflowApi, stack, run_id: str, min_step: int = 2, timeout: float = 600) -> dict:
    """Wait until ``train`` is running and has published a checkpoint of step >= ``min_step``;
    returns its task instance."""
    ck = stack.cfg.root / "checkpoints" / "train"
    t0 = time.monotonic()
    while True:
        run = api.run(DAG, run_id)
        tis = _tis(api, run_id)
        states = {k[0]: v["state"] for k, v in tis.items()}
        assert run["state"] in ("queued", "running"), f"run ended before train was caught: {states}"
        assert not (dead := stack.dead()), f"{dead} died; logs in {stack.log_dir}"
        tr = tis.get(("train", -1))
        assert tr is None or tr["state"] != "success", "train finished before it could be killed"
        if tr is not None and tr["state"] == "running":
            for f in ck.glob("*/latest.json"):
                try:
                    step = int(json.loads(f.read_text())["step"])
                except (OSError, ValueError, KeyError):
                    continue
                if step >= min_step:
                    return tr
        assert time.monotonic() - t0 < timeout, f"train never checkpointed: {states}"
        time.sleep(1)


def _attempt_log(stack, run_id: str, task: str, try_number: int) -> str:
    """The local log file of one attempt of a task (Airflow's default log layout)."""
    p = (
        Path(stack.env["AIRFLOW_HOME"]) / "logs" / f"dag_id={DAG}" / f"run_id={run_id}"
        / f"task_id={task}" / f"attempt={try_number}.log"
    )
    return p.read_text(errors="replace") if p.exists() else ""


def _train_runner(stack, train_ti: dict) -> tuple[int, int]:
    """``(pid, start time)`` of the process running ``train`` (the TI's ``pid``), checked to be a
    task runner of this stack's scheduler, leading a process group of its own."""
    pid = train_ti["pid"]
    st = proc_stat(pid) if pid else None
    assert st is not None, f"train's task runner {pid} is not running"
    assert descends_from_group(pid, stack.procs["scheduler"].pid), f"{pid} is not a task of this stack"
    assert st[1] == pid  # Airflow puts each task runner in a process group of its own
    return pid, st[2]


def _finished_before(api: AirflowApi, run_id: str) -> tuple[dict, dict[str, tuple[Path, int, list[Path]]]]:
    """The task instances done now, and for each done step its ``_SUCCESS.json``, that file's
    mtime and every published key of the step (earlier runs' included)."""
    done = {k: v for k, v in _tis(api, run_id).items() if v["state"] in ("success", "skipped")}
    files = {}
    for task in STEP_TASKS:
        if (task, -1) in done and done[(task, -1)]["state"] == "success":
            res = _x(api, run_id, task)
            f = Path(res["output_dir"]) / "_SUCCESS.json"
            files[task] = (f, f.stat().st_mtime_ns, sorted(f.parent.parent.glob("*/_SUCCESS.json")))
    return done, files


def _assert_not_redone(api: AirflowApi, run_id: str, before: dict, files: dict, root: Path) -> dict:
    """Every task done before the fault kept its state and try, every step its one ``_SUCCESS.json``."""
    after = _tis(api, run_id)
    for k, ti in before.items():
        # try 1 (a skipped placeholder: try 0), as before the fault
        assert after[k]["try_number"] == ti["try_number"] <= 1 and after[k]["state"] == ti["state"], (k, after[k])
    for task, (f, mtime, keys) in files.items():
        assert f.stat().st_mtime_ns == mtime, f"{task}: {f} was rewritten"
        # and not computed again under another key
        assert sorted(f.parent.parent.glob("*/_SUCCESS.json")) == keys, task
    assert all(t["state"] in ("success", "skipped") for t in after.values()), {
        k: (v["state"], v["try_number"]) for k, v in after.items()
    }
    return after


# ---------------------------------------------------------------------------------------------
# 1. scheduler kill -9 (its whole process group) while train runs, on a fresh artifact root
# ---------------------------------------------------------------------------------------------
def test_scheduler_group_killed_mid_train_run_recovers_without_redoing(stack):
    """SIGKILL the scheduler's process group (scheduler, LocalExecutor workers, task supervisors)
    while ``train`` runs on a fresh root: every step before it was really computed by this run.
    A new scheduler finishes the run; ``train`` was retried (try 2) or resumed from its
    checkpoint; no step finished before the kill ran again or rewrote its output."""
    api: AirflowApi = stack.api
    root = stack.cfg.root
    assert not (root / "ingest").exists(), "the module's artifact root must be fresh"
    t_trigger = time.time_ns()
    run_id = api.trigger(DAG, KILL_SCHEDULER_CONF)["dag_run_id"]
    train_ti = _wait_train_checkpointed(api, stack, run_id)
    before, files = _finished_before(api, run_id)
    assert set(files) == set(STEP_TASKS), sorted(files)
    for task, (_f, mtime, keys) in files.items():  # computed by this run, not found in a cache
        assert mtime >= t_trigger and len(keys) == 1, f"{task} was not computed by this run"
    runner = _train_runner(stack, train_ti)

    old = stack.procs.pop("scheduler")
    stack.leftovers.append(runner)
    os.killpg(old.pid, signal.SIGKILL)
    old.wait(timeout=30)
    # train's task runner has a process group of its own: it outlives its supervisor, an orphan
    # that either finishes and publishes (the retry then waits for the step lock and finds the
    # result) or dies (the retry resumes from the checkpoint)
    stack.start_component("scheduler")

    done = api.wait_run(DAG, run_id, timeout=600, stack=stack)
    tis = _tis(api, run_id)
    assert done["state"] == "success", {k: (v["state"], v["try_number"]) for k, v in tis.items()}
    tr = _x(api, run_id, "train")
    # the abandoned attempt was reset and tried again; that try lost no work: it found the result
    # the orphaned runner published (after waiting for the step lock), or resumed its checkpoint
    assert tis[("train", -1)]["try_number"] == 2, tis[("train", -1)]
    log2 = _attempt_log(stack, run_id, "train", 2)
    assert tr["resumed_from"] is not None or "already done, returning the published result" in log2, (
        "the retried train started over"
    )
    _assert_not_redone(api, run_id, before, files, root)
    # the trigger's params reached train (profile: 1 epoch, a checkpoint every 5 steps)
    assert tr["epochs"] == KILL_SCHEDULER_CONF["epochs"]
    # the featurize shards of this fresh root were mapped over the plan (dynamic task mapping)
    plan = _x(api, run_id, "featurize_plan")
    assert plan, "a fresh root has utterances to featurize"
    shards = sorted(k[1] for k in tis if k[0] == "featurize_shard")
    assert shards == list(range(len(plan)))
    assert all(tis[("featurize_shard", i)]["state"] == "success" for i in shards)
    # the first candidate of an empty registry passes the tiny ceiling: version A is staged
    assert tis[("promote", -1)]["state"] == "success"
    assert _registry(stack.cfg)[:2] == (1, "1")


# ---------------------------------------------------------------------------------------------
# 2. REST trigger params reach the steps; promote=false skips promote
# ---------------------------------------------------------------------------------------------
def test_rest_trigger_params_reach_the_steps_and_promote_false_skips(stack):
    """Params that differ from the tiny profile, on a fresh train key: train ran 2 epochs with
    the overridden checkpoint interval, tune used 1 trial, and ``promote=false`` skipped ``promote`` although
    the gate passed: no version registered, ``staging`` where it was."""
    import mlflow

    api: AirflowApi = stack.api
    cfg = stack.cfg
    registry_before = _registry(cfg)
    conf = {
        "profile": "tiny",
        "epochs": 2,
        "n_trials": 1,
        "promote": False,
        # an operational train setting: a new train key, the tuning study of the first run
        "overrides": [*FAST, "train.checkpoint_every_steps=3", *GATE_PASSES],
    }
    t_trigger = time.time_ns()
    run = api.trigger(DAG, conf)
    assert run["conf"]["epochs"] == 2 and run["conf"]["promote"] is False
    done = api.wait_run(DAG, run["dag_run_id"], timeout=480, stack=stack)
    rid = run["dag_run_id"]
    tis = _tis(api, rid)
    assert done["state"] == "success", {k: v["state"] for k, v in tis.items()}
    assert tis[("train", -1)]["pool"] == "gpu_pool"
    # train computed anew (a fresh key), with the trigger's epochs and override
    tr = _x(api, rid, "train")
    assert (Path(tr["output_dir"]) / "_SUCCESS.json").stat().st_mtime_ns >= t_trigger
    assert tr["epochs"] == 2 and not tr["stopped_early"]
    params = mlflow.MlflowClient(cfg.registry.tracking_uri).get_run(tr["mlflow_run_id"]).data.params
    assert params["train.epochs"] == "2" and params["train.checkpoint_every_steps"] == "3"
    tune = _x(api, rid, "tune_finalize")
    assert tune["n_trials_complete"] + tune["n_trials_pruned"] == 1
    # the gate passed; promote=false alone kept promote from running
    ev = _x(api, rid, "evaluate")
    assert ev["passed"] is True, ev["reason"]
    gate = _x(api, rid, "promote_gate", "gate")
    assert gate["promote"] is False and gate["reason"].startswith("promote=false")
    assert _x(api, rid, "promote_gate", "skip_reason") == gate["reason"]
    assert tis[("promote_gate", -1)]["state"] == "success" and tis[("promote", -1)]["state"] == "skipped"
    assert _registry(cfg) == registry_before


# ---------------------------------------------------------------------------------------------
# 3. the trigger form in a real browser
# ---------------------------------------------------------------------------------------------
def _chrome(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
        "--window-size=1400,1000",
    ):
        opts.add_argument(a)
    return webdriver.Chrome(
        options=opts, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    )


def _mark_failed(api: AirflowApi, run_id: str, tries: int = 10) -> None:
    """Mark a run failed (the UI's "mark as failed"); retried while SQLite is busy (HTTP 500)."""
    for _ in range(tries):
        r = api.s.patch(f"{api.base}/api/v2/dags/{DAG}/dagRuns/{run_id}", json={"state": "failed"}, timeout=60)
        if r.status_code == 200:
            return
        assert r.status_code == 500, r.text
        time.sleep(2)
    raise AssertionError(f"could not mark {run_id} failed: {r.text}")


@pytest.mark.browser
def test_browser_trigger_with_changed_param(stack, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from devstack.airflow_env import ADMIN_USER, admin_password

    api: AirflowApi = stack.api
    before = {r["dag_run_id"] for r in _runs(api)}
    d = _chrome(tmp_path)
    wait = WebDriverWait(d, 60)
    new: list[dict] = []
    try:
        d.get(stack.url + "/")
        wait.until(EC.presence_of_element_located((By.NAME, "username"))).send_keys(ADMIN_USER)
        d.find_element(By.NAME, "password").send_keys(admin_password(stack.cfg))
        d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(lambda drv: "/auth/login" not in drv.current_url)
        d.get(f"{stack.url}/dags/{DAG}")
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "button[aria-label='Trigger Dag']"))).click()
        epochs = wait.until(EC.element_to_be_clickable((By.NAME, "element_epochs")))
        epochs.send_keys(Keys.CONTROL, "a")
        epochs.send_keys("2")
        overrides = d.find_element(By.NAME, "element_overrides")
        overrides.send_keys(Keys.CONTROL, "a")
        overrides.send_keys("\n".join(FAST))
        d.save_screenshot(str(tmp_path / "trigger-form.png"))
        buttons = [
            b
            for b in d.find_elements(By.TAG_NAME, "button")
            if (b.get_attribute("textContent") or "").strip() == "Trigger"
            and b.get_attribute("aria-label") != "Trigger Dag"  # the page's button that opened the form
        ]
        assert buttons, "no Trigger button in the trigger form"
        d.execute_script("arguments[0].scrollIntoView(true);", buttons[-1])
        buttons[-1].click()
        # the run appears through the REST API with the changed param
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and not new:
            new = [r for r in _runs(api) if r["dag_run_id"] not in before]
            time.sleep(1)
        d.save_screenshot(str(tmp_path / "after-trigger.png"))
    finally:
        d.quit()
        for r in new:  # only the form is under test here: stop that run at once
            _mark_failed(api, r["dag_run_id"])
    assert (tmp_path / "trigger-form.png").stat().st_size > 10_000
    assert len(new) == 1, "the UI trigger did not create a run"
    assert new[0]["conf"]["epochs"] == 2
    assert new[0]["conf"]["overrides"] == FAST
    assert new[0]["conf"]["profile"] == "tiny"  # the form's default (ASRFLOW_PROFILE of the stack)
    # nothing of that run keeps running into the next test
    t0 = time.monotonic()
    while any(t["state"] in ("running", "queued") for t in api.task_instances(DAG, new[0]["dag_run_id"])):
        assert time.monotonic() - t0 < 120, "the failed run's tasks did not stop"
        time.sleep(1)


# ---------------------------------------------------------------------------------------------
# 4. a failing gate through the DAG
# ---------------------------------------------------------------------------------------------
def test_failing_gate_skips_promote(stack):
    """The first run's model (cached: train, export) judged for a registered model that has no
    champion, against a WER ceiling no model can meet: ``evaluate`` fails the gate (a normal
    outcome, the task succeeds), ``promote_gate`` skips ``promote`` with the reason in XCom, and
    no registry changes."""
    from mlflow import MlflowClient

    api: AirflowApi = stack.api
    cfg = stack.cfg
    registry_before = _registry(cfg)
    fresh_name = "asr_gate_test"
    conf = {
        **KILL_SCHEDULER_CONF,
        "overrides": [
            *KILL_SCHEDULER_CONF["overrides"],
            f"registry.model_name={fresh_name}",
            "gate.absolute_wer_ceiling=0.0",
        ],
    }
    run = api.trigger(DAG, conf)
    rid = run["dag_run_id"]
    done = api.wait_run(DAG, rid, timeout=480, stack=stack)
    tis = _tis(api, rid)
    assert done["state"] == "success", {k: v["state"] for k, v in tis.items()}
    ev = _x(api, rid, "evaluate")
    assert ev["passed"] is False and ev["champion_version"] is None
    assert "absolute ceiling" in ev["reason"], ev["reason"]
    gate = _x(api, rid, "promote_gate", "gate")
    assert gate["promote"] is False and gate["reason"].startswith("gate failed")
    assert _x(api, rid, "promote_gate", "skip_reason") == gate["reason"]
    assert tis[("evaluate", -1)]["state"] == "success"
    assert tis[("promote_gate", -1)]["state"] == "success" and tis[("promote", -1)]["state"] == "skipped"
    assert _registry(cfg) == registry_before
    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri, registry_uri=cfg.registry.tracking_uri)
    assert client.search_registered_models(f"name = '{fresh_name}'") == []


# ---------------------------------------------------------------------------------------------
# 5. staging -> production through the manual DAG
# ---------------------------------------------------------------------------------------------
def _promote_run(api: AirflowApi, stack, conf: dict) -> tuple[str, dict]:
    run = api.trigger(PROMOTE_DAG, {"profile": "tiny", **conf})
    done = api.wait_run(PROMOTE_DAG, run["dag_run_id"], timeout=300, stack=stack)
    tis = {t["task_id"]: t["state"] for t in api.task_instances(PROMOTE_DAG, run["dag_run_id"])}
    assert done["state"] == "success", tis
    return run["dag_run_id"], tis


# the tiny model's WER is far above the default canary bar: lift it for these runs
CANARY_PASSES = {"rollback": False, "overrides": ["registry.canary_max_wer=1.5"]}


def test_promote_production_through_the_dag(stack):
    """The manual production DAG: canary on the staging model, then ``production`` = staging."""
    api: AirflowApi = stack.api
    api.wait_dag(PROMOTE_DAG)
    api.req("PATCH", f"/dags/{PROMOTE_DAG}", json={"is_paused": False})
    n, staging, production = _registry(stack.cfg)
    assert (n, staging, production) == (1, "1", None), "the first test should have staged version 1"

    rid, tis = _promote_run(api, stack, CANARY_PASSES)
    assert tis == {
        "choose_action": "success",
        "canary_check": "success",
        "promote_production": "success",
        "rollback": "skipped",
    }
    canary = _x(api, rid, "canary_check", dag=PROMOTE_DAG)
    assert canary["passed"] is True and canary["version"] == "1"
    assert _registry(stack.cfg) == (1, "1", "1")


# ---------------------------------------------------------------------------------------------
# 6. the running train task's process killed -9
# ---------------------------------------------------------------------------------------------
def test_train_task_process_killed_is_retried_from_its_checkpoint(stack):
    """SIGKILL the process group of the task runner executing ``train`` (its supervisor lives
    and reports the death): the retry (try 2) resumes from the last checkpoint, the run
    succeeds, nothing finished before the kill runs again, and the model is staged."""
    api: AirflowApi = stack.api
    run_id = api.trigger(DAG, KILL_TASK_CONF)["dag_run_id"]
    train_ti = _wait_train_checkpointed(api, stack, run_id)
    before, files = _finished_before(api, run_id)
    pid, _ = _train_runner(stack, train_ti)
    os.killpg(pid, signal.SIGKILL)

    done = api.wait_run(DAG, run_id, timeout=600, stack=stack)
    tis = _tis(api, run_id)
    assert done["state"] == "success", {k: (v["state"], v["try_number"]) for k, v in tis.items()}
    tr = _x(api, run_id, "train")
    assert tis[("train", -1)]["try_number"] == 2
    assert tr["resumed_from"] is not None and tr["resumed_from"] >= 2, tr["resumed_from"]
    assert tr["epochs"] == KILL_TASK_CONF["epochs"]
    _assert_not_redone(api, run_id, before, files, stack.cfg.root)
    # the gate passed (GATE_PASSES) and the new candidate is version 2 on staging
    assert tis[("promote", -1)]["state"] == "success"
    assert _registry(stack.cfg) == (2, "2", "1")


# ---------------------------------------------------------------------------------------------
# 7. rollback through the DAG
# ---------------------------------------------------------------------------------------------
def test_rollback_through_the_dag(stack):
    """Version 2 goes to production (version 1 becomes previous-production); ``rollback=true``
    puts version 1 back and tags version 2 as rolled back; a second rollback changes nothing."""
    from mlflow import MlflowClient

    from pipeline_tasks.services.registry import TAG_ROLLED_BACK, alias_version

    api: AirflowApi = stack.api
    cfg = stack.cfg
    assert _registry(cfg) == (2, "2", "1"), "the earlier tests should have left v2 staging, v1 production"
    rid, tis = _promote_run(api, stack, CANARY_PASSES)
    assert tis["promote_production"] == "success"
    assert _registry(cfg) == (2, "2", "2")
    prev = alias_version(cfg, "previous-production", cfg.registry.model_name)
    assert prev is not None and str(prev.version) == "1"

    rid, tis = _promote_run(api, stack, {"rollback": True})
    assert tis == {
        "choose_action": "success",
        "canary_check": "skipped",
        "promote_production": "skipped",
        "rollback": "success",
    }
    rb = _x(api, rid, "rollback", dag=PROMOTE_DAG)
    assert rb["rolled_back"] is True and rb["version"] == "1" and rb["rolled_back_version"] == "2"
    assert _registry(cfg) == (2, "2", "1")
    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri, registry_uri=cfg.registry.tracking_uri)
    assert client.get_model_version(cfg.registry.model_name, "2").tags.get(TAG_ROLLED_BACK) == "true"
    assert client.get_model_version(cfg.registry.model_name, "1").tags.get(TAG_ROLLED_BACK) is None

    rid, tis = _promote_run(api, stack, {"rollback": True})
    assert tis["rollback"] == "success"
    rb = _x(api, rid, "rollback", dag=PROMOTE_DAG)
    assert rb["rolled_back"] is False and rb.get("already_rolled_back") is True and rb["version"] == "1"
    assert _registry(cfg) == (2, "2", "1")

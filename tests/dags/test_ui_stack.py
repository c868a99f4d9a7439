"""The DAG on a real Airflow stack, as a UI user drives it.

One stack for the module (api-server, scheduler ``--skip-serve-logs`` and dag-processor on
loopback, LocalExecutor, SQLite, a temporary AIRFLOW_HOME under a fresh tiny artifact root),
shared by the tests below, which run in file order:

1. the manual trigger through the REST API with custom params, polled to success, the gate's
   result read back from XCom;
2. a real headless Chromium that logs in, opens the DAG, changes a param in the trigger form
   and triggers it;
3. the scheduler killed during a run and started again: the run completes and finished steps
   are not redone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.dags.conftest import FAST, AirflowApi, free_port, tiny_root_cfg

DAG = "asr_retraining"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(dags_root):
    from devstack.airflow_env import (
        ADMIN_USER,
        admin_password,
        airflow_env,
        airflow_home,
        setup_airflow,
    )
    from devstack.airflow_ui import Stack

    cfg = tiny_root_cfg(dags_root)
    port = free_port()
    # manual runs only: unpausing must not start the latest missed Monday run on top of ours
    env = airflow_env(
        cfg,
        port=port,
        extra={"AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5", "ASRFLOW_RETRAIN_SCHEDULE": "none"},
    )
    setup_airflow(cfg, env)
    st = Stack(env=env, log_dir=airflow_home(cfg) / "test-logs", port=port)
    st.cfg = cfg  # type: ignore[attr-defined]
    st.extra_groups = []  # type: ignore[attr-defined]
    try:
        st.start_airflow()
        st.wait_healthy(timeout=180)
        api = AirflowApi(st.url, ADMIN_USER, admin_password(cfg))
        api.wait_dag(DAG)
        st.api = api  # type: ignore[attr-defined]
        yield st
    finally:
        st.stop()
        for pgid in st.extra_groups:  # type: ignore[attr-defined]
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _runs(api: AirflowApi) -> list[dict]:
    return api.get(f"/dags/{DAG}/dagRuns", order_by="-run_after", limit=50)["dag_runs"]


def test_rest_manual_trigger_with_params(stack):
    api: AirflowApi = stack.api
    api.req("PATCH", f"/dags/{DAG}", json={"is_paused": False})
    conf = {"profile": "tiny", "epochs": 1, "n_trials": 1, "promote": True, "overrides": FAST}
    run = api.trigger(DAG, conf)
    assert run["conf"]["n_trials"] == 1
    done = api.wait_run(DAG, run["dag_run_id"], timeout=480, stack=stack)
    tis = {(t["task_id"], t["map_index"]): t for t in api.task_instances(DAG, run["dag_run_id"])}
    assert done["state"] == "success", {k: v["state"] for k, v in tis.items()}
    # the train task ran in the GPU pool
    assert tis[("train", -1)]["pool"] == "gpu_pool"
    # the featurize shards were mapped over the plan (dynamic task mapping); an empty plan
    # (nothing new to featurize in this shared root) leaves one skipped placeholder
    plan = api.xcom(DAG, run["dag_run_id"], "featurize_plan")
    plan = json.loads(plan) if isinstance(plan, str) else plan
    shard_tis = [v for (tid, _), v in tis.items() if tid == "featurize_shard"]
    if plan:
        assert sorted(t["map_index"] for t in shard_tis) == list(range(len(plan)))
        assert all(t["state"] == "success" for t in shard_tis)
    else:
        assert [t["state"] for t in shard_tis] == ["skipped"]
    assert tis[("featurize_finalize", -1)]["state"] == "success"
    # the gate's decision, read back through the REST API
    ev = api.xcom(DAG, run["dag_run_id"], "evaluate")
    ev = json.loads(ev) if isinstance(ev, str) else ev
    assert isinstance(ev["passed"], bool) and isinstance(ev["candidate_wer"], float)
    gate = api.xcom(DAG, run["dag_run_id"], "promote_gate", "gate")
    gate = json.loads(gate) if isinstance(gate, str) else gate
    assert gate["promote"] == ev["passed"]
    promote_state = tis[("promote", -1)]["state"]
    assert promote_state == ("success" if ev["passed"] else "skipped")
    # the tasks used the run's params: the train step saw epochs=1 from the trigger
    tr = api.xcom(DAG, run["dag_run_id"], "train")
    tr = json.loads(tr) if isinstance(tr, str) else tr
    assert tr["epochs"] == 1


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
        new = []
        while time.monotonic() - t0 < 60 and not new:
            new = [r for r in _runs(api) if r["dag_run_id"] not in before]
            time.sleep(1)
        d.save_screenshot(str(tmp_path / "after-trigger.png"))
    finally:
        d.quit()
    assert (tmp_path / "trigger-form.png").stat().st_size > 10_000
    assert len(new) == 1, "the UI trigger did not create a run"
    assert new[0]["conf"]["epochs"] == 2
    assert new[0]["conf"]["overrides"] == FAST
    assert new[0]["conf"]["profile"] == "tiny"  # the form's default (ASRFLOW_PROFILE of the stack)


def _success_file(root: Path, step: str, key: str) -> Path:
    return root / step / key / "_SUCCESS.json"


def test_scheduler_killed_mid_run_resumes_without_redoing(stack):
    """Kill -9 the scheduler while a run is in flight, start a new one: the run finishes and
    the steps that had finished are not run again (try_number 1, outputs untouched)."""
    api: AirflowApi = stack.api
    api.req("PATCH", f"/dags/{DAG}", json={"is_paused": False})
    active = [r for r in _runs(api) if r["state"] in ("queued", "running")]
    if active:  # the browser test's run (epochs=2: a new training run) — use it
        run_id = active[0]["dag_run_id"]
    else:
        run_id = api.trigger(DAG, {"profile": "tiny", "epochs": 3, "overrides": FAST})["dag_run_id"]

    # wait until ingest has finished and the run is still going
    t0 = time.monotonic()
    while True:
        assert time.monotonic() - t0 < 300, "ingest did not finish"
        tis = {t["task_id"]: t for t in api.task_instances(DAG, run_id) if t["map_index"] in (-1, None)}
        if tis.get("ingest", {}).get("state") == "success":
            break
        time.sleep(1)
    assert api.run(DAG, run_id)["state"] == "running"
    ingest = api.xcom(DAG, run_id, "ingest")
    ingest = json.loads(ingest) if isinstance(ingest, str) else ingest
    success = _success_file(stack.cfg.root, "ingest", ingest["key"])
    mtime = success.stat().st_mtime_ns

    # kill -9 the scheduler (its task processes are left to finish or be reaped), start a new one
    old = stack.procs.pop("scheduler")
    os.kill(old.pid, signal.SIGKILL)
    old.wait(timeout=30)
    stack.extra_groups.append(old.pid)
    time.sleep(3)
    stack.start_component("scheduler")

    done = api.wait_run(DAG, run_id, timeout=480, stack=stack)
    tis = {(t["task_id"], t["map_index"]): t for t in api.task_instances(DAG, run_id)}
    assert done["state"] == "success", {k: (v["state"], v["try_number"]) for k, v in tis.items()}
    assert tis[("ingest", -1)]["try_number"] == 1
    assert success.stat().st_mtime_ns == mtime
    assert all(t["state"] in ("success", "skipped") for t in tis.values())


def test_promote_production_and_rollback(stack):
    """The manual production DAG: canary + staging → production, then the rollback branch."""
    from pipeline_tasks.services.registry import alias_version

    api: AirflowApi = stack.api
    dag = "asr_promote_production"
    api.wait_dag(dag)
    api.req("PATCH", f"/dags/{dag}", json={"is_paused": False})
    cfg = stack.cfg
    staging = alias_version(cfg, "staging", cfg.registry.model_name)
    assert staging is not None, "asr_retraining should have staged a version"

    # the tiny model's WER is far above the default canary bar: lift it for this run
    run = api.trigger(
        dag, {"profile": "tiny", "rollback": False, "overrides": ["registry.canary_max_wer=1.5"]}
    )
    done = api.wait_run(dag, run["dag_run_id"], timeout=300, stack=stack)
    tis = {t["task_id"]: t["state"] for t in api.task_instances(dag, run["dag_run_id"])}
    assert done["state"] == "success", tis
    assert tis == {
        "choose_action": "success",
        "canary_check": "success",
        "promote_production": "success",
        "rollback": "skipped",
    }
    canary = api.xcom(dag, run["dag_run_id"], "canary_check")
    canary = json.loads(canary) if isinstance(canary, str) else canary
    assert canary["passed"] is True and canary["version"] == str(staging.version)
    prod = alias_version(cfg, "production", cfg.registry.model_name)
    assert prod is not None and prod.version == staging.version

    run = api.trigger(dag, {"profile": "tiny", "rollback": True})
    done = api.wait_run(dag, run["dag_run_id"], timeout=300, stack=stack)
    tis = {t["task_id"]: t["state"] for t in api.task_instances(dag, run["dag_run_id"])}
    assert done["state"] == "success", tis
    assert tis["rollback"] == "success" and tis["canary_check"] == "skipped"
    assert tis["promote_production"] == "skipped"
    rb = api.xcom(dag, run["dag_run_id"], "rollback")
    rb = json.loads(rb) if isinstance(rb, str) else rb
    assert "rolled_back" in rb and rb["reason"]

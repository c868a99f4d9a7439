"""``make pipeline-local``: the whole ``asr_retraining`` DAG through Airflow itself, on this machine.

    python -m devstack.local_run --profile local [--week N] [--set key=value ...]

From a fresh clone it

1. fills an empty landing zone with week 1 of the embedded synthetic corpus (``--week N``
   adds week N instead) and synthesizes the golden set if it is missing;
2. prepares the embedded Airflow (SQLite metadata DB under the artifact root, ``gpu_pool``);
3. runs ``airflow dags test asr_retraining <logical date>`` (one process, the real DAG,
   scheduler-free) with Airflow's own log in ``<root>/airflow/local_run-<date>.log``, printing a
   line per task start and finish;
4. prints a summary: the gate's figures, the registered model and where to look at it.

The logical date is the Monday 03:00 UTC of the data week (week 1 = 2026-01-05), never
"now", so a rerun on unchanged data is the same run again and every step is a cache hit.
Nothing here imports Airflow: it drives the ``airflow`` command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from devstack.airflow_env import airflow_bin, airflow_env, airflow_home, setup_airflow
from devstack.airflow_state import AirflowState
from devstack.procs import stop_group
from pipeline_tasks.config import REPO_ROOT, AsrflowConfig, load_config
from pipeline_tasks.graph import STEPS

DAG_ID = "asr_retraining"
WEEK1_MONDAY = datetime(2026, 1, 5, 3, 0, tzinfo=UTC)  # a Monday, the schedule's 03:00 UTC

_START = re.compile(r"\[DAG TEST\] starting task_id=(\S+) map_index=(-?\d+)")
_END = re.compile(r"\[DAG TEST\] end task task_id=(\S+) map_index=(-?\d+)")
_RUN_ID = re.compile(rf"<TaskInstance: {DAG_ID}\.\S+ (\S+)")
_FINISHED = re.compile(r"DagRun Finished: .*state=(\w+)")


def say(msg: str = "") -> None:
    print(msg, flush=True)


def logical_date_for_week(week: int) -> datetime:
    """Monday 03:00 UTC of data week ``week`` (1-based): deterministic, so reruns are identical."""
    return WEEK1_MONDAY + timedelta(weeks=max(week, 1) - 1)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def landing_weeks(landing: Path) -> list[int]:
    weeks = []
    for p in landing.glob("week-*/manifest.jsonl"):
        m = re.fullmatch(r"week-(\d+)", p.parent.name)
        if m:
            weeks.append(int(m.group(1)))
    return sorted(weeks)


def ensure_data(cfg: AsrflowConfig, week: int | None) -> int:
    """Synthesize the data this run needs; returns the data week the run stands for."""
    from synth import corpus

    c = cfg.corpus
    landing_url = cfg.paths.landing_url
    if not _is_local(landing_url):
        say(f"landing zone {landing_url} is remote: using what is there")
        return week or 1
    landing = _local_path(landing_url)
    have = landing_weeks(landing)
    wanted = ([1] if not have else []) + ([week] if week is not None else [])
    for want in sorted(set(wanted) - set(have)):
        say(f"• synthesizing week {want}: {c.utterances_per_week} utterances into {landing} (espeak-ng) ...")
        t0 = time.monotonic()
        res = corpus.generate_week(
            landing,
            week=want,
            utterances=c.utterances_per_week,
            seed=c.seed,
            jobs=c.jobs,
            long_form_share=c.long_form_share,
            noise_snr_db=tuple(c.noise_snr_db),
        )
        say(f"  {res['n']} utterances, {res['hours']:.2f} h of speech in {time.monotonic() - t0:.0f}s")
    have = landing_weeks(landing)
    golden = Path(cfg.paths.golden_dir)
    if not (golden / "manifest.jsonl").exists():
        say(f"• synthesizing the golden set: {c.golden_utterances} utterances into {golden} ...")
        t0 = time.monotonic()
        res = corpus.generate_golden(
            golden,
            utterances=c.golden_utterances,
            seed=c.seed,
            jobs=c.jobs,
            long_form_share=c.long_form_share,
            noise_snr_db=tuple(c.noise_snr_db),
        )
        say(f"  {res['n']} utterances in {time.monotonic() - t0:.0f}s")
    return week if week is not None else (max(have) if have else 1)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def state_db(env: dict[str, str]) -> AirflowState:
    """The run's Airflow state, read through Airflow's models (cheap once Airflow is imported)."""
    return AirflowState(env)


def _label(task_id: str, map_index: str | int) -> str:
    return task_id if int(map_index) < 0 else f"{task_id}[{map_index}]"


def run_dag(
    cfg: AsrflowConfig, env: dict[str, str], logical_date: datetime, conf: dict[str, Any], log_path: Path
) -> tuple[str, str | None]:
    """``airflow dags test`` with live progress; returns (dag run state, run_id)."""
    cmd = [airflow_bin(), "dags", "test", DAG_ID, logical_date.isoformat(), "-c", json.dumps(conf)]
    say(f"• airflow dags test {DAG_ID} {logical_date.isoformat()}   (Airflow's log: {log_path})")
    started: dict[str, float] = {}
    run_id: str | None = None
    final_state = "failed"
    t0 = time.monotonic()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=str(REPO_ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                if m := _START.search(line):
                    label = _label(*m.groups())
                    started[label] = time.monotonic()
                    say(f"  {time.monotonic() - t0:6.0f}s  ▶ {label}")
                elif m := _END.search(line):
                    label = _label(*m.groups())
                    dur = time.monotonic() - started.get(label, time.monotonic())
                    state = "?"
                    if run_id:
                        with contextlib.suppress(Exception):  # the run is writing: a busy DB is fine
                            for ti in state_db(env).task_states(DAG_ID, run_id):
                                if _label(ti["task_id"], ti["map_index"]) == label:
                                    state = ti["state"]
                    mark = {"success": "✔", "failed": "✘", "skipped": "⤼", "up_for_retry": "↻"}.get(
                        state, "•"
                    )
                    say(f"  {time.monotonic() - t0:6.0f}s  {mark} {label}: {state} in {dur:.1f}s")
                elif run_id is None and (m := _RUN_ID.search(line)):
                    run_id = m.group(1)
                elif m := _FINISHED.search(line):
                    final_state = m.group(1)
            proc.wait()
        except KeyboardInterrupt:
            say("interrupted: stopping airflow dags test ...")
            stop_group(proc)
            raise
        finally:
            if proc.poll() is None:
                stop_group(proc)
    if proc.returncode != 0 and final_state == "success":
        final_state = "failed"
    return final_state, run_id


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x, nd) for x in v) + "]"
    return str(v)


STEP_TASKS = tuple(s.result_task for s in STEPS)  # the task holding each step's result record


def step_freshness(env: dict[str, str], run_id: str, since: float) -> tuple[list[str], list[str]]:
    """Which steps of the run wrote their output now (``_SUCCESS.json`` newer than ``since``) vs cached."""
    recomputed, cached = [], []
    for task_id in STEP_TASKS:
        res = state_db(env).xcom(DAG_ID, run_id, task_id)
        if not isinstance(res, dict) or not res.get("output_dir"):
            continue
        marker = Path(res["output_dir"]) / "_SUCCESS.json"
        step = res.get("step", task_id)
        try:
            (recomputed if marker.stat().st_mtime >= since else cached).append(step)
        except FileNotFoundError:
            recomputed.append(step)
    return recomputed, cached


def summary(
    cfg: AsrflowConfig, env: dict[str, str], run_id: str, state: str, wall_s: float, run_started: float
) -> dict[str, Any]:
    db = state_db(env)
    tis = db.task_states(DAG_ID, run_id)
    ev = db.xcom(DAG_ID, run_id, "evaluate") or {}
    gate = db.xcom(DAG_ID, run_id, "promote_gate", "gate") or {}
    skip_reason = db.xcom(DAG_ID, run_id, "promote_gate", "skip_reason")
    prom = db.xcom(DAG_ID, run_id, "promote") or {}
    ex = db.xcom(DAG_ID, run_id, "export") or {}
    tr = db.xcom(DAG_ID, run_id, "train") or {}
    tu = db.xcom(DAG_ID, run_id, "tune_finalize") or {}
    steps_run = {ti["task_id"]: ti["state"] for ti in tis}
    say("")
    say(f"══ asr_retraining {run_id}: {state.upper()} in {wall_s:.0f}s ══")
    counts: dict[str, int] = {}
    for ti in tis:
        counts[ti["state"] or "none"] = counts.get(ti["state"] or "none", 0) + 1
    say("tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    recomputed, cached = step_freshness(env, run_id, run_started)
    say(f"steps recomputed in this run: {', '.join(recomputed) or 'none'}")
    say(f"steps served from cache:      {', '.join(cached) or 'none'}")
    why_skipped = {
        "featurize_shard": "no new utterances to featurize",
        "tune_worker": "tuning disabled (tune.enabled=false)",
        "promote": skip_reason or gate.get("reason", ""),
    }
    for ti in tis:
        if ti["state"] != "success":
            why = why_skipped.get(ti["task_id"], "") if ti["state"] == "skipped" else ""
            say(f"  {_label(ti['task_id'], ti['map_index'])}: {ti['state']}" + (f" ({why})" if why else ""))
    if ev:
        say("gate (golden set):")
        say(f"  candidate WER {_fmt(ev.get('candidate_wer'))}  CER {_fmt(ev.get('candidate_cer'))}")
        say(
            f"  champion  WER {_fmt(ev.get('champion_wer'))} (version {_fmt(ev.get('champion_version'))})"
            f"  P(better) {_fmt(ev.get('p_better'), 3)}  95% CI of ΔWER {_fmt(ev.get('ci95'))}"
        )
        say(f"  decision: {'PASS' if ev.get('passed') else 'FAIL'} — {ev.get('reason', '')}")
    if tu.get("enabled"):
        say(
            f"tune: {tu.get('n_trials_complete')} complete + {tu.get('n_trials_pruned')} pruned trial(s), "
            f"best {tu.get('metric', 'dev_wer')} {_fmt(tu.get('best_value'))} (trial {tu.get('best_trial')})"
            + (f"; {tu['no_signal']}" if tu.get("no_signal") else "")
        )
    if tr:
        say(
            f"train: dev WER {_fmt(tr.get('dev_wer'))} CER {_fmt(tr.get('dev_cer'))}, {tr.get('epochs')} epoch(s),"
            f" {tr.get('steps')} steps, {_fmt(tr.get('wall_s'), 0)}s"
        )
    if ex:
        say(f"export: {Path(ex.get('output_dir', '')) / str(ex.get('onnx', ''))}")
    model = cfg.registry.model_name
    if prom:
        fresh = prom.get("new_version_created") and (
            (Path(prom["output_dir"]) / "_SUCCESS.json").stat().st_mtime >= run_started
            if prom.get("output_dir")
            else True
        )
        new = "new version registered by this run" if fresh else "nothing new registered (already registered)"
        say(
            f"registry: model '{prom.get('model_name', model)}' version {prom.get('version')} "
            f"alias {prom.get('alias')} — {new}; {prom.get('reason', '')}"
        )
    elif skip_reason or steps_run.get("promote") == "skipped":
        say(f"registry: promote skipped — {skip_reason or gate.get('reason', '')}")
    say(f"MLflow:   {cfg.registry.tracking_uri}   (UI: make airflow-ui → http://127.0.0.1:5000, or")
    say(f"          .venv/bin/mlflow ui --host 127.0.0.1 --backend-store-uri {cfg.registry.tracking_uri})")
    say(f"Airflow:  AIRFLOW_HOME={airflow_home(cfg)}  (make airflow-ui → http://127.0.0.1:8080)")
    if prom.get("alias") or prom.get("version"):
        golden = Path(cfg.paths.golden_dir)
        sample = next(iter(sorted(golden.glob("audio/*.wav"))), None) or next(
            iter(sorted(golden.rglob("*.wav"))), None
        )
        say("try it:")
        prefix = f"ASRFLOW_ROOT={cfg.root} " if os.environ.get("ASRFLOW_ROOT") else ""
        say(
            f"  {prefix}.venv/bin/asrflow transcribe --profile {cfg.profile} --model models:/{model}@staging "
            f"{sample or '<audio.wav>'}"
        )
    return {"state": state, "run_id": run_id, "evaluate": ev, "promote": prom, "skip_reason": skip_reason}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m devstack.local_run", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--profile", default="local", help="profile name in configs/ (default: local)")
    ap.add_argument("--week", type=int, default=None, help="add week N of synthetic data and retrain")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override key.sub=value"
    )
    ap.add_argument("--force", action="store_true", help="recompute every step")
    ap.add_argument("--no-promote", action="store_true", help="only evaluate: never move the staging alias")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    cfg = load_config(args.profile)
    if args.overrides:  # validate them here: a typo should fail before Airflow starts
        load_config(args.profile, args.overrides)
    say(f"asrflow pipeline-local: profile {cfg.profile}, artifact root {cfg.root}")
    week = ensure_data(cfg, args.week)
    env = airflow_env(cfg)
    t0 = time.monotonic()
    setup_airflow(cfg, env)
    say(
        f"• Airflow ready ({time.monotonic() - t0:.0f}s): metadata DB {env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']}"
    )
    conf = {"profile": cfg.profile, "force": bool(args.force), "promote": not args.no_promote}
    if args.overrides:
        conf["overrides"] = list(args.overrides)
    ld = logical_date_for_week(week)
    log_path = airflow_home(cfg) / f"local_run-{ld:%Y-%m-%d}.log"
    run_started = time.time()
    state, run_id = run_dag(cfg, env, ld, conf, log_path)
    if run_id is None:
        say(f"the DAG run did not start; see {log_path}")
        tail = log_path.read_text().splitlines()[-25:]
        say("\n".join(tail))
        return 1
    summary(cfg, env, run_id, state, time.monotonic() - t_start, run_started)
    if state != "success":
        say(f"the run {state}: see the task logs in {log_path}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

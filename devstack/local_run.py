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
It drives the ``airflow`` command line and reads the run's state through Airflow's models
(``devstack.airflow_state``).

``--weeks N`` (``make pipeline-local WEEKS=N``) runs data weeks 1..N in order, each through the
DAG on the batches landed by then (a hard-linked view per week, so reruns stay identical); each
week's model warm-starts from the last one, and on profiles with
``registry.auto_promote_production`` (local) a week whose gate passed also becomes
``production``. The summary ends with a table: week, parent, training minutes, golden WER/CER
overall and per slice, gate decision.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
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
    landing_url = cfg.paths.landing_url
    if not _is_local(landing_url):
        say(f"landing zone {landing_url} is remote: using what is there")
        return week or 1
    landing = _local_path(landing_url)
    with _quiet("synth"):
        return _ensure_data(cfg, landing, week)


@contextlib.contextmanager
def _quiet(logger: str):
    """``logger`` at WARNING for a while: its per-100-utterances INFO lines are for the logs; the
    console gets the one-line summaries below (after week 1 this process has imported Airflow,
    whose logging setup would otherwise print every one of them)."""
    lg = logging.getLogger(logger)
    before = lg.level
    if not lg.isEnabledFor(logging.DEBUG):  # -v / a DEBUG setup keeps them
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(before)


def _ensure_data(cfg: AsrflowConfig, landing: Path, week: int | None) -> int:
    from synth import corpus

    c = cfg.corpus
    have = landing_weeks(landing)
    wanted = ([1] if not have else []) + ([week] if week is not None else [])
    for want in sorted(set(wanted) - set(have)):
        say(f"• synthesizing week {want}: {c.utterances_per_week} utterances into {landing} (espeak-ng + Festival) ...")
        t0 = time.monotonic()
        res = corpus.generate_week(
            landing,
            week=want,
            utterances=c.utterances_per_week,
            seed=c.seed,
            jobs=c.jobs,
            long_form_share=c.long_form_share,
            noise_snr_db=tuple(c.noise_snr_db),
            mix=corpus.Mix.from_config(c),
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
        "train_node": "one node (train.nnodes=1): train trains itself",
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
        sl = golden_slices(ev)
        if sl:
            say("  per slice (WER): " + ", ".join(f"{k} {v:.3f}" for k, v in sl.items()))
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
    return {"state": state, "run_id": run_id, "evaluate": ev, "promote": prom, "skip_reason": skip_reason,
            "train": tr, "slices": golden_slices(ev)}


def golden_slices(ev: dict[str, Any], kinds: tuple[str, ...] | None = None) -> dict[str, float]:
    """Candidate WER per golden slice, from an evaluate result's decision: every kind but speakers
    (which are many), or only ``kinds`` (e.g. ``("synth", "condition")``)."""
    if not ev.get("output_dir") or not ev.get("decision"):
        return {}
    try:
        dec = json.loads((Path(ev["output_dir"]) / ev["decision"]).read_text())
    except (OSError, ValueError):
        return {}
    return {
        s["slice"]: float(s["wer_candidate"])
        for s in dec.get("slices", [])[1:]
        if s.get("kind") != "speaker" and (kinds is None or s.get("kind") in kinds) and s.get("wer_candidate") is not None
    }


def landing_view(cfg: AsrflowConfig, week: int) -> Path:
    """A landing zone holding exactly the weeks up to ``week`` (hard links, no copies).

    ``WEEKS=N`` runs week w on what had landed by week w, so a rerun of an old week sees the
    same data as its first run (same keys, nothing retrained) even though later weeks have
    landed since. The view lies under the artifact root; its batch folders keep their names.
    """
    landing = _local_path(cfg.paths.landing_url)
    view = cfg.root / "landing_views" / f"upto-week-{week:03d}"
    for w in landing_weeks(landing):
        if w > week:
            continue
        src = landing / f"week-{w:03d}"
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            dst = view / src.name / f.relative_to(src)
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".tmp-{dst.name}")
            tmp.unlink(missing_ok=True)
            try:
                os.link(f, tmp)
            except OSError:  # another filesystem: copy
                import shutil

                shutil.copy2(f, tmp)
            os.replace(tmp, dst)
    return view


def run_week(
    cfg: AsrflowConfig, env: dict[str, str], week: int, conf: dict[str, Any], t_start: float
) -> tuple[int, dict[str, Any] | None]:
    """One data week through the DAG; returns (exit code, summary)."""
    ld = logical_date_for_week(week)
    log_path = airflow_home(cfg) / f"local_run-{ld:%Y-%m-%d}.log"
    run_started = time.time()
    state, run_id = run_dag(cfg, env, ld, conf, log_path)
    if run_id is None:
        say(f"the DAG run did not start; see {log_path}")
        tail = log_path.read_text().splitlines()[-25:]
        say("\n".join(tail))
        return 1, None
    try:  # `dags test` starts the run at its logical date: the UI would show it lasting months
        state_db(env).correct_run_start(DAG_ID, run_id, datetime.fromtimestamp(run_started, tz=UTC))
    except Exception as e:  # cosmetic: never fail the week over it
        say(f"(could not set the run's real start time: {e})")
    out = summary(cfg, env, run_id, state, time.monotonic() - t_start, run_started)
    if state != "success":
        say(f"the run {state}: see the task logs in {log_path}")
        return 1, out
    return 0, out


def promote_week_to_production(cfg: AsrflowConfig, out: dict[str, Any]) -> str:
    """``registry.auto_promote_production``: move production to the week's staged model (canary first)."""
    from pipeline_tasks.steps import promote

    if not out.get("evaluate", {}).get("passed") or not (out.get("promote") or {}).get("version"):
        return "no (gate failed)"
    res = promote.promote_production(cfg)
    if res.get("promoted"):
        return f"yes: v{res['version']} (canary WER {res.get('canary_wer', float('nan')):.3f})"
    if res.get("already_production"):
        return f"yes: v{res['version']} (already)"
    return f"no ({res.get('reason')})"


def weeks_table(rows: list[dict[str, Any]]) -> None:
    """The per-week table that ends ``make pipeline-local WEEKS=N``."""
    slices = sorted({k for r in rows for k in r.get("slices", {})})
    say("")
    say("══ weeks ══")
    head = ["week", "version", "parent", "train min", "golden WER", "CER", "gate", "production", *slices]
    table = [head]
    for r in rows:
        table.append([
            str(r["week"]), str(r.get("version") or "–"), str(r.get("parent") or "–"), _fmt(r.get("train_min"), 1),
            _fmt(r.get("wer"), 3), _fmt(r.get("cer"), 3), r.get("gate", "–"), r.get("production", "–"),
            *[_fmt(r.get("slices", {}).get(k), 3) for k in slices],
        ])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        say("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def week_row(week: int, out: dict[str, Any] | None, production: str) -> dict[str, Any]:
    out = out or {}
    ev, tr, pr = out.get("evaluate") or {}, out.get("train") or {}, out.get("promote") or {}
    lin = tr.get("lineage") or {}
    return {
        "week": week,
        "version": pr.get("version"),
        "parent": lin.get("parent_version") or (tr.get("parent") or {}).get("version") or "scratch",
        "train_min": lin.get("train_minutes") if lin.get("train_minutes") is not None else (tr.get("train_s") or 0) / 60,
        "wer": ev.get("candidate_wer"),
        "cer": ev.get("candidate_cer"),
        "gate": ("PASS" if ev.get("passed") else "FAIL") if ev else "–",
        "production": production,
        "slices": out.get("slices") or {},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m devstack.local_run", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--profile", default="local", help="profile name in configs/ (default: local)")
    ap.add_argument("--week", type=int, default=None, help="add week N of synthetic data and retrain")
    ap.add_argument(
        "--weeks", type=int, default=None,
        help="run weeks 1..N in order, each through the DAG on the data landed by then (continual training)",
    )
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override key.sub=value"
    )
    ap.add_argument("--force", action="store_true", help="recompute every step")
    ap.add_argument("--no-promote", action="store_true", help="only evaluate: never move the staging alias")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    # overrides apply here too (paths of the data this runner synthesizes), and a typo fails
    # before Airflow starts
    cfg = load_config(args.profile, args.overrides)
    say(f"asrflow pipeline-local: profile {cfg.profile}, artifact root {cfg.root}")
    if args.weeks:
        return run_weeks(cfg, args, t_start)
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
    rc, _ = run_week(cfg, env, week, conf, t_start)
    return rc


def run_weeks(cfg: AsrflowConfig, args: argparse.Namespace, t_start: float) -> int:
    """``--weeks N``: weeks 1..N in order; each week's model starts from the previous week's."""
    if not _is_local(cfg.paths.landing_url):
        say("--weeks needs a local landing zone (it synthesizes the weeks and builds per-week views)")
        return 2
    env = airflow_env(cfg)
    setup_airflow(cfg, env)
    auto = cfg.registry.auto_promote_production and not args.no_promote
    say(f"• {args.weeks} week(s); after a passed gate production moves to the week's model: "
        f"{'yes (registry.auto_promote_production)' if auto else 'no (staging only; production stays manual)'}")
    rows: list[dict[str, Any]] = []
    rc = 0
    for week in range(1, args.weeks + 1):
        say("")
        say(f"━━ week {week} ━━")
        ensure_data(cfg, week)
        view = landing_view(cfg, week)
        conf = {"profile": cfg.profile, "force": bool(args.force), "promote": not args.no_promote,
                "landing_url": str(view)}
        rest = [o for o in args.overrides if not o.startswith("paths.landing_url=")]  # the view replaces it
        if rest:
            conf["overrides"] = rest
        rc, out = run_week(cfg, env, week, conf, time.monotonic())
        production = promote_week_to_production(cfg, out) if (auto and rc == 0 and out) else "–"
        if production != "–":
            say(f"production: {production}")
        rows.append(week_row(week, out, production))
        if rc:
            break
    weeks_table(rows)
    say(f"total {time.monotonic() - t_start:.0f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Continual training vs from scratch: golden WER week by week, at equal training minutes.

The same 4 synthetic weeks (``synth.corpus`` with the profile's mix and diversity ramp) go
through the pipeline's own steps (``pipeline_tasks.graph.run_until``: ingest → … → promote, in
this process, no Airflow) twice, in two artifact roots:

* **warm**: ``train.init_from=auto`` — each week starts from the current model (``production``,
  moved after every passed gate, as ``make pipeline-local WEEKS=N`` does on the local profile),
  fine-tunes with its schedule and replays older weeks;
* **scratch**: ``train.init_from=scratch`` — each week trains a new model on everything landed.

Both arms get the same ``train.max_minutes`` per week, the same data views (week w sees weeks
1..w), the same golden set and the same tuning setting (``--tune`` off by default, so both use
the profile's config and the minutes go to training). Printed per week: the candidate's golden
WER/CER (beam + lexicon + LM, the gate's decoder, on the exported file), per slice, the gate
decision and the parent. Goals (issue 11): warm WER falls every week, week 4 ≤ 0.7 × week 1 and
≤ 0.8 × scratch week 4, and ≤ 30 %.

    .venv/bin/python bench/continuous.py --weeks 4 --minutes 10 --json bench/results/continuous.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CMD = " ".join(["python", *sys.argv])


def _week_cfg(profile: str, root: Path, view: Path, golden: Path, arm: str, minutes: float, tune: bool,
              extra: list[str]):
    from pipeline_tasks.config import load_config

    return load_config(profile, [
        f"paths.root={root}", f"paths.landing_url={view}", f"paths.golden_dir={golden}",
        f"train.init_from={'auto' if arm == 'warm' else 'scratch'}", f"train.max_minutes={minutes}",
        f"tune.enabled={'true' if tune else 'false'}", *extra,
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="local")
    ap.add_argument("--weeks", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=10.0, help="training minutes per week (both arms)")
    ap.add_argument("--tune", action="store_true", help="run the tune step too (both arms)")
    ap.add_argument("--arms", default="warm,scratch")
    ap.add_argument("--work", default=str(REPO / "artifacts" / "bench-continuous"))
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for both arms (corpus.* keys also shape the synthesized weeks)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from devstack.local_run import ensure_data, golden_slices, landing_view
    from pipeline_tasks.config import load_config
    from pipeline_tasks.graph import run_until
    from pipeline_tasks.steps import promote

    work = Path(args.work)
    landing, golden = work / "shared" / "landing", work / "shared" / "golden_set"
    # --set corpus.* changes the synthesized weeks too (the golden set's slices are fixed in code)
    shared = load_config(args.profile, [f"paths.root={work / 'shared'}", f"paths.landing_url={landing}",
                                        f"paths.golden_dir={golden}", *args.extra])
    rows: dict[str, list[dict]] = {a: [] for a in args.arms.split(",")}
    t_all = time.monotonic()
    for week in range(1, args.weeks + 1):
        ensure_data(shared, week)  # the week's corpus and the golden set, as make pipeline-local makes them
        for arm in rows:
            root = work / arm
            cfg0 = load_config(args.profile, [f"paths.root={root}", f"paths.landing_url={landing}"])
            view = landing_view(cfg0, week)
            cfg = _week_cfg(args.profile, root, view, golden, arm, args.minutes, args.tune, args.extra)
            t0 = time.monotonic()
            res = run_until("promote", cfg)
            tr, ev, pr = res["train"], res["evaluate"], res["promote"]
            if arm == "warm" and ev["passed"]:
                promote.promote_production(cfg.model_copy(update={"registry": cfg.registry.model_copy(
                    update={"canary_max_wer": 10.0})}))  # the bench measures the gate, not the canary
            slices = {k: round(v, 4) for k, v in golden_slices(ev, ("synth", "condition")).items()}
            row = {
                "week": week, "wer": round(ev["candidate_wer"], 4), "cer": round(ev["candidate_cer"], 4),
                "passed": ev["passed"], "parent": (tr.get("lineage") or {}).get("parent_version", "scratch"),
                "train_min": round(tr["train_s"] / 60, 2), "steps": tr["steps"], "version": pr.get("version"),
                "dev_cer": tr.get("dev_cer"), "wall_min": round((time.monotonic() - t0) / 60, 1), "slices": slices,
            }
            rows[arm].append(row)
            print(f"[{arm}] week {week}: golden WER {row['wer']:.4f} CER {row['cer']:.4f} "
                  f"(parent {row['parent']}, {row['train_min']} train-min, {row['steps']} steps, "
                  f"gate {'PASS' if row['passed'] else 'FAIL'}) slices {slices}", flush=True)

    print("\ngolden WER per week (beam + lexicon + LM on the exported file)")
    print("week  " + "  ".join(f"{a:>9}" for a in rows))
    for i in range(args.weeks):
        print(f"{i + 1:>4}  " + "  ".join(f"{rows[a][i]['wer']:9.4f}" for a in rows))
    summary: dict = {"cmd": CMD, "weeks": args.weeks, "minutes": args.minutes, "rows": rows,
                     "wall_min": round((time.monotonic() - t_all) / 60, 1)}
    if "warm" in rows and len(rows["warm"]) == args.weeks:
        w = [r["wer"] for r in rows["warm"]]
        summary["warm_falls_every_week"] = all(b < a for a, b in zip(w, w[1:], strict=False))
        summary["warm_last_over_first"] = round(w[-1] / w[0], 3) if w[0] else None
        if "scratch" in rows:
            s = rows["scratch"][-1]["wer"]
            summary["warm_over_scratch_last_week"] = round(w[-1] / s, 3) if s else None
        print(f"warm: falls every week {summary['warm_falls_every_week']}, week {args.weeks} / week 1 = "
              f"{summary['warm_last_over_first']} (goal <= 0.7), vs scratch "
              f"{summary.get('warm_over_scratch_last_week')} (goal <= 0.8)")
    print(f"reproduce: {CMD}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

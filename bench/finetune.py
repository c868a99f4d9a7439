"""Fine-tuning variants of one week from one parent, at equal training minutes: golden WER each.

A 4-week ``bench/continuous.py`` run costs 45 minutes per arm on 2 cores, and its week-4 figure
mixes every week's noise. This benchmark isolates one warm week: every variant fine-tunes the
same parent model (e.g. the week-1 model of a ``bench/continuous.py`` run) on the same landing
view (weeks 1..W) for the same minutes, through the pipeline's own steps (``run_until
("evaluate")``: ingest → … → evaluate, no tuning, in one artifact root so ingest and features are
shared). Printed per variant: golden WER/CER with the gate's decoder on the exported file, per
slice, the steps it made and its dev figures; with ``train.ema_decay`` also the dev CER of the raw
(un-averaged) weights of the same run, a paired comparison without seed noise.

    .venv/bin/python bench/continuous.py --weeks 1 --arms warm --work W      # the parent: W/warm/train/*/model
    .venv/bin/python bench/finetune.py --work W --week 2 \\
        --variant base= --variant ema=train.ema_decay=0.998 --json bench/results/finetune.json

A variant is ``name=key=value,key=value`` (``name=`` for the profile's config). Run the variants
one after the other on an otherwise idle machine: the budget is wall-clock minutes.
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


def _variant(s: str) -> tuple[str, list[str]]:
    name, _, rest = s.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {s!r}: expected name=key=value,key=value")
    return name, [x for x in rest.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="a bench/continuous.py work folder (shared/landing, shared/golden_set)")
    ap.add_argument("--parent", default="", help="packaged model folder (default: the newest <work>/warm/train/*/model)")
    ap.add_argument("--week", type=int, default=2, help="fine-tune on the landing view of weeks 1..WEEK")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--profile", default="local")
    ap.add_argument("--variant", type=_variant, action="append", required=True)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from devstack.local_run import ensure_data, golden_slices, landing_view
    from pipeline_tasks.config import load_config
    from pipeline_tasks.graph import run_until

    work = Path(args.work)
    landing, golden = work / "shared" / "landing", work / "shared" / "golden_set"
    if not (golden / "manifest.jsonl").exists():
        raise SystemExit(f"no golden set under {golden}: run bench/continuous.py --work {work} --weeks 1 first")
    parents = sorted((work / "warm" / "train").glob("*/model/weights.pt"), key=lambda p: p.stat().st_mtime)
    parent = Path(args.parent) if args.parent else (parents[-1].parent if parents else None)
    if parent is None:
        raise SystemExit(f"no parent model under {work}/warm/train: run bench/continuous.py --work {work} --weeks 1 first")
    shared = load_config(args.profile, [f"paths.root={work / 'shared'}", f"paths.landing_url={landing}",
                                        f"paths.golden_dir={golden}"])
    for w in range(1, args.week + 1):
        ensure_data(shared, w)  # as make pipeline-local makes them
    root = work / "finetune"
    view = landing_view(load_config(args.profile, [f"paths.root={root}", f"paths.landing_url={landing}"]), args.week)
    print(f"parent {parent}; week {args.week}; {args.minutes} min per variant")
    rows = []
    for name, extra in args.variant:
        cfg = load_config(args.profile, [
            f"paths.root={root}", f"paths.landing_url={view}", f"paths.golden_dir={golden}",
            f"train.init_from={parent}", f"train.max_minutes={args.minutes}", "tune.enabled=false", *extra,
        ])
        t0 = time.monotonic()
        res = run_until("evaluate", cfg)
        tr, ev = res["train"], res["evaluate"]
        row = {
            "variant": name, "overrides": extra, "golden_wer": round(ev["candidate_wer"], 4),
            "golden_cer": round(ev["candidate_cer"], 4), "steps": tr["steps"], "train_min": round(tr["train_s"] / 60, 2),
            "dev_wer": tr.get("dev_wer"), "dev_cer": tr.get("dev_cer"), "ema": tr.get("ema"),
            "slices": {k: round(v, 4) for k, v in golden_slices(ev, ("synth", "condition")).items()},
            "wall_min": round((time.monotonic() - t0) / 60, 1),
        }
        rows.append(row)
        ema = row["ema"] or {}
        print(f"{name:<14} golden WER {row['golden_wer']:.4f} CER {row['golden_cer']:.4f}  dev CER {row['dev_cer']:.4f}"
              f"  {row['steps']} steps"
              + (f"  (ema: dev CER averaged {ema['dev_cer_ema']:.4f} vs raw {ema['dev_cer_raw']:.4f}, published {ema['used']})"
                 if ema.get("dev_cer_raw") is not None else "")
              + f"\n{'':<14} slices {row['slices']}", flush=True)
    print(f"reproduce: .venv/bin/{CMD}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cmd": CMD, "parent": str(parent), "week": args.week,
                                               "minutes": args.minutes, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model capacity for the diverse corpus: which shape learns most in the local profile's budget.

One synthetic week (``synth.corpus`` with the profile's mix and week-1 ramp) and the golden set go
through the pipeline's own steps (``pipeline_tasks.graph.run_until``: ingest → … → evaluate, in
this process, no Airflow) once per variant, in one artifact root (the data steps are computed once
and cached; every variant has its own train key). Every variant trains from scratch for the same
``--minutes`` with the tuner off, so the only difference is the variant's overrides. Printed per
variant: parameters, optimizer steps, audio hours seen, dev WER/CER (what a selection may use),
and golden WER/CER overall and per slice (beam + lexicon + LM on the exported file: the gate's
numbers, reported, not selected on). Run it on a quiet machine: the budget is wall-clock minutes.

    .venv/bin/python bench/capacity.py --minutes 10 --json bench/results/capacity.json
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

VARIANTS: dict[str, list[str]] = {
    "base": [],  # the local profile: char CTC, d_model 144, 4 layers
    "deep6": ["model.n_layers=6"],
    "wide192": ["model.d_model=192"],
    "bpe128": ["model.vocab=bpe", "model.bpe_vocab_size=128"],
    "small_batch": ["train.sampler.max_duration_s=40"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="local")
    ap.add_argument("--minutes", type=float, default=10.0, help="training minutes per variant")
    ap.add_argument(
        "--epochs", type=int, default=1000,
        help="epoch cap (default: high, so the minutes bind; the profile's own value compares at equal epochs)",
    )  # fmt: skip
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)} ('' for none)")
    ap.add_argument("--variant", type=_variant, action="append", default=[],
                    help="an extra variant, name=key=value,key=value (after --variants)")  # fmt: skip
    ap.add_argument("--work", default=str(REPO / "artifacts" / "bench-capacity"))
    ap.add_argument("--landing", default="", help="an existing landing zone with week-001 (default: generate)")
    ap.add_argument("--golden", default="", help="an existing golden set folder (default: generate)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from devstack.local_run import ensure_data, golden_slices, landing_view
    from pipeline_tasks.config import load_config
    from pipeline_tasks.graph import run_until

    work = Path(args.work)
    root = work / "root"
    landing = Path(args.landing) if args.landing else work / "landing"
    golden = Path(args.golden) if args.golden else work / "golden_set"
    # week 1 and the golden set as make pipeline-local makes them (kept if already there)
    ensure_data(load_config(args.profile, [f"paths.root={root}", f"paths.landing_url={landing}",
                                           f"paths.golden_dir={golden}"]), 1)  # fmt: skip
    view = landing_view(load_config(args.profile, [f"paths.root={root}", f"paths.landing_url={landing}"]), 1)
    variants = [(n, VARIANTS[n]) for n in args.variants.split(",") if n] + args.variant
    rows = []
    for name, extra in variants:
        cfg = load_config(args.profile, [
            f"paths.root={root}", f"paths.landing_url={view}", f"paths.golden_dir={golden}",
            "train.init_from=scratch", f"train.max_minutes={args.minutes}", f"train.epochs={args.epochs}",
            "tune.enabled=false", *extra,
        ])  # fmt: skip
        t0 = time.monotonic()
        res = run_until("evaluate", cfg)
        tr, ev = res["train"], res["evaluate"]
        slices = {k: round(v, 4) for k, v in golden_slices(ev, ("synth", "condition")).items()}
        row = {
            "variant": name, "overrides": extra, "params": tr.get("params"), "steps": tr["steps"],
            "train_min": round(tr["train_s"] / 60, 2), "audio_s_per_s": round(tr["audio_s_per_s"], 1),
            "audio_h_seen": round(tr["audio_s_per_s"] * tr["train_s"] / 3600, 2),
            "dev_wer": tr["dev_wer"], "dev_cer": tr["dev_cer"],
            "golden_wer": round(ev["candidate_wer"], 4), "golden_cer": round(ev["candidate_cer"], 4),
            "slices": slices, "wall_min": round((time.monotonic() - t0) / 60, 1), "epochs": tr["epochs"],
        }  # fmt: skip
        rows.append(row)
        print(f"[{name}] {row['params']} params, {row['steps']} steps, {row['audio_h_seen']} audio-h seen: dev WER "
              f"{row['dev_wer']:.4f} CER {row['dev_cer']:.4f}; golden WER {row['golden_wer']:.4f} CER "
              f"{row['golden_cer']:.4f}; slices {slices}", flush=True)  # fmt: skip

    print(f"\n{'variant':<12} {'params':>8} {'epochs':>6} {'min':>5} {'steps':>6} {'audio-h':>8} {'dev WER':>8} "
          f"{'dev CER':>8} {'gold WER':>9} {'gold CER':>9} {'flite':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['variant']:<12} {r['params'] or 0:>8} {r['epochs']:>6} {r['train_min']:>5} {r['steps']:>6} "
              f"{r['audio_h_seen']:>8} {r['dev_wer']:>8.4f} "
              f"{r['dev_cer']:>8.4f} {r['golden_wer']:>9.4f} {r['golden_cer']:>9.4f} "
              f"{r['slices'].get('synth=flite', float('nan')):>6.3f}")  # fmt: skip
    print(f"reproduce: {CMD}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cmd": CMD, "minutes": args.minutes, "epochs": args.epochs, "rows": rows}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ASHA vs no pruning: trial-epochs spent to reach (almost) the unpruned search's best.

For each sampler seed, two studies search the same space with the same TPE sampler settings
(:func:`pipeline_tasks.steps.tune.make_sampler`, seeded identically) and the same sampling code
(:func:`pipeline_tasks.steps.tune.sample_params` + :func:`derive_overrides`):

* **unpruned**: ``--trials`` trials, every one trained for ``--epochs`` epochs;
* **asha**: :func:`pipeline_tasks.steps.tune.make_pruner` with ``pruner=asha`` (``SuccessiveHalvingPruner``,
  ``--min-resource``, ``--reduction-factor``), reporting dev WER each epoch exactly as the tune
  step does (no pruning decision at the last epoch), allowed up to ``--asha-trials`` trials.

Figure of merit: trial-epochs spent (summed over trials, in trial order) until the best
*full-fidelity* dev WER (a trial that ran all epochs) is within ``--tolerance`` (1% absolute) of
the unpruned search's final best; for the unpruned search the same count against its own final
best. Goal: ASHA needs ≥ 3× fewer trial-epochs.

Learning curves. ``--mode surrogate`` (default): real training is far too slow on 2 CPU cores
for dozens of trials × many seeds, so trials follow a *documented parametric surrogate* of dev
WER vs epoch and hyperparameters (:func:`surrogate_curve`): a floor that depends on lr (log-
quadratic around an optimum), dropout, warmup and SpecAugment, an exponential-power decay whose
speed grows with lr and shrinks with dropout (so fast-learning configs can lead early and lose
late, the case where early stopping can be misled), and seeded per-(trial, epoch) noise. The
space is the ``tune.space`` of ``--profile`` (local by default). ``--mode real`` runs the real
``train.fit`` through :func:`pipeline_tasks.steps.tune.run` on the profile's proxy split (one seed;
needs the upstream pipeline steps, slow).

    .venv/bin/python bench/tuning.py                       # surrogate, 5 seeds
    .venv/bin/python bench/tuning.py --mode real --profile local --trials 6 --epochs 3
    .venv/bin/python bench/tuning.py --mode real --profile local --trials 9 --epochs 9 \\
        --root R --landing L --golden G --week 2 --init-from R/train/<week-1 key>/model   # warm trials
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402

from pipeline_tasks.config import load_config  # noqa: E402
from pipeline_tasks.steps import tune  # noqa: E402

CMD = " ".join(sys.argv)


def _noise(key: str, sd: float) -> float:
    """Deterministic Gaussian-ish noise from a string key (sum of 4 uniforms, rescaled)."""
    h = hashlib.sha256(key.encode()).digest()
    u = [int.from_bytes(h[i : i + 4], "little") / 2**32 for i in range(0, 16, 4)]
    return sd * (sum(u) - 2.0) / math.sqrt(4 / 12)


def surrogate_curve(
    hp: dict, epochs: int, noise_key: str, noise_sd: float = 0.004, crossing: float = 1.0
) -> list[float]:
    """Dev WER after epochs 1..``epochs`` for a config (the surrogate learning-curve model).

    ``floor`` = 0.14 + 0.35·(log10 lr − log10 1.5e-3)² + 1.5·(dropout − 0.08)² + warmup and
    SpecAugment terms (a random config of the local space is ~0.07 worse than the optimum, the
    worst ~0.2: the spread one sees across lr / regularization in small-data ASR); ``wer(e) = floor + (1 − floor)·exp(−(e/τ)^0.8)`` with
    ``τ = 3·(1.5e-3/lr)^(0.6c)·(1 + 2c·dropout)·(1 + c·warmup/1000)`` epochs, plus per-(config,
    epoch) noise of sd ``noise_sd``. ``c`` = ``crossing``: how much faster a high-lr / low-dropout /
    short-warmup config learns early, i.e. how often learning curves cross. ``c = 0``: every
    config converges at the same speed, so the ranking at epoch 1 is the final ranking up to
    noise (early stopping is never misled); ``c = 1``: strong crossing (fast learners lead for
    several epochs and end worse).
    """
    lr = float(hp.get("train.lr", 2e-3))
    drop = float(hp.get("model.dropout", 0.1))
    warm = float(hp.get("train.warmup_steps", 150))
    fmw = float(hp.get("train.specaugment.freq_mask_width", 15))
    tms = float(hp.get("train.specaugment.time_masks", 2))
    dl = math.log10(lr) - math.log10(1.5e-3)
    floor = (
        0.14
        + 0.35 * dl * dl
        + 1.5 * (drop - 0.08) ** 2
        + 0.03 * ((warm - 100) / 100) ** 2
        + 0.04 * ((fmw - 15) / 12) ** 2
        + 0.03 * (tms - 2) ** 2 / 4
        + (0.05 * max(0.0, dl) if tms < 1 else 0.0)  # high lr without time masks overfits
    )
    c = crossing
    tau = 3.0 * (1.5e-3 / lr) ** (0.6 * c) * (1 + 2 * c * drop) * (1 + c * warm / 1000)
    return [
        floor + (1 - floor) * math.exp(-((e / tau) ** 0.8)) + _noise(f"{noise_key}:{e}", noise_sd)
        for e in range(1, epochs + 1)
    ]


def run_study(
    cfg,
    seed: int,
    variant: str,
    n_trials: int,
    epochs: int,
    target: float | None,
    crossing: float = 1.0,
):
    """One sequential study. Returns per-trial records (epochs used, full-fidelity value or None).

    ``variant`` is ``pruner[:min_resource[:reduction_factor]]`` (``none``, ``asha:1:3``, ``hyperband:1:3``).
    """
    name, *rest = variant.split(":")
    upd = {"pruner": name, "epochs": epochs, "sampler_seed": seed}
    if rest:
        upd["min_resource"] = int(rest[0])
    if len(rest) > 1:
        upd["reduction_factor"] = int(rest[1])
    tcfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update=upd)})
    study = optuna.create_study(
        # a fixed name: HyperbandPruner assigns brackets by hashing the study name
        study_name=f"bench-{variant}-{seed}-{crossing}",
        direction="minimize",
        sampler=tune.make_sampler(tcfg, seed),
        pruner=tune.make_pruner(tcfg),
    )
    records: list[dict] = []

    def objective(trial):
        params = tune.sample_params(trial, tcfg)
        overrides, _ = tune.derive_overrides(tcfg, params)
        curve = surrogate_curve(overrides, epochs, json.dumps(overrides, sort_keys=True), crossing=crossing)
        used = 0
        try:
            for step, wer in enumerate(curve, start=1):
                used = step
                trial.report(wer, step)
                if step < epochs and trial.should_prune():
                    raise optuna.TrialPruned()
            return curve[-1]
        finally:
            records.append({"epochs": used, "value": curve[-1] if used == epochs else None})

    best = math.inf
    for _ in range(n_trials):
        study.optimize(objective, n_trials=1)
        if records[-1]["value"] is not None:
            best = min(best, records[-1]["value"])
        if target is not None and best <= target:
            break
    return records


def epochs_to(records: list[dict], target: float) -> int | None:
    spent = 0
    best = math.inf
    for r in records:
        spent += r["epochs"]
        if r["value"] is not None:
            best = min(best, r["value"])
        if best <= target:
            return spent
    return None


def _one_seed(cfg, args, seed: int, crossing: float, variant: str) -> dict:
    un = _unpruned(cfg, args, seed, crossing)
    final_best = min(r["value"] for r in un)
    target = final_best + args.tolerance
    ash = run_study(cfg, seed, variant, args.asha_trials, args.epochs, target, crossing)
    e_un = epochs_to(un, target)
    e_as = epochs_to(ash, target)
    total_un = sum(r["epochs"] for r in un)
    return {
        "variant": variant,
        "crossing": crossing,
        "seed": seed,
        "unpruned_best": final_best,
        "unpruned_epochs_to_target": e_un,
        "unpruned_total_epochs": total_un,
        "asha_epochs_to_target": e_as,
        "asha_epochs_spent": sum(r["epochs"] for r in ash),
        "asha_trials_run": len(ash),
        "asha_best": min((r["value"] for r in ash if r["value"] is not None), default=None),
        "speedup": (e_un / e_as) if e_as else None,
        "speedup_vs_full": (total_un / e_as) if e_as else None,
    }


_UNPRUNED_CACHE: dict = {}


def _unpruned(cfg, args, seed: int, crossing: float) -> list[dict]:
    key = (seed, crossing)
    if key not in _UNPRUNED_CACHE:
        _UNPRUNED_CACHE[key] = run_study(cfg, seed, "none", args.trials, args.epochs, None, crossing)
    return _UNPRUNED_CACHE[key]


def _gmean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def surrogate(args) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    tune._quiet_optuna()
    cfg = load_config(args.profile, [f"tune.n_trials={args.trials}"])
    speeds = [float(x) for x in args.crossing.split(",")]
    variants = args.variants.split(",")
    t0 = time.monotonic()
    rows = [
        _one_seed(cfg, args, seed, sp, v) for v in variants for sp in speeds for seed in range(args.seeds)
    ]
    wall = time.monotonic() - t0
    print("bench/tuning.py — ASHA vs no pruning (SURROGATE learning curves, not real training)")
    print(
        f"space: tune.space of profile {args.profile!r} ({', '.join(cfg.tune.space)}); TPE (tune.make_sampler) seeds "
        f"0..{args.seeds - 1}; max epochs/trial {args.epochs}; unpruned trials {args.trials}; pruned searches up to "
        f"{args.asha_trials} trials (stop at the target); target = unpruned final best + {args.tolerance:.3f} abs WER; "
        f"variant = pruner:min_resource:reduction_factor"
    )
    if args.verbose:
        print(
            f"{'variant':>12} {'crossing':>8} {'seed':>4} {'unpr best':>9} {'unpr ep>tgt':>11} {'pruned ep>tgt':>13} "
            f"{'pruned best':>11} {'trials':>6} {'speedup':>8}"
        )
        for r in rows:
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else "missed"
            ab = f"{r['asha_best']:.4f}" if r["asha_best"] is not None else "-"
            print(
                f"{r['variant']:>12} {r['crossing']:>8.2f} {r['seed']:>4} {r['unpruned_best']:>9.4f} "
                f"{r['unpruned_epochs_to_target']:>11} {str(r['asha_epochs_to_target']):>13} {ab:>11} "
                f"{r['asha_trials_run']:>6} {sp:>8}"
            )
    print(
        f"{'variant':>12} {'crossing':>8} {'unpr ep>tgt':>11} {'pruned ep>tgt':>13} {'ratio':>6} "
        f"{'gmean/seed':>10} {'min':>6} {'max':>6} {'missed':>6}  goal>=3x"
    )
    for v in variants:
        for sp in speeds:
            rs = [r for r in rows if r["crossing"] == sp and r["variant"] == v]
            ok = [r for r in rs if r["speedup"]]
            missed = len(rs) - len(ok)
            # ratio of total epochs to target over all seeds; a missed seed counts its whole budget
            un_total = sum(r["unpruned_epochs_to_target"] for r in rs)
            pr_total = sum(r["asha_epochs_to_target"] or r["asha_epochs_spent"] for r in rs)
            ratio = un_total / pr_total
            gm = _gmean([r["speedup"] for r in ok]) if ok else float("nan")
            mn = min((r["speedup"] for r in ok), default=float("nan"))
            mx = max((r["speedup"] for r in ok), default=float("nan"))
            met = "MET" if ratio >= 3 and not missed else "NOT MET"
            print(
                f"{v:>12} {sp:>8.2f} {un_total:>11} {pr_total:>13} {ratio:>5.2f}x {gm:>9.2f}x {mn:>5.2f}x "
                f"{mx:>5.2f}x {missed:>3}/{len(rs):<2}  {met}"
            )
    print(f"wall {wall:.1f}s")
    print(f"reproduce: .venv/bin/python {CMD}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _real_overrides(args) -> list[str]:
    """Paths, warm start and the search settings shared by both real studies."""
    out = [
        f"tune.epochs={args.epochs}",
        f"tune.min_resource={args.min_resource}",
        f"tune.reduction_factor={args.reduction_factor}",
        "tune.n_workers=1",
        "tune.timeout_s=null",
        "tune.fidelity_check_top_k=0",
        "tune.enabled=true",
    ]
    if args.root:
        out.append(f"paths.root={args.root}")
    if args.init_from:
        out.append(f"train.init_from={args.init_from}")
    return out


def _real_landing(args, overrides: list[str]) -> list[str]:
    """With ``--landing``: weeks 1..``--week`` there (generated when missing, as `make pipeline-local`
    does), seen through the week's landing view; the golden set likewise."""
    if not args.landing:
        return []
    from devstack.local_run import landing_view, landing_weeks
    from synth import corpus

    landing = Path(args.landing)
    c = load_config(args.profile, overrides).corpus
    have = landing_weeks(landing)
    for w in range(1, args.week + 1):
        if w not in have:
            corpus.generate_week(landing, week=w, utterances=c.utterances_per_week, seed=c.seed, jobs=c.jobs,
                                 long_form_share=c.long_form_share, mix=corpus.Mix.from_config(c))  # fmt: skip
    out = [f"paths.landing_url={landing}"]
    if args.golden:
        golden = Path(args.golden)
        if not (golden / "manifest.jsonl").exists():
            corpus.generate_golden(golden, utterances=c.golden_utterances, seed=c.seed, jobs=c.jobs)
        out.append(f"paths.golden_dir={golden}")
    view = landing_view(load_config(args.profile, [*overrides, *out]), args.week)
    return [*out[1:], f"paths.landing_url={view}"]


def wall_is_reuse(wall_s: float, recs: list[dict]) -> bool:
    """True when ``tune.run`` returned a published study instead of training (< 0.5 s per trial-epoch)."""
    return wall_s < 0.5 * max(1, sum(r["epochs"] for r in recs))


def real(args) -> None:
    """Real ``fit`` trials on the profile's proxy split: the same seed and trial budget with ASHA and
    without. With ``--init-from`` (a packaged model folder: weights.pt + model.json, e.g. last
    week's ``train/<key>/model``) every trial fine-tunes that parent, as the tune step does in a
    warm week, and dev WER is the metric; from scratch, short trials score on dev loss."""
    from pipeline_tasks.contract import resolve
    from pipeline_tasks.graph import run_until

    common = _real_overrides(args)
    common += _real_landing(args, common)
    base = load_config(args.profile, common)
    inputs = {"split": run_until("split", base)["split"]}
    out = {}
    for pruner in ("none", "asha"):
        n = args.trials if pruner == "none" else args.asha_trials
        cfg = load_config(args.profile, [*common, f"tune.pruner={pruner}", f"tune.n_trials={n}"])
        t0 = time.monotonic()
        res = tune.run(cfg, inputs)
        trials = json.loads(resolve(res, res["trials"]).read_text())
        recs = [
            {"epochs": t["epochs"] or 0, "value": (t["values"][0] if t["state"] == "COMPLETE" else None)}
            for t in sorted(trials, key=lambda t: t["number"])
            if t["state"] in ("COMPLETE", "PRUNED")
        ]
        out[pruner] = {
            "records": recs, "wall_s": time.monotonic() - t0, "best": res["best_value"],
            "metric": res.get("metric"), "warm": args.init_from or None,
            # a study published by an earlier run is reused (the tune step is idempotent): its
            # trials are not trained again and this wall time is ~0
            "reused": wall_is_reuse(time.monotonic() - t0, recs),
        }  # fmt: skip
    target = out["none"]["best"] + args.tolerance
    e_un, e_as = epochs_to(out["none"]["records"], target), epochs_to(out["asha"]["records"], target)
    print("bench/tuning.py — ASHA vs no pruning (REAL train.fit on the proxy split, one seed)")
    print(
        f"profile {args.profile}, week {args.week}, parent {args.init_from or 'none (from scratch)'}; {args.trials} "
        f"trials unpruned, {args.asha_trials} with ASHA, up to {args.epochs} epochs; ASHA min_resource {args.min_resource}, reduction_factor "
        f"{args.reduction_factor}; metric {out['none']['metric']}"
    )
    for k, v in out.items():
        vals = " ".join(f"{r['value']:.3f}/{r['epochs']}" if r["value"] is not None else f"pruned/{r['epochs']}"
                        for r in v["records"])  # fmt: skip
        print(
            f"{k:>5}: best {v['best']:.4f}  trial-epochs {sum(r['epochs'] for r in v['records'])}  "
            f"wall {v['wall_s']:.0f}s{' (reused from an earlier run)' if v['reused'] else ''}  "
            f"trials (value/epochs): {vals}"
        )
    print(
        f"trial-epochs to within {args.tolerance} of the unpruned best: unpruned {e_un}, asha {e_as}"
        + (f", speedup {e_un / e_as:.2f}x (goal >= 3x)" if e_as else " (ASHA missed the target)")
    )
    print(f"reproduce: .venv/bin/python {CMD}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cmd": CMD, "target": target, "unpruned_epochs": e_un, "asha_epochs": e_as, **out},
                       indent=1, default=str) + "\n"  # fmt: skip
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["surrogate", "real"], default="surrogate")
    ap.add_argument("--profile", default="local")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=40, help="trials of the unpruned search")
    ap.add_argument("--asha-trials", type=int, default=None,
                    help="max trials of the ASHA search (surrogate default 120; real default --trials)")
    ap.add_argument("--epochs", type=int, default=27, help="max epochs per trial")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument(
        "--crossing", default="0,0.5,1", help="surrogate learning-curve crossing strengths c (comma list)"
    )
    ap.add_argument(
        "--variants", default="asha:1:3,asha:3:3,hyperband:1:3", help="pruned searches to compare"
    )
    ap.add_argument("--verbose", action="store_true", help="print every seed's row")
    ap.add_argument("--min-resource", type=int, default=1, help="real mode: ASHA min_resource")
    ap.add_argument("--reduction-factor", type=int, default=3, help="real mode: ASHA reduction_factor")
    ap.add_argument("--root", default="", help="real mode: artifact root (default: the profile's)")
    ap.add_argument("--landing", default="", help="real mode: landing zone with weeks 1..--week (generated if missing)")
    ap.add_argument("--golden", default="", help="real mode: golden set folder (generated if missing)")
    ap.add_argument("--week", type=int, default=2, help="real mode: the week whose data the trials tune on")
    ap.add_argument("--init-from", default="", help="real mode: packaged parent model folder (warm trials)")
    ap.add_argument("--json", default="", help="also write per-seed rows here")
    args = ap.parse_args()
    if args.asha_trials is None:
        args.asha_trials = 120 if args.mode == "surrogate" else args.trials
    surrogate(args) if args.mode == "surrogate" else real(args)


if __name__ == "__main__":
    main()

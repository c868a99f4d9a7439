"""Benchmark: does a week's run cost what the new data costs, or what the whole history costs?

Simulates ``--weeks`` weekly batches (default 20) through the non-training steps, in order, by
calling each step's ``run(config, inputs)`` on a temporary artifact root (``--profile``, default
``tiny``, plus ``--set`` overrides), exactly as ``tests/pipeline_tasks`` does:

    ingest (decode + raw store + cumulative manifest + dvc add / git commit / tag / dvc push)
    -> validate (GX suites) -> featurize -> golden (cached after week 1) -> split

Training, tuning, evaluation and promotion are left out: their budget is set on purpose.

Corpus: week 1 is ``synth.corpus.generate_week`` (espeak-ng / Festival speech, ``--utterances``
utterances); every later week is a *cheap perturbed copy* of week 1's audio: new ids
(``wNNN-…``), each file scaled by a random gain of -0.1…-1.5 dB and shifted by 1–160 samples of
leading silence (so every PCM hash differs and nothing is a duplicate), same transcripts and
speakers, written as a new landing batch ``week-NNN/`` beside the earlier ones (the landing zone
is cumulative, as in production until old batches are archived).

Printed per week: wall and CPU seconds (this process + reaped children: dvc/git subprocesses,
decode/featurize pools) per step, ingest's own phases, and files / bytes of each storage tier:
artifact root (step outputs + feature cache), DVC workspace (checked-out files), DVC cache, git,
DVC remote, landing zone, MLflow DB and Airflow metadata DB (when present; these steps create
neither). Bytes are on-disk bytes of *distinct* inodes; a cache file hard-linked to its workspace
file is counted once, in the workspace tier ("cache, own bytes" is what the cache adds).

Figures: linear fit of each step's wall/CPU time against cumulative utterances (weeks 2..N:
week 1 initialises the workspace and featurizes the golden set), the cost per new utterance,
the ratio week-N / week-2 of the non-training wall time (goal <= 1.2), and storage per audio hour
per tier.

    .venv/bin/python bench/scale.py --weeks 20 --utterances 100 --json bench/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

STEPS = ("ingest", "validate", "featurize", "golden", "split")


def cpu_s() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ------------------------------------------------------------------------------------------ corpus
def perturbed_week(week1: Path, out: Path, week: int, seed: int) -> dict:
    """A new landing batch ``out/week-NNN`` from week 1's audio: new ids, gain and shift per file."""
    rng = np.random.default_rng([seed, week])
    folder = out / f"week-{week:03d}"
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    lines, total = [], 0.0
    for line in (week1 / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        wave, sr = sf.read(str(week1 / rec["audio_filepath"]), dtype="int16", always_2d=False)
        gain = 10 ** (-rng.uniform(0.1, 1.5) / 20)
        shift = int(rng.integers(1, 161))
        w = np.concatenate([np.zeros(shift, np.float32), wave.astype(np.float32) * gain])
        w = np.clip(np.round(w), -32768, 32767).astype(np.int16)
        uid = f"w{week:03d}-{rec['id'].split('-', 1)[-1]}"
        sf.write(str(folder / "audio" / f"{uid}.wav"), w, sr, subtype="PCM_16")
        rec.update(id=uid, audio_filepath=f"audio/{uid}.wav", duration=round(len(w) / sr, 4))
        total += len(w) / sr
        lines.append(json.dumps(rec))
    tmp = folder / ".manifest.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, folder / "manifest.jsonl")  # last: the batch is complete
    return {"n": len(lines), "hours": total / 3600}


# ------------------------------------------------------------------------------------------ storage
def tier(path: Path, exclude: tuple[Path, ...] = (), seen: set | None = None) -> dict:
    """Files, apparent bytes and on-disk bytes of the distinct inodes under ``path`` not in ``seen``."""
    out = {"files": 0, "bytes": 0, "disk_bytes": 0, "links": 0}
    if not path.exists():
        return out
    seen = set() if seen is None else seen
    ex = {str(p) for p in exclude}
    paths = [path] if path.is_file() else None
    walker = ((str(path.parent), [], [path.name]),) if paths else os.walk(path)
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in ex]
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            out["files"] += 1
            if os.path.islink(p):
                out["links"] += 1
                continue
            if st.st_nlink > 1:
                out["links"] += 1
            out["bytes"] += st.st_size
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            out["disk_bytes"] += st.st_blocks * 512
    return out


def storage(cfg) -> dict:
    root = Path(cfg.root)
    ws = Path(cfg.paths.data_workspace)
    remote = Path(cfg.paths.dvc_remote)
    landing = Path(cfg.paths.landing_url)
    mlflow_db = Path(cfg.registry.tracking_uri.replace("sqlite:///", "")) if cfg.registry.tracking_uri.startswith("sqlite:///") else None
    airflow_db = root / "airflow" / "airflow.db"
    seen: set = set()
    res = {}
    # workspace first: a cache file hard-linked to a workspace file counts there, once
    res["dvc_workspace"] = tier(ws, (ws / ".dvc", ws / ".git"), seen)
    res["dvc_cache"] = tier(ws / ".dvc" / "cache", (), seen)  # disk_bytes = what the cache adds
    res["git"] = tier(ws / ".git", (), seen)
    res["dvc_remote"] = tier(remote, (), seen)
    res["feature_cache"] = tier(root / "feature_cache", (), seen)
    skip = (ws, remote, root / "feature_cache", landing)
    res["artifact_root_other"] = tier(root, skip + ((mlflow_db,) if mlflow_db else ()) + (airflow_db,), seen)
    res["mlflow_db"] = tier(mlflow_db, (), seen) if mlflow_db else tier(root / "mlflow.db", (), seen)
    res["airflow_db"] = tier(airflow_db, (), seen)
    res["landing"] = tier(landing, (), set())
    return res


# ------------------------------------------------------------------------------------------ fits
def linfit(x: list[float], y: list[float]) -> dict:
    x_, y_ = np.asarray(x, float), np.asarray(y, float)
    if len(x_) < 2 or np.ptp(x_) == 0:
        return {"slope_per_1k": None, "intercept": float(np.mean(y_)) if len(y_) else None}
    b, a = np.polyfit(x_, y_, 1)
    pred = a + b * x_
    ss = float(np.sum((y_ - y_.mean()) ** 2))
    r2 = 1 - float(np.sum((y_ - pred) ** 2)) / ss if ss > 0 else 1.0
    return {
        "slope_per_1k": float(b * 1000),  # seconds per 1,000 cumulative utterances
        "intercept": float(a),
        "r2": r2,
        "history_share_last": float(b * x_[-1] / (a + b * x_[-1])) if (a + b * x_[-1]) > 0 else None,
    }


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weeks", type=int, default=20)
    ap.add_argument("--utterances", type=int, default=100, help="new utterances per week")
    ap.add_argument("--golden", type=int, default=16, help="golden-set utterances")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cmd = f".venv/bin/python bench/scale.py --weeks {args.weeks} --utterances {args.utterances} --golden {args.golden} --profile {args.profile} --seed {args.seed}"
    cmd += "".join(f" --set {o}" for o in args.overrides) + (f" --json {args.json}" if args.json else "")

    logging.disable(logging.WARNING)  # steps and GX log at INFO/WARNING; figures only here
    import pyarrow.parquet as pq

    from pipeline_tasks.config import load_config
    from pipeline_tasks.contract import resolve
    from pipeline_tasks.steps import featurize, golden, ingest, split, validate
    from synth import corpus

    work = args.work or Path(tempfile.mkdtemp(prefix="asrflow-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    landing, gdir, root = work / "landing", work / "golden", work / "root"
    t0 = time.perf_counter()
    info1 = corpus.generate_week(landing, week=1, utterances=args.utterances, seed=args.seed, jobs=0)
    corpus.generate_golden(gdir, utterances=args.golden, seed=args.seed, jobs=0)
    gen_s = time.perf_counter() - t0
    cfg = load_config(
        args.profile,
        [f"paths.root={root}", f"paths.landing_url={landing}", f"paths.golden_dir={gdir}", *args.overrides],
    )
    print(
        f"scale: {args.weeks} weeks x {args.utterances} new utterances, profile {args.profile}, cores {os.cpu_count()}\n"
        f"corpus: week 1 generated by synth.corpus.generate_week ({info1['hours'] * 60:.1f} audio-min, {gen_s:.0f} s with the"
        f" golden set); weeks 2..{args.weeks} are perturbed copies of week 1 (new ids, gain -0.1..-1.5 dB, 1-160 samples"
        f" of leading silence, same transcripts), each a new landing batch\nwork folder: {work}\n"
    )
    weeks: list[dict] = []
    cum_utts, cum_hours = 0, 0.0
    hdr = (
        f"{'wk':>3} {'new':>4} {'total':>6} {'hours':>6} | "
        + " ".join(f"{s[:6]:>11}" for s in STEPS)
        + f" | {'all wall':>8} {'all cpu':>8} | ingest: {'fp':>5} {'parse':>5} {'dec':>5} {'merge':>5} {'add':>5} {'c+p':>5}"
        + f" | MB: {'ws':>6} {'cache+':>6} {'remote':>6} {'feat':>6} {'other':>6} {'git':>5}"
    )
    print("per step: wall s (cpu s); storage: on-disk MB of distinct inodes (cache+ = what the DVC cache adds)")
    print(hdr)
    for w in range(1, args.weeks + 1):
        if w == 1:
            new = {"n": info1["n"], "hours": info1["hours"]}
        else:
            new = perturbed_week(Path(info1["folder"]), landing, w, args.seed)
        rec: dict = {"week": w, "new_utts": new["n"], "steps": {}}
        results: dict = {}
        for step in STEPS:
            c0, w0 = cpu_s(), time.perf_counter()
            if step == "ingest":
                r = ingest.run(cfg, {})
            elif step == "validate":
                r = validate.run(cfg, {"ingest": results["ingest"]})
            elif step == "featurize":
                r = featurize.run(cfg, {"validate": results["validate"]})
            elif step == "golden":
                r = golden.run(cfg, {})
            else:
                r = split.run(cfg, {"featurize": results["featurize"], "golden": results["golden"]})
            rec["steps"][step] = {"wall_s": time.perf_counter() - w0, "cpu_s": cpu_s() - c0}
            results[step] = r
        ing = results["ingest"]
        cum_utts = int(ing["n_rows"])
        m = pq.read_table(resolve(ing, ing["manifest"]), columns=["duration_s"])
        cum_hours = float(np.sum(m.column("duration_s").to_numpy())) / 3600
        rec.update(
            cum_utts=cum_utts,
            cum_hours=cum_hours,
            n_new_ingested=int(ing["n_new"]),
            n_quarantined=int(results["validate"]["n_quarantined"]),
            n_computed_features=int(results["featurize"].get("n_computed", 0)),
            ingest_timings=ing.get("timings", {}),
            wall_s=sum(s["wall_s"] for s in rec["steps"].values()),
            cpu_s=sum(s["cpu_s"] for s in rec["steps"].values()),
            storage=storage(cfg),
        )
        weeks.append(rec)
        st, it = rec["storage"], rec["ingest_timings"]
        mb = lambda k, st=st: st[k]["disk_bytes"] / 1e6  # noqa: E731
        print(
            f"{w:>3} {new['n']:>4} {cum_utts:>6} {cum_hours:>6.2f} | "
            + " ".join(f"{rec['steps'][s]['wall_s']:>5.1f}({rec['steps'][s]['cpu_s']:>4.1f})" for s in STEPS)
            + f" | {rec['wall_s']:>8.1f} {rec['cpu_s']:>8.1f} | ingest: "
            + " ".join(f"{it.get(k, float('nan')):>5.2f}" for k in ("fingerprint_s", "parse_s", "decode_s", "merge_s", "dvc_add_s", "dvc_commit_push_s"))
            + f" | MB: {mb('dvc_workspace'):>6.1f} {mb('dvc_cache'):>6.1f} {mb('dvc_remote'):>6.1f} {mb('feature_cache'):>6.1f}"
            f" {mb('artifact_root_other'):>6.1f} {mb('git'):>5.1f}",
            flush=True,
        )

    # ---- fits and ratios (weeks 2..N)
    later = weeks[1:]
    x = [r["cum_utts"] for r in later]
    fits = {"total": {"wall": linfit(x, [r["wall_s"] for r in later]), "cpu": linfit(x, [r["cpu_s"] for r in later])}}
    for s in STEPS:
        fits[s] = {
            "wall": linfit(x, [r["steps"][s]["wall_s"] for r in later]),
            "cpu": linfit(x, [r["steps"][s]["cpu_s"] for r in later]),
        }
    for k in ("fingerprint_s", "parse_s", "decode_s", "merge_s", "dvc_add_s", "dvc_commit_push_s"):
        ys = [r["ingest_timings"].get(k) for r in later]
        if all(v is not None for v in ys):
            fits[f"ingest.{k}"] = {"wall": linfit(x, ys)}
    summary: dict = {"fits_vs_cumulative_utts": fits}
    print(f"\nlinear fit vs cumulative utterances, weeks 2..{args.weeks} (seconds = intercept + slope x cumulative/1000):")
    print(f"  {'':22s} {'wall: intercept':>15} {'slope/1k':>9} {'r2':>5} {'hist.share@N':>12} | {'cpu: intercept':>14} {'slope/1k':>9} {'hist.share@N':>12}")
    for name, f in fits.items():
        fw, fc = f["wall"], f.get("cpu")
        def fmt(v, p=".3f"):
            return format(v, p) if isinstance(v, (int, float)) else "-"
        line = f"  {name:22s} {fmt(fw['intercept']):>15} {fmt(fw['slope_per_1k']):>9} {fmt(fw.get('r2'), '.2f'):>5} {fmt(fw.get('history_share_last'), '.1%'):>12}"
        if fc:
            line += f" | {fmt(fc['intercept']):>14} {fmt(fc['slope_per_1k']):>9} {fmt(fc.get('history_share_last'), '.1%'):>12}"
        print(line)
    if len(weeks) >= 2:
        w2, wn = weeks[1], weeks[-1]
        per_new = [r["wall_s"] / max(1, r["new_utts"]) for r in later]
        summary["cost_per_new_utt_wall_s"] = {"week2": per_new[0], "last": per_new[-1], "mean": float(np.mean(per_new))}
        summary["ratio_last_over_week2_wall"] = wn["wall_s"] / w2["wall_s"]
        summary["ratio_last_over_week2_cpu"] = wn["cpu_s"] / w2["cpu_s"]
        k = min(3, len(later))
        summary["ratio_last3_over_first3_wall"] = float(np.mean([r["wall_s"] for r in later[-k:]]) / np.mean([r["wall_s"] for r in later[:k]]))
        summary["ratio_last3_over_first3_cpu"] = float(np.mean([r["cpu_s"] for r in later[-k:]]) / np.mean([r["cpu_s"] for r in later[:k]]))
        summary["ratio_by_step_last_over_week2_cpu"] = {s: wn["steps"][s]["cpu_s"] / max(w2["steps"][s]["cpu_s"], 1e-9) for s in STEPS}
        print(
            f"\ncost per new utterance (wall): week 2 {per_new[0] * 1000:.1f} ms, week {args.weeks} {per_new[-1] * 1000:.1f} ms"
            f"\nnon-training wall, week {args.weeks} / week 2: {summary['ratio_last_over_week2_wall']:.2f}x"
            f" (cpu {summary['ratio_last_over_week2_cpu']:.2f}x)   goal <= 1.2"
            f"\n  mean of the last {k} weeks / mean of weeks 2..{k + 1}: wall {summary['ratio_last3_over_first3_wall']:.2f}x,"
            f" cpu {summary['ratio_last3_over_first3_cpu']:.2f}x"
            f"\n  by step (cpu, week {args.weeks} / week 2): "
            + ", ".join(f"{s} {v:.2f}x" for s, v in summary["ratio_by_step_last_over_week2_cpu"].items())
        )
    last = weeks[-1]
    hours = last["cum_hours"]
    per_hour = {k: {"mb_per_audio_hour": v["disk_bytes"] / 1e6 / hours, "files": v["files"], "mb": v["disk_bytes"] / 1e6,
                    "apparent_mb": v["bytes"] / 1e6, "linked_files": v["links"]} for k, v in last["storage"].items()}
    summary["storage_per_audio_hour"] = per_hour
    summary["storage_fit_vs_hours"] = {
        k: linfit([r["cum_hours"] * 1000 for r in weeks], [r["storage"][k]["disk_bytes"] / 1e6 for r in weeks])
        for k in ("dvc_workspace", "dvc_cache", "dvc_remote", "feature_cache", "git", "artifact_root_other")
    }
    print(f"\nstorage after week {args.weeks} ({hours:.2f} audio-h, {last['cum_utts']} utterances); on-disk MB of distinct inodes:")
    print(f"  {'tier':22s} {'files':>7} {'MB':>9} {'MB/audio-h':>11} {'apparent MB':>12} {'linked':>7}  growth MB per audio-h (fit)")
    for k, v in per_hour.items():
        fit = summary["storage_fit_vs_hours"].get(k)
        g = f"{fit['slope_per_1k']:.1f}" if fit and fit.get("slope_per_1k") is not None else "-"
        print(f"  {k:22s} {v['files']:>7} {v['mb']:>9.1f} {v['mb_per_audio_hour']:>11.1f} {v['apparent_mb']:>12.1f} {v['linked_files']:>7}  {g}")
    if not last["storage"]["mlflow_db"]["files"]:
        print("  (no MLflow DB and no Airflow metadata DB: these steps create neither; training and the DAGs do)")

    out = {"command": cmd, "weeks": weeks, "summary": summary, "args": {k: str(v) for k, v in vars(args).items()},
           "corpus": "week 1 generated (synth.corpus.generate_week); later weeks perturbed copies of week 1",
           "cpu_count": os.cpu_count(), "load_avg_end": os.getloadavg()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    print(f"reproduce: {cmd}")
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

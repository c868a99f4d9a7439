"""Benchmark: the featurize step's feature cache.

Measures, side by side in one run (ratios; the machine is shared and noisy):

1. throughput: our featurize (FLAC decode + numpy log-mel + Parquet shard write + index) vs
   Lhotse 1.33's ``CutSet.compute_and_store_features`` (Kaldi-style ``Fbank``, 80 bins,
   ``NumpyFilesWriter``) on the same FLAC files, with the same CPU budget: both in one process
   (ours ``jobs=1``; Lhotse ``num_jobs=1``, one torch thread), and both with one worker process per
   core (``--jobs``, default all cores). Repeated ``--repeats`` times, interleaved, with
   min/median/max. Figure: audio hours per CPU-core-minute of the single-process runs (user+sys CPU
   of this process), and the wall-time ratio of the all-cores runs. Goal >= 3x (issue 18).
   A decode profile (FLAC -> float32 alone, and FLAC -> int16) says how much of ours is decoding.
2. reading cached features (``FeatureTable``) vs recomputing them from FLAC. Goal >= 10x.
3. incremental featurize with 10% new utterances vs the full run (wall time). Goal <= 15%.
4. shard layout: ``features`` as ``list<float16>`` vs ``large_binary`` float16 bytes (the layout
   featurize uses), write and read times and file sizes, plus binary + zstd.

Corpus: ``--hours`` of audio (default 1) from ``synth.corpus.generate_week`` (espeak-ng / Festival
speech; as many weeks of 400 utterances as needed), decoded to 16 kHz mono FLAC like ingest does,
cached under ``bench/results/tmp/featurize``. Lhotse is bench-only: ``make bench`` installs it;
without it, part 1 runs our side only and says so.

    .venv/bin/python bench/featurize.py [--hours 1] [--jobs 0] [--shard-size 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=UserWarning)
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import soundfile as sf  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from data_contracts.schema import UTTERANCE_SCHEMA  # noqa: E402
from model_code.audio import load_audio, pcm16_hash, write_flac  # noqa: E402
from model_code.features import feature_kwargs, logmel  # noqa: E402
from pipeline_tasks.config import FeatureConfig  # noqa: E402
from pipeline_tasks.services.feature_cache import featurize_manifest  # noqa: E402

WORK = REPO / "bench" / "results" / "tmp" / "featurize"


def cpu_s() -> float:
    """CPU seconds (user + sys) of this process and its finished children."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def cpu_self_s() -> float:
    """CPU seconds of this process only (single-process runs: a pool worker of an earlier run that is
    reaped late must not be charged to them)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime


class Timer:
    def __init__(self, self_only: bool = False):
        self.clock = cpu_self_s if self_only else cpu_s

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), self.clock()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = self.clock() - self.c0


def _store_week(week_dir: Path, ws: Path, batch: str, rows: list[dict], limit_s: float) -> float:
    """Decode one generated week into the FLAC store (as ingest does) until ``limit_s`` of audio."""
    total = 0.0
    for line in (week_dir / "manifest.jsonl").read_text().splitlines():
        if total >= limit_s:
            break
        rec = json.loads(line)
        wave, osr, och = load_audio(week_dir / rec["audio_filepath"], 16000)
        h = pcm16_hash(wave)
        rel = f"raw/{h[:2]}/{h}.flac"
        if not (ws / rel).exists():
            write_flac(ws / rel, wave, 16000)
        dur = wave.size / 16000
        total += dur
        rows.append(
            dict(
                id=rec["id"], audio_hash=h, audio_path=rel, duration_s=dur, num_samples=wave.size,
                sample_rate=16000, orig_sample_rate=osr, orig_channels=och, text=rec["text"],
                text_raw=rec["text"], speaker=rec.get("speaker"), batch=batch,
                source=f"m:{len(rows) + 1}", long_form=dur > 20.0,
            )
        )
    return total


def make_corpus(hours: float, seed: int, jobs: int) -> tuple[Path, Path, float]:
    """Generate (once) ``hours`` of synthetic speech, store it as 16 kHz FLAC, write the manifest."""
    ws, manifest = WORK / "workspace", WORK / f"manifest-{hours:g}h-{seed}.parquet"
    if manifest.exists():
        t = pq.read_table(manifest)
        return ws, manifest, float(np.sum(t.column("duration_s").to_numpy())) / 3600
    from synth import corpus

    landing = WORK / f"landing-{seed}"
    rows: list[dict] = []
    total, week = 0.0, 0
    while total < hours * 3600:
        week += 1
        info = corpus.generate_week(landing, week=week, utterances=400, seed=seed, jobs=jobs)
        total += _store_week(Path(info["folder"]), ws, f"week-{week:03d}", rows, hours * 3600 - total)
    pq.write_table(pa.Table.from_pylist(rows, schema=UTTERANCE_SCHEMA), manifest)
    return ws, manifest, total / 3600


def stats(xs: list[float]) -> dict:
    return {"min": float(np.min(xs)), "median": float(np.median(xs)), "max": float(np.max(xs)), "n": len(xs)}


def decode_profile(manifest: Path, ws: Path) -> dict:
    """Decode alone (no features): FLAC -> float32 (what featurize reads) and FLAC -> int16."""
    paths = [ws / p for p in pq.read_table(manifest, columns=["audio_path"]).column("audio_path").to_pylist()]
    out = {}
    for dtype in ("float32", "int16"):
        with Timer(self_only=True) as t:
            for p in paths:
                with sf.SoundFile(str(p)) as f:
                    f.read(dtype=dtype)
        out[dtype] = {"cpu_s": t.cpu, "wall_s": t.wall}
    return out


def ours(manifest: Path, ws: Path, fcfg: FeatureConfig, root: Path) -> tuple[Timer, dict]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with Timer(self_only=fcfg.jobs == 1) as t:  # jobs=1 computes in this process
        out = featurize_manifest(manifest, ws, fcfg, root, root / "index.parquet")
    return t, out


def lhotse_run(manifest: Path, ws: Path, jobs: int, out: Path) -> Timer:
    import torch
    from lhotse import CutSet, Fbank, FbankConfig, Recording, RecordingSet
    from lhotse.features.io import NumpyFilesWriter

    # one torch thread per process, as Lhotse itself recommends for num_jobs > 1 (without it the
    # pool oversubscribes the cores and is several times slower); also the fairest CPU figure
    torch.set_num_threads(1)
    t = pq.read_table(manifest, columns=["id", "audio_path"]).to_pylist()
    recs = RecordingSet.from_recordings(
        Recording.from_file(ws / r["audio_path"], recording_id=r["id"]) for r in t
    )
    cuts = CutSet.from_manifests(recordings=recs)
    shutil.rmtree(out, ignore_errors=True)
    with Timer(self_only=jobs == 1) as tm:  # num_jobs=1 runs in this process
        cuts.compute_and_store_features(
            extractor=Fbank(FbankConfig(num_mel_bins=80)),
            storage_path=out,
            num_jobs=jobs,
            storage_type=NumpyFilesWriter,
            progress_bar=False,
        )
    return tm


def layout_bench(index: Path, work: Path, repeats: int) -> dict:
    """list<float16> vs large_binary float16 bytes (+ zstd), on the real features of the corpus."""
    from model_code.dataset import FeatureTable

    table = FeatureTable(index)
    feats = [table.features(i).astype(np.float16) for i in range(len(table))]
    n_mels = feats[0].shape[1]
    flat = np.concatenate([f.reshape(-1) for f in feats])
    offs = np.concatenate([[0], np.cumsum([f.size for f in feats])]).astype(np.int64)
    list_col = pa.LargeListArray.from_arrays(pa.array(offs), pa.array(flat, type=pa.float16()))
    bin_col = pa.array([f.tobytes() for f in feats], type=pa.large_binary())

    def read_list(p):
        col = pq.read_table(p).column("features").combine_chunks()
        vals, o = col.values.to_numpy(zero_copy_only=False), col.offsets.to_numpy()
        return [vals[o[i] : o[i + 1]].reshape(-1, n_mels).astype(np.float32) for i in range(len(col))]

    def read_bin(p):
        from model_code.feature_store import decode_column

        col = pq.read_table(p).column("features")
        nf = np.array([f.shape[0] for f in feats])
        return [x.astype(np.float32) for x in decode_column(col, nf, n_mels, np.dtype("float16"))]

    res = {}
    for name, col, comp, reader in [
        ("list<float16>", list_col, "none", read_list),
        ("large_binary", bin_col, "none", read_bin),
        ("large_binary+zstd", bin_col, "zstd", read_bin),
    ]:
        p = work / f"layout-{name.replace('<', '_').replace('>', '').replace('+', '_')}.parquet"
        w, r = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pq.write_table(pa.table({"features": col}), p, row_group_size=64, compression=comp)
            w.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = reader(p)
            r.append(time.perf_counter() - t0)
        assert np.array_equal(got[-1], feats[-1].astype(np.float32))
        res[name] = {"write_s": min(w), "read_s": min(r), "mb": os.path.getsize(p) / 1e6}
    return res


def fmt(st: dict, unit: str = "s") -> str:
    return f"{st['median']:6.2f} {unit} (min {st['min']:.2f}, max {st['max']:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=1.0, help="audio hours in the corpus")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--jobs", type=int, default=0, help="processes of the all-cores runs (0 = all cores)")
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "featurize.json")
    args = ap.parse_args()
    jobs = args.jobs or os.cpu_count() or 1
    cmd = (
        f".venv/bin/python bench/featurize.py --hours {args.hours:g} --seed {args.seed} "
        f"--jobs {args.jobs} --shard-size {args.shard_size} --repeats {args.repeats}"
    )
    WORK.mkdir(parents=True, exist_ok=True)
    ws, manifest, hours = make_corpus(args.hours, args.seed, 0)
    fcfg = FeatureConfig(shard_size=args.shard_size, jobs=jobs, parallel_min_audio_s=0)  # always the pool
    n = pq.read_metadata(manifest).num_rows
    print(
        f"corpus: {n} utterances, {hours * 60:.1f} audio-minutes (synth.corpus.generate_week), 16 kHz FLAC;"
        f" cores: {os.cpu_count()}, all-cores runs use {jobs} processes; load average {os.getloadavg()[0]:.1f}"
    )
    figures: dict = {"command": cmd, "utterances": n, "audio_hours": hours, "cpu_count": os.cpu_count(),
                     "jobs": jobs, "repeats": args.repeats, "load_avg_start": os.getloadavg()}

    # (1) throughput, ours vs lhotse, same CPU budget: 1 process each, then `jobs` processes each.
    # CPU figures come from the single-process runs (a pool's CPU time is only visible once its
    # workers are reaped, which Lhotse's executor does not do before it returns); the pool runs give
    # wall-clock figures. Repeats are interleaved so load changes hit every variant alike.
    try:
        import lhotse  # noqa: F401

        have_lhotse = True
    except ImportError:
        have_lhotse = False
    fcfg1 = FeatureConfig(shard_size=args.shard_size, jobs=1)
    runs_t: dict[str, list[Timer]] = {}
    for _ in range(args.repeats):
        runs = [
            ("ours_1", lambda: ours(manifest, ws, fcfg1, WORK / "root-1")[0]),
            ("ours_pool", lambda: ours(manifest, ws, fcfg, WORK / "root-full")[0]),
        ]
        if have_lhotse:
            runs += [
                ("lhotse_1", lambda: lhotse_run(manifest, ws, 1, WORK / "lhotse-feats")),
                ("lhotse_pool", lambda: lhotse_run(manifest, ws, jobs, WORK / "lhotse-feats")),
            ]
        for name, fn in runs:
            runs_t.setdefault(name, []).append(fn())
    spread = {k: {"cpu_s": stats([t.cpu for t in v]), "wall_s": stats([t.wall for t in v])} for k, v in runs_t.items()}
    figures["spread"] = spread
    o1c, o1w, opw = spread["ours_1"]["cpu_s"], spread["ours_1"]["wall_s"], spread["ours_pool"]["wall_s"]
    ours_rate = hours / (o1c["median"] / 60)
    figures["ours"] = {
        "cpu_s_1proc": o1c["median"],
        "wall_s_1proc": o1w["median"],
        "wall_s_pool": opw["median"],
        "audio_h_per_cpu_core_min": ours_rate,
    }
    prof = decode_profile(manifest, ws)
    figures["decode_profile"] = prof
    print(f"\n(1) featurize throughput (decode + log-mel + write), {hours * 60:.0f} audio-min, median of {args.repeats} (min, max)")
    print(f"  ours   1 proc : cpu {fmt(o1c)}  wall {fmt(o1w)}  -> {ours_rate:.2f} audio-h / CPU-core-min")
    print(f"  ours   {jobs} procs: wall {fmt(opw)}")
    dec = prof["float32"]["cpu_s"]
    print(
        f"  decode profile (1 proc, FLAC only): float32 {dec:.2f} cpu-s = {100 * dec / o1c['median']:.0f}% of ours;"
        f" int16 {prof['int16']['cpu_s']:.2f} cpu-s"
    )
    if have_lhotse:
        l1c, l1w, lpw = spread["lhotse_1"]["cpu_s"], spread["lhotse_1"]["wall_s"], spread["lhotse_pool"]["wall_s"]
        lh_rate = hours / (l1c["median"] / 60)
        figures["lhotse"] = {
            "cpu_s_1proc": l1c["median"],
            "wall_s_1proc": l1w["median"],
            "wall_s_pool": lpw["median"],
            "audio_h_per_cpu_core_min": lh_rate,
        }
        per_rep = [lc.cpu / oc.cpu for lc, oc in zip(runs_t["lhotse_1"], runs_t["ours_1"], strict=True)]
        per_rep_pool = [lp.wall / op.wall for lp, op in zip(runs_t["lhotse_pool"], runs_t["ours_pool"], strict=True)]
        figures["throughput_ratio_cpu"] = ours_rate / lh_rate
        figures["throughput_ratio_wall_pool"] = lpw["median"] / opw["median"]
        figures["throughput_ratio_cpu_per_repeat"] = stats(per_rep)
        figures["throughput_ratio_wall_pool_per_repeat"] = stats(per_rep_pool)
        print(f"  lhotse 1 proc : cpu {fmt(l1c)}  wall {fmt(l1w)}  -> {lh_rate:.2f} audio-h / CPU-core-min")
        print(f"  lhotse {jobs} procs: wall {fmt(lpw)}")
        rr, rp = figures["throughput_ratio_cpu_per_repeat"], figures["throughput_ratio_wall_pool_per_repeat"]
        print(
            f"  ratio ours/lhotse: {ours_rate / lh_rate:.2f}x per CPU-core-minute (per repeat {rr['min']:.2f}-{rr['max']:.2f}),"
            f" {lpw['median'] / opw['median']:.2f}x wall with {jobs} procs each (per repeat {rp['min']:.2f}-{rp['max']:.2f})"
            "   goal >= 3x"
        )
    else:
        print(
            "  lhotse : NOT INSTALLED (pip install 'lhotse==1.33.*' urllib3, or `make bench`); comparison skipped"
        )

    # (2) cached read vs recompute from FLAC (single process both)
    # (imported here, not at the top: spawned featurize workers re-import this script, and torch
    # in every worker would be charged to our throughput)
    from model_code.dataset import FeatureTable

    index = WORK / "root-full" / "index.parquet"
    m = pq.read_table(manifest, columns=["audio_path"]).column("audio_path").to_pylist()
    kw = feature_kwargs(fcfg)
    reads, recs = [], []
    for _ in range(args.repeats):
        with Timer(self_only=True) as tr:
            table = FeatureTable(index)
            cached = [table.features(i) for i in range(len(table))]
        reads.append(tr)
        with Timer(self_only=True) as tc, threadpool_limits(limits=1, user_api="blas"):  # as featurize computes them
            fresh = [logmel(sf.read(ws / p, dtype="float32")[0], **kw) for p in m]
        recs.append(tc)
        assert all(a.shape == b.shape for a, b in zip(cached, fresh, strict=True))
        del cached, fresh
    rw, rc = np.median([t.wall for t in reads]), np.median([t.cpu for t in reads])
    cw, cc = np.median([t.wall for t in recs]), np.median([t.cpu for t in recs])
    figures.update(read_wall_s=rw, read_cpu_s=rc, recompute_wall_s=cw, recompute_cpu_s=cc)
    figures["read_speedup_wall"], figures["read_speedup_cpu"] = cw / rw, cc / max(rc, 1e-9)
    figures["read_speedup_wall_per_repeat"] = stats([c.wall / r.wall for c, r in zip(recs, reads, strict=True)])
    print("\n(2) cached features vs recomputing from FLAC (all utterances, 1 process, median)")
    sp = figures["read_speedup_wall_per_repeat"]
    print(
        f"  read cache {rw:.3f} s wall ({rc:.3f} s cpu)   recompute {cw:.3f} s wall ({cc:.3f} s cpu)"
        f"   -> {cw / rw:.1f}x wall (per repeat {sp['min']:.1f}-{sp['max']:.1f}), {cc / max(rc, 1e-9):.1f}x cpu   goal >= 10x"
    )

    # (3) incremental: 90% cached, then the full manifest (10% new); the new shards are removed
    # between repeats so each repeat computes the same 10%
    full = pq.read_table(manifest)
    n90 = int(round(n * 0.9))
    m90 = WORK / "manifest-90.parquet"
    pq.write_table(full.slice(0, n90), m90)
    root = WORK / "root-inc"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    featurize_manifest(m90, ws, fcfg, root, root / "index90.parquet")
    base_files = {p for p in root.rglob("*") if p.is_file()}
    hs = full.column("audio_hash").to_pylist()
    incs = []
    for _ in range(args.repeats):
        for p in root.rglob("*"):
            if p.is_file() and p not in base_files:
                p.unlink()
        with Timer() as ti:
            out = featurize_manifest(manifest, ws, fcfg, root, root / "index.parquet")
        assert out["n_computed"] == len(set(hs[n90:]) - set(hs[:n90]))
        incs.append(ti)
    inc = stats([t.wall for t in incs])
    figures["incremental_wall_s"] = inc["median"]
    figures["incremental_wall_s_spread"] = inc
    figures["incremental_share_vs_pool"] = inc["median"] / opw["median"]
    figures["incremental_share_vs_1proc"] = inc["median"] / o1w["median"]
    print(f"\n(3) incremental featurize, {n - n90} new of {n} utterances (same code path, {jobs} procs)")
    print(
        f"  incremental {fmt(inc)} wall = {100 * inc['median'] / opw['median']:.1f}% of the full run ({opw['median']:.2f} s, "
        f"{jobs} procs), {100 * inc['median'] / o1w['median']:.1f}% of the full 1-proc run ({o1w['median']:.2f} s)   goal <= 15%"
    )

    # (4) layout
    lay = layout_bench(index, WORK, max(2, args.repeats))
    figures["layout"] = lay
    print("\n(4) shard layout for float16 features (all utterances, row groups of 64)")
    for name, r in lay.items():
        print(f"  {name:18s} write {r['write_s']:.3f} s  read {r['read_s']:.3f} s  size {r['mb']:.1f} MB")
    lb, ll = lay["large_binary"], lay["list<float16>"]
    print(
        f"  large_binary vs list<float16>: read {ll['read_s'] / lb['read_s']:.1f}x faster, write {ll['write_s'] / lb['write_s']:.1f}x faster"
    )

    figures["load_avg_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nreproduce: {cmd}\nfigures written to {args.json}")


if __name__ == "__main__":
    main()

"""Benchmark: the featurize step's feature cache.

Measures, side by side in one run (ratios; the machine is shared and noisy):

1. throughput: our featurize (FLAC decode + numpy log-mel + Parquet shard write + index) vs
   Lhotse 1.33's ``CutSet.compute_and_store_features`` (Kaldi-style ``Fbank``, 80 bins,
   ``NumpyFilesWriter``) on the same FLAC files, same number of worker processes. Figure: audio
   hours per CPU-core-minute (user+sys CPU time of this process and its workers). Goal >= 1.5x.
2. reading cached features (``FeatureTable``) vs recomputing them from FLAC. Goal >= 10x.
3. incremental featurize with 10% new utterances vs the full run (wall time). Goal <= 15%.
4. shard layout: ``features`` as ``list<float16>`` vs ``large_binary`` float16 bytes (the layout
   featurize uses), write and read times and file sizes, plus binary + zstd.

The corpus is ``asrflow corpus generate``'s synthetic speech (espeak-ng), decoded to 16 kHz mono FLAC
like ingest does. Lhotse is bench-only: ``make bench`` installs it; without it, part 1 says so and
the rest still runs.

    .venv/bin/python bench/featurize.py [--utterances 200] [--jobs 2] [--shard-size 100] [--repeats 2]
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


class Timer:
    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = cpu_s() - self.c0


def make_corpus(n: int, seed: int, jobs: int) -> tuple[Path, Path, float]:
    """Generate (once) ``n`` synthetic utterances, store them as 16 kHz FLAC, write the manifest."""
    ws, manifest = WORK / "workspace", WORK / f"manifest-{n}-{seed}.parquet"
    if manifest.exists():
        t = pq.read_table(manifest)
        return ws, manifest, float(np.sum(t.column("duration_s").to_numpy())) / 3600
    from synth import corpus

    landing = WORK / f"landing-{n}-{seed}"
    info = corpus.generate_week(landing, week=1, utterances=n, seed=seed, jobs=jobs)
    week = Path(info["folder"]) if "folder" in info else landing / "week-001"
    rows = []
    for line in (week / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        wave, osr, och = load_audio(week / rec["audio_filepath"], 16000)
        h = pcm16_hash(wave)
        rel = f"raw/{h[:2]}/{h}.flac"
        if not (ws / rel).exists():
            write_flac(ws / rel, wave, 16000)
        rows.append(
            dict(
                id=rec["id"],
                audio_hash=h,
                audio_path=rel,
                duration_s=wave.size / 16000,
                num_samples=wave.size,
                sample_rate=16000,
                orig_sample_rate=osr,
                orig_channels=och,
                text=rec["text"],
                text_raw=rec["text"],
                speaker=rec.get("speaker"),
                batch="week-001",
                source=f"m:{len(rows) + 1}",
                long_form=wave.size / 16000 > 20.0,
            )
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=UTTERANCE_SCHEMA), manifest)
    return ws, manifest, sum(r["duration_s"] for r in rows) / 3600


def ours(manifest: Path, ws: Path, fcfg: FeatureConfig, root: Path) -> tuple[Timer, dict]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with Timer() as t:
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
    with Timer() as tm:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--utterances", type=int, default=200)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cmd = (
        f".venv/bin/python bench/featurize.py --utterances {args.utterances} --seed {args.seed} "
        f"--jobs {args.jobs} --shard-size {args.shard_size} --repeats {args.repeats}"
    )
    WORK.mkdir(parents=True, exist_ok=True)
    ws, manifest, hours = make_corpus(args.utterances, args.seed, args.jobs)
    fcfg = FeatureConfig(
        shard_size=args.shard_size, jobs=args.jobs, parallel_min_audio_s=0
    )  # always the pool
    n = pq.read_metadata(manifest).num_rows
    print(f"corpus: {n} utterances, {hours * 60:.1f} audio-minutes, 16 kHz FLAC; cores: {os.cpu_count()}")
    figures: dict = {"command": cmd, "utterances": n, "audio_hours": hours, "cpu_count": os.cpu_count()}

    # (1) throughput, ours vs lhotse. CPU figures come from single-process runs (a pool's CPU time
    # is only visible once its workers are reaped, which Lhotse's executor does not do before it
    # returns); the pool runs (--jobs) give the wall-clock figures. Interleaved repeats, best of each.
    try:
        import lhotse  # noqa: F401

        have_lhotse = True
    except ImportError:
        have_lhotse = False
    fcfg1 = FeatureConfig(shard_size=args.shard_size, jobs=1)
    best = {}
    for _ in range(args.repeats):
        runs = [
            ("ours_1", lambda: ours(manifest, ws, fcfg1, WORK / "root-1")[0]),
            ("ours_pool", lambda: ours(manifest, ws, fcfg, WORK / "root-full")[0]),
        ]
        if have_lhotse:
            runs += [
                ("lhotse_1", lambda: lhotse_run(manifest, ws, 1, WORK / "lhotse-feats")),
                ("lhotse_pool", lambda: lhotse_run(manifest, ws, args.jobs, WORK / "lhotse-feats")),
            ]
        for name, fn in runs:
            t = fn()
            if name in best:  # best (lowest) CPU and wall figures, each on its own
                t.cpu, t.wall = min(t.cpu, best[name].cpu), min(t.wall, best[name].wall)
            best[name] = t
    o1, op = best["ours_1"], best["ours_pool"]
    ours_rate = hours / (o1.cpu / 60)
    figures["ours"] = {
        "cpu_s_1proc": o1.cpu,
        "wall_s_1proc": o1.wall,
        "wall_s_pool": op.wall,
        "audio_h_per_cpu_core_min": ours_rate,
    }
    print(f"\n(1) featurize throughput (decode + log-mel + write), best of {args.repeats}")
    print(
        f"  ours   : 1 proc cpu {o1.cpu:6.2f} s (wall {o1.wall:6.2f} s) -> {ours_rate:.3f} audio-h / CPU-core-min;"
        f"  {args.jobs} procs wall {op.wall:6.2f} s"
    )
    if have_lhotse:
        l1, lp = best["lhotse_1"], best["lhotse_pool"]
        lh_rate = hours / (l1.cpu / 60)
        figures["lhotse"] = {
            "cpu_s_1proc": l1.cpu,
            "wall_s_1proc": l1.wall,
            "wall_s_pool": lp.wall,
            "audio_h_per_cpu_core_min": lh_rate,
        }
        figures["throughput_ratio_cpu"] = ours_rate / lh_rate
        figures["throughput_ratio_wall_pool"] = lp.wall / op.wall
        print(
            f"  lhotse : 1 proc cpu {l1.cpu:6.2f} s (wall {l1.wall:6.2f} s) -> {lh_rate:.3f} audio-h / CPU-core-min;"
            f"  {args.jobs} procs wall {lp.wall:6.2f} s"
        )
        print(
            f"  ratio ours/lhotse: {ours_rate / lh_rate:.2f}x per CPU-core-minute, "
            f"{lp.wall / op.wall:.2f}x wall with {args.jobs} procs   goal >= 1.5x"
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
        with Timer() as tr:
            table = FeatureTable(index)
            cached = [table.features(i) for i in range(len(table))]
        reads.append(tr)
        with Timer() as tc, threadpool_limits(limits=1, user_api="blas"):  # as featurize computes them
            fresh = [logmel(sf.read(ws / p, dtype="float32")[0], **kw) for p in m]
        recs.append(tc)
    assert all(a.shape == b.shape for a, b in zip(cached, fresh, strict=True))
    rw, rc = min(t.wall for t in reads), min(t.cpu for t in reads)
    cw, cc = min(t.wall for t in recs), min(t.cpu for t in recs)
    figures.update(read_wall_s=rw, read_cpu_s=rc, recompute_wall_s=cw, recompute_cpu_s=cc)
    figures["read_speedup_wall"], figures["read_speedup_cpu"] = cw / rw, cc / max(rc, 1e-9)
    print("\n(2) cached features vs recomputing from FLAC (all utterances, 1 process)")
    print(
        f"  read cache {rw:.3f} s wall ({rc:.3f} s cpu)   recompute {cw:.3f} s wall ({cc:.3f} s cpu)"
        f"   -> {cw / rw:.1f}x wall, {cc / max(rc, 1e-9):.1f}x cpu   goal >= 10x"
    )

    # (3) incremental: 90% cached, then the full manifest (10% new)
    full = pq.read_table(manifest)
    n90 = int(round(n * 0.9))
    m90 = WORK / "manifest-90.parquet"
    pq.write_table(full.slice(0, n90), m90)
    incs = []
    for _ in range(args.repeats):
        root = WORK / "root-inc"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        featurize_manifest(m90, ws, fcfg, root, root / "index90.parquet")
        with Timer() as ti:
            out = featurize_manifest(manifest, ws, fcfg, root, root / "index.parquet")
        hs = full.column("audio_hash").to_pylist()
        assert out["n_computed"] == len(set(hs[n90:]) - set(hs[:n90]))
        incs.append(ti)
    inc = min(incs, key=lambda t: t.wall)
    figures["incremental_wall_s"] = inc.wall
    figures["incremental_share_vs_pool"] = inc.wall / op.wall
    figures["incremental_share_vs_1proc"] = inc.wall / o1.wall
    print(
        f"\n(3) incremental featurize, {n - n90} new of {n} utterances (same code path, --jobs {args.jobs})"
    )
    print(
        f"  incremental {inc.wall:.2f} s wall = {100 * inc.wall / op.wall:.1f}% of the full run ({op.wall:.2f} s, "
        f"{args.jobs} procs), {100 * inc.wall / o1.wall:.1f}% of the full 1-proc run ({o1.wall:.2f} s)   goal <= 15%"
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

    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "featurize.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nreproduce: {cmd}\nfigures written to bench/results/featurize.json")


if __name__ == "__main__":
    main()

"""Training throughput of the real DeepSpeed loop: audio-seconds per second, padding, data waiting.

    .venv/bin/python bench/train_throughput.py [--steps 200] [--profile local] [--index train.parquet]
                                               [--workers 0 1] [--precisions fp32 bf16]
                                               [--json bench/results/train_throughput.json]

Runs :func:`model_code.training.train` (the same code the ``train`` step runs: DeepSpeed engine,
DynamicBucketingSampler, DataLoader, SpecAugment, CTC) for ``--steps`` optimizer steps of the
profile's model and sampler settings, once per DataLoader worker count in ``--workers``, on

* synthetic features (default): durations drawn like the espeak corpus (log-normal, median
  ~3 s, 0.5–15 s), random text; written in the real feature-shard/index format; or
* a real feature index (``--index``, e.g. the split step's ``train.parquet``).

Figures per variant: audio-seconds trained per wall second (steady state: the first 5 steps are
excluded), padding share, share of step time spent waiting for the next batch, p50/p95 batch
load time, ms per step, and each precision's speed as a ratio to fp32 with the same workers.
``--precisions`` defaults to bf16 and fp32 on CUDA and on CPUs with native bf16 (where
``train.precision: bf16`` means bf16 autocast with fp32 weights), fp32 alone elsewhere; the
``precision`` column is what the run resolved to. With CUDA it also samples GPU utilization
(``torch.cuda.utilization``, needs pynvml) and peak memory; without CUDA it says so.
Nothing is asserted: the machine is shared, compare variants of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic_index(folder: Path, n_utts: int, n_mels: int, seed: int = 0) -> Path:
    """A feature shard + FEATURE_INDEX_SCHEMA index of ``n_utts`` random utterances (100 frames/s)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_contracts.schema import FEATURE_INDEX_SCHEMA
    from model_code.dataset import shard_table

    rng = np.random.default_rng(seed)
    durs = np.clip(rng.lognormal(np.log(3.0), 0.5, n_utts), 0.5, 15.0)
    letters = list("abcdefghijklmnopqrstuvwxyz ")
    ids, feats, texts = [], [], []
    for i, d in enumerate(durs):
        t = int(d * 100)
        feats.append(rng.standard_normal((t, n_mels)).astype(np.float32))
        texts.append("".join(rng.choice(letters, size=max(int(d * 12), 1))).strip() or "a")
        ids.append(f"syn-{i:05d}")
    shard = folder / "shard.parquet"
    hashes = [f"{i:064d}" for i in range(n_utts)]
    pq.write_table(shard_table(ids, hashes, feats, texts, [float(x) for x in durs], [None] * n_utts), shard)
    index = pa.table(
        {
            "id": ids, "audio_hash": hashes, "shard": [str(shard)] * n_utts, "row": list(range(n_utts)),
            "n_frames": [f.shape[0] for f in feats], "duration_s": [float(x) for x in durs], "text": texts,
            "speaker": [None] * n_utts, "long_form": [False] * n_utts, "batch": ["bench"] * n_utts,
        },
        schema=FEATURE_INDEX_SCHEMA,
    )  # fmt: skip
    path = folder / "train.parquet"
    pq.write_table(index, path)
    return path


class _GpuSampler:
    """Samples ``torch.cuda.utilization()`` every 0.2 s in a thread (GPU only)."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import torch

        while not self._stop.is_set():
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:
                return
            time.sleep(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_variant(cfg, index: Path, steps: int, workers: int, precision: str, tmp: Path) -> dict:
    import torch

    from model_code.dataset import FeatureTable
    from model_code.training import train
    from pipeline_tasks.services.fitting import make_tokenizer, train_args

    tok = make_tokenizer(cfg, FeatureTable(index, in_memory=False).texts())
    out = tmp / f"out-w{workers}-{precision}"
    args = train_args(cfg, index, None, out, tok, epochs=1000)
    args.max_steps = steps
    args.num_workers = workers
    args.precision = precision
    args.save_model = False
    args.max_minutes = None
    recs: list[dict] = []
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with (_GpuSampler() if cuda else _Null()) as gs:
        t0 = time.perf_counter()
        res = train(args, on_step=recs.append)
        wall = time.perf_counter() - t0

    steady = recs[5:] if len(recs) > 10 else recs
    step_s = [r["step_s"] for r in steady]
    loads = [r["batch_load_s"] for r in steady]
    audio = sum(r["audio_s_per_s"] * r["step_s"] for r in steady)
    out_rec = {
        "workers": workers,
        "precision": res["precision"],
        "steps": res["steps"],
        "params": res["params"],
        "audio_s_per_s": audio / max(sum(step_s), 1e-9),
        "padding_share": float(np.mean([r["padding_share"] for r in steady])),
        "data_wait_share": float(sum(r["data_wait_share"] * r["step_s"] for r in steady) / max(sum(step_s), 1e-9)),
        "batch_load_p50_ms": 1000 * float(np.percentile(loads, 50)),
        "batch_load_p95_ms": 1000 * float(np.percentile(loads, 95)),
        "ms_per_step": 1000 * float(np.mean(step_s)),
        "utts_per_batch": float(np.mean([r["batch_utts"] for r in steady])),
        "wall_s_incl_startup": wall,
        "threads": res["threads"],
    }
    if cuda:
        out_rec["gpu_util_mean_pct"] = float(np.mean(gs.samples)) if gs.samples else None
        out_rec["gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out_rec


class _Null:
    samples: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="local")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--index", type=Path, default=None, help="a real feature index (default: synthetic)")
    p.add_argument("--utterances", type=int, default=1200, help="synthetic utterances")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16", "fp16", "auto"],
                   help="train.precision values to compare (default: bf16 and fp32 where bf16 is native)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ns = p.parse_args(argv)

    import torch

    from model_code.training import cpu_has_native_bf16
    from pipeline_tasks.config import load_config

    cfg = load_config(ns.profile, [*ns.overrides, f"train.torch_threads={ns.threads}"])
    cuda = torch.cuda.is_available()
    native_bf16 = cpu_has_native_bf16()
    tmp = Path(tempfile.mkdtemp(prefix="asrflow-bench-train-"))
    try:
        index = ns.index or synthetic_index(tmp, ns.utterances, cfg.features.n_mels)
        src = str(ns.index) if ns.index else f"synthetic ({ns.utterances} utts, log-normal durations, median 3 s)"
        precisions = ns.precisions or (["fp32", "bf16"] if cuda or native_bf16 else ["fp32"])
        rows = [run_variant(cfg, index, ns.steps, w, prec, tmp) for w in ns.workers for prec in precisions]
        for r in rows:  # speed relative to fp32 with the same worker count, in this run
            base = next((b for b in rows if b["workers"] == r["workers"] and b["precision"] == "fp32"), None)
            r["speed_vs_fp32"] = r["audio_s_per_s"] / base["audio_s_per_s"] if base else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmd = " ".join([".venv/bin/python", "bench/train_throughput.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"# train throughput — profile {ns.profile}, {ns.steps} optimizer steps per variant, data: {src}")
    print(f"# model {cfg.model.d_model}d x {cfg.model.n_layers} layers; sampler max_duration_s="
          f"{cfg.train.sampler.max_duration_s}, num_buckets={cfg.train.sampler.num_buckets}; "
          f"cores={os.cpu_count()}; load average at end={os.getloadavg()[0]:.1f}")
    if not cuda:
        print(f"# no CUDA device: GPU utilization and memory not sampled; CPU native bf16: {native_bf16}")
    hdr = ["workers", "precision", "audio_s_per_s", "speed_vs_fp32", "padding_share", "data_wait_share", "batch_load_p50_ms",
           "batch_load_p95_ms", "ms_per_step", "utts_per_batch"] + (["gpu_util_mean_pct", "gpu_peak_mem_gb"] if cuda else [])
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in hdr))
    print(f"# command: {cmd}")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps({"command": cmd, "source": src, "cuda": cuda, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Padding share of batch samplers, side by side: no bucketing, Lhotse, ours.

    .venv/bin/python bench/padding.py                       # (a) lognormal + (b) generated corpus
    .venv/bin/python bench/padding.py --manifest path/to/manifest.jsonl   # (b) from a manifest
    .venv/bin/python bench/padding.py --no-corpus           # (a) only

(a) 50,000 lognormal durations (median 12 s, σ 0.5, clipped to 1–35 s), 600 s batches;
(b) the embedded corpus's durations: ``--manifest`` files (NeMo JSONL with ``duration``), else
    ~300 utterances generated with ``synth.corpus.generate_week`` into a temp folder,
    batches of ``--corpus-max-duration`` s (the config default, 120 s).

Per sampler and one epoch: padding share = 1 − Σ duration / Σ (batch size × longest in batch)
(the share of the padded tensor that is padding), mean batch size, number of batches and the
time to produce the epoch's batches. Lhotse (bench-only dependency: ``pip install
'lhotse==1.33.*' urllib3``) runs its ``DynamicBucketingSampler`` on a ``CutSet`` of dummy cuts
with the same durations; its ``max_duration`` counts the padded cost too (number of cuts ×
longest cut), so the budgets are the same.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_code.sampler import DynamicBucketingSampler, padding_share  # noqa: E402


def lognormal_durations(n: int = 50_000, median: float = 12.0, sigma: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(np.log(median) + sigma * rng.standard_normal(n)), 1.0, 35.0)


def no_bucketing(d: np.ndarray, max_duration: float, seed: int = 0) -> list[list[int]]:
    """Random order, batches filled greedily under the same padded-cost budget."""
    order = np.random.default_rng(seed).permutation(len(d))
    batches, cur, cur_max = [], [], 0.0
    for i in order.tolist():
        m = max(cur_max, d[i])
        if cur and m * (len(cur) + 1) > max_duration:
            batches.append(cur)
            cur, m = [], d[i]
        cur.append(i)
        cur_max = m
    if cur:
        batches.append(cur)
    return batches


def lhotse_batches(d: np.ndarray, max_duration: float, num_buckets: int, seed: int = 0) -> list[list[int]]:
    from lhotse import CutSet
    from lhotse.dataset.sampling.dynamic_bucketing import DynamicBucketingSampler as LhotseSampler
    from lhotse.testing.dummies import dummy_cut

    cuts = CutSet.from_cuts(dummy_cut(i, duration=float(x), recording_duration=float(x)) for i, x in enumerate(d))
    index = {c.id: i for i, c in enumerate(cuts)}
    sampler = LhotseSampler(cuts, max_duration=max_duration, num_buckets=num_buckets, shuffle=True,
                            seed=seed, world_size=1, rank=0)
    sampler.set_epoch(0)
    return [[index[c.id] for c in batch] for batch in sampler]


def ours(d: np.ndarray, max_duration: float, num_buckets: int, seed: int = 0, balance: bool = True) -> list[list[int]]:
    s = DynamicBucketingSampler(d, max_duration, num_buckets, seed=seed, balance=balance)
    s.set_epoch(0)
    return list(s)


def evaluate(name: str, fn, d: np.ndarray) -> dict:
    t0 = time.perf_counter()
    batches = fn()
    wall = time.perf_counter() - t0
    seen = sorted(i for b in batches for i in b)
    return {
        "sampler": name,
        "padding_share": padding_share(d, batches),
        "mean_batch": float(np.mean([len(b) for b in batches])),
        "batches": len(batches),
        "coverage": len(seen) / len(d),
        "seconds": wall,
    }


def run_case(title: str, d: np.ndarray, max_duration: float, with_lhotse: bool) -> list[dict]:
    print(f"\n## {title}: {len(d)} utterances, {d.sum() / 3600:.1f} h, median {np.median(d):.2f} s, "
          f"batches of {max_duration:g} s (padded cost)")
    variants = [("no bucketing (random, greedy fill)", lambda: no_bucketing(d, max_duration))]
    if with_lhotse:
        for nb in (10, 30):
            variants.append((f"lhotse DynamicBucketingSampler {nb} buckets",
                             lambda nb=nb: lhotse_batches(d, max_duration, nb)))
    variants.append(("ours 30 buckets, greedy fill only (balance off)",
                     lambda: ours(d, max_duration, 30, balance=False)))
    for nb in (30, 60):
        variants.append((f"ours DynamicBucketingSampler {nb} buckets", lambda nb=nb: ours(d, max_duration, nb)))
    rows = [evaluate(name, fn, d) for name, fn in variants]
    print(f"| {'sampler':<48} | padding | mean batch | batches | coverage | time s |")
    print(f"|{'-' * 50}|---------|------------|---------|----------|--------|")
    for r in rows:
        print(f"| {r['sampler']:<48} | {100 * r['padding_share']:6.2f}% | {r['mean_batch']:10.2f} | "
              f"{r['batches']:7d} | {r['coverage']:8.3f} | {r['seconds']:6.2f} |")
    return rows


def manifest_durations(paths: list[Path]) -> np.ndarray:
    out = []
    for p in paths:
        for line in p.read_text().splitlines():
            if line.strip():
                out.append(float(json.loads(line)["duration"]))
    return np.asarray(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="lognormal utterances")
    ap.add_argument("--max-duration", type=float, default=600.0)
    ap.add_argument("--manifest", type=Path, action="append", default=[], help="manifest.jsonl (repeatable)")
    ap.add_argument("--generate", type=int, default=300, help="corpus utterances to generate without --manifest")
    ap.add_argument("--corpus-max-duration", type=float, default=120.0)
    ap.add_argument("--no-corpus", action="store_true")
    ap.add_argument("--no-lhotse", action="store_true")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)

    print("command: .venv/bin/python bench/padding.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    with_lhotse = not args.no_lhotse
    if with_lhotse:
        try:
            import lhotse

            print(f"lhotse {lhotse.__version__}")
        except ImportError:
            print("lhotse not installed (pip install 'lhotse==1.33.*' urllib3): skipping its rows")
            with_lhotse = False
    results = {"lognormal": run_case("(a) lognormal", lognormal_durations(args.n), args.max_duration, with_lhotse)}
    if not args.no_corpus:
        if args.manifest:
            d = manifest_durations(args.manifest)
            src = ", ".join(str(p) for p in args.manifest)
        else:
            from synth import corpus

            with tempfile.TemporaryDirectory(prefix="asrflow-bench-padding-") as tmp_s:
                tmp = Path(tmp_s)
                res = corpus.generate_week(tmp, week=1, utterances=args.generate, seed=1234, jobs=0)
                d = manifest_durations([Path(res["manifest"]) if Path(res["manifest"]).is_absolute()
                                        else tmp / res["manifest"]])
            src = f"generated {len(d)} utterances, corpus.generate_week(seed=1234)"
        results["corpus"] = run_case(f"(b) embedded corpus ({src})", d, args.corpus_max_duration, with_lhotse)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

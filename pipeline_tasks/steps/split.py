"""The ``split`` step: train / dev / proxy index files from featurize's index.

What: every featurized utterance goes to ``train`` or ``dev``; ``proxy`` is a small stratified
sample of ``train`` used by tuning. Long-form rows are kept out of all three and listed in
``long_form.parquet``. Golden-set utterances (matched by audio hash or by id) are dropped from
everything and listed in ``golden_excluded.parquet``: the golden set is never trained or tuned on.
All outputs are ``FEATURE_INDEX_SCHEMA`` rows, so they point straight into the feature cache.

Why hash-based: the split of an utterance is a function of its own id only (salted with
``split.salt``) — not of the rest of the data, so as weeks are added an utterance never moves
between train and dev (no dev leakage into a later model's training data). With
``speaker_disjoint_dev`` the *speaker* is hashed instead, so a speaker is wholly in dev or in train.

Proxy: an utterance of train is in proxy when a second, independent hash of its id falls below
``proxy_share``. That sample is proportional in every (duration bucket x speaker) stratum in
expectation and stable as data grows. Small strata can get no member by chance, so each duration
bucket and each speaker of train with no member contributes its lowest-hash utterance; those
fallback members are the only proxy rows that can change when data is added (a new utterance can
take a stratum's place), and they stay inside train.

Speed copies: when featurize wrote speed-perturbed indexes (``speed_indexes``: factor → same rows,
same order, another cache folder), the same train and proxy selections of each are written as
``train_sp<f>.parquet`` / ``proxy_sp<f>.parquet`` (``train_speed`` / ``proxy_speed``: factor →
file, with md5s), row for row beside ``train.parquet`` / ``proxy.parquet``. Dev is not perturbed.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.schema import FEATURE_INDEX_SCHEMA
from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import file_md5, resolve, run_step, step_key
from pipeline_tasks.records import SplitResult, StepInputs

log = logging.getLogger(__name__)

STEP = "split"
CODE_VERSION = "1"
_DENOM = float(16**15)


def unit_hash(salt: str, purpose: str, key: str) -> float:
    """A uniform number in [0, 1) from ``(salt, purpose, key)``; independent across purposes."""
    h = hashlib.sha256(f"{salt}\x00{purpose}\x00{key}".encode()).hexdigest()
    return int(h[:15], 16) / _DENOM


def duration_bucket(duration_s: float, edges_s: list[float]) -> int:
    """Index of the fixed duration bucket (``edges_s`` sorted, seconds)."""
    return bisect.bisect_right(sorted(edges_s), float(duration_s))


def assign_splits(
    ids: list[str],
    speakers: list[str | None],
    durations_s: list[float],
    dev_share: float,
    proxy_share: float,
    salt: str,
    speaker_disjoint_dev: bool = False,
    duration_edges_s: list[float] | None = None,
) -> tuple[list[str], list[bool]]:
    """Split ``N`` utterances: returns ``(split (N,) in {"train", "dev"}, proxy (N,) bool)``.

    ``proxy[i]`` implies ``split[i] == "train"``. Pure and deterministic: see the module docstring
    for what is stable when utterances are added.
    """
    edges = list(duration_edges_s or [])
    split: list[str] = []
    for uid, spk in zip(ids, speakers, strict=True):
        key = spk if (speaker_disjoint_dev and spk is not None) else uid
        purpose = "dev-speaker" if (speaker_disjoint_dev and spk is not None) else "dev"
        split.append("dev" if unit_hash(salt, purpose, key) < dev_share else "train")
    u_proxy = [unit_hash(salt, "proxy", uid) for uid in ids]
    proxy = [s == "train" and u < proxy_share for s, u in zip(split, u_proxy, strict=True)]
    # coverage fallback: every duration bucket and every speaker of train has a proxy member
    groups: dict[tuple[str, Any], list[int]] = {}
    for i, s in enumerate(split):
        if s != "train":
            continue
        groups.setdefault(("bucket", duration_bucket(durations_s[i], edges)), []).append(i)
        groups.setdefault(("speaker", speakers[i]), []).append(i)
    for members in groups.values():
        if not any(proxy[i] for i in members):
            proxy[min(members, key=lambda i: (u_proxy[i], ids[i]))] = True
    return split, proxy


def golden_keys(inputs: dict[str, dict]) -> tuple[set[str], set[str], str]:
    """(audio hashes, ids, golden md5) of the golden set, from the ``golden`` input.

    The golden set is an upstream of ``split`` in the step graph, so the exclusion can never be
    skipped: a call without it is an error, not a split that might train on the golden set.
    """
    g = inputs.get("golden")
    if g is None:
        raise ValueError("split needs the golden step's result as input 'golden' (see pipeline_tasks.graph)")
    m = pq.read_table(resolve(g, g["manifest"]), columns=["id", "audio_hash"])
    return set(m.column("audio_hash").to_pylist()), set(m.column("id").to_pylist()), str(g["golden_md5"])


def _write(table: pa.Table, path: Path) -> str:
    pq.write_table(table.cast(FEATURE_INDEX_SCHEMA), path)
    return file_md5(path)


def split_index(
    index: pa.Table,
    cfg: AsrflowConfig,
    golden_hashes: set[str],
    golden_ids: set[str],
    out_dir: Path,
    speed_indexes: dict[str, pa.Table] | None = None,
) -> dict[str, Any]:
    """Write train/dev/proxy/long_form/golden_excluded parquets for ``index`` into ``out_dir``;
    and ``train_sp<f>`` / ``proxy_sp<f>`` for each ``speed_indexes`` table (factor → index of the
    same rows in the same order)."""
    ids = index.column("id").to_pylist()
    hashes = index.column("audio_hash").to_pylist()
    long_form = index.column("long_form").to_pylist()
    is_golden = np.array(
        [h in golden_hashes or u in golden_ids for h, u in zip(hashes, ids, strict=True)], dtype=bool
    )
    lf = np.array(long_form, dtype=bool) & ~is_golden
    short = ~lf & ~is_golden
    sub = index.filter(pa.array(short))
    sc = cfg.split
    split, proxy = assign_splits(
        sub.column("id").to_pylist(),
        sub.column("speaker").to_pylist(),
        sub.column("duration_s").to_pylist(),
        sc.dev_share,
        sc.proxy_share,
        sc.salt,
        sc.speaker_disjoint_dev,
        sc.proxy_duration_edges_s,
    )
    is_train = pa.array([s == "train" for s in split])
    train = sub.filter(is_train)
    dev = sub.filter(pa.array([s == "dev" for s in split]))
    proxy_t = sub.filter(pa.array(proxy))
    out = {
        "train": "train.parquet",
        "dev": "dev.parquet",
        "proxy": "proxy.parquet",
        "long_form": "long_form.parquet",
        "golden_excluded": "golden_excluded.parquet",
        "train_md5": _write(train, out_dir / "train.parquet"),
        "dev_md5": _write(dev, out_dir / "dev.parquet"),
        "proxy_md5": _write(proxy_t, out_dir / "proxy.parquet"),
        "long_form_md5": _write(index.filter(pa.array(lf)), out_dir / "long_form.parquet"),
        "golden_excluded_md5": _write(index.filter(pa.array(is_golden)), out_dir / "golden_excluded.parquet"),
        "n_train": train.num_rows,
        "n_dev": dev.num_rows,
        "n_proxy": proxy_t.num_rows,
        "n_long_form": int(lf.sum()),
        "n_golden_excluded": int(is_golden.sum()),
        "hours_train": round(float(np.sum(train.column("duration_s").to_numpy())) / 3600.0, 6),
        "hours_dev": round(float(np.sum(dev.column("duration_s").to_numpy())) / 3600.0, 6),
        "hours_proxy": round(float(np.sum(proxy_t.column("duration_s").to_numpy())) / 3600.0, 6),
    }
    for f, sidx in sorted((speed_indexes or {}).items()):
        if sidx.column("id").to_pylist() != ids:
            raise ValueError(f"speed index {f} does not list featurize's rows in their order")
        ssub = sidx.filter(pa.array(short))
        for part, mask in (("train", is_train), ("proxy", pa.array(proxy))):
            name = f"{part}_sp{f}.parquet"
            out.setdefault(f"{part}_speed", {})[f] = name
            out.setdefault(f"{part}_speed_md5", {})[f] = _write(ssub.filter(mask), out_dir / name)
    if out["n_train"] == 0 or out["n_dev"] == 0:
        log.warning("split: %d train / %d dev utterances", out["n_train"], out["n_dev"])
    return out


def run(cfg: AsrflowConfig, inputs: StepInputs, force: bool = False) -> SplitResult:
    f = inputs["featurize"]
    g_hashes, g_ids, g_md5 = golden_keys(inputs)
    key_inputs = {"featurize": f["index_md5"], "golden": g_md5}
    if f.get("speed_indexes_md5"):  # (absent without speed copies: keys of such runs are unchanged)
        key_inputs["speed"] = f["speed_indexes_md5"]
    key = step_key(STEP, cfg.split, key_inputs, CODE_VERSION)

    def work(tmp: Path) -> dict[str, Any]:
        index = pq.read_table(resolve(f, f["index"]))
        speed = {k: pq.read_table(resolve(f, v)) for k, v in (f.get("speed_indexes") or {}).items()}
        out = split_index(index, cfg, g_hashes, g_ids, tmp, speed)
        out.update({"golden_md5": g_md5, "feature_hash": f.get("feature_hash"), "index_md5": f["index_md5"],
                    "snapshot_md5": f.get("snapshot_md5"), "dvc_tag": f.get("dvc_tag")})
        return out

    return run_step(cfg.root, STEP, key, work, force=force)

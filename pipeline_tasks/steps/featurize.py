"""The ``featurize`` step: log-mel features of every validated utterance, in a content-addressed cache.

The cache itself (layout, shards, planning, the index) is
:mod:`pipeline_tasks.services.feature_cache`, shared with the ``golden`` step; this module is
the step around it. Shards are independent, so Airflow maps over them: :func:`plan` (which
audio hashes go to which new shard), :func:`run_shard` (one shard, idempotent), :func:`finalize`
(the index, under the step contract). :func:`run` is the single-process path: plan + a process
pool (``features.jobs``) + finalize.

With ``features.speed_factors`` (e.g. ``[0.9, 1.0, 1.1]``) the plan also holds the new shards of
each speed copy's cache (``<feature_hash>-sp0.9/``...: only utterances not cached at that speed),
and finalize writes one more index per factor, ``index_sp0.9.parquet``..., listed in
``speed_indexes`` (factor → file) with ``speed_indexes_md5``: the same rows in the same order
as ``index.parquet``, pointing into that factor's cache.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from model_code.features import feature_hash
from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import file_md5, resolve, run_step, step_key
from pipeline_tasks.records import FeaturizeResult, StepInputs
from pipeline_tasks.services.feature_cache import (
    build_index,
    compute_shard,
    compute_shards,
    feature_cache_dir,
    plan_manifest,
    speed_tag,
)

log = logging.getLogger(__name__)

STEP = "featurize"
CODE_VERSION = "1"

# ---------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------


def _manifest(inputs: dict[str, dict]) -> Path:
    v = inputs["validate"]
    return resolve(v, v["manifest"])


def _key(cfg: AsrflowConfig, inputs: dict[str, dict]) -> str:
    # jobs does not change the output; leave it out so a different core count reuses the result
    # (nor does speed_factors when it is the default [1.0]: keys of runs without copies are unchanged)
    exclude = {"jobs", "parallel_min_audio_s"} | (set() if cfg.features.speed_variants else {"speed_factors"})
    fsec = cfg.features.model_dump(mode="json", exclude=exclude)
    return step_key(STEP, fsec, {"validate": inputs["validate"]["manifest_md5"]}, CODE_VERSION)


def plan(cfg: AsrflowConfig, inputs: dict[str, dict]) -> list[dict[str, Any]]:
    """Shard records still to compute for validate's manifest (``[]`` when everything is cached):
    the plain cache's, then each speed copy's (``features.speed_factors``)."""
    return [
        s
        for speed in [1.0, *cfg.features.speed_variants]
        for s in plan_manifest(_manifest(inputs), cfg.paths.data_workspace, cfg.features, cfg.root, speed)
    ]


def run_shard(cfg: AsrflowConfig, inputs: dict[str, dict], shard: dict[str, Any]) -> dict[str, Any]:
    """Compute one planned shard (idempotent; safe to retry)."""
    return compute_shard(shard)


def finalize(
    cfg: AsrflowConfig, inputs: dict[str, dict], shard_results: list[dict[str, Any]], force: bool = False
) -> dict[str, Any]:
    """Write the index of validate's manifest under the step contract; return the step result."""
    manifest = _manifest(inputs)
    cdir = feature_cache_dir(cfg.root, cfg.features)

    def work(tmp: Path) -> dict[str, Any]:
        index = build_index(manifest, cdir)
        pq.write_table(index, tmp / "index.parquet")
        n_long = int(np.asarray(index.column("long_form").to_numpy(zero_copy_only=False)).sum())
        speed: dict[str, Any] = {}
        for f in cfg.features.speed_variants:
            name = f"index{speed_tag(f)}.parquet"
            pq.write_table(build_index(manifest, feature_cache_dir(cfg.root, cfg.features, f), speed=f), tmp / name)
            speed.setdefault("speed_indexes", {})[f"{f:g}"] = name
            speed.setdefault("speed_indexes_md5", {})[f"{f:g}"] = file_md5(tmp / name)
        if speed:  # utterances computed per factor (the plain cache's under "1")
            speed["n_computed_by_speed"] = {
                f"{f:g}": int(sum(r.get("n_computed", 0) for r in shard_results if float(r.get("speed", 1.0)) == f))
                for f in cfg.features.speed_factors
            }
        return {
            "index": "index.parquet",
            "index_md5": file_md5(tmp / "index.parquet"),
            "feature_hash": feature_hash(cfg.features),
            "n_utts": index.num_rows,
            "n_long_form": n_long,
            "n_computed": int(sum(r.get("n_computed", 0) for r in shard_results)),
            "n_shards_written": int(sum(1 for r in shard_results if r.get("n_computed", 0) > 0)),
            "audio_hours_computed": round(sum(r.get("audio_s", 0.0) for r in shard_results) / 3600.0, 4),
            "cache_dir": str(cdir),
            # the DVC snapshot these features come from (lineage of the models trained on them)
            "snapshot_md5": inputs["validate"].get("snapshot_md5"),
            "dvc_tag": inputs["validate"].get("dvc_tag"),
            **speed,
        }

    return run_step(cfg.root, STEP, _key(cfg, inputs), work, force=force)


def run(cfg: AsrflowConfig, inputs: StepInputs, force: bool = False) -> FeaturizeResult:
    """plan + run_shard over a process pool (``features.jobs``, 0 = all cores) + finalize.

    When the step's output exists already (same manifest, same config) it is returned as is,
    without planning.
    """
    from pipeline_tasks.contract import StepRun

    if not force:
        done = StepRun(cfg.root, STEP, _key(cfg, inputs)).done()
        if done is not None:
            return done
    shards = plan(cfg, inputs)
    log.info("featurize: %d shards to compute", len(shards))
    results = compute_shards(shards, cfg.features.jobs, cfg.features.parallel_min_audio_s)
    return finalize(cfg, inputs, results, force=force)


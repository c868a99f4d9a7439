"""featurize: content-addressed feature cache, incremental runs, the index, Airflow-style mapping."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from data_contracts.schema import FEATURE_INDEX_SCHEMA
from model_code.dataset import FEATURE_SHARD_SCHEMA, FeatureTable
from model_code.features import feature_kwargs, logmel
from pipeline_tasks.config import load_config
from pipeline_tasks.contract import resolve
from pipeline_tasks.steps import featurize
from tests.pipeline_tasks.featurize_helpers import make_rows, write_validate_result


@pytest.fixture()
def cfg(tmp_path):
    return load_config(
        "tiny",
        [
            f"paths.root={tmp_path / 'art'}",
            "features.shard_size=8",
            "features.jobs=2",
            "features.parallel_min_audio_s=0",  # exercise the process pool
        ],
    )


def _ws(cfg):
    from pathlib import Path

    return Path(cfg.paths.data_workspace)


def test_featurize_rerun_and_incremental(cfg, tmp_path):
    ids = [f"u{i:03d}" for i in range(18)]
    rows = make_rows(_ws(cfg), ids, long_form_ids={"u017"})
    v1 = write_validate_result(tmp_path / "v1", rows)

    shards = featurize.plan(cfg, {"validate": v1})
    assert [len(s["audio_hashes"]) for s in shards] == [8, 8, 2]

    pool = featurize.compute_shards(shards[:2], jobs=2)  # the process pool run() uses
    assert [r["n_computed"] for r in pool] == [8, 8] and os.getpid() not in {r["pid"] for r in pool}
    r1 = featurize.run(cfg, {"validate": v1})
    assert (
        r1["n_utts"] == 18 and r1["n_computed"] == 2 and r1["n_long_form"] == 1
    )  # 16 done by the pool above
    cache = sorted(p.name for p in (cfg.root / "feature_cache" / r1["feature_hash"]).glob("shard-*.parquet"))
    assert len(cache) == 3 and cache == sorted(s["name"] for s in shards)

    index = pq.read_table(resolve(r1, r1["index"]))
    assert index.schema.equals(FEATURE_INDEX_SCHEMA, check_metadata=False)
    assert index.column("id").to_pylist() == ids  # manifest order
    assert index.column("long_form").to_pylist() == [u == "u017" for u in ids]
    shard0 = pq.read_table(index.column("shard")[0].as_py())
    assert shard0.schema.equals(FEATURE_SHARD_SCHEMA, check_metadata=False)

    # cached features are logmel() of the stored FLAC, rounded to float16
    table = FeatureTable(resolve(r1, r1["index"]))
    for i in (0, 9, 17):
        wave, _ = sf.read(_ws(cfg) / rows[i]["audio_path"], dtype="float32")
        ref = logmel(wave, **feature_kwargs(cfg.features))
        got = table.features(i)
        assert got.shape == ref.shape == (int(table.n_frames()[i]), 80)
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)

    # unchanged inputs: same result, nothing planned, no shard rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (cfg.root / "feature_cache").rglob("shard-*.parquet")}
    assert featurize.plan(cfg, {"validate": v1}) == []
    assert featurize.run(cfg, {"validate": v1}) == r1
    forced = featurize.run(cfg, {"validate": v1}, force=True)
    assert forced["n_computed"] == 0 and forced["index_md5"] == r1["index_md5"]

    # a new week: 4 more utterances (and one duplicate of an old audio under a new id)
    new_rows = make_rows(_ws(cfg), [f"w2-{i}" for i in range(4)], batch="week-002")
    dup = dict(rows[0], id="dup-of-u000", batch="week-002")
    v2 = write_validate_result(tmp_path / "v2", rows + new_rows + [dup])
    r2 = featurize.run(cfg, {"validate": v2})
    assert r2["n_computed"] == 4 and r2["n_utts"] == 23
    after = {p: p.stat().st_mtime_ns for p in (cfg.root / "feature_cache").rglob("shard-*.parquet")}
    assert {p: after[p] for p in mtimes} == mtimes  # old shards never rewritten
    assert len(after) == 4
    idx2 = pq.read_table(resolve(r2, r2["index"])).to_pylist()
    by_id = {r["id"]: r for r in idx2}
    assert (by_id["dup-of-u000"]["shard"], by_id["dup-of-u000"]["row"]) == (
        by_id["u000"]["shard"],
        by_id["u000"]["row"],
    )


def test_run_shard_is_idempotent_and_mappable(cfg, tmp_path):
    rows = make_rows(_ws(cfg), [f"m{i}" for i in range(10)])
    v = write_validate_result(tmp_path / "v", rows)
    shards = featurize.plan(cfg, {"validate": v})
    assert len(shards) == 2
    # Airflow maps run_shard over the plan; a retried task finds its shard and computes nothing
    results = [featurize.run_shard(cfg, {"validate": v}, s) for s in shards]
    assert [r["n_computed"] for r in results] == [8, 2]
    assert {r["pid"] for r in results} == {os.getpid()}
    assert featurize.run_shard(cfg, {"validate": v}, shards[0])["n_computed"] == 0
    # a temp file left by a killed attempt is ignored by lookups and by the next plan
    (cfg.root / "feature_cache" / "x").mkdir(exist_ok=True)
    (
        cfg.root / "feature_cache" / featurize.feature_hash(cfg.features) / ".tmp-shard-dead.parquet.1.x"
    ).write_bytes(b"x")
    assert featurize.plan(cfg, {"validate": v}) == []
    res = featurize.finalize(cfg, {"validate": v}, results)
    assert res["n_computed"] == 10 and res["n_utts"] == 10


def test_missing_features_fail_finalize_and_new_config_gets_new_cache(cfg, tmp_path):
    rows = make_rows(_ws(cfg), [f"c{i}" for i in range(3)])
    v = write_validate_result(tmp_path / "v", rows)
    with pytest.raises(RuntimeError, match="no cached features"):
        featurize.finalize(cfg, {"validate": v}, [])
    r40 = featurize.run(
        cfg.model_copy(update={"features": cfg.features.model_copy(update={"n_mels": 40})}), {"validate": v}
    )
    r80 = featurize.run(cfg, {"validate": v})
    assert r40["feature_hash"] != r80["feature_hash"] and r40["n_computed"] == r80["n_computed"] == 3
    assert FeatureTable(resolve(r40, r40["index"])).features(0).shape[1] == 40


def test_feature_hash_tracks_value_fields_only():
    from model_code.features import feature_hash
    from pipeline_tasks.config import FeatureConfig

    base = FeatureConfig()
    assert feature_hash(base) == feature_hash(base.model_copy(update={"shard_size": 7, "jobs": 1}))
    assert feature_hash(base) != feature_hash(base.model_copy(update={"n_mels": 64}))
    assert feature_hash(base) != feature_hash(base.model_copy(update={"dtype": "float32"}))


def test_speed_copies_are_cached_once_as_their_own_shards_and_stay_incremental(cfg, tmp_path):
    """features.speed_factors: each factor's copy has its own cache folder (<hash>-sp0.9/...),
    computed once, reused on rerun, and a new week computes only its new utterances in every
    folder; the plain cache and index are the same as without speed copies."""
    from model_code.audio import speed_perturb
    from pipeline_tasks.config import with_overrides

    cfg = with_overrides(cfg, {"features.jobs": 1})
    scfg = with_overrides(cfg, {"features.speed_factors": [1.1, 1.0, 0.9]})
    assert scfg.features.speed_factors == [0.9, 1.0, 1.1] and scfg.features.speed_variants == [0.9, 1.1]
    rows = make_rows(_ws(cfg), [f"s{i:02d}" for i in range(10)])
    v1 = write_validate_result(tmp_path / "v1", rows)
    plain = featurize.run(cfg, {"validate": v1})
    plain_shards = {p: p.stat().st_mtime_ns for p in (cfg.root / "feature_cache").rglob("shard-*.parquet")}

    r1 = featurize.run(scfg, {"validate": v1})
    assert r1["n_computed_by_speed"] == {"0.9": 10, "1": 0, "1.1": 10}  # the plain cache was already there
    assert r1["feature_hash"] == plain["feature_hash"] and r1["index_md5"] == plain["index_md5"]
    assert "speed_indexes" not in plain and r1["key"] != plain["key"]
    fh = r1["feature_hash"]
    for f in ("0.9", "1.1"):
        assert len(list((cfg.root / "feature_cache" / f"{fh}-sp{f}").glob("shard-*.parquet"))) == 2
    assert {p: p.stat().st_mtime_ns for p in plain_shards} == plain_shards
    base = FeatureTable(resolve(r1, r1["index"]))
    for f in (0.9, 1.1):
        idx = pq.read_table(resolve(r1, r1["speed_indexes"][f"{f:g}"]))
        assert idx.schema.equals(FEATURE_INDEX_SCHEMA, check_metadata=False)
        assert idx.column("id").to_pylist() == base.ids()  # the same rows in the same order
        assert {p.split("/")[-2] for p in idx.column("shard").to_pylist()} == {f"{fh}-sp{f:g}"}
        np.testing.assert_allclose(idx.column("duration_s").to_numpy(), base.durations() / f)
        table = FeatureTable(resolve(r1, r1["speed_indexes"][f"{f:g}"]))
        np.testing.assert_allclose(table.n_frames(), base.n_frames() / f, atol=1.5)  # a 0.9 copy is longer
        for i in (0, 7):
            wave, _ = sf.read(_ws(cfg) / rows[i]["audio_path"], dtype="float32")
            ref = logmel(speed_perturb(wave, 16000, f), **feature_kwargs(cfg.features))
            np.testing.assert_allclose(table.features(i), ref, rtol=2e-3, atol=2e-3)

    # a rerun computes nothing, in any folder
    mtimes = {p: p.stat().st_mtime_ns for p in (cfg.root / "feature_cache").rglob("shard-*.parquet")}
    assert featurize.plan(scfg, {"validate": v1}) == []
    assert featurize.run(scfg, {"validate": v1}) == r1
    forced = featurize.run(scfg, {"validate": v1}, force=True)
    assert forced["n_computed"] == 0 and forced["speed_indexes_md5"] == r1["speed_indexes_md5"]

    # a new week: only its 3 utterances are computed, at every speed; old shards are never rewritten
    new_rows = make_rows(_ws(cfg), [f"t{i}" for i in range(3)], batch="week-002")
    v2 = write_validate_result(tmp_path / "v2", rows + new_rows)
    assert sorted(len(s["audio_hashes"]) for s in featurize.plan(scfg, {"validate": v2})) == [3, 3, 3]
    r2 = featurize.run(scfg, {"validate": v2})
    assert r2["n_computed_by_speed"] == {"0.9": 3, "1": 3, "1.1": 3} and r2["n_utts"] == 13
    after = {p: p.stat().st_mtime_ns for p in (cfg.root / "feature_cache").rglob("shard-*.parquet")}
    assert {p: after[p] for p in mtimes} == mtimes and len(after) == len(mtimes) + 3


def test_cache_lookup_opens_only_shards_it_has_not_seen(cfg, tmp_path, monkeypatch):
    """Issue 18: a week's lookup does not open every shard of the history; ``_lookup.parquet`` is
    a derived copy (a shard gone from disk drops out, a damaged copy is rebuilt, same answer)."""
    from pipeline_tasks.services import feature_cache as fc

    rows = make_rows(_ws(cfg), [f"u{i:03d}" for i in range(18)])
    r1 = featurize.run(cfg, {"validate": write_validate_result(tmp_path / "v1", rows)})
    cdir = cfg.root / "feature_cache" / r1["feature_hash"]
    full = fc.cache_lookup(cdir)
    assert len(full) == 18 and (cdir / fc.LOOKUP_NAME).exists()
    opened: list[str] = []
    real = pq.read_table

    def counting(path, *a, **k):
        opened.append(os.path.basename(str(path)))
        return real(path, *a, **k)

    monkeypatch.setattr(fc.pq, "read_table", counting)
    assert fc.cache_lookup(cdir) == full and opened == [fc.LOOKUP_NAME]

    # a new week's shard: only it is opened besides the lookup file
    more = make_rows(_ws(cfg), [f"w2-{i}" for i in range(3)], batch="week-002")
    monkeypatch.setattr(fc.pq, "read_table", real)
    shards = featurize.plan(cfg, {"validate": write_validate_result(tmp_path / "v2", rows + more)})
    featurize.compute_shards(shards, jobs=1)
    assert len(shards) == 1
    monkeypatch.setattr(fc.pq, "read_table", counting)
    opened.clear()
    after = fc.cache_lookup(cdir)
    assert len(after) == 21 and opened == [fc.LOOKUP_NAME, shards[0]["name"]]
    opened.clear()
    assert fc.cache_lookup(cdir) == after and opened == [fc.LOOKUP_NAME]

    (cdir / fc.LOOKUP_NAME).unlink()
    monkeypatch.setattr(fc.pq, "read_table", real)
    assert fc.cache_lookup(cdir) == after  # rebuilt from the shards: the same answer
    gone = sorted(cdir.glob("shard-*.parquet"))[0]
    lost = {h for h, v in after.items() if v[0] == str(gone)}
    gone.unlink()
    assert set(fc.cache_lookup(cdir)) == set(after) - lost and lost
    (cdir / fc.LOOKUP_NAME).write_bytes(b"not parquet")
    assert set(fc.cache_lookup(cdir)) == set(after) - lost

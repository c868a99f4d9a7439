"""split: hash-based, stable train/dev, stratified proxy inside train, golden and long-form excluded."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_contracts.schema import FEATURE_INDEX_SCHEMA
from pipeline_tasks.config import load_config
from pipeline_tasks.contract import resolve
from pipeline_tasks.graph import run_until
from pipeline_tasks.steps import featurize, golden, split
from tests.pipeline_tasks.featurize_helpers import make_rows, write_golden_dir, write_validate_result

EDGES = [2.0, 4.0, 8.0]

utt = st.tuples(
    st.text(alphabet="abcdefghijklmnop0123456789-", min_size=1, max_size=12),
    st.sampled_from(["s1", "s2", "s3", None]),
    st.floats(0.3, 20.0),
)


def _split_map(utts, **kw):
    ids = [u[0] for u in utts]
    s, p = split.assign_splits(
        ids, [u[1] for u in utts], [u[2] for u in utts], salt="t", duration_edges_s=EDGES, **kw
    )
    return dict(zip(ids, s, strict=True)), {i for i, x in zip(ids, p, strict=True) if x}


@settings(max_examples=60, deadline=None)
@given(
    old=st.lists(utt, max_size=40, unique_by=lambda u: u[0]),
    new=st.lists(utt, max_size=40, unique_by=lambda u: u[0]),
    dev_share=st.floats(0.05, 0.5),
    proxy_share=st.floats(0.05, 0.5),
    spk_disjoint=st.booleans(),
)
def test_adding_utterances_never_moves_one(old, new, dev_share, proxy_share, spk_disjoint):
    new = [u for u in new if u[0] not in {o[0] for o in old}]
    kw = dict(dev_share=dev_share, proxy_share=proxy_share, speaker_disjoint_dev=spk_disjoint)
    s_old, p_old = _split_map(old, **kw)
    s_all, p_all = _split_map(old + new, **kw)
    assert {k: s_all[k] for k in s_old} == s_old  # never moves between train and dev
    for p in (p_old, p_all):  # proxy is inside train (and so disjoint from dev)
        assert all(s_all[i] == "train" for i in p)
    # the hash-sampled proxy members stay; only coverage fallbacks may be replaced
    stable = {i for i in p_old if split.unit_hash("t", "proxy", i) < proxy_share}
    assert stable <= p_all
    if spk_disjoint:  # a speaker is wholly in dev or wholly in train
        by_spk: dict = {}
        for uid, spk, _ in old + new:
            if spk is not None:
                by_spk.setdefault(spk, set()).add(s_all[uid])
        assert all(len(v) == 1 for v in by_spk.values())


@settings(max_examples=10, deadline=None)
@given(dev_share=st.floats(0.05, 0.3), proxy_share=st.floats(0.05, 0.3), seed=st.integers(0, 10**6))
def test_shares_are_about_right_for_large_n(dev_share, proxy_share, seed):
    n = 6000
    ids = [f"{seed}-{i}" for i in range(n)]
    s, p = split.assign_splits(
        ids,
        ["a", "b"] * (n // 2),
        [1.0 + (i % 10) for i in range(n)],
        dev_share,
        proxy_share,
        "salt",
        duration_edges_s=EDGES,
    )
    n_dev, n_train = s.count("dev"), s.count("train")
    assert abs(n_dev / n - dev_share) < 0.03
    assert abs(sum(p) / n_train - proxy_share) < 0.03
    # stratified: each duration bucket's proxy share is close to the overall share
    for b in range(len(EDGES) + 1):
        members = [
            i for i in range(n) if s[i] == "train" and split.duration_bucket(1.0 + (i % 10), EDGES) == b
        ]
        assert abs(sum(p[i] for i in members) / len(members) - proxy_share) < 0.06


def test_small_strata_are_covered():
    ids = [f"x{i}" for i in range(30)]
    spk = ["common"] * 28 + ["rare1", "rare2"]
    durs = [1.0] * 29 + [15.0]
    s, p = split.assign_splits(ids, spk, durs, 0.01, 0.01, "salt", duration_edges_s=EDGES)
    in_proxy = {(spk[i], split.duration_bucket(durs[i], EDGES)) for i in range(30) if p[i]}
    for i in range(30):
        if s[i] == "train":
            assert any(k[0] == spk[i] for k in in_proxy)
            assert any(k[1] == split.duration_bucket(durs[i], EDGES) for k in in_proxy)


@pytest.fixture()
def scfg(tmp_path):
    write_golden_dir(tmp_path / "gsrc", ["gold-a", "gold-b", "gold-c"], sr=16000, channels=1)
    return load_config(
        "tiny",
        [
            f"paths.root={tmp_path / 'art'}",
            f"paths.golden_dir={tmp_path / 'gsrc'}",
            "features.jobs=1",
            "split.dev_share=0.2",
            "split.proxy_share=0.3",
        ],
    )


def test_split_step_excludes_golden_and_long_form(scfg, tmp_path):
    g = golden.run(scfg, {})
    g_rows = pq.read_table(resolve(g, g["manifest"])).to_pylist()
    ws = Path(scfg.paths.data_workspace)
    rows = make_rows(ws, [f"u{i:02d}" for i in range(30)], long_form_ids={"u05"})
    # plant golden utterances in the training data: the same audio under a new id, and a golden id
    planted_audio = dict(g_rows[0], id="innocent-looking", batch="week-001", source="week-001/m.jsonl:99")
    planted_id = dict(rows[1], id=g_rows[1]["id"])
    planted_id.update({k: v for k, v in make_rows(ws, ["other-audio"])[0].items() if k not in ("id",)})
    rows += [planted_audio, planted_id]
    f = featurize.run(scfg, {"validate": write_validate_result(tmp_path / "v", rows)})
    assert f["n_utts"] == 32

    r = split.run(scfg, {"featurize": f, "golden": g})
    parts = {
        k: pq.read_table(resolve(r, r[k])) for k in ("train", "dev", "proxy", "long_form", "golden_excluded")
    }
    for t in parts.values():
        assert t.schema.equals(FEATURE_INDEX_SCHEMA, check_metadata=False)
    ids = {k: set(t.column("id").to_pylist()) for k, t in parts.items()}
    hashes = {k: set(t.column("audio_hash").to_pylist()) for k, t in parts.items()}
    golden_hashes = {x["audio_hash"] for x in g_rows}
    golden_ids = {x["id"] for x in g_rows}
    for k in ("train", "dev", "proxy", "long_form"):
        assert not hashes[k] & golden_hashes and not ids[k] & golden_ids
    assert ids["golden_excluded"] == {"innocent-looking", g_rows[1]["id"]} and r["n_golden_excluded"] == 2
    assert ids["long_form"] == {"u05"} and "u05" not in ids["train"] | ids["dev"]
    assert not ids["train"] & ids["dev"] and ids["proxy"] <= ids["train"]
    assert len(ids["train"]) + len(ids["dev"]) == 29 == r["n_train"] + r["n_dev"]
    assert r["n_dev"] > 0 and r["n_proxy"] > 0
    assert r["hours_train"] == pytest.approx(
        sum(parts["train"].column("duration_s").to_pylist()) / 3600, abs=1e-5
    )

    # deterministic and cached; without the golden input the step refuses to split
    assert split.run(scfg, {"featurize": f, "golden": g}) == r
    with pytest.raises(ValueError, match="golden"):
        split.run(scfg, {"featurize": f}, force=True)
    forced = split.run(scfg, {"featurize": f, "golden": g}, force=True)
    assert (forced["train_md5"], forced["dev_md5"], forced["proxy_md5"]) == (
        r["train_md5"],
        r["dev_md5"],
        r["proxy_md5"],
    )


def test_split_writes_speed_copies_of_train_and_proxy_row_for_row(scfg, tmp_path):
    """With speed copies from featurize, split writes train_sp<f> / proxy_sp<f>: the rows of train /
    proxy in the same order, pointing into the copies' caches; without them nothing changes."""
    from pipeline_tasks.config import with_overrides

    g = golden.run(scfg, {})
    rows = make_rows(Path(scfg.paths.data_workspace), [f"u{i:02d}" for i in range(20)], long_form_ids={"u03"})
    v = write_validate_result(tmp_path / "v", rows)
    plain = split.run(scfg, {"featurize": featurize.run(scfg, {"validate": v}), "golden": g})
    assert "train_speed" not in plain and "proxy_speed" not in plain
    sp = with_overrides(scfg, {"features.speed_factors": [0.9, 1.0, 1.1]})
    f = featurize.run(sp, {"validate": v})
    r = split.run(sp, {"featurize": f, "golden": g})
    assert r["key"] != plain["key"]  # the copies are inputs of the split
    assert (r["train_md5"], r["dev_md5"], r["proxy_md5"]) == (plain["train_md5"], plain["dev_md5"], plain["proxy_md5"])
    assert r["train_speed"] == {"0.9": "train_sp0.9.parquet", "1.1": "train_sp1.1.parquet"}
    assert r["proxy_speed"] == {"0.9": "proxy_sp0.9.parquet", "1.1": "proxy_sp1.1.parquet"}
    for part in ("train", "proxy"):
        base = pq.read_table(resolve(r, r[part]))
        for fac, name in r[f"{part}_speed"].items():
            t = pq.read_table(resolve(r, name))
            assert t.schema.equals(FEATURE_INDEX_SCHEMA, check_metadata=False)
            assert t.column("id").to_pylist() == base.column("id").to_pylist()
            assert {p.split("/")[-2] for p in t.column("shard").to_pylist()} == {f"{f['feature_hash']}-sp{fac}"}
            assert t.column("duration_s").to_pylist() == pytest.approx(
                [d / float(fac) for d in base.column("duration_s").to_pylist()]
            )
    assert "u03" not in pq.read_table(resolve(r, r["train_speed"]["0.9"])).column("id").to_pylist()  # long-form


# the real chain on the shared tiny fixtures: corpus -> ingest -> validate -> featurize -> split, and golden
def test_featurize_split_golden_on_the_tiny_fixtures(tiny_cfg):
    res = run_until("split", tiny_cfg)
    res = run_until("golden", tiny_cfg, results=res)
    f, s, g = res["featurize"], res["split"], res["golden"]
    v = res["validate"]
    assert f["n_utts"] == v["n_accepted"] and f["feature_hash"] == g["feature_hash"]
    assert g["n_utts"] == 16
    golden_hashes = set(pq.read_table(resolve(g, g["manifest"])).column("audio_hash").to_pylist())
    parts = {k: pq.read_table(resolve(s, s[k])) for k in ("train", "dev", "proxy", "long_form")}
    ids = {k: set(t.column("id").to_pylist()) for k, t in parts.items()}
    for t in parts.values():
        assert not set(t.column("audio_hash").to_pylist()) & golden_hashes
    assert not ids["train"] & ids["dev"] and ids["proxy"] <= ids["train"]
    assert s["n_train"] + s["n_dev"] + s["n_long_form"] + s["n_golden_excluded"] == f["n_utts"]
    assert s["n_train"] > 0 and s["n_dev"] > 0 and s["n_proxy"] > 0
    # a rerun on unchanged inputs computes nothing and publishes the same index
    again = featurize.run(tiny_cfg, {"validate": v}, force=True)
    assert again["n_computed"] == 0 and again["index_md5"] == f["index_md5"]

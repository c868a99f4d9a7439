"""Feature readers: random access, sharded streaming split by rank and worker, collate."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_contracts.schema import FEATURE_INDEX_SCHEMA
from model_code.dataset import (
    FeatureTable,
    ShardedFeatureDataset,
    assign_shards,
    collate,
    read_shard_features,
)
from model_code.feature_store import shard_table
from model_code.features import logmel

N = 13
SR = 16000


@pytest.fixture(scope="module")
def index_path(tmp_path_factory) -> Path:
    """N utterances of log-mel features in shards of 2 (one row per row group), and their index,
    laid out as the featurize step writes them (built here from model_code alone)."""
    base = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    ids = [f"d{i:02d}" for i in range(N)]
    durs = [float(rng.uniform(0.6, 2.5)) for _ in ids]
    feats = [logmel((0.1 * rng.standard_normal(int(round(d * SR)))).astype(np.float32)) for d in durs]
    index_rows = []
    for start in range(0, N, 2):
        sl = slice(start, start + 2)
        shard = base / f"shard-{start:02d}.parquet"
        table = shard_table(ids[sl], [f"h{i}" for i in ids[sl]], feats[sl], [f"text {i}" for i in ids[sl]],
                            durs[sl], ["spk"] * len(ids[sl]))
        pq.write_table(table, shard, row_group_size=1, compression="none")
        for row, uid in enumerate(ids[sl]):
            i = ids.index(uid)
            index_rows.append({
                "id": uid, "audio_hash": f"h{uid}", "shard": str(shard), "row": row,
                "n_frames": int(feats[i].shape[0]), "duration_s": durs[i], "text": f"text {uid}",
                "speaker": "spk", "long_form": False, "batch": "week-001",
            })
    path = base / "index.parquet"
    pq.write_table(pa.Table.from_pylist(index_rows, schema=FEATURE_INDEX_SCHEMA), path)
    return path


def test_feature_table_in_memory_and_lazy_agree(index_path):
    idx = pq.read_table(index_path)
    eager, lazy = FeatureTable(index_path), FeatureTable(index_path, in_memory=False, cache_row_groups=2)
    assert len(eager) == len(lazy) == N
    assert eager.ids() == idx.column("id").to_pylist() and eager.texts() == idx.column("text").to_pylist()
    np.testing.assert_array_equal(eager.n_frames(), idx.column("n_frames").to_numpy())
    np.testing.assert_allclose(eager.durations(), idx.column("duration_s").to_numpy())
    for i in (12, 0, 5, 5, 7, 1):
        a, b = eager.features(i), lazy.features(i)
        assert a.dtype == np.float32 and a.shape == (eager.n_frames()[i], 80)
        np.testing.assert_array_equal(a, b)
    # frames follow from durations: 1 + samples // hop
    assert list(eager.n_frames()) == [1 + int(round(d * 16000)) // 160 for d in eager.durations()]
    assert len(lazy._cache) <= 2
    # rows map to the right cells: every row of shard 0 read directly equals the table's view
    shard0 = eager._shards[0]
    direct = read_shard_features(shard0)
    for i, (s, r) in enumerate(zip(eager._shards, eager._rows, strict=True)):
        if s == shard0:
            np.testing.assert_array_equal(direct[int(r)].astype(np.float32), eager.features(i))


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (1, 3), (2, 2), (3, 1), (4, 3)])
def test_rank_worker_split_covers_every_shard_once(world_size, num_workers):
    shards = [f"/c/shard-{i:02d}.parquet" for i in range(7)]
    got = Counter(
        s
        for rank in range(world_size)
        for w in range(num_workers)
        for s in assign_shards(shards, rank, world_size, w, num_workers)
    )
    assert set(got) == set(shards) and set(got.values()) == {1}
    with pytest.raises(ValueError):
        assign_shards(shards, world_size, world_size, 0, num_workers)


def test_streaming_with_dataloader_workers_yields_each_utterance_once(index_path):
    ids_all = pq.read_table(index_path).column("id").to_pylist()
    seen: list[str] = []
    for rank in range(2):
        ds = ShardedFeatureDataset(index_path, rank=rank, world_size=2)
        assert len(ds.shards) == 7 and np.array_equal(
            ds.n_frames(), FeatureTable(index_path, False).n_frames()
        )
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        for item in loader:
            # (the DataLoader's default_convert turns the numpy array into a tensor)
            assert item["feats"].dtype == torch.float32 and item["feats"].shape[1] == 80
            seen.append(item["id"])
    assert sorted(seen) == sorted(ids_all)


def test_streaming_a_subset_index_and_shuffle(index_path, tmp_path):
    idx = pq.read_table(index_path)
    sub_path = tmp_path / "train.parquet"
    pq.write_table(idx.take([0, 3, 4, 9, 12]), sub_path)  # like split's train.parquet
    table = FeatureTable(index_path)
    ds = ShardedFeatureDataset(sub_path, shuffle=True, seed=3)
    e0 = [x["id"] for x in ds]
    ds.set_epoch(1)
    items = list(ds)
    assert (
        sorted(e0)
        == sorted(x["id"] for x in items)
        == sorted(idx.take([0, 3, 4, 9, 12]).column("id").to_pylist())
    )
    assert e0 != [x["id"] for x in items] or len(e0) < 3
    for it in items:
        np.testing.assert_array_equal(it["feats"], table.features(table.ids().index(it["id"])))


def test_collate_pads_and_reports_lengths():
    feats = [np.ones((5, 4), np.float32), np.full((3, 4), 2.0, np.float16)]
    b = collate(feats, [[3, 4], [5, 6, 7]])
    assert b["feats"].shape == (2, 5, 4) and b["feats"].dtype == torch.float32
    assert b["feat_lens"].tolist() == [5, 3] and b["token_lens"].tolist() == [2, 3]
    assert b["tokens"].tolist() == [[3, 4, 0], [5, 6, 7]] and b["tokens"].dtype == torch.long
    assert float(b["feats"][1, 3:].abs().sum()) == 0.0 and float(b["feats"][1, :3].mean()) == 2.0
    with pytest.raises(ValueError):
        collate(feats, [[1]])

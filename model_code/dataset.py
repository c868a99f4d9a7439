"""Reading cached log-mel features: a random-access table, a streaming dataset, and collate.

The shard layout (``FEATURE_SHARD_SCHEMA``: one Parquet row per utterance, features as the
row-major float16 bytes of a ``(n_frames, n_mels)`` array) lives in :mod:`model_code.feature_store`
and is re-exported here. An *index* (``FEATURE_INDEX_SCHEMA`` in ``data_contracts/schema.py``)
lists utterances of a set (train, dev, golden...) and where their features are: ``shard``
(absolute path) and ``row``.

- :class:`FeatureTable`: random access (``features(i)``) plus the cheap per-utterance columns
  (durations, frame counts, texts) that samplers need; by default all features of the index are
  loaded once (fine at local scale).
- :class:`ShardedFeatureDataset`: a torch ``IterableDataset`` that streams shards, giving each
  (rank, DataLoader worker) pair a disjoint subset of shards, for data that does not fit in memory.
- :func:`collate`: pad a batch into tensors.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from model_code.feature_store import (  # noqa: F401  (re-exported: the shard layout)
    FEATURE_SHARD_SCHEMA,
    decode_column,
    encode_features,
    read_shard_features,
    shard_dtype,
    shard_table,
)

_INDEX_LIGHT_COLUMNS = ["id", "audio_hash", "shard", "row", "n_frames", "duration_s", "text", "speaker", "batch"]


class FeatureTable:
    """Random access to the utterances of a feature index.

    ``index_path``: a Parquet file of ``FEATURE_INDEX_SCHEMA`` rows. With ``in_memory`` (default),
    the features of every indexed utterance are read once, shard by shard, and kept in their stored
    dtype (float16: half the memory); otherwise row groups are read on demand with a small cache.
    """

    def __init__(self, index_path: str | Path, in_memory: bool = True, cache_row_groups: int = 8) -> None:
        self.index_path = Path(index_path)
        t = pq.read_table(self.index_path, columns=_INDEX_LIGHT_COLUMNS)
        self._ids: list[str] = t.column("id").to_pylist()
        self._texts: list[str] = t.column("text").to_pylist()
        self._speakers: list[str | None] = t.column("speaker").to_pylist()
        self._audio_hashes: list[str] = t.column("audio_hash").to_pylist()
        self._batches: list[str] = t.column("batch").to_pylist()
        self._durations = t.column("duration_s").to_numpy().astype(np.float64)
        self._n_frames = t.column("n_frames").to_numpy().astype(np.int64)
        self._shards: list[str] = t.column("shard").to_pylist()
        self._rows = t.column("row").to_numpy().astype(np.int64)
        self.in_memory = in_memory
        self._feats: list[np.ndarray] | None = None
        self._cache: OrderedDict[tuple[str, int], dict[int, np.ndarray]] = OrderedDict()
        self._cache_size = cache_row_groups
        if in_memory:
            self._load_all()

    def _load_all(self) -> None:
        by_shard: dict[str, list[int]] = {}
        for i, s in enumerate(self._shards):
            by_shard.setdefault(s, []).append(i)
        feats: list[np.ndarray | None] = [None] * len(self)
        for shard, idxs in by_shard.items():
            got = read_shard_features(shard, self._rows[idxs])
            for i in idxs:
                feats[i] = got[int(self._rows[i])]
        self._feats = feats  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    def texts(self) -> list[str]:
        return list(self._texts)

    def speakers(self) -> list[str | None]:
        return list(self._speakers)

    def audio_hashes(self) -> list[str]:
        return list(self._audio_hashes)

    def batches(self) -> list[str]:
        """The landing batch (data week) of each utterance."""
        return list(self._batches)

    def durations(self) -> np.ndarray:
        """Seconds per utterance, float64 ``(N,)`` (no feature read)."""
        return self._durations.copy()

    def n_frames(self) -> np.ndarray:
        """Frames per utterance, int64 ``(N,)`` (no feature read)."""
        return self._n_frames.copy()

    def features(self, i: int) -> np.ndarray:
        """Log-mel features of utterance ``i``: float32 ``(T, n_mels)``."""
        if self._feats is not None:
            return self._feats[i].astype(np.float32)
        shard, row = self._shards[i], int(self._rows[i])
        pf_md = pq.ParquetFile(shard).metadata
        # row group of `row` (row groups are written with a fixed size, but do not rely on it)
        start = 0
        for g in range(pf_md.num_row_groups):
            n = pf_md.row_group(g).num_rows
            if row < start + n:
                break
            start += n
        key = (shard, g)
        if key not in self._cache:
            rows = list(range(start, start + pf_md.row_group(g).num_rows))
            self._cache[key] = read_shard_features(shard, rows)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key][row].astype(np.float32)


def assign_shards(
    shards: list[str], rank: int, world_size: int, worker_id: int, num_workers: int
) -> list[str]:
    """The shards one (rank, DataLoader worker) pair streams: round-robin over ``world_size * num_workers``.

    Every shard goes to exactly one pair; a pair may get none when there are fewer shards than pairs.
    """
    if not 0 <= rank < world_size or not 0 <= worker_id < num_workers:
        raise ValueError(f"bad rank/worker: rank {rank}/{world_size}, worker {worker_id}/{num_workers}")
    slot = rank * num_workers + worker_id
    return sorted(shards)[slot :: world_size * num_workers]


class ShardedFeatureDataset(torch.utils.data.IterableDataset):
    """Streams the utterances of an index shard by shard; shards are split by rank and worker.

    Yields ``{"id": str, "feats": np.float32 (T, n_mels), "text": str, "duration_s": float}``.
    Within a shard, only the indexed rows are yielded (an index such as ``train.parquet`` refers
    to a subset of the cached rows), reading one row group at a time. ``set_epoch`` + ``shuffle``
    reshuffle the shard order and the order within each shard deterministically per epoch.
    Lengths (``durations()``, ``n_frames()``) come from the index without reading features.
    """

    def __init__(
        self,
        index_path: str | Path,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.index_path = Path(index_path)
        t = pq.read_table(self.index_path, columns=_INDEX_LIGHT_COLUMNS)
        self._table = t
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        by_shard: dict[str, list[int]] = {}
        for i, s in enumerate(t.column("shard").to_pylist()):
            by_shard.setdefault(s, []).append(i)
        self._by_shard = by_shard
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")

    @property
    def shards(self) -> list[str]:
        return sorted(self._by_shard)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:  # total utterances of the index (all ranks)
        return self._table.num_rows

    def durations(self) -> np.ndarray:
        return self._table.column("duration_s").to_numpy().astype(np.float64)

    def n_frames(self) -> np.ndarray:
        return self._table.column("n_frames").to_numpy().astype(np.int64)

    def my_shards(self) -> list[str]:
        """Shards this rank and (inside a DataLoader worker) this worker stream."""
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = assign_shards(self.shards, self.rank, self.world_size, wid, nw)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid])
            shards = [shards[j] for j in rng.permutation(len(shards))]
        return shards

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ids = self._table.column("id").to_pylist()
        texts = self._table.column("text").to_pylist()
        durs = self._table.column("duration_s").to_numpy()
        rows = self._table.column("row").to_numpy()
        for shard in self.my_shards():
            idxs = self._by_shard[shard]
            feats = read_shard_features(shard, rows[idxs])
            order = list(idxs)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(shard.encode())])
                order = [order[j] for j in rng.permutation(len(order))]
            for i in order:
                yield {
                    "id": ids[i],
                    "feats": feats[int(rows[i])].astype(np.float32),
                    "text": texts[i],
                    "duration_s": float(durs[i]),
                }


def collate(feats: list[np.ndarray], tokens: list[list[int]]) -> dict[str, torch.Tensor]:
    """Pad a batch.

    ``feats``: B arrays ``(T_i, F)``; ``tokens``: B token-id lists (no blanks). Returns
    ``feats`` float32 ``(B, T_max, F)`` (zero-padded), ``feat_lens`` long ``(B,)``, ``tokens`` long
    ``(B, L_max)`` (zero-padded: 0 is the CTC blank, never a target), ``token_lens`` long ``(B,)``.
    """
    if len(feats) != len(tokens):
        raise ValueError(f"{len(feats)} feature arrays but {len(tokens)} token lists")
    if not feats:
        raise ValueError("empty batch")
    n_feat = feats[0].shape[1]
    feat_lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    token_lens = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    out = torch.zeros(len(feats), int(feat_lens.max()), n_feat, dtype=torch.float32)
    for b, f in enumerate(feats):
        out[b, : f.shape[0]] = torch.from_numpy(np.asarray(f, dtype=np.float32))
    tok = torch.zeros(len(tokens), max(1, int(token_lens.max())), dtype=torch.long)
    for b, t in enumerate(tokens):
        if t:
            tok[b, : len(t)] = torch.tensor(t, dtype=torch.long)
    return {"feats": out, "feat_lens": feat_lens, "tokens": tok, "token_lens": token_lens}

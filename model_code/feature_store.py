"""The feature-shard layout: how cached log-mel features are stored in Parquet (no torch).

Feature shards (written by ``pipeline_tasks/steps/featurize.py``) are Parquet files, one row per
utterance, schema :data:`FEATURE_SHARD_SCHEMA`. The ``features`` column holds the row-major
bytes of a ``(n_frames, n_mels)`` float16 (or float32, see the file's ``asrflow.feature_dtype``
metadata) array in a ``large_binary`` cell. That layout was chosen by measurement
(``bench/featurize.py``): decoding ``list<float16>`` cells through Arrow was ~7x slower to read
and ~20x slower to write than slicing one binary buffer with ``np.frombuffer``.

Why a separate module: the featurize worker processes write shards and must stay light (numpy,
pyarrow, soundfile), while the readers in :mod:`model_code.dataset` need torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_SCHEMA_VERSION = "1"

# One utterance's cached features. Metadata per file: asrflow.feature_dtype, asrflow.feature_hash.
FEATURE_SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("audio_hash", pa.string(), nullable=False),
        pa.field("n_frames", pa.int32(), nullable=False),
        pa.field("n_mels", pa.int16(), nullable=False),
        pa.field(
            "features", pa.large_binary(), nullable=False
        ),  # (n_frames, n_mels) row-major, feature_dtype
        pa.field("text", pa.string(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("speaker", pa.string(), nullable=True),
    ],
    metadata={"asrflow.schema": "feature_shard", "asrflow.schema_version": SHARD_SCHEMA_VERSION},
)


def encode_features(feats: np.ndarray, dtype: str = "float16") -> bytes:
    """``(T, n_mels)`` float -> row-major bytes in ``dtype`` (the shard cell)."""
    return np.ascontiguousarray(feats, dtype=np.dtype(dtype)).tobytes()


def shard_table(
    ids: list[str],
    audio_hashes: list[str],
    feats: list[np.ndarray],
    texts: list[str],
    durations_s: list[float],
    speakers: list[str | None],
    dtype: str = "float16",
    feature_hash: str = "",
) -> pa.Table:
    """Build one shard's table (:data:`FEATURE_SHARD_SCHEMA`) from ``(T_i, n_mels)`` feature arrays."""
    n_mels = {int(f.shape[1]) for f in feats}
    if len(n_mels) > 1:
        raise ValueError(f"mixed n_mels in one shard: {sorted(n_mels)}")
    schema = FEATURE_SHARD_SCHEMA.with_metadata(
        {
            **FEATURE_SHARD_SCHEMA.metadata,
            b"asrflow.feature_dtype": dtype,
            b"asrflow.feature_hash": feature_hash,
        }
    )
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "audio_hash": pa.array(audio_hashes, pa.string()),
            "n_frames": pa.array([f.shape[0] for f in feats], pa.int32()),
            "n_mels": pa.array([f.shape[1] for f in feats], pa.int16()),
            "features": pa.array([encode_features(f, dtype) for f in feats], pa.large_binary()),
            "text": pa.array(texts, pa.string()),
            "duration_s": pa.array(durations_s, pa.float64()),
            "speaker": pa.array(speakers, pa.string()),
        },
        schema=schema,
    )


def shard_dtype(path: str | Path) -> np.dtype:
    """The feature dtype a shard was written with (its ``asrflow.feature_dtype`` metadata)."""
    md = pq.read_schema(path).metadata or {}
    return np.dtype(md.get(b"asrflow.feature_dtype", b"float16").decode())


def decode_column(
    col: pa.ChunkedArray | pa.Array, n_frames: np.ndarray, n_mels: int, dtype: np.dtype
) -> list[np.ndarray]:
    """A ``features`` column -> list of ``(n_frames[i], n_mels)`` arrays in ``dtype`` (views, no copy).

    Reads the binary column's value buffer once and slices it with the offsets; far cheaper than
    per-cell ``as_py()``.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return []
    bufs = arr.buffers()  # [validity, offsets (int64), data]
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    out = []
    for i in range(len(arr)):
        cell = data[offsets[i] : offsets[i + 1]].view(dtype)
        out.append(cell.reshape(int(n_frames[i]), n_mels))
    return out


def read_shard_features(
    path: str | Path, rows: list[int] | np.ndarray | None = None
) -> dict[int, np.ndarray]:
    """Features of some rows of a shard: ``{row: (T, n_mels) array in the shard's dtype}``.

    Only the row groups that hold the requested rows are read (all rows when ``rows`` is None).
    """
    pf = pq.ParquetFile(path)
    dtype = np.dtype((pf.schema_arrow.metadata or {}).get(b"asrflow.feature_dtype", b"float16").decode())
    md = pf.metadata
    starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
    wanted = None if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    out: dict[int, np.ndarray] = {}
    for g in range(md.num_row_groups):
        lo, hi = int(starts[g]), int(starts[g + 1])
        if wanted is not None:
            sel = wanted[(wanted >= lo) & (wanted < hi)]
            if sel.size == 0:
                continue
        t = pf.read_row_group(g, columns=["n_frames", "n_mels", "features"])
        if t.num_rows == 0:
            continue
        n_mels = int(t.column("n_mels")[0].as_py())
        feats = decode_column(t.column("features"), t.column("n_frames").to_numpy(), n_mels, dtype)
        keep = range(lo, hi) if wanted is None else sel
        for r in keep:
            out[int(r)] = feats[int(r) - lo]
    return out

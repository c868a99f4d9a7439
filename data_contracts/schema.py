"""Record schemas shared by every step (pyarrow), versioned as code.

These are the data contracts between steps: a Parquet file written by one step is read by
the next only through these schemas. Field names carry their units (``duration_s``).
The landing-zone JSONL keeps NeMo's names (``audio_filepath``, ``duration``, ``text``);
ingest maps them onto :data:`UTTERANCE_SCHEMA`.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

# One ingested utterance: audio decoded to 16 kHz mono FLAC in the content-addressed raw store.
UTTERANCE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("audio_hash", pa.string(), nullable=False),  # sha256 of 16 kHz mono int16 PCM
        pa.field("audio_path", pa.string(), nullable=False),  # raw/<batch>/<h[:2]>/<h>.flac, relative to the data workspace
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("orig_sample_rate", pa.int32(), nullable=False),
        pa.field("orig_channels", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # normalized transcript
        pa.field("text_raw", pa.string(), nullable=False),  # as written in the landing manifest
        pa.field("speaker", pa.string(), nullable=True),
        pa.field("batch", pa.string(), nullable=False),  # landing folder, e.g. week-001
        pa.field("source", pa.string(), nullable=False),  # <manifest path>:<line number>
        pa.field("long_form", pa.bool_(), nullable=False),  # longer than the training maximum
    ],
    metadata={"asrflow.schema": "utterance", "asrflow.schema_version": SCHEMA_VERSION},
)

# A rejected landing row: the source is never deleted, only referenced (and copied when useful).
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=True),
        pa.field("batch", pa.string(), nullable=True),
        pa.field("source", pa.string(), nullable=False),  # <manifest path>:<line number>
        pa.field("audio_filepath", pa.string(), nullable=True),  # as written in the manifest
        pa.field("reason", pa.string(), nullable=False),  # machine code: audio_truncated, path_escape, ...
        pa.field("message", pa.string(), nullable=False),  # readable explanation
        pa.field("stage", pa.string(), nullable=False),  # ingest | validate
        pa.field("quarantined_copy", pa.string(), nullable=True),
    ],
    metadata={"asrflow.schema": "quarantine", "asrflow.schema_version": SCHEMA_VERSION},
)

# Where an utterance's cached features are: one row per utterance of a featurized set.
FEATURE_INDEX_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("audio_hash", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # absolute path of the Parquet shard
        pa.field("row", pa.int64(), nullable=False),  # row inside the shard
        pa.field("n_frames", pa.int32(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("speaker", pa.string(), nullable=True),
        pa.field("long_form", pa.bool_(), nullable=False),
        pa.field("batch", pa.string(), nullable=False),
    ],
    metadata={"asrflow.schema": "feature_index", "asrflow.schema_version": SCHEMA_VERSION},
)


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table``'s columns to ``schema`` (raises if a column is missing)."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing} required by schema {schema.metadata}")
    return table.select(schema.names).cast(schema)

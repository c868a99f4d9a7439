"""Synthetic feature indexes for the training tests (no espeak, no upstream steps).

Each utterance's features are made from its text: every character maps to a fixed random
``n_mels`` pattern held for ``frames_per_char`` frames, plus noise. A model can therefore
learn something from them (the loss falls), while writing them takes milliseconds. They are
written in the real formats: a feature shard (``model_code.dataset.shard_table``) and an index
with ``FEATURE_INDEX_SCHEMA``, so :class:`model_code.dataset.FeatureTable` reads them as it
reads featurize's output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.schema import FEATURE_INDEX_SCHEMA
from model_code.dataset import shard_table

WORDS = "the cat sat on a mat dog ran far big red sun hot cold sea blue sky".split()


def write_synthetic_index(
    folder: Path, n_utts: int, n_mels: int = 80, seed: int = 0, frames_per_char: int = 6, name: str = "train"
) -> Path:
    """Write ``<folder>/<name>_shard.parquet`` and ``<folder>/<name>.parquet`` (the index) → index path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    proto = np.random.default_rng(999).standard_normal((128, n_mels)).astype(np.float32) * 2.0
    ids, hashes, feats, texts, durs = [], [], [], [], []
    for i in range(n_utts):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        f = np.repeat(proto[[ord(c) for c in text]], frames_per_char, axis=0)
        f = f + 0.3 * rng.standard_normal(f.shape).astype(np.float32)
        ids.append(f"{name}-{i:04d}")
        hashes.append(f"{seed:04d}{i:060d}")
        feats.append(f)
        texts.append(text)
        durs.append(f.shape[0] / 100.0)
    shard = folder / f"{name}_shard.parquet"
    pq.write_table(shard_table(ids, hashes, feats, texts, durs, [None] * n_utts, dtype="float16"), shard)
    index = pa.table(
        {
            "id": ids,
            "audio_hash": hashes,
            "shard": [str(shard.resolve())] * n_utts,
            "row": list(range(n_utts)),
            "n_frames": [f.shape[0] for f in feats],
            "duration_s": durs,
            "text": texts,
            "speaker": [None] * n_utts,
            "long_form": [False] * n_utts,
            "batch": ["week-001"] * n_utts,
        },
        schema=FEATURE_INDEX_SCHEMA,
    )
    path = folder / f"{name}.parquet"
    pq.write_table(index, path)
    return path


def tiny_args(tmp: Path, **over):
    """``TrainArgs`` for a ~30k-parameter model on synthetic data (fast enough for 2 CPU cores)."""
    from model_code.tokenizer import CharTokenizer
    from model_code.training import TrainArgs

    data = tmp / "data"
    train_index = data / "train.parquet"
    if not train_index.exists():
        write_synthetic_index(data, 40, seed=1, name="train")
        write_synthetic_index(data, 8, seed=2, name="dev")
    tok = CharTokenizer()
    base = dict(
        train_index=str(train_index),
        dev_index=str(data / "dev.parquet"),
        out_dir=str(tmp / "out"),
        tokenizer=tok.to_dict(),
        model_kwargs=dict(
            n_mels=80, vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, ff_mult=2,
            conv_kernel=7, dropout=0.1, subsampling_channels=16,
        ),
        feature_kwargs={"n_mels": 80},
        epochs=2,
        lr=3e-3,
        warmup_steps=3,
        seed=11,
        deterministic=True,
        num_workers=0,
        torch_threads=1,
        checkpoint_every_steps=4,
        checkpoint_every_minutes=60.0,
        sampler={"max_duration_s": 2.5, "num_buckets": 3},
        specaugment={"freq_masks": 1, "freq_mask_width": 8, "time_masks": 1, "time_mask_width": 5},
        lm_texts=False,
    )
    base.update(over)
    return TrainArgs(**base)

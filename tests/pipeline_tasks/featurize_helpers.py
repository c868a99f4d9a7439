"""Test helpers for featurize/split/golden: a real data workspace with real FLAC files and a real
validate-style manifest (``UTTERANCE_SCHEMA`` parquet), built without running ingest/validate.

The audio is a voiced, speech-like signal (harmonics of a gliding f0 under a syllable-rate
envelope, plus noise), so log-mel features have real structure. Each utterance's waveform is
seeded by its id, so the same id always gives the same audio (and audio hash).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.schema import UTTERANCE_SCHEMA
from model_code.audio import pcm16_hash, write_flac
from pipeline_tasks.contract import file_md5

SR = 16000


def speechlike(seed: int, duration_s: float, sr: int = SR) -> np.ndarray:
    """A voiced, speech-like waveform float32 ``(S,)``."""
    rng = np.random.default_rng(seed)
    n = int(duration_s * sr)
    t = np.arange(n) / sr
    f0 = 110 + 60 * rng.random() + 20 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)))
    wave = 0.15 * env * voiced + 0.01 * rng.standard_normal(n)
    return wave.astype(np.float32)


def _seed(uid: str) -> int:
    return int(hashlib.sha1(uid.encode()).hexdigest()[:8], 16)


def make_rows(
    workspace: Path,
    ids: list[str],
    batch: str = "week-001",
    long_form_ids: set[str] = frozenset(),
    speakers: int = 3,
) -> list[dict]:
    """Write one FLAC per id into ``workspace/raw/`` and return ``UTTERANCE_SCHEMA`` rows."""
    rows = []
    for uid in ids:
        rng = np.random.default_rng(_seed(uid))
        dur = 25.0 if uid in long_form_ids else float(rng.uniform(0.6, 2.5))
        wave = speechlike(_seed(uid), dur)
        h = pcm16_hash(wave)
        rel = f"raw/{h[:2]}/{h}.flac"
        write_flac(workspace / rel, wave, SR)
        rows.append(
            {
                "id": uid,
                "audio_hash": h,
                "audio_path": rel,
                "duration_s": wave.shape[0] / SR,
                "num_samples": int(wave.shape[0]),
                "sample_rate": SR,
                "orig_sample_rate": SR,
                "orig_channels": 1,
                "text": f"utterance {uid.replace('-', ' ')}",
                "text_raw": f"Utterance {uid}",
                "speaker": f"spk{_seed(uid) % speakers}",
                "batch": batch,
                "source": f"{batch}/manifest.jsonl:{len(rows) + 1}",
                "long_form": uid in long_form_ids,
            }
        )
    return rows


def write_validate_result(out_dir: Path, rows: list[dict]) -> dict:
    """Write ``rows`` as a validate-style output folder; return validate's result record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=UTTERANCE_SCHEMA)
    pq.write_table(table, out_dir / "manifest.parquet")
    return {
        "manifest": "manifest.parquet",
        "manifest_md5": file_md5(out_dir / "manifest.parquet"),
        "output_dir": str(out_dir),
        "n_accepted": len(rows),
        "step": "validate",
    }


def write_golden_dir(golden_dir: Path, ids: list[str], sr: int = 22050, channels: int = 2) -> list[dict]:
    """A NeMo-style golden folder (``manifest.jsonl`` + WAVs at ``sr`` with ``channels``), like
    ``asrflow corpus golden`` writes; returns the manifest records."""
    import soundfile as sf

    golden_dir.mkdir(parents=True, exist_ok=True)
    (golden_dir / "audio").mkdir(exist_ok=True)
    recs = []
    for uid in ids:
        wave = speechlike(_seed(uid), float(np.random.default_rng(_seed(uid)).uniform(0.8, 2.0)), sr)
        data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
        rel = f"audio/{uid}.wav"
        sf.write(golden_dir / rel, data, sr, subtype="PCM_16")
        recs.append(
            {
                "audio_filepath": rel,
                "duration": wave.shape[0] / sr,
                "text": f"Golden clip number {len(recs) + 1}!",
                "id": uid,
                "speaker": "gspk",
            }
        )
    with open(golden_dir / "manifest.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return recs

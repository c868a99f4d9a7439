"""The content-addressed log-mel feature cache, shared by the ``featurize`` and ``golden`` steps.

What: for each row of validate's manifest (``UTTERANCE_SCHEMA``), decode its FLAC from the data
workspace, compute ``model_code.features.logmel`` and store the result in sharded Parquet
(``model_code.feature_store.FEATURE_SHARD_SCHEMA``, uncompressed: see ``bench/README.md``) under

    <root>/feature_cache/<feature_hash>/shard-<content hash>.parquet

and write a per-run index (``FEATURE_INDEX_SCHEMA``: which shard and row holds each utterance)
as the step output. Long-form rows are featurized too (long-form evaluation needs them); the
index keeps their ``long_form`` flag and ``split`` leaves them out of training.

Why this layout:

* The cache is keyed by (audio hash, feature-config hash): ``feature_hash`` names the folder and
  a shard holds utterances by audio hash, so a new week only computes utterances whose audio was
  never featurized with this config, whatever their ids; a config change starts a new folder.
* Shards are content-addressed (named by a hash of the feature hash and the sorted audio hashes
  they hold), written to a temp file and renamed into place, and never overwritten: a shard file
  that exists is complete, a crashed or repeated ``run_shard`` recomputes the same name, and two
  runs (featurize and golden in parallel) that race on the same shard write identical bytes.
* Shards are independent, so Airflow maps over them: :func:`plan` (which audio hashes go to which
  new shard), :func:`run_shard` (one shard, idempotent), :func:`finalize` (the index, under the
  step contract). :func:`run` is the single-process path: plan + a process pool (``features.jobs``;
  in-process below ``features.parallel_min_audio_s`` of new audio, where starting workers costs more
  than it saves) + finalize. Each worker pins BLAS to one thread (measured: OpenBLAS's own threads
  tripled the CPU cost on a busy machine).

Speed perturbation (``features.speed_factors``, Kaldi-style 0.9 / 1.1 copies): each factor
``f != 1`` has its own cache folder, ``<root>/feature_cache/<feature_hash>-sp<f>/``, with the same
shard layout, keyed the same way (audio hash) and filled the same incremental way; its shards hold
``logmel(speed_perturb(wave, sr, f))`` and ``duration_s / f``. So the Parquet cache stays the one
source of features, a new week computes only its own utterances in every folder, and the plain
folder is the same with or without factors. The index of a factor (:func:`build_index` with
``speed=f``) lists the same rows in the same order as the plain one, so training can swap copies
row by row.

Which utterances are cached is read from the shards themselves (their ``audio_hash`` column; a
column projection reads a few KB per shard). So that a week does not open every shard of the
history (issue 18), the answer is also kept in ``_lookup.parquet`` beside them: a derived copy,
rebuilt from the shards it does not cover yet (any shard it does not name is read; rows of a
shard no longer on disk are dropped), never the source of truth.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from data_contracts.schema import FEATURE_INDEX_SCHEMA
from model_code.audio import speed_perturb
from model_code.feature_store import shard_table
from model_code.features import feature_hash, feature_kwargs, logmel
from pipeline_tasks.config import FeatureConfig
from pipeline_tasks.contract import sha256_hex, write_parquet_atomic

log = logging.getLogger(__name__)

CACHE_DIRNAME = "feature_cache"
SHARD_PREFIX = "shard-"


def speed_tag(speed: float) -> str:
    """``""`` for 1.0, ``"-sp0.9"`` for 0.9: the suffix of a speed copy's cache folder and files."""
    return "" if float(speed) == 1.0 else f"-sp{float(speed):g}"


def feature_cache_dir(root: str | os.PathLike[str], fcfg: FeatureConfig, speed: float = 1.0) -> Path:
    """``<root>/feature_cache/<feature_hash>[-sp<speed>]/``: where features of this config (and speed copy) live."""
    return Path(root) / CACHE_DIRNAME / (feature_hash(fcfg) + speed_tag(speed))


LOOKUP_NAME = "_lookup.parquet"  # derived: which shard and row holds each audio hash
_LOOKUP_SCHEMA = pa.schema(
    [("audio_hash", pa.string()), ("shard", pa.string()), ("row", pa.int64()), ("n_frames", pa.int64())]
)


def _read_lookup(path: Path) -> pa.Table | None:
    if not path.exists():
        return None
    try:
        return pq.read_table(path).cast(_LOOKUP_SCHEMA)
    except (OSError, ValueError, pa.ArrowException) as e:  # derived data: rebuilt from the shards
        log.warning("feature cache: ignoring unreadable %s (%s)", path, e)
        return None


def cache_lookup(cache_dir: str | os.PathLike[str]) -> dict[str, tuple[str, int, int]]:
    """Every cached utterance of a cache folder: ``audio_hash -> (abs shard path, row, n_frames)``.

    Shards are taken in name order and the first occurrence wins, so the answer is deterministic
    even if two shards hold the same audio (two runs that raced on overlapping work). Only shards
    that ``_lookup.parquet`` does not cover are opened; the file is then rewritten (atomically).
    """
    cache_dir = Path(cache_dir)
    out: dict[str, tuple[str, int, int]] = {}
    if not cache_dir.exists():
        return out
    on_disk = sorted(p.name for p in cache_dir.glob(f"{SHARD_PREFIX}*.parquet"))
    known = _read_lookup(cache_dir / LOOKUP_NAME)
    parts: list[pa.Table] = []
    covered: set[str] = set()
    if known is not None and known.num_rows:
        keep = pc.is_in(known.column("shard"), value_set=pa.array(on_disk, pa.string()))
        known_kept = known.filter(keep)
        covered = set(pc.unique(known.column("shard")).to_pylist())
        parts.append(known_kept)
    new = [name for name in on_disk if name not in covered]
    for name in new:
        t = pq.read_table(cache_dir / name, columns=["audio_hash", "n_frames"])
        parts.append(
            pa.table(
                {
                    "audio_hash": t.column("audio_hash"),
                    "shard": pa.array([name] * t.num_rows, pa.string()),
                    "row": pa.array(np.arange(t.num_rows), pa.int64()),
                    "n_frames": t.column("n_frames").cast(pa.int64()),
                }
            ).cast(_LOOKUP_SCHEMA)
        )
    if not parts:
        return out
    table = pa.concat_tables(parts).sort_by([("shard", "ascending"), ("row", "ascending")])
    if new or (known is not None and table.num_rows != known.num_rows):
        try:
            write_parquet_atomic(table, cache_dir / LOOKUP_NAME)
        except OSError as e:  # only a derived copy
            log.warning("feature cache: could not write %s: %s", cache_dir / LOOKUP_NAME, e)
    base = str(cache_dir)
    for h, shard, row, n in zip(
        table.column("audio_hash").to_pylist(),
        table.column("shard").to_pylist(),
        table.column("row").to_pylist(),
        table.column("n_frames").to_pylist(),
        strict=True,
    ):
        if h not in out:
            out[h] = (os.path.join(base, shard), int(row), int(n))
    return out


def shard_name(fhash: str, audio_hashes: list[str]) -> str:
    """Content address of a shard: hash of the feature hash and its sorted audio hashes."""
    return SHARD_PREFIX + sha256_hex(fhash + "\n" + "\n".join(sorted(audio_hashes)))[:16] + ".parquet"


def _feature_section(fcfg: FeatureConfig) -> dict[str, Any]:
    """The feature config as a plain dict for shard records (JSON-able, picklable)."""
    return fcfg.model_dump(mode="json")


def plan_manifest(
    manifest_path: str | os.PathLike[str],
    workspace: str | os.PathLike[str],
    fcfg: FeatureConfig,
    root: str | os.PathLike[str],
    speed: float = 1.0,
) -> list[dict[str, Any]]:
    """Shard records for the utterances of ``manifest_path`` that are not cached yet (at ``speed``).

    Each record is small and JSON-able: ``name`` (shard file name), ``cache_dir``, ``manifest``,
    ``workspace``, ``features`` (the feature config), ``speed`` (the speed-perturbation factor)
    and ``audio_hashes`` (which utterances it computes). Audio that appears several times in the
    manifest is computed once. The grouping is deterministic (manifest order, ``shard_size`` per
    shard), so a re-plan after a crash names the same shards.
    """
    cdir = feature_cache_dir(root, fcfg, speed)
    cached = cache_lookup(cdir)
    m = pq.read_table(manifest_path, columns=["audio_hash", "duration_s"])
    hashes = m.column("audio_hash").to_pylist()
    durs = m.column("duration_s").to_pylist()
    todo: list[str] = []
    dur_of: dict[str, float] = {}
    seen: set[str] = set(cached)
    for h, d in zip(hashes, durs, strict=True):
        if h not in seen:
            seen.add(h)
            todo.append(h)
            dur_of[h] = float(d)
    fhash = feature_hash(fcfg) + speed_tag(speed)
    shards = []
    for i in range(0, len(todo), fcfg.shard_size):
        chunk = todo[i : i + fcfg.shard_size]
        shards.append(
            {
                "name": shard_name(fhash, chunk),
                "cache_dir": str(cdir),
                "manifest": str(Path(manifest_path).absolute()),
                "workspace": str(Path(workspace).absolute()),
                "features": _feature_section(fcfg),
                "speed": float(speed),
                "audio_hashes": chunk,
                "audio_s": round(sum(dur_of[h] for h in chunk) / speed, 3),
            }
        )
    return shards


def _read_wave(path: Path, sample_rate: int) -> np.ndarray:
    """Decode a workspace FLAC to float32 ``(S,)``.

    Ingest stores 16 kHz mono FLAC, which soundfile reads exactly as ``model_code.audio.load_audio``
    does (int16 / 32768); anything else goes through ``load_audio`` (downmix + resample). Reading
    directly keeps torch out of the featurize workers.
    """
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:  # one open: sf.info() + sf.read() parsed the header twice
        if f.samplerate == sample_rate and f.channels == 1:
            return f.read(dtype="float32")
    from model_code.audio import load_audio

    wave, _, _ = load_audio(path, target_sr=sample_rate)
    return wave


def compute_shard(shard: dict[str, Any]) -> dict[str, Any]:
    """Compute and publish one shard (idempotent). Returns ``shard`` (abs path), counts and timings.

    If the shard file exists already (a retry, or another run got there first) nothing is
    computed (``n_computed == 0``). A ``speed`` other than 1 (absent: 1) computes the features of
    ``speed_perturb(wave, sr, speed)`` and stores ``duration_s / speed``.
    """
    t0 = time.perf_counter()
    cdir = Path(shard["cache_dir"])
    final = cdir / shard["name"]
    hashes: list[str] = list(shard["audio_hashes"])
    speed = float(shard.get("speed", 1.0))
    if final.exists():
        return {
            "shard": str(final),
            "speed": speed,
            "n_rows": len(hashes),
            "n_computed": 0,
            "audio_s": 0.0,
            "wall_s": 0.0,
            "pid": os.getpid(),
        }
    fcfg = shard["features"]
    kwargs = feature_kwargs(fcfg)
    m = pq.read_table(
        shard["manifest"], columns=["audio_hash", "audio_path", "id", "text", "duration_s", "speaker"]
    )
    # only this shard's rows become Python objects (the cumulative manifest grows every week)
    m = m.filter(pc.is_in(m.column("audio_hash"), value_set=pa.array(hashes, pa.string())))
    first: dict[str, int] = {}
    for i, h in enumerate(m.column("audio_hash").to_pylist()):
        first.setdefault(h, i)
    missing = [h for h in hashes if h not in first]
    if missing:
        raise ValueError(f"shard {shard['name']}: {len(missing)} audio hashes not in {shard['manifest']}")
    cols = {c: m.column(c).to_pylist() for c in ("audio_path", "id", "text", "duration_s", "speaker")}
    ws = Path(shard["workspace"])
    ids, texts, durs, spks, feats = [], [], [], [], []
    audio_s = 0.0
    # one BLAS thread: the (T, 201) @ (201, 80) mel projection is too small to gain from threads, and
    # OpenBLAS's spinning worker threads cost several times the useful CPU on a busy machine
    # (measured: 1.9 -> ~0.6 CPU-s for 11 audio-minutes); parallelism comes from shards instead
    with threadpool_limits(limits=1, user_api="blas"):
        for h in hashes:
            i = first[h]
            wave = _read_wave(ws / cols["audio_path"][i], kwargs["sample_rate"])
            if speed != 1.0:
                wave = speed_perturb(wave, kwargs["sample_rate"], speed)  # (ceil(S / speed),)
            audio_s += wave.shape[0] / kwargs["sample_rate"]
            feats.append(logmel(wave, **kwargs))  # (T, n_mels)
            ids.append(cols["id"][i])
            texts.append(cols["text"][i])
            durs.append(float(cols["duration_s"][i]) / speed)
            spks.append(cols["speaker"][i])
    table = shard_table(
        ids, hashes, feats, texts, durs, spks, dtype=fcfg["dtype"], feature_hash=feature_hash(fcfg) + speed_tag(speed)
    )
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = cdir / f".tmp-{shard['name']}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(table, tmp, row_group_size=int(fcfg["row_group_size"]), compression="none")
        if final.exists():  # never overwrite a published shard (a racing run wrote the same content)
            n_computed = 0
        else:
            os.replace(tmp, final)
            n_computed = len(hashes)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "shard": str(final),
        "speed": speed,
        "n_rows": len(hashes),
        "n_computed": n_computed,
        "audio_s": round(audio_s, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "pid": os.getpid(),
    }


def build_index(
    manifest_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str], speed: float = 1.0
) -> pa.Table:
    """``FEATURE_INDEX_SCHEMA`` rows for every manifest row, in manifest order, from the cache.

    ``cache_dir`` of a speed copy with its ``speed``: the same rows, durations ``duration_s / speed``.
    """
    m = pq.read_table(manifest_path)
    lookup = cache_lookup(cache_dir)
    hashes = m.column("audio_hash").to_pylist()
    missing = sorted({h for h in hashes if h not in lookup})
    if missing:
        raise RuntimeError(
            f"{len(missing)} utterances have no cached features in {cache_dir} (e.g. {missing[0]}); "
            "a run_shard did not complete"
        )
    loc = [lookup[h] for h in hashes]
    return pa.table(
        {
            "id": m.column("id"),
            "audio_hash": m.column("audio_hash"),
            "shard": pa.array([x[0] for x in loc], pa.string()),
            "row": pa.array([x[1] for x in loc], pa.int64()),
            "n_frames": pa.array([x[2] for x in loc], pa.int32()),
            "duration_s": m.column("duration_s")
            if speed == 1.0
            else pa.array(np.asarray(m.column("duration_s").to_numpy(), dtype=np.float64) / speed, pa.float64()),
            "text": m.column("text"),
            "speaker": m.column("speaker"),
            "long_form": m.column("long_form"),
            "batch": m.column("batch"),
        }
    ).cast(FEATURE_INDEX_SCHEMA)


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Worker processes inherit these, so N workers on N cores do not oversubscribe with BLAS threads."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    old = {k: os.environ.get(k) for k in names}
    os.environ.update({k: "1" for k in names})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compute_shards(
    shards: list[dict[str, Any]], jobs: int = 0, parallel_min_audio_s: float = 0.0
) -> list[dict[str, Any]]:
    """Run :func:`compute_shard` over ``shards``, in a process pool of ``jobs`` (0 = all cores).

    In-process when there is one shard, one job, or less than ``parallel_min_audio_s`` seconds of
    audio to compute (spawning workers would cost more than it saves).
    """
    if not shards:
        return []
    jobs = jobs or os.cpu_count() or 1
    jobs = min(jobs, len(shards))
    if jobs <= 1 or sum(s.get("audio_s", 0.0) for s in shards) < parallel_min_audio_s:
        return [compute_shard(s) for s in shards]
    with _single_threaded_blas(), ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(compute_shard, shards))


def featurize_manifest(
    manifest_path: str | os.PathLike[str],
    workspace: str | os.PathLike[str],
    fcfg: FeatureConfig,
    root: str | os.PathLike[str],
    out_index: str | os.PathLike[str],
) -> dict[str, Any]:
    """Featurize a manifest into the cache and write its index (used by golden too). Returns counts."""
    shards = plan_manifest(manifest_path, workspace, fcfg, root)
    results = compute_shards(shards, fcfg.jobs, fcfg.parallel_min_audio_s)
    cdir = feature_cache_dir(root, fcfg)
    index = build_index(manifest_path, cdir)
    pq.write_table(index, out_index)
    return {
        "n_utts": index.num_rows,
        "n_computed": sum(r["n_computed"] for r in results),
        "feature_hash": feature_hash(fcfg),
        "cache_dir": str(cdir),
    }

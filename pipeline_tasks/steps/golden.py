"""The ``golden`` step: the fixed evaluation set, decoded, DVC-versioned on its own, and featurized.

What: reads ``<paths.golden_dir>/manifest.jsonl`` (NeMo JSONL, as written by ``asrflow corpus
golden``), decodes, downmixes and resamples every file and normalizes every transcript with the same
``model_code`` functions as ingest, stores 16 kHz mono FLAC in the data workspace under
``golden/<h[:2]>/<h>.flac``, versions that folder with DVC *separately* from the training snapshots
(its own ``golden.dvc`` and a ``golden-<md5[:12]>`` tag), and featurizes it with the same front end
into the same feature cache as training data. Returns ``index`` (``FEATURE_INDEX_SCHEMA``),
``manifest`` (``UTTERANCE_SCHEMA``), ``golden_md5`` (DVC md5 of ``golden/``), ``n_utts`` and
``feature_hash``.

Why: models are compared on one fixed set whose exact bytes are named by ``golden_md5`` (tagged on
every model version); ``split`` drops any golden utterance from train/dev/proxy by audio hash and
id. The golden set is curated, so a row that fails to decode or normalize is an error, not a
quarantine: a silently shrunken golden set would make WERs incomparable.

The key hashes the content of the manifest and of every audio file it references, plus the text
normalization, sample rate and feature config, so an edited golden set is a new key.

Nothing else is ever deleted (issue 13): ``paths.golden_dir`` (the source set) and
``paths.data_workspace`` must not overlap (refused before anything is touched), and when the set
changes, only files that the previous ``golden.dvc`` recorded are removed from
``<workspace>/golden``; any other file there stops the step with the list of those files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_contracts.schema import UTTERANCE_SCHEMA
from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import file_md5, run_step, step_key
from pipeline_tasks.records import GoldenResult, StepInputs
from pipeline_tasks.services.feature_cache import featurize_manifest
from pipeline_tasks.services.manifests import ManifestError, read_manifest

log = logging.getLogger(__name__)

STEP = "golden"
CODE_VERSION = "3"  # 3: slices.parquet (synth, condition); 2: one numpy resampler (model_code.audio.resample) for ingest, golden and serving
WORKSPACE_DIR = "golden"
MANIFEST_NAME = "manifest.jsonl"
# optional golden manifest fields that evaluate reports WER per value of (synth/corpus.py writes them)
SLICE_FIELDS = ("synth", "condition")


class GoldenSetError(RuntimeError):
    """The golden set is missing or has a row that cannot be used."""


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_layout(cfg: AsrflowConfig) -> None:
    """Refuse a golden set folder that overlaps the data workspace (either inside the other):
    the step rewrites ``<workspace>/golden`` and would delete the source set."""
    gdir = cfg.paths.golden_dir
    if "://" in gdir:
        return  # refused by golden_manifest_path
    g = Path(os.path.realpath(gdir))
    ws = Path(os.path.realpath(cfg.paths.data_workspace))
    if _inside(g, ws) or _inside(ws, g):
        raise GoldenSetError(
            f"paths.golden_dir ({g}) and paths.data_workspace ({ws}) overlap: the golden step rewrites "
            f"{ws / WORKSPACE_DIR} and could delete the source golden set. Point them at separate folders."
        )


def golden_manifest_path(cfg: AsrflowConfig) -> Path:
    gdir = cfg.paths.golden_dir
    if "://" in gdir:
        raise GoldenSetError(f"golden_dir {gdir!r}: only local folders are supported for the golden set")
    path = Path(gdir) / MANIFEST_NAME
    if not path.exists():
        raise GoldenSetError(
            f"no golden set: {path} does not exist. Create one with "
            f"`asrflow corpus golden --out {gdir}` (or point paths.golden_dir at a folder holding a "
            f"NeMo-style {MANIFEST_NAME})"
        )
    return path


def _read_records(manifest: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        recs = read_manifest(manifest, required=("audio_filepath", "text"))
    except ManifestError as e:
        raise GoldenSetError(str(e)) from e
    if not recs:
        raise GoldenSetError(f"{manifest}: the golden manifest is empty")
    return [(r["_line"], r) for r in recs]


def _audio_path(manifest: Path, rec: dict[str, Any]) -> Path:
    p = Path(str(rec["audio_filepath"]))
    return p if p.is_absolute() else manifest.parent / p


def content_md5(manifest: Path) -> str:
    """md5 over the manifest bytes and the bytes of every audio file it references (in order)."""
    h = hashlib.md5()
    h.update(file_md5(manifest).encode())
    for _, rec in _read_records(manifest):
        p = _audio_path(manifest, rec)
        h.update(f"\n{rec['audio_filepath']}:{file_md5(p) if p.exists() else 'missing'}".encode())
    return h.hexdigest()


def _decode_rows(cfg: AsrflowConfig, manifest: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """UTTERANCE_SCHEMA rows and ``{audio_hash: wave}`` for every manifest record."""
    from model_code.audio import AudioDecodeError, load_audio, pcm16_hash
    from model_code.text import TextRejected

    sr = cfg.ingest.target_sample_rate
    tn = cfg.ingest.text
    rows, waves = [], {}
    for lineno, rec in _read_records(manifest):
        where = f"{manifest}:{lineno}"
        try:
            wave, orig_sr, orig_ch = load_audio(_audio_path(manifest, rec), target_sr=sr)
        except AudioDecodeError as e:
            raise GoldenSetError(f"{where}: golden audio unusable ({e.reason}: {e.message})") from e
        try:
            text = tn.normalize(str(rec["text"]))
        except TextRejected as e:
            raise GoldenSetError(f"{where}: golden transcript rejected ({e.reason}: {e.message})") from e
        h = pcm16_hash(wave)
        waves[h] = wave
        duration = wave.shape[0] / sr
        uid = rec.get("id") or hashlib.sha1(f"golden/{manifest.name}:{lineno}".encode()).hexdigest()[:16]
        spk = rec.get("speaker")
        rows.append(
            {
                "id": str(uid),
                "audio_hash": h,
                "audio_path": f"{WORKSPACE_DIR}/{h[:2]}/{h}.flac",
                "duration_s": duration,
                "num_samples": int(wave.shape[0]),
                "sample_rate": sr,
                "orig_sample_rate": int(orig_sr),
                "orig_channels": int(orig_ch),
                "text": text,
                "text_raw": str(rec["text"]),
                "speaker": None if spk is None else str(spk),
                "batch": "golden",
                "source": where,
                "long_form": duration > cfg.validate_.max_train_duration_s,
                # slice labels (not in UTTERANCE_SCHEMA): the golden set's synthesizer / channel condition
                **{k: None if rec.get(k) is None else str(rec[k]) for k in SLICE_FIELDS},
            }
        )
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise GoldenSetError(f"{manifest}: duplicate ids in the golden set: {dup[:5]}")
    return rows, waves


def _store_and_version(cfg: AsrflowConfig, waves: dict[str, Any]) -> tuple[str, str]:
    """Write the golden FLACs into the workspace (exactly this set), DVC add/commit/tag/push.

    Returns ``(golden_md5, tag)``. Idempotent: unchanged audio gives the same md5, no new commit
    and an existing tag.
    """
    from model_code.audio import write_flac
    from pipeline_tasks.services.dvc_store import DataWorkspace

    check_layout(cfg)
    ws = DataWorkspace(cfg.paths.data_workspace, cfg.paths.dvc_remote).ensure()
    sr = cfg.ingest.target_sample_rate
    with ws.lock(cfg.ingest.lock_timeout_s):
        gdir = ws.path / WORKSPACE_DIR
        wanted = {f"{h[:2]}/{h}.flac" for h in waves}
        # a changed golden set replaces the old one, never mixes; but only what the previous
        # golden.dvc recorded is ours to delete
        recorded = ws.tracked_files(WORKSPACE_DIR) or set()
        present = {
            p.relative_to(gdir).as_posix()
            for p in (gdir.rglob("*") if gdir.exists() else [])
            if (p.is_file() or p.is_symlink()) and not p.name.startswith(".tmp-")  # .dvcignore'd temporaries
        }
        extra = present - wanted
        unknown = sorted(extra - recorded)
        if unknown:
            raise GoldenSetError(
                f"{gdir} holds {len(unknown)} file(s) that the previous golden.dvc did not record, e.g. "
                f"{unknown[:5]}: not deleting them. Move them out of the data workspace and rerun."
            )
        for rel in sorted(extra):
            (gdir / rel).unlink()
        for h, wave in waves.items():
            p = gdir / h[:2] / f"{h}.flac"
            if not p.exists():
                write_flac(p, wave, sr)
        md5 = ws.add_commit_push([WORKSPACE_DIR], "asrflow: golden set", tag=None, push=False)[WORKSPACE_DIR]
        tag = f"golden-{md5.removesuffix('.dir')[:12]}"
        if not ws.has_tag(tag):
            ws.git("tag", "-a", tag, "-m", f"asrflow: golden set {md5}")
        if cfg.ingest.dvc_push:
            ws.dvc("push", "-q", f"{WORKSPACE_DIR}.dvc")
    return md5, tag


def run(cfg: AsrflowConfig, inputs: StepInputs | None = None, force: bool = False) -> GoldenResult:
    check_layout(cfg)
    manifest = golden_manifest_path(cfg)
    material = {
        # speed copies are for training only: the golden set is featurized at speed 1 whatever speed_factors says
        "features": cfg.features.model_dump(mode="json", exclude={"jobs", "parallel_min_audio_s", "speed_factors"}),
        "text": cfg.ingest.text,
        "sample_rate": cfg.ingest.target_sample_rate,
        "max_train_duration_s": cfg.validate_.max_train_duration_s,
        "workspace": cfg.paths.data_workspace,
    }
    key = step_key(STEP, material, {"golden_set": content_md5(manifest)}, CODE_VERSION)

    def work(tmp: Path) -> dict[str, Any]:
        rows, waves = _decode_rows(cfg, manifest)
        md5, tag = _store_and_version(cfg, waves)
        table = pa.Table.from_pylist(rows, schema=UTTERANCE_SCHEMA)
        import pyarrow.parquet as pq

        pq.write_table(table, tmp / "manifest.parquet")
        # what evaluate slices by, beside speaker and duration: the golden manifest's own labels
        labels = pa.table({"id": [r["id"] for r in rows], **{k: [r[k] for r in rows] for k in SLICE_FIELDS}},
                          schema=pa.schema([("id", pa.string()), *[(k, pa.string()) for k in SLICE_FIELDS]]))
        pq.write_table(labels, tmp / "slices.parquet")
        counts = featurize_manifest(
            tmp / "manifest.parquet", cfg.paths.data_workspace, cfg.features, cfg.root, tmp / "index.parquet"
        )
        return {
            "index": "index.parquet",
            "index_md5": file_md5(tmp / "index.parquet"),
            "manifest": "manifest.parquet",
            "manifest_md5": file_md5(tmp / "manifest.parquet"),
            "golden_md5": md5,
            "dvc_tag": tag,
            "n_utts": len(rows),
            "n_computed": counts["n_computed"],
            "feature_hash": counts["feature_hash"],
            "cache_dir": counts["cache_dir"],
            "hours": round(sum(r["duration_s"] for r in rows) / 3600.0, 6),
            "slices": "slices.parquet",
            "slice_kinds": [k for k in SLICE_FIELDS if any(r[k] for r in rows)],
        }

    return run_step(cfg.root, STEP, key, work, force=force)

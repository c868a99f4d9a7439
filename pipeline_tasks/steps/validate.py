"""The ``validate`` step: check ingested utterances against the data contract (GX suites).

What: takes ingest's cumulative manifest and quarantine table, and

1. checks every row against the row-level suite (``data_contracts.suites.ROW_SUITE``):
   decodable stored FLAC (its header frame count equals ``num_samples``; the header is read,
   the audio is not re-decoded), 16 kHz, duration within bounds, non-empty text from the
   allowed alphabet, plausible characters per second, unique id. Failing rows are mapped
   back by id (GX ``unexpected_index_list``) and quarantined with ``stage="validate"``, the
   reason of the first failing expectation and a message listing every failure; a copy of
   the stored FLAC goes to ``paths.quarantine_dir/<batch>/``.
   A row that passed the same suite and limits before with the same values (id, audio hash and
   path, sample count and rate, duration, text) is not checked again (issue 18: a week checks
   its new rows, not the history; ``<root>/validate/.row-verdicts/``, only passes are kept,
   delete the folder to check every row again). The raw store is written once and DVC-protected,
   so a stored FLAC does not change under a row that passed.
2. marks long-form rows (``duration_s > validate.max_train_duration_s``): kept with
   ``long_form=True`` for long-form evaluation, never trained on, never quarantined.
3. checks every landing batch (``week-001``…) against the batch-level suite: enough accepted
   rows, median duration in range, share quarantined (ingest + validate) under the
   threshold, no speaker above the hours share. A failing batch stops the run: a
   :class:`~data_contracts.suites.DataContractError` lists the failing expectations with
   observed values, and its report is kept in ``<root>/validate/failed-<key>/``.
4. writes ``manifest.parquet`` (accepted rows, ``UTTERANCE_SCHEMA``), ``quarantine.parquet``
   (ingest's rows + validate's, ``QUARANTINE_SCHEMA``), ``summary.json`` plus
   ``summaries/<batch>.json``, and the GX Data Docs site (``data_docs/index.html``, rendered by
   GX's own site builder from the ephemeral context's stored validation results).

Why: bad rows must not reach training, and a batch that is broken as a whole (a bad export,
a wrong sample rate upstream) must stop the pipeline with a report a person can read, rather
than quietly train on it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from data_contracts.schema import QUARANTINE_SCHEMA, UTTERANCE_SCHEMA, conform
from data_contracts.suites import (
    SUITES_VERSION,
    ContractLimits,
    ContractRunner,
    DataContractError,
    batch_frame,
    format_failures,
)
from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import (
    canonical_json,
    file_md5,
    resolve,
    run_step,
    sha256_hex,
    step_key,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline_tasks.records import StepInputs, ValidateResult

log = logging.getLogger(__name__)

STEP = "validate"
CODE_VERSION = "1"

__all__ = ["run", "limits_from_config", "row_frame", "DataContractError", "STEP", "CODE_VERSION"]


def limits_from_config(cfg: AsrflowConfig) -> ContractLimits:
    v = cfg.validate_
    return ContractLimits(
        sample_rate=cfg.ingest.target_sample_rate,
        min_duration_s=v.min_duration_s,
        max_duration_s=v.max_duration_s,
        min_chars_per_s=v.min_chars_per_s,
        max_chars_per_s=v.max_chars_per_s,
        allowed_chars=cfg.ingest.text.allowed_chars,
        max_quarantine_share=v.max_quarantine_share,
        min_utterances=v.min_utterances,
        median_duration_s=tuple(v.median_duration_s),
        max_hours_per_speaker_share=v.max_hours_per_speaker_share,
    )


def _flac_header(path: Path) -> tuple[int | None, int | None]:
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError):
        return None, None
    return int(info.frames), int(info.samplerate)


def row_frame(manifest: pa.Table, workspace: str | os.PathLike[str]) -> pd.DataFrame:
    """The manifest as a DataFrame plus the derived columns the row suite checks:
    ``audio_frames`` / ``audio_sample_rate`` (from the stored FLAC's header, null when it is
    missing or unreadable) and ``chars_per_s`` (characters of normalized text per second)."""
    df = manifest.to_pandas()
    ws = Path(workspace)
    headers = [_flac_header(ws / p) for p in df["audio_path"]]
    df["audio_frames"] = pd.array([h[0] for h in headers], dtype="Int64").astype("float64")
    df["audio_sample_rate"] = pd.array([h[1] for h in headers], dtype="Int64").astype("float64")
    dur = df["duration_s"].astype(float)
    df["chars_per_s"] = df["text"].str.len().astype(float) / dur.where(dur > 0)
    df["chars_per_s"] = df["chars_per_s"].fillna(float("inf"))
    return df


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", s)[:120]


def _copy_flac(src: Path, qdir: Path, batch: str, rid: str) -> str | None:
    if not src.is_file():
        return None
    dest = qdir / batch / f"validate-{_safe_name(rid)}.flac"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{dest.name}.{uuid.uuid4().hex}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    return str(dest)


def _batch_summary(acc: pd.DataFrame, n_q_ingest: int, n_q_validate: int) -> dict[str, Any]:
    n_total = len(acc) + n_q_ingest + n_q_validate
    hours = float(acc["duration_s"].sum()) / 3600.0
    spk = acc.dropna(subset=["speaker"]).groupby("speaker")["duration_s"].sum()
    total_s = float(acc["duration_s"].sum())
    return {
        "n_landing_rows": n_total,
        "n_accepted": len(acc),
        "n_quarantined_ingest": n_q_ingest,
        "n_quarantined_validate": n_q_validate,
        "quarantine_share": round((n_q_ingest + n_q_validate) / n_total, 6) if n_total else 0.0,
        "median_duration_s": float(acc["duration_s"].median()) if len(acc) else None,
        "hours": round(hours, 6),
        "n_speakers": int(spk.size),
        "max_speaker_share": round(float(spk.max() / total_s), 6) if spk.size and total_s > 0 else None,
        "n_long_form": int(acc["long_form"].sum()) if len(acc) else 0,
    }


VERDICTS_DIR = ".batch-verdicts"
ROW_VERDICTS_DIR = ".row-verdicts"
# what the row suite reads of a manifest row: a row with the same values passed before passes again
ROW_KEY_COLUMNS = ["id", "audio_hash", "audio_path", "num_samples", "sample_rate", "duration_s", "text"]


def _row_hashes(df: pd.DataFrame) -> np.ndarray:
    """One 64-bit hash per row over :data:`ROW_KEY_COLUMNS` (vectorized)."""
    return pd.util.hash_pandas_object(df[ROW_KEY_COLUMNS], index=False).to_numpy(dtype=np.uint64)


def _passed_rows(path: Path | None) -> np.ndarray:
    if path is None or not path.exists():
        return np.empty(0, dtype=np.uint64)
    try:
        return pq.read_table(path).column("row_hash").to_numpy().astype(np.uint64)
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:  # only a cache: check every row
        log.warning("validate: ignoring unreadable %s (%s); every row is checked", path, e)
        return np.empty(0, dtype=np.uint64)


def _remember_passed(path: Path, hashes: np.ndarray) -> None:
    try:
        write_parquet_atomic(pa.table({"row_hash": pa.array(np.unique(hashes), pa.uint64())}), path)
    except OSError as e:  # only a cache
        log.warning("validate: could not remember the rows that passed: %s", e)


def _batch_failures(runner: ContractRunner, frame: pd.DataFrame, batch: str, cache: Path | None, salt: str) -> list[dict]:
    """The batch suite's failures for one batch, remembered by the content of its frame (issue 18).

    A batch's verdict depends only on its frame (its accepted durations and speaker shares, its
    quarantine count) and on the suite and limits (``salt``), so a batch that passed before with the
    same frame (every earlier week, each run) is not run through GX again: without this the batch
    loop costs one GX validation per week of history. Only passes are remembered (a failing batch is
    validated again, so its failure report is always complete). The Data Docs then show the batches
    validated by this run; ``summary.json`` lists every batch either way."""
    if cache is None:
        return runner.validate_batch(frame, batch)[0]
    h = hashlib.sha256(f"{salt}\x00{batch}\x00{list(frame.columns)}\x00{list(map(str, frame.dtypes))}".encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    path = cache / f"{h.hexdigest()[:32]}.json"
    if path.exists():
        return []  # only passing verdicts are remembered: a failing batch is re-run for its report
    fails = runner.validate_batch(frame, batch)[0]
    if not fails:
        try:
            write_json_atomic(path, {"batch": batch, "failures": []})
        except OSError as e:  # only a cache
            log.warning("validate: could not remember the verdict of %s: %s", batch, e)
    return fails


def _work(cfg: AsrflowConfig, ing: dict[str, Any], key: str, tmp: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    vc = cfg.validate_
    workspace = Path(ing["workspace"])
    manifest = conform(pq.read_table(resolve(ing, ing["manifest"])), UTTERANCE_SCHEMA)
    ing_q = conform(pq.read_table(resolve(ing, ing["quarantine"])), QUARANTINE_SCHEMA)
    limits = limits_from_config(cfg)
    runner = ContractRunner(limits, docs_dir=tmp / "data_docs")

    # 1. row level: rows that passed this suite before with the same values are not checked again
    # (issue 18: a week checks its new rows, not the history; the raw store is written once)
    salt = sha256_hex(canonical_json({"limits": limits.as_dict(), "suites": SUITES_VERSION, "code": CODE_VERSION}))
    passed_file = Path(cfg.root) / STEP / ROW_VERDICTS_DIR / f"{salt[:16]}.parquet"
    df = manifest.to_pandas()
    hashes = _row_hashes(df) if len(df) else np.empty(0, dtype=np.uint64)
    passed_before = _passed_rows(passed_file)
    known = np.isin(hashes, passed_before)
    checked = row_frame(manifest.filter(pa.array(~known)), workspace) if (~known).any() else df.iloc[0:0]
    failures, _ = runner.validate_rows(checked) if len(checked) else ({}, None)
    rejected = df["id"].astype(str).isin(failures) & ~known
    newly_passed = hashes[~known & ~rejected.to_numpy()]
    if len(newly_passed):
        _remember_passed(passed_file, np.concatenate([passed_before, newly_passed]))
    qdir = Path(cfg.paths.quarantine_dir)
    q_recs = []
    for rec in df[rejected].to_dict("records"):
        fl = failures[str(rec["id"])]
        msg = "; ".join(f"{f['description']} (got {f['value']!r})" for f in fl)
        q_recs.append(
            {
                "id": rec["id"],
                "batch": rec["batch"],
                "source": rec["source"],
                "audio_filepath": None,  # the landing path is in `source`'s manifest line
                "reason": fl[0]["reason"],
                "message": msg,
                "stage": "validate",
                "quarantined_copy": _copy_flac(workspace / rec["audio_path"], qdir, rec["batch"], str(rec["id"])),
            }
        )
        # the message quotes the failing values, the transcript among them (personal data): DEBUG only
        log.warning("validate: quarantined %s (%s)", rec["id"], fl[0]["reason"])
        log.debug("validate: %s: %s", rec["id"], msg)
    val_q = pa.Table.from_pylist(q_recs, schema=QUARANTINE_SCHEMA)

    # 2. accepted rows, long-form flagged
    acc_df = df[~rejected].copy()
    acc_df["long_form"] = acc_df["duration_s"] > vc.max_train_duration_s
    accepted = pa.Table.from_pandas(acc_df[list(UTTERANCE_SCHEMA.names)], schema=UTTERANCE_SCHEMA, preserve_index=False)

    # 3. batch level
    ing_q_batches = pd.Series(ing_q.column("batch").to_pylist(), dtype=object)
    val_q_batches = pd.Series([r["batch"] for r in q_recs], dtype=object)
    batches = sorted(set(df["batch"]) | set(ing_q_batches.dropna()))
    summaries: dict[str, Any] = {}
    batch_failures: list[dict[str, Any]] = []
    verdicts = Path(cfg.root) / STEP / VERDICTS_DIR
    by_batch = dict(tuple(acc_df.groupby("batch", sort=False))) if len(acc_df) else {}
    for b in batches:
        acc_b = by_batch.get(b, acc_df.iloc[0:0])
        n_qi = int((ing_q_batches == b).sum())
        n_qv = int((val_q_batches == b).sum())
        fails = _batch_failures(runner, batch_frame(acc_b, n_qi + n_qv), b, verdicts, salt)
        summaries[b] = {**_batch_summary(acc_b, n_qi, n_qv), "success": not fails, "failures": fails}
        batch_failures += fails

    runner.build_docs()
    row_reasons: dict[str, int] = {}
    for r in q_recs:
        row_reasons[r["reason"]] = row_reasons.get(r["reason"], 0) + 1
    summary = {
        "suites_version": SUITES_VERSION,
        "success": not batch_failures,
        "limits": limits.as_dict(),
        "n_rows": len(df),
        "n_rows_checked": len(checked),  # the others passed this suite before with the same values
        "n_accepted": accepted.num_rows,
        "n_quarantined_validate": len(q_recs),
        "n_quarantined_ingest": ing_q.num_rows,
        "row_reasons": dict(sorted(row_reasons.items())),
        "n_long_form": int(acc_df["long_form"].sum()),
        "batches": summaries,
        "snapshot_md5": ing.get("snapshot_md5"),
        "report_html": "data_docs/index.html",
    }
    write_json_atomic(tmp / "summary.json", summary)
    for b, s in summaries.items():
        write_json_atomic(tmp / "summaries" / f"{_safe_name(b)}.json", {"batch": b, **s})

    if batch_failures:
        keep = Path(cfg.root) / STEP / f"failed-{key}"
        if keep.exists():
            shutil.rmtree(keep)
        keep.mkdir(parents=True)
        for name in ("summary.json", "summaries", "data_docs"):
            src = tmp / name
            if src.is_dir():
                shutil.copytree(src, keep / name)
            elif src.exists():
                shutil.copyfile(src, keep / name)
        raise DataContractError(
            f"data contract broken by {len({f['batch'] for f in batch_failures})} batch(es):\n"
            f"{format_failures(batch_failures)}\nreport: {keep / 'data_docs' / 'index.html'}",
            failures=batch_failures,
            report=str(keep / "data_docs" / "index.html"),
        )

    pq.write_table(accepted, tmp / "manifest.parquet")
    quarantine = pa.concat_tables([ing_q, val_q])
    pq.write_table(quarantine, tmp / "quarantine.parquet")
    return {
        "manifest": "manifest.parquet",
        "manifest_md5": file_md5(tmp / "manifest.parquet"),
        "quarantine": "quarantine.parquet",
        "n_accepted": accepted.num_rows,
        "n_quarantined": quarantine.num_rows,
        "n_quarantined_validate": len(q_recs),
        "n_long_form": summary["n_long_form"],
        "n_rows_checked": len(checked),
        "report_html": "data_docs/index.html",
        "summary": "summary.json",
        "snapshot_md5": ing.get("snapshot_md5"),
        "dvc_tag": ing.get("dvc_tag"),
        "workspace": str(workspace),
        "batches": batches,
        "wall_s": round(time.monotonic() - t0, 3),
    }


def run(cfg: AsrflowConfig, inputs: StepInputs, force: bool = False) -> ValidateResult:
    """Validate ingest's manifest (see the module docstring); keyed by its md5 and the contract."""
    ing = inputs["ingest"]
    key = step_key(
        STEP,
        {
            "validate": cfg.validate_,
            "limits": limits_from_config(cfg).as_dict(),
            "suites_version": SUITES_VERSION,
            "quarantine_dir": cfg.paths.quarantine_dir,
        },
        {"ingest_manifest": ing["manifest_md5"], "ingest_quarantine": file_md5(resolve(ing, ing["quarantine"]))},
        CODE_VERSION,
    )
    return run_step(cfg.root, STEP, key, lambda tmp: _work(cfg, ing, key, tmp), force=force)

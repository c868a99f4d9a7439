"""Using exported models: transcribe and score with a model reference (``models:/name@alias`` or a file).

What (the registry look-ups themselves are :mod:`pipeline_tasks.services.registry`):
- :func:`load_model`: an :class:`model_code.onnx_runtime.OnnxAsr` with the profile's decode settings.
- :func:`transcribe_cli` (``asrflow transcribe``): audio files or a NeMo manifest → JSONL lines
  ``{id, audio_filepath, text, duration, rtf}``.
- :func:`evaluate_manifest` (``asrflow evaluate --model M --manifest F``): WER/CER of a model on
  any NeMo manifest with transcripts.

Why here and not in model_code: the registry and the profile are pipeline concerns; the
torch-free model itself is ``model_code/onnx_runtime.py``. Nothing in this module imports torch
(MLflow's registry client does not either), so transcription runs with onnxruntime only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.services.manifests import read_manifest
from pipeline_tasks.services.registry import resolve_model

log = logging.getLogger(__name__)

def load_model(cfg: AsrflowConfig, model: str | os.PathLike[str], decode: str | None = None, threads: int = 0):
    """:class:`OnnxAsr` for a model reference, decoding with the profile's ``decode`` settings."""
    from model_code.onnx_runtime import OnnxAsr

    path, info = resolve_model(cfg, model)
    d = cfg.decode
    asr = OnnxAsr(
        path,
        decode=decode or d.mode,
        beam_size=d.beam_size,
        lm_weight=d.lm_weight,
        word_score=d.word_score,
        chunk_s=d.chunk_s,
        chunk_overlap_s=d.chunk_overlap_s,
        threads=threads,
    )
    return asr, info


# ---------------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------------


def transcribe_rows(asr, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Transcribe manifest-like rows (``_abs_path``) → output records (one per row, in order).

    A file that cannot be decoded gives a record with ``error`` instead of failing the batch.
    """
    from model_code.audio import AudioDecodeError

    out = []
    for row in rows:
        rec: dict[str, Any] = {"id": row.get("id") or row["audio_filepath"], "audio_filepath": row["audio_filepath"]}
        try:
            rec.update(asr.transcribe_file(row["_abs_path"]))
        except AudioDecodeError as e:
            rec.update({"text": None, "duration": None, "rtf": None, "error": f"{e.reason}: {e.message}"})
        if "text" in row:
            rec["ref"] = row["text"]
        out.append(rec)
    return out


def transcribe_cli(
    cfg: AsrflowConfig,
    model: str,
    audio_paths: list[Path],
    manifest: Path | None,
    output: Path | None,
) -> list[dict[str, Any]]:
    """``asrflow transcribe``: JSONL ``{id, audio_filepath, text, duration, rtf}`` to ``output`` or stdout."""
    asr, info = load_model(cfg, model)
    rows: list[dict[str, Any]] = []
    if manifest is not None:
        rows.extend(read_manifest(manifest))
    for p in audio_paths:
        rows.append({"audio_filepath": str(p), "_abs_path": str(Path(p).expanduser())})
    recs = transcribe_rows(asr, rows)
    for r in recs:
        r.pop("ref", None)
        r.pop("orig_channels", None)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".tmp-{output.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(text)
        os.replace(tmp, output)
        log.info("wrote %d transcripts to %s (model %s, %s decoding)", len(recs), output, info["model"], asr.decode_mode)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return recs


def evaluate_manifest(cfg: AsrflowConfig, model: str, manifest: str | os.PathLike[str]) -> dict[str, Any]:
    """``asrflow evaluate --model M --manifest F``: WER/CER (jiwer) of M on F's transcripts.

    Reference texts are normalized with the ingest text normalizer (so ``"Hello, World!"`` scores
    against ``hello world``); rows whose reference the normalizer rejects are skipped and counted.
    """
    from model_code.metrics import error_counts
    from model_code.text import TextRejected

    asr, info = load_model(cfg, model)
    rows = [r for r in read_manifest(manifest) if r.get("text") is not None]
    t = cfg.ingest.text
    keep, rejected = [], 0
    for r in rows:
        try:
            r["text"] = t.normalize(r["text"])
            keep.append(r)
        except TextRejected:
            rejected += 1
    if not keep:
        raise ValueError(f"{manifest}: no rows with a usable transcript")
    recs = transcribe_rows(asr, keep)
    ok = [r for r in recs if r.get("text") is not None]
    counts = error_counts([r["ref"] for r in ok], [r["text"] for r in ok])
    audio_s = sum(r["duration"] for r in ok)
    compute_s = sum(r["rtf"] * r["duration"] for r in ok if r["rtf"] is not None)
    return {
        **info,
        "manifest": str(manifest),
        "decode": asr.decode_mode,
        "quantization": asr.quantization,
        "n_utts": len(ok),
        "n_failed": len(recs) - len(ok),
        "n_rejected_refs": rejected,
        "wer": counts["wer"],
        "cer": counts["cer"],
        "ref_words": counts["ref_words"],
        "audio_s": round(audio_s, 3),
        "rtf": round(compute_s / audio_s, 5) if audio_s else None,
        "rtfx": round(audio_s / compute_s, 2) if compute_s else None,
    }

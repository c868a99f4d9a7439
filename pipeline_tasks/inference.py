"""Using exported models: resolve ``models:/name@alias`` in the MLflow registry, transcribe, score.

What:
- :func:`alias_version`, :func:`resolve_model`: a model reference (``models:/asr@production``,
  ``models:/asr@staging``, ``models:/asr/3`` or a path to an exported ``.onnx``) → a local
  ``.onnx`` path. Registry models are downloaded once into ``<root>/model_cache/<name>/<version>-<id>/``
  (atomic rename, so concurrent readers never see half a download).
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

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig

log = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def registry_client(cfg: AsrflowConfig):
    """An ``MlflowClient`` on the profile's tracking + registry URI (the SQLite folder is created)."""
    import mlflow

    uri = cfg.registry.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(cfg: AsrflowConfig, alias: str, name: str | None = None, client=None):
    """The ``ModelVersion`` an alias points to, or ``None`` (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    client = client or registry_client(cfg)
    try:
        return client.get_model_version_by_alias(name or cfg.registry.model_name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def download_version(cfg: AsrflowConfig, mv) -> Path:
    """Download a registered model version once; return its ``.onnx`` file.

    Cache folder ``<root>/model_cache/<name>/<version>-<sha1(source)[:8]>`` (the source URI is part
    of the name so a re-created registry with the same version numbers cannot hit a stale copy).
    """
    import mlflow

    tag = hashlib.sha1(str(mv.source).encode()).hexdigest()[:8]
    dest = cfg.root / "model_cache" / mv.name / f"{mv.version}-{tag}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
        try:
            mlflow.set_tracking_uri(cfg.registry.tracking_uri)
            mlflow.set_registry_uri(cfg.registry.tracking_uri)
            tmp.mkdir()
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(tmp)
            )
            try:
                os.replace(tmp, dest)
            except OSError:  # another process finished first
                if not dest.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return find_onnx(dest)


def find_onnx(folder: Path) -> Path:
    """The model file of a downloaded MLflow ONNX model folder (``model.onnx`` first)."""
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    found = sorted(folder.rglob("*.onnx"))
    if not found:
        raise FileNotFoundError(f"no .onnx file under {folder}")
    return found[0]


def resolve_model(cfg: AsrflowConfig, model: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """A model reference → ``(local .onnx path, info)``; ``info`` has ``name``/``version``/``alias`` for registry models."""
    m = _MODELS_URI.match(str(model))
    if m:
        name, alias, version = m.group("name"), m.group("alias"), m.group("version")
        client = registry_client(cfg)
        if alias:
            mv = alias_version(cfg, alias, name, client)
            if mv is None:
                raise LookupError(f"{model}: the registry has no model {name!r} with alias {alias!r}")
        else:
            mv = client.get_model_version(name, version)
        return download_version(cfg, mv), {"model": str(model), "name": name, "version": str(mv.version), "alias": alias}
    p = Path(model).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{model}: neither a models:/ URI nor an existing .onnx file")
    return p.resolve(), {"model": str(p.resolve())}


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


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """NeMo JSONL manifest → rows with ``audio_filepath`` made absolute (relative to the manifest)."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from e
        if "audio_filepath" not in row:
            raise ValueError(f"{path}:{n}: no audio_filepath")
        ap = Path(row["audio_filepath"]).expanduser()
        row["_abs_path"] = str(ap if ap.is_absolute() else (path.parent / ap))
        row["_source"] = f"{path}:{n}"
        rows.append(row)
    return rows


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
    from model_code.text import TextRejected, normalize_text

    asr, info = load_model(cfg, model)
    rows = [r for r in read_manifest(manifest) if r.get("text") is not None]
    t = cfg.ingest.text
    keep, rejected = [], 0
    for r in rows:
        try:
            r["text"] = normalize_text(
                r["text"],
                lowercase=t.lowercase,
                strip_punctuation=t.strip_punctuation,
                collapse_whitespace=t.collapse_whitespace,
                digits=t.digits,
                allowed_chars=t.allowed_chars,
            )
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

"""The MLflow model registry as the pipeline reads it: aliases, versions, local copies.

- :func:`registry_client`: an ``MlflowClient`` on the profile's tracking + registry URI.
- :func:`alias_version`: the version an alias (``staging``, ``production``) points to, or ``None``.
- :func:`resolve_model`: a model reference (``models:/asr@production``, ``models:/asr@staging``,
  ``models:/asr/3`` or a path to an exported ``.onnx``) → a local ``.onnx`` path. Registry models
  are downloaded once into ``<root>/model_cache/<name>/<version>-<id>/`` (atomic rename, so
  concurrent readers never see half a download).

Nothing here imports torch (MLflow's registry client does not either).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


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



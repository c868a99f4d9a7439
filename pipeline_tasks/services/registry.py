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

# aliases and tags of registered versions (the registry's vocabulary, shared by evaluate and promote)
STAGING = "staging"
PRODUCTION = "production"
PREVIOUS = "previous-production"
TAG_CANDIDATE = "asrflow.candidate_key"  # the export key a version was registered from
TAG_STAGED = "asrflow.staged"
TAG_ROLLED_BACK = "asrflow.rolled_back"
TAG_CHAMPION_VERSION = "asrflow.gate_champion_version"  # what the gate compared it against
TAG_CHAMPION_ALIAS = "asrflow.gate_champion_alias"

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
    return alias_version_client(client or registry_client(cfg), name or cfg.registry.model_name, alias)


def alias_version_client(client, name: str, alias: str):
    """:func:`alias_version` with a client at hand."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
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




def _batches(mv) -> set[str] | None:
    raw = mv.tags.get("asrflow.batches")
    return None if raw is None else {b for b in raw.split(",") if b}


def as_of(client, mv, candidate_key: str, batches: set[str] | None, depth: int = 0):
    """``mv`` as a candidate's counterpart, or what stood in its place when the candidate first ran.

    Returns ``(version or None, resolved)``. ``resolved`` is True when ``mv`` *is* the candidate
    (registered by an earlier run of the same inputs): the answer is then the champion it was
    judged against (its ``asrflow.gate_champion_version`` tag). A version trained on batches the
    candidate does not hold is from a later week (a rerun of an old week after the registry moved
    on): its parent chain is followed back to the newest version the candidate could have met.
    """
    if mv is None or depth > 200:
        return None, False
    name = mv.name
    if mv.tags.get(TAG_CANDIDATE) == candidate_key:
        ver = mv.tags.get(TAG_CHAMPION_VERSION)
        if not ver or ver in ("None", "none", "null"):
            return None, True
        return client.get_model_version(name, ver), True
    have = _batches(mv)
    if batches is not None and have is not None and not have <= batches:
        parent = mv.tags.get("asrflow.parent_version")
        if not parent or not parent.isdigit():
            return None, False
        return as_of(client, client.get_model_version(name, parent), candidate_key, batches, depth + 1)
    return mv, False


def champion_version(cfg: AsrflowConfig, candidate_key: str, client=None, batches: list[str] | None = None):
    """The version a candidate is judged against: ``production``, else ``staging``, else none.

    Returns ``(ModelVersion | None, alias | None)``. Reruns reach the same decision as the first
    run: when the alias now points at this very candidate, or at a model of a later week, the
    champion is the one the candidate met then (:func:`as_of`).
    """
    client = client or registry_client(cfg)
    name = cfg.registry.model_name
    want = set(batches) if batches else None
    for alias in (PRODUCTION, STAGING):
        mv = alias_version(cfg, alias, name, client)
        if mv is None:
            continue
        champ, resolved = as_of(client, mv, candidate_key, want)
        if resolved:
            recorded = mv.tags.get(TAG_CHAMPION_ALIAS) if mv.tags.get(TAG_CANDIDATE) == candidate_key else None
            return champ, (recorded or alias) if champ is not None else None
        if champ is not None:
            return champ, alias
    return None, None


def version_ref(mv, alias: str | None = None) -> dict[str, Any] | None:
    """A small JSON-able record of a version (what step keys and results hold)."""
    if mv is None:
        return None
    return {"name": mv.name, "version": str(mv.version), "source": str(mv.source), "alias": alias}


def lineage(cfg: AsrflowConfig, model: str, client=None, max_depth: int = 500) -> list[dict[str, Any]]:
    """The chain of parents of a registered version, newest first (``models:/asr/N`` or ``@alias``).

    Each entry: ``version``, ``parent`` (version or ``scratch``), the data snapshot (DVC tag and
    md5), the batches it had seen and the new ones, training minutes, gate figures, aliases.
    """
    m = _MODELS_URI.match(str(model))
    if not m:
        raise ValueError(f"{model}: use models:/<name>/<version> or models:/<name>@<alias>")
    client = client or registry_client(cfg)
    name = m.group("name")
    mv = alias_version(cfg, m.group("alias"), name, client) if m.group("alias") else client.get_model_version(
        name, m.group("version")
    )
    if mv is None:
        raise LookupError(f"{model}: no such version")
    aliases: dict[str, list[str]] = {}
    for a, v in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(v), []).append(a)
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    while mv is not None and str(mv.version) not in seen and len(chain) < max_depth:
        seen.add(str(mv.version))
        t = mv.tags
        chain.append({
            "version": str(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            "parent": t.get("asrflow.parent_version", "unknown"),
            "data_snapshot_tag": t.get("asrflow.data_snapshot_tag"),
            "data_snapshot_md5": t.get("asrflow.data_snapshot_md5"),
            "train_md5": t.get("asrflow.train_md5"),
            "batches": [b for b in (t.get("asrflow.batches") or "").split(",") if b],
            "new_batches": [b for b in (t.get("asrflow.new_batches") or "").split(",") if b],
            "train_minutes": t.get("asrflow.train_minutes"),
            "gate_passed": t.get("asrflow.gate_passed"),
            "gate_candidate_wer": t.get("asrflow.gate_candidate_wer"),
            "gate_champion_version": t.get("asrflow.gate_champion_version"),
            "gate_champion_wer": t.get("asrflow.gate_champion_wer"),
            "gate_ci95": t.get("asrflow.gate_ci95"),
            "onnx_file": t.get("asrflow.onnx_file"),
        })
        parent = t.get("asrflow.parent_version")
        mv = client.get_model_version(name, parent) if parent and parent.isdigit() else None
    return chain

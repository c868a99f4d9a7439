"""Warm start: which model a training run starts from, and whether its weights fit the config.

Continual training fine-tunes the current model on the new weeks instead of training from
scratch every week. ``train.init_from`` says where the starting weights come from:

* ``auto`` (default): the ``production`` model, else ``staging``, else from scratch. A parent
  that does not fit the config (tokenizer, model dimensions, feature front end) means from
  scratch, with the reason in the log, the step result and MLflow.
* ``production`` / ``staging`` / ``models:/<name>/<N>`` / a path to a packaged model folder:
  that model; one that is missing or does not fit is an error (:class:`ParentError`).
* ``scratch``: never warm-start.

The weights are the torch ``weights.pt`` that promote registers next to the ONNX file (the ONNX
file stays what serves); they are read with ``torch.load(weights_only=True)``: nothing is
unpickled.

Reruns are idempotent: a registered version trained on *this very data* (its
``asrflow.train_md5`` tag equals the run's train split md5) is this run's own model, promoted
since, and one trained on batches this run does not hold is from a later week (a rerun of an
older week after the registry moved on); the parent is then what that version's chain started
from (its ``asrflow.parent_version`` tags), so a rerun resolves the same parent as the first
run did, computes the same keys and registers nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import file_md5

log = logging.getLogger(__name__)

TAG_PARENT = "asrflow.parent_version"
TAG_TRAIN_MD5 = "asrflow.train_md5"
TAG_BATCHES = "asrflow.batches"  # comma-separated landing batches a version has seen
# ConformerCTC arguments that decide the shapes of the weights (dropout does not)
# a packaged model that predates an argument was built with ConformerCTC's default for it
_CONFORMER_DEFAULTS = {"ff_mult": 4, "pos_encoding": "sinusoidal"}
SHAPE_KEYS = ("n_mels", "vocab_size", "d_model", "n_layers", "n_heads", "ff_mult", "conv_kernel",
              "subsampling_channels", "pos_encoding")


class ParentError(ValueError):
    """An explicitly named parent model is missing or does not fit the config."""


@dataclass
class Parent:
    """The starting point of a training run (``warm`` False: from scratch)."""

    source: str  # scratch | production | staging | models:/<name>/<N> | a path
    reason: str
    version: str | None = None  # registry version, when the parent is registered
    model_dir: str | None = None  # packaged torch model folder (weights.pt, model.json)
    weights_md5: str | None = None
    batches: list[str] = field(default_factory=list)  # landing batches the parent was trained on

    @property
    def warm(self) -> bool:
        return self.model_dir is not None

    def identity(self) -> dict[str, Any]:
        """What a step key must include: a different parent is a different run."""
        return {"warm": self.warm, "version": self.version, "weights_md5": self.weights_md5}

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "warm": self.warm}

    @classmethod
    def from_record(cls, rec: dict[str, Any] | None) -> Parent:
        if not rec:
            return cls("scratch", "no parent given")
        return cls(**{k: v for k, v in rec.items() if k != "warm"})

    def info(self) -> dict[str, Any]:
        """The parent's ``model.json`` (tokenizer, model_kwargs, features, meta)."""
        if not self.model_dir:
            return {}
        return json.loads((Path(self.model_dir) / "model.json").read_text())


def _scratch(reason: str) -> Parent:
    return Parent("scratch", reason)


def incompatibilities(cfg: AsrflowConfig, info: dict[str, Any]) -> list[str]:
    """Why a packaged model's weights cannot start a run of ``cfg`` (empty: they can)."""
    from model_code.features import feature_kwargs
    from pipeline_tasks.services.fitting import model_kwargs

    out: list[str] = []
    tok = info.get("tokenizer") or {}
    kind = str(tok.get("kind", "char")).lower()
    if cfg.model.vocab == "char" and kind != "char":
        out.append(f"tokenizer: parent is {kind or '?'}, config wants char")
    if cfg.model.vocab == "bpe":
        if kind != "bpe":
            out.append(f"tokenizer: parent is {kind or '?'}, config wants bpe")
        elif int(info.get("model_kwargs", {}).get("vocab_size", -1)) != int(cfg.model.bpe_vocab_size):
            out.append(f"tokenizer: parent has {info['model_kwargs'].get('vocab_size')} pieces, config wants "
                       f"{cfg.model.bpe_vocab_size}")
    have = {**_CONFORMER_DEFAULTS, **(info.get("model_kwargs") or {})}
    want = model_kwargs(cfg, int(have.get("vocab_size", 0)))
    for k in SHAPE_KEYS:
        if have.get(k) != want.get(k):
            out.append(f"model.{k}: parent {have.get(k)!r}, config {want.get(k)!r}")
    if (info.get("features") or {}) != feature_kwargs(cfg.features):
        out.append("features: the parent was trained on another log-mel front end")
    return out


def _from_folder(source: str, folder: Path, version: str | None, reason: str) -> Parent:
    info = json.loads((folder / "model.json").read_text())
    meta = info.get("meta") or {}
    return Parent(
        source=source,
        reason=reason,
        version=version,
        model_dir=str(folder),
        weights_md5=file_md5(folder / "weights.pt"),
        batches=sorted(meta.get("batches") or []),
    )


def _has_weights(folder: Path) -> bool:
    return (folder / "weights.pt").is_file() and (folder / "model.json").is_file()


def _registered(cfg: AsrflowConfig, mv, source: str, reason: str) -> Parent | None:
    """A registered version as a parent (``None`` when it carries no torch weights)."""
    from pipeline_tasks.services.registry import download_version

    root = download_version(cfg, mv).parent
    # promote logs the torch model as the ONNX model's extra files (MLflow puts them in extra_files/)
    folder = next((f for f in (root / "extra_files", root) if _has_weights(f)), None)
    if folder is None:
        return None
    return _from_folder(source, folder, str(mv.version), reason)


def _tag_batches(mv) -> set[str] | None:
    raw = mv.tags.get(TAG_BATCHES)
    return None if raw is None else {b for b in raw.split(",") if b}


def _predecessor(client, mv, train_md5: str | None, batches: set[str] | None, depth: int = 0):
    """``mv``, or the newest of its ancestors that trained on strictly less data than this run.

    A version trained on this very data, or on batches this run does not have (a rerun of an
    older week, after the registry moved on), cannot be this run's parent: the parent is what
    that version's chain started from, as it was when this week first ran. Returns
    ``(version or None, why it is scratch)``.
    """
    if mv is None or depth > 200:
        return mv, None
    have = _tag_batches(mv)
    same_data = train_md5 is not None and mv.tags.get(TAG_TRAIN_MD5) == train_md5
    not_before = batches is not None and have is not None and not have < batches
    if not (same_data or not_before):
        return mv, None
    parent = mv.tags.get(TAG_PARENT)
    if not parent or parent == "scratch":
        return None, (f"version {mv.version} (trained on {'this data' if same_data else 'later data'}) started "
                      "from scratch: this run does too (a rerun)")
    return _predecessor(client, client.get_model_version(mv.name, parent), train_md5, batches, depth + 1)


def resolve_parent(cfg: AsrflowConfig, train_md5: str | None = None, batches: list[str] | None = None) -> Parent:
    """The parent of a training run on the train split ``train_md5`` holding ``batches``.

    See the module docstring; a registered candidate that trained on this very data, or on
    batches this run does not hold, is skipped for the version its chain started from.
    """
    mode = cfg.train.init_from
    if mode == "scratch":
        return _scratch("train.init_from=scratch")
    explicit = mode != "auto"
    if not mode.startswith("models:/") and mode not in ("auto", "production", "staging"):
        folder = Path(mode).expanduser()
        if folder.is_file():
            folder = folder.parent
        if not _has_weights(folder):
            raise ParentError(f"train.init_from={mode}: no weights.pt + model.json there")
        parent = _from_folder(str(folder), folder.resolve(), None, f"train.init_from={mode}")
        return _checked(cfg, parent, explicit=True)

    from pipeline_tasks.services.registry import alias_version, registry_client

    client = registry_client(cfg)
    name = cfg.registry.model_name
    if mode.startswith("models:/"):
        ref = mode[len("models:/"):]
        mname, _, ver = ref.partition("/")
        if not ver.isdigit():
            raise ParentError(f"train.init_from={mode}: use models:/<name>/<version> (or production/staging)")
        mv = client.get_model_version(mname, ver)
        p = _registered(cfg, mv, mode, f"train.init_from={mode}")
        if p is None:
            raise ParentError(f"{mode} was registered without torch weights: it cannot start a training run")
        return _checked(cfg, p, explicit=True)

    aliases = ["production", "staging"] if mode == "auto" else [mode]
    notes: list[str] = []
    for alias in aliases:
        mv = alias_version(cfg, alias, name, client)
        if mv is None:
            notes.append(f"no {alias} model")
            continue
        mv, why = _predecessor(client, mv, train_md5, set(batches) if batches else None)
        if mv is None:
            return _scratch(why or "no parent")
        p = _registered(cfg, mv, alias, f"{alias} is version {mv.version}")
        if p is None:
            notes.append(f"{alias} version {mv.version} has no torch weights (registered before warm start existed)")
            if explicit:
                raise ParentError(notes[-1])
            continue
        return _checked(cfg, p, explicit=explicit)
    if explicit:
        raise ParentError(f"train.init_from={mode}: {'; '.join(notes)}")
    return _scratch("; ".join(notes) or "no registered model")


def _checked(cfg: AsrflowConfig, parent: Parent, explicit: bool) -> Parent:
    bad = incompatibilities(cfg, parent.info())
    if not bad:
        log.info("warm start from %s (%s)", parent.source, parent.reason)
        return parent
    why = f"parent {parent.source} (version {parent.version}) does not fit the config: {'; '.join(bad)}"
    if explicit:
        raise ParentError(why)
    log.warning("%s: training from scratch", why)
    return _scratch(why)


def new_batches(parent: Parent, train_batches: list[str]) -> list[str]:
    """The landing batches of this run that the parent never trained on.

    From the parent's recorded batches; a parent that recorded none (trained before lineage
    existed) counts only the newest batch as new.
    """
    have = sorted(set(train_batches))
    if not parent.warm:
        return have
    if parent.batches:
        return [b for b in have if b not in set(parent.batches)]
    return have[-1:]


def split_batches(split: dict[str, Any]) -> list[str]:
    """The landing batches of a split's train rows (a column read of its index)."""
    import pyarrow.parquet as pq

    from pipeline_tasks.contract import resolve

    t = pq.read_table(resolve(split, split["train"]), columns=["batch"])
    return sorted(set(t.column("batch").to_pylist()))


def parent_for_split(cfg: AsrflowConfig, split: dict[str, Any]) -> Parent:
    """:func:`resolve_parent` for a training run on ``split`` (train and tune use this)."""
    batches = split_batches(split) if split.get("train") and split.get("output_dir") else None
    return resolve_parent(cfg, split.get("train_md5"), batches)

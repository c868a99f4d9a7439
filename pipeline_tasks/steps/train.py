"""The ``train`` step: full training with DeepSpeed, tracked in MLflow, resumable after a kill.

``run(cfg, inputs)`` (step contract, inputs ``split`` and ``tune``):

1. applies the tuned ``inputs["tune"]["best_overrides"]`` (dotted keys → values) to the config;
2. keys the step by the train + model + features config, the split's train/dev md5s and the
   overrides;
3. trains with :func:`fit` into the step's temp folder, checkpointing into
   ``<root>/checkpoints/train/<key>/`` — *outside* the temp folder, so a killed attempt's retry
   resumes from the last checkpoint instead of starting over;
4. publishes ``model/`` (packaging format, with lexicon + LM from the training transcripts),
   ``history.json`` and ``curve.png``; then deletes the checkpoints (unless
   ``train.keep_checkpoint_after_publish``).

The training call itself is :func:`pipeline_tasks.services.fitting.fit`, shared with the tune step.

Continual training: the run starts from the parent model that ``train.init_from`` names
(:mod:`pipeline_tasks.services.parent`; by default the ``production`` model, else ``staging``,
else scratch), fine-tunes with its own schedule and replays older weeks. The parent is part of
the key; the result records it (``init``, ``parent``) and the model's lineage (the batches it
has seen, the new ones, the DVC snapshot, the training minutes).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig, with_overrides
from pipeline_tasks.contract import resolve, run_step, step_key
from pipeline_tasks.records import StepInputs, TrainResult
from pipeline_tasks.services.fitting import fit

log = logging.getLogger(__name__)

STEP = "train"
CODE_VERSION = "1"


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------
def train_key(cfg: AsrflowConfig, split: dict[str, Any], overrides: dict[str, Any], parent=None) -> str:
    """Key of a train run: its (override-applied) config, data md5s, overrides and parent model."""
    return step_key(
        STEP,
        {"train": cfg.train, "model": cfg.model, "features": cfg.features, "lm_order": cfg.decode.lm_order},
        {
            "train_md5": split["train_md5"],
            "dev_md5": split["dev_md5"],
            "overrides": overrides,
            "parent": None if parent is None else parent.identity(),
            # the speed copies it trains on (only with train.augment.speed_perturb)
            **({"train_speed_md5": split.get("train_speed_md5")} if cfg.train.augment.speed_perturb else {}),
        },
        CODE_VERSION,
    )


def checkpoint_dir_for(cfg: AsrflowConfig, key: str) -> Path:
    """Where a keyed run checkpoints: outside the step's temp folder, so a retry finds it."""
    return cfg.root / "checkpoints" / STEP / key


def _find_or_start_run(cfg: AsrflowConfig, key: str):
    """The MLflow run of this step key: an unfinished one (killed attempt) is resumed, not duplicated."""
    import mlflow

    from pipeline_tasks.services.tracking import mlflow_setup

    exp_id = mlflow_setup(cfg)
    runs = mlflow.search_runs(
        experiment_ids=[exp_id],
        filter_string=f"tags.`asrflow.step` = 'train' and tags.`asrflow.key` = '{key}'",
        output_format="list",
        max_results=5,
    )
    for r in runs:
        if r.info.status != "FINISHED":
            return mlflow.start_run(run_id=r.info.run_id)
    return mlflow.start_run(run_name=f"train-{key}", tags={"asrflow.step": "train", "asrflow.key": key})


def _fit_record(
    tcfg: AsrflowConfig,
    split: dict[str, Any],
    overrides: dict[str, Any],
    parent,
    key: str,
    ckdir: Path,
    out: Path,
    node: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train into ``out`` (MLflow run of the key) and return the step's result record.

    ``node``: as node 0 of a multi-node training (:func:`run_node`), see ``fit(node=...)``.
    With ``train.launcher: pytorchjob`` the ranks run as a Kubernetes PyTorchJob
    (:mod:`pipeline_tasks.services.pytorchjob`) and this task follows it."""
    import mlflow

    snapshot = {"data_snapshot_md5": split.get("snapshot_md5"), "data_snapshot_tag": split.get("dvc_tag")}
    with _find_or_start_run(tcfg, key) as mrun:
        mlflow.set_tags({"dev_md5": split["dev_md5"], "applied_overrides": json.dumps(overrides, sort_keys=True)})
        res = fit(
            tcfg,
            resolve(split, split["train"]),
            resolve(split, split["dev"]),
            out,
            checkpoint_dir=ckdir,
            parent=parent,
            meta={**snapshot, "train_key": key},
            speed_indexes={f: resolve(split, v) for f, v in (split.get("train_speed") or {}).items()},
            node=node,
            runner=_job_runner(tcfg, key),
        )
    lineage = {**res["lineage"], **snapshot, "train_minutes": round(res["train_s"] / 60.0, 2)}
    return {
        "model_dir": "model",
        "history": "history.json",
        "curve": "curve.png",
        "dev_wer": res["dev_wer"],
        "dev_cer": res["dev_cer"],
        "dev_loss": res.get("dev_loss"),
        "epochs": res["epochs"],
        "steps": res["steps"],
        "train_md5": split["train_md5"],
        "dev_md5": split["dev_md5"],
        "mlflow_run_id": mrun.info.run_id,
        "train_hours": split.get("hours_train"),
        "wall_s": res["wall_s"],
        "train_s": res["train_s"],
        "audio_s_per_s": res["audio_s_per_s"],
        "stopped_early": res["stopped_early"],
        "resumed_from": res["resumed_from"],
        "params": res["params"],
        "world_size": res["world_size"],
        "applied_overrides": overrides,
        "init": res["init"],
        "parent": parent.record(),
        "lineage": lineage,
        "throughput": res.get("throughput") or {},
        "ema": res.get("ema"),
        "precision": res.get("precision"),
        "nnodes": int(tcfg.train.nnodes) if node is not None or _on_kubernetes(tcfg) else 1,
        "launcher": tcfg.train.launcher,
    }


def _on_kubernetes(cfg: AsrflowConfig) -> bool:
    return cfg.train.launcher == "pytorchjob"


def _job_runner(cfg: AsrflowConfig, key: str):
    """``fit(runner=...)``: a PyTorchJob for ``train.launcher: pytorchjob``, else None (local ranks)."""
    if not _on_kubernetes(cfg):
        return None
    from pipeline_tasks.services import pytorchjob

    return pytorchjob.runner(cfg, key)


def run(cfg: AsrflowConfig, inputs: StepInputs, force: bool = False) -> TrainResult:
    split, overrides, tcfg, parent, key, ckdir = _prepare(cfg, inputs)

    def work(tmp: Path) -> dict[str, Any]:
        return _fit_record(tcfg, split, overrides, parent, key, ckdir, tmp)

    return _publish(cfg, key, ckdir, work, force)


def _publish(cfg: AsrflowConfig, key: str, ckdir: Path, work, force: bool) -> TrainResult:
    """``run_step`` for the key, then drop its checkpoints unless ``train.keep_checkpoint_after_publish``."""
    result = run_step(cfg.root, STEP, key, work, force=force)
    if not cfg.train.keep_checkpoint_after_publish and ckdir.exists():
        shutil.rmtree(ckdir, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------
# multi-node: train_plan → train_node (mapped, one per node) → train (gathers)
# ---------------------------------------------------------------------------------------------
def _prepare(cfg: AsrflowConfig, inputs: StepInputs):
    """What :func:`run` computes before it trains: (split, overrides, tcfg, parent, key, ckdir)."""
    from pipeline_tasks.services.parent import parent_for_split

    split = inputs["split"]
    overrides = dict((inputs.get("tune") or {}).get("best_overrides") or {})
    tcfg = with_overrides(cfg, overrides)
    parent = parent_for_split(tcfg, split)
    key = train_key(tcfg, split, overrides, parent)
    return split, overrides, tcfg, parent, key, checkpoint_dir_for(cfg, key)


def _published(cfg: AsrflowConfig, key: str) -> bool:
    from pipeline_tasks.contract import StepRun

    return StepRun(Path(cfg.root), STEP, key).done() is not None


def plan(cfg: AsrflowConfig, inputs: StepInputs, force: bool = False) -> list[dict[str, Any]]:
    """The nodes the DAG's ``train_node`` maps over: ``[]`` when ``train.nnodes`` is 1 (the ``train``
    task trains, as always), when this key is already published (nothing to train), or with
    ``train.launcher: pytorchjob`` (the ``train`` task submits one job for all nodes)."""
    from pipeline_tasks.services import multinode

    _split, _overrides, tcfg, _parent, key, _ckdir = _prepare(cfg, inputs)
    if _on_kubernetes(tcfg) or (int(tcfg.train.nnodes) > 1 and _published(cfg, key) and not force):
        return []
    return multinode.plan(tcfg, key)


def run_node(cfg: AsrflowConfig, inputs: StepInputs, node: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """One node of a multi-node training (``train.nnodes > 1``; see :mod:`pipeline_tasks.services.multinode`).

    Node 0 trains into the shared work folder like :func:`run` (MLflow run of the key, rendezvous
    published), the others join it. Returns a small record of this node; :func:`finalize_nodes`
    publishes the result."""
    from pipeline_tasks.services import multinode

    split, overrides, tcfg, parent, key, ckdir = _prepare(cfg, inputs)
    i = int(node["node_rank"])
    if node.get("key") != key:
        raise RuntimeError(f"train node {i}: planned for key {node.get('key')}, the inputs now give {key}")
    if int(node["nnodes"]) != int(tcfg.train.nnodes):
        raise RuntimeError(f"train node {i}: planned for {node['nnodes']} nodes, train.nnodes is {tcfg.train.nnodes}")
    if _published(cfg, key) and not force:
        return {"node_rank": i, "key": key, "cached": True}
    if i == 0:
        work = multinode.work_dir(ckdir)
        work.mkdir(parents=True, exist_ok=True)
        rec = _fit_record(tcfg, split, overrides, parent, key, ckdir, work, node=multinode.lead_node(tcfg, ckdir, key))
        multinode.write_lead_record(ckdir, rec)
        return {"node_rank": 0, "key": key, "steps": rec["steps"], "throughput": rec["throughput"].get("nodes", [])}
    out = multinode.join_node(tcfg, ckdir, i)
    return {"node_rank": i, "key": key, **{k: out[k] for k in ("endpoint", "rdzv_id", "wall_s") if k in out}}


def finalize_nodes(
    cfg: AsrflowConfig, inputs: StepInputs, node_results: list[dict[str, Any]], force: bool = False
) -> TrainResult:
    """Publish a multi-node training under the step contract: node 0's record and the model the
    ranks wrote to the shared work folder (the same record :func:`run` publishes)."""
    from pipeline_tasks.services import multinode

    _split, _overrides, tcfg, _parent, key, ckdir = _prepare(cfg, inputs)
    keys = {r.get("key") for r in node_results if r}
    if keys and keys != {key}:
        raise RuntimeError(f"train nodes trained key(s) {sorted(map(str, keys))}, the inputs give {key}")

    def work(tmp: Path) -> dict[str, Any]:
        rec = multinode.read_lead_record(ckdir)
        multinode.copy_outputs(ckdir, tmp)
        return {**rec, "nodes": sorted((r for r in node_results if r), key=lambda r: int(r["node_rank"]))}

    return _publish(tcfg, key, ckdir, work, force)

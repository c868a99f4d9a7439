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

``fit(cfg, train_index, dev_index, out_dir, ...)`` is the reusable part (the tune step calls it
per trial). It runs :func:`model_code.training.train` in this process for world size 1, or
``train.world_size`` processes through ``torchrun`` / the ``deepspeed`` launcher
(:mod:`model_code.ds_launch`), and logs to MLflow (only rank 0's figures; the parent logs them).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig, apply_overrides, config_from_dict
from pipeline_tasks.contract import file_md5, resolve, run_step, step_key, write_json_atomic

log = logging.getLogger(__name__)

STEP = "train"
CODE_VERSION = "1"
_FLUSH_EVERY = 25  # buffered MLflow step metrics per batch write


# ---------------------------------------------------------------------------------------------
# config → plain training arguments
# ---------------------------------------------------------------------------------------------
def apply_best_overrides(cfg: AsrflowConfig, overrides: dict[str, Any] | None) -> AsrflowConfig:
    """The config with ``{"train.lr": 0.002, ...}`` applied (values JSON-encoded → parsed as YAML)."""
    if not overrides:
        return cfg
    items = [f"{k}={json.dumps(v)}" for k, v in sorted(overrides.items())]
    return config_from_dict(apply_overrides(cfg.dump(), items))


def model_kwargs(cfg: AsrflowConfig, vocab_size: int) -> dict[str, Any]:
    m = cfg.model
    return {
        "n_mels": int(cfg.features.n_mels),
        "vocab_size": int(vocab_size),
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "ff_mult": m.ff_mult,
        "conv_kernel": m.conv_kernel,
        "dropout": m.dropout,
        "subsampling_channels": m.subsampling_channels,
        "pos_encoding": m.pos_encoding,
    }


def make_tokenizer(cfg: AsrflowConfig, texts: list[str], saved: Path | None = None):
    """Char tokenizer, or BPE trained on ``texts``; reuses ``saved`` (a resumed run) if it exists."""
    from model_code.tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_dict

    if saved is not None and saved.exists():
        return tokenizer_from_dict(json.loads(saved.read_text()))
    tok = CharTokenizer() if cfg.model.vocab == "char" else BPETokenizer.train(texts, cfg.model.bpe_vocab_size)
    if saved is not None:
        write_json_atomic(saved, tok.to_dict())
    return tok


def train_args(
    cfg: AsrflowConfig,
    train_index: Path,
    dev_index: Path | None,
    out_dir: Path,
    tokenizer,
    *,
    epochs: int | None = None,
    max_minutes: float | None = None,
    checkpoint_dir: Path | None = None,
    meta: dict[str, Any] | None = None,
):
    """:class:`model_code.training.TrainArgs` from the typed config (the only place they meet)."""
    from model_code.features import feature_kwargs
    from model_code.training import TrainArgs

    t = cfg.train
    return TrainArgs(
        train_index=str(train_index),
        dev_index=str(dev_index) if dev_index else None,
        out_dir=str(out_dir),
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        tokenizer=tokenizer.to_dict(),
        model_kwargs=model_kwargs(cfg, tokenizer.vocab_size),
        feature_kwargs=feature_kwargs(cfg.features),
        epochs=int(epochs if epochs is not None else t.epochs),
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        schedule=t.schedule,
        min_lr_ratio=t.min_lr_ratio,
        grad_clip=t.grad_clip,
        grad_accum=t.grad_accum,
        zero_stage=t.zero_stage,
        precision=t.precision,
        seed=t.seed,
        deterministic=t.deterministic,
        num_workers=t.num_workers,
        torch_threads=t.torch_threads,
        max_minutes=max_minutes if max_minutes is not None else t.max_minutes,
        checkpoint_every_steps=t.checkpoint_every_steps,
        checkpoint_every_minutes=t.checkpoint_every_minutes,
        keep_checkpoints=t.keep_checkpoints,
        sampler={
            **t.sampler.model_dump(mode="json"),
            "memory_probe_cache": str(cfg.root / "cache" / "memory_probe.json"),
        },
        specaugment=t.specaugment.model_dump(mode="json"),
        lm_texts=t.build_lm,
        lm_order=cfg.decode.lm_order,
        meta=dict(meta or {}),
        ds_shm_comm=t.ds_shm_comm,
    )


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------
class _MlflowSink:
    """Buffers rank 0's step records and writes them with ``log_batch`` (one DB write per batch)."""

    STEP_KEYS = ("loss", "lr", "grad_norm", "audio_s_per_s", "data_wait_share", "batch_load_s", "padding_share")
    EPOCH_KEYS = ("loss", "dev_wer", "dev_cer", "dev_loss", "audio_s_per_s", "data_wait_share", "padding_share",
                  "batch_load_p95_s")

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.buf: list = []

    def step(self, rec: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k in self.STEP_KEYS:
            v = rec.get(k)
            if v is not None and math.isfinite(float(v)):
                self.buf.append(Metric(f"train/{k}", float(v), ts, int(rec["step"])))
        if len(self.buf) >= _FLUSH_EVERY * len(self.STEP_KEYS):
            self.flush()

    def epoch(self, epoch: int, rec: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k in self.EPOCH_KEYS:
            v = rec.get(k)
            if v is not None and math.isfinite(float(v)):
                self.buf.append(Metric(f"epoch/{k}", float(v), ts, int(epoch)))
        self.flush()

    def flush(self) -> None:
        if self.run_id is None or not self.buf:
            return
        import mlflow

        client = mlflow.MlflowClient()
        for i in range(0, len(self.buf), 1000):  # MLflow's per-batch metric limit
            client.log_batch(self.run_id, metrics=self.buf[i : i + 1000])
        self.buf = []


def plot_curve(history: list[dict[str, Any]], step_log: list[list[float]], path: Path) -> Path:
    """Training curve PNG: per-step loss and LR, per-epoch dev CER/WER."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if step_log:
        steps = [r[0] for r in step_log]
        ax.plot(steps, [r[1] for r in step_log], lw=0.8, label="train CTC loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.plot(steps, [r[2] for r in step_log], color="tab:orange", lw=0.8, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title("training loss")
    ax = axes[1]
    ep = [h for h in history if h.get("dev_cer") is not None]
    if ep:
        ax.plot([h["epoch"] + 1 for h in ep], [h["dev_cer"] for h in ep], "o-", label="dev CER")
        ax.plot([h["epoch"] + 1 for h in ep], [h["dev_wer"] for h in ep], "s-", label="dev WER (greedy)")
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_title("dev error rates")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------
def fit(
    cfg: AsrflowConfig,
    train_index: Path,
    dev_index: Path,
    out_dir: Path,
    *,
    epochs: int | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    mlflow_nested: bool = False,
    max_minutes: float | None = None,
    checkpoint_dir: Path | None = None,
    mlflow_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train a model on ``train_index``, evaluating on ``dev_index`` each epoch; write ``out_dir``.

    Writes ``out_dir/model/`` (packaging format), ``history.json``, ``curve.png``,
    ``events.jsonl``. ``on_epoch_end(epoch, {"dev_wer", "dev_cer", "loss", ...})`` may raise
    (e.g. ``optuna.TrialPruned``): training stops and the exception propagates after the MLflow
    run is closed (status KILLED). MLflow: if a run is active, logs into it (a nested child with
    ``mlflow_nested``); otherwise opens a run in the profile's experiment.

    Returns ``model_dir`` (absolute), ``dev_wer``, ``dev_cer``, ``dev_loss``, ``epochs``, ``steps``,
    ``history`` (per-epoch dicts), ``wall_s``, ``train_s``, ``audio_s_per_s``, ``mlflow_run_id``,
    ``stopped_early``, ``resumed_from``, ``params``, ``world_size``, ``train_md5``.
    """
    import mlflow

    from model_code.dataset import FeatureTable
    from pipeline_tasks.tracking import flat_params, git_commit, mlflow_setup

    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_index, dev_index = Path(train_index), Path(dev_index) if dev_index else None
    texts = FeatureTable(train_index, in_memory=False).texts()
    tok_path = Path(checkpoint_dir) / "tokenizer.json" if checkpoint_dir else None
    if tok_path is not None:
        tok_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(cfg, texts, tok_path)
    train_md5 = file_md5(train_index)
    meta = {"train_md5": train_md5, "git_commit": git_commit(), "profile": cfg.profile}
    args = train_args(
        cfg, train_index, dev_index, out_dir, tokenizer, epochs=epochs, max_minutes=max_minutes,
        checkpoint_dir=checkpoint_dir, meta=meta,
    )

    # ---- MLflow run
    active = mlflow.active_run()
    opened = False
    if active is None:
        mlflow_setup(cfg)
        run = mlflow.start_run(run_name="train")
        opened = True
    elif mlflow_nested:
        run = mlflow.start_run(run_name="fit", nested=True)
        opened = True
    else:
        run = active
    run_id = run.info.run_id
    sink = _MlflowSink(run_id)
    status = "FINISHED"
    try:
        try:
            mlflow.log_params({**flat_params(cfg.dump()), "train.epochs_effective": args.epochs})
        except Exception as e:  # a resumed run already holds these params
            log.info("mlflow params not logged again: %s", e)
        mlflow.set_tags({"train_md5": train_md5, "git_commit": meta["git_commit"], **(mlflow_tags or {})})

        def epoch_cb(epoch: int, rec: dict[str, Any]) -> None:
            sink.epoch(epoch, rec)
            if on_epoch_end is not None:
                on_epoch_end(epoch, rec)

        world = int(cfg.train.world_size) * int(cfg.train.nnodes)
        if world <= 1:
            from model_code.training import train

            res = train(args, on_step=sink.step, on_epoch_end=epoch_cb)
        else:
            from model_code.ds_launch import launch

            def on_event(e: dict[str, Any]) -> None:
                if e.get("type") == "step":
                    sink.step(e)
                elif e.get("type") == "epoch":
                    epoch_cb(int(e["epoch"]), e)

            launcher = "torchrun" if cfg.train.launcher == "inprocess" else cfg.train.launcher
            res = launch(args, world, launcher=launcher, on_event=on_event)
        sink.flush()
        history = res["history"]
        (out_dir / "history.json").write_text(
            json.dumps({"epochs": history, "steps": res["step_log"]}, indent=1, sort_keys=True)
        )
        plot_curve(history, res["step_log"], out_dir / "curve.png")
        for name in ("curve.png", "history.json", "ds_config.json"):
            if (out_dir / name).exists():
                mlflow.log_artifact(str(out_dir / name))
        final = {
            "dev_wer": res.get("dev_wer"),
            "dev_cer": res.get("dev_cer"),
            "steps": res["steps"],
            "epochs_done": res["epochs"],
            "train_s": res["train_s"],
        }
        mlflow.log_metrics({f"final/{k}": float(v) for k, v in final.items() if v is not None})
    except BaseException:
        status = "KILLED"
        sink.flush()
        raise
    finally:
        if opened:
            mlflow.end_run(status=status)
    train_s = float(res["train_s"])
    return {
        "model_dir": str(out_dir / "model"),
        "dev_wer": res.get("dev_wer"),
        "dev_cer": res.get("dev_cer"),
        "dev_loss": res.get("dev_loss"),
        "epochs": int(res["epochs"]),
        "steps": int(res["steps"]),
        "history": history,
        "wall_s": time.monotonic() - t0,
        "train_s": train_s,
        "audio_s_per_s": float(res["audio_s"]) / max(train_s, 1e-9),
        "mlflow_run_id": run_id,
        "stopped_early": bool(res["stopped_early"]),
        "resumed_from": res.get("resumed_from"),
        "params": int(res["params"]),
        "world_size": int(res["world_size"]),
        "train_md5": train_md5,
    }


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------
def train_key(cfg: AsrflowConfig, split: dict[str, Any], overrides: dict[str, Any]) -> str:
    """Key of a train run: its (override-applied) train/model/features config, data md5s, overrides."""
    return step_key(
        STEP,
        {"train": cfg.train, "model": cfg.model, "features": cfg.features, "lm_order": cfg.decode.lm_order},
        {"train_md5": split["train_md5"], "dev_md5": split["dev_md5"], "overrides": overrides},
        CODE_VERSION,
    )


def checkpoint_dir_for(cfg: AsrflowConfig, key: str) -> Path:
    """Where a keyed run checkpoints: outside the step's temp folder, so a retry finds it."""
    return cfg.root / "checkpoints" / STEP / key


def _find_or_start_run(cfg: AsrflowConfig, key: str):
    """The MLflow run of this step key: an unfinished one (killed attempt) is resumed, not duplicated."""
    import mlflow

    from pipeline_tasks.tracking import mlflow_setup

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


def run(cfg: AsrflowConfig, inputs: dict[str, dict], force: bool = False) -> dict[str, Any]:
    split = inputs["split"]
    overrides = dict((inputs.get("tune") or {}).get("best_overrides") or {})
    tcfg = apply_best_overrides(cfg, overrides)
    key = train_key(tcfg, split, overrides)
    ckdir = checkpoint_dir_for(cfg, key)

    def work(tmp: Path) -> dict[str, Any]:
        import mlflow

        with _find_or_start_run(tcfg, key) as mrun:
            mlflow.set_tags({"dev_md5": split["dev_md5"], "applied_overrides": json.dumps(overrides, sort_keys=True)})
            res = fit(
                tcfg,
                resolve(split, split["train"]),
                resolve(split, split["dev"]),
                tmp,
                checkpoint_dir=ckdir,
            )
        return {
            "model_dir": "model",
            "history": "history.json",
            "curve": "curve.png",
            "dev_wer": res["dev_wer"],
            "dev_cer": res["dev_cer"],
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
        }

    result = run_step(cfg.root, STEP, key, work, force=force)
    if not cfg.train.keep_checkpoint_after_publish and ckdir.exists():
        shutil.rmtree(ckdir, ignore_errors=True)
    return result

"""Fitting a model from the typed config: the training call shared by the ``train`` and ``tune`` steps.

``fit(cfg, train_index, dev_index, out_dir, ...)`` runs :func:`model_code.training.train` in this
process for world size 1, or ``train.world_size`` processes through ``torchrun`` / the
``deepspeed`` launcher (:mod:`model_code.ds_launch`), and logs to MLflow (only rank 0's figures;
the parent logs them). MLflow failures follow :func:`pipeline_tasks.services.tracking.mlflow_call`'s
one policy: retried, then logged and tolerated; training never fails because tracking is down.

``model_kwargs`` is the one place the typed config becomes the model's plain arguments
(``model_code.conformer.ConformerCTC(**model_kwargs(cfg, vocab_size))``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import file_md5, write_json_atomic

log = logging.getLogger(__name__)

_FLUSH_EVERY = 25  # buffered MLflow step metrics per batch write

# ---------------------------------------------------------------------------------------------
# config → plain training arguments
# ---------------------------------------------------------------------------------------------
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


def make_tokenizer(cfg: AsrflowConfig, texts: list[str], saved: Path | None = None, parent=None):
    """The parent's tokenizer (warm start), else char, or BPE trained on ``texts``; reuses
    ``saved`` (a resumed run) if it exists."""
    from model_code.tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_dict

    if saved is not None and saved.exists():
        return tokenizer_from_dict(json.loads(saved.read_text()))
    if parent is not None and parent.warm:
        tok = tokenizer_from_dict(parent.info()["tokenizer"])
    else:
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
    parent=None,
    new_batches: list[str] | None = None,
    speed_indexes: dict[str, Path] | None = None,
):
    """:class:`model_code.training.TrainArgs` from the typed config (the only place they meet).

    A warm start (``parent.warm``) loads the parent's weights, uses the fine-tuning schedule (peak
    LR ``lr × finetune_lr_factor``, ``finetune_warmup_steps``) and replays older weeks
    (``replay_share`` of each epoch; every utterance of ``new_batches`` each epoch).
    With ``train.augment.speed_perturb``, ``speed_indexes`` (factor → index of ``train_index``'s
    rows in that speed copy's cache, e.g. split's ``train_speed``) become the variant indexes.
    """
    from model_code.features import feature_kwargs
    from model_code.training import TrainArgs

    t = cfg.train
    warm = parent is not None and parent.warm
    variants: list[str] = []
    if t.augment.speed_perturb:
        if not speed_indexes:
            raise ValueError(
                "train.augment.speed_perturb is on but there are no speed-perturbed indexes for "
                f"{train_index} (featurize with features.speed_factors, then split)"
            )
        variants = [str(speed_indexes[f]) for f in sorted(speed_indexes, key=float)]
    return TrainArgs(
        train_index=str(train_index),
        dev_index=str(dev_index) if dev_index else None,
        out_dir=str(out_dir),
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        tokenizer=tokenizer.to_dict(),
        model_kwargs=model_kwargs(cfg, tokenizer.vocab_size),
        feature_kwargs=feature_kwargs(cfg.features),
        epochs=int(epochs if epochs is not None else t.epochs),
        lr=t.lr * t.finetune_lr_factor if warm else t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.finetune_warmup_steps if warm else t.warmup_steps,
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
        variant_indexes=variants,
        augment=t.augment.feature_kwargs(),
        lm_texts=t.build_lm,
        lm_order=cfg.decode.lm_order,
        meta=dict(meta or {}),
        ds_shm_comm=t.ds_shm_comm,
        ema_decay=t.ema_decay,
        inter_ctc_weight=t.inter_ctc_weight,
        inter_ctc_layer=t.inter_ctc_layer,
        init_weights=str(Path(parent.model_dir) / "weights.pt") if warm else None,
        replay={"new_batches": list(new_batches or []), "share": t.replay_share, "new_repeats": t.new_data_repeats}
        if warm
        else None,
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

        from pipeline_tasks.services.tracking import mlflow_call

        client = mlflow.MlflowClient()
        for i in range(0, len(self.buf), 1000):  # MLflow's per-batch metric limit
            chunk = self.buf[i : i + 1000]
            mlflow_call("log metrics", lambda c=chunk: client.log_batch(self.run_id, metrics=c))
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
    parent=None,
    meta: dict[str, Any] | None = None,
    speed_indexes: dict[str, Path] | None = None,
    node: dict[str, Any] | None = None,
    runner: Callable[[Any, Callable[[dict[str, Any]], None]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train a model on ``train_index``, evaluating on ``dev_index`` each epoch; write ``out_dir``.

    ``node``: this call is node 0 of a multi-node training (``train.nnodes > 1`` in the DAG):
    keyword arguments of :func:`model_code.ds_launch.launch` (``node``, ``ranks_dir``,
    ``before_start``) from :func:`pipeline_tasks.services.multinode.lead_node`; this node starts
    ``train.world_size`` ranks and the other nodes join them. Without it, ``world_size × nnodes``
    ranks run on this node (the CLI, the tune step).

    ``speed_indexes``: factor → the speed copy of ``train_index`` (used with
    ``train.augment.speed_perturb``; see :func:`train_args`).

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
    from pipeline_tasks.services.tracking import flat_params, git_commit, mlflow_call, mlflow_setup

    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_index, dev_index = Path(train_index), Path(dev_index) if dev_index else None
    from pipeline_tasks.services.parent import new_batches as parent_new_batches

    table = FeatureTable(train_index, in_memory=False)
    texts, batches = table.texts(), sorted(set(table.batches()))
    tok_path = Path(checkpoint_dir) / "tokenizer.json" if checkpoint_dir else None
    if tok_path is not None:
        tok_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(cfg, texts, tok_path, parent=parent)
    train_md5 = file_md5(train_index)
    warm = parent is not None and parent.warm
    fresh = parent_new_batches(parent, batches) if warm else batches
    lineage = {
        "batches": batches,  # every landing batch this model has seen (its parent's included)
        "new_batches": fresh,
        "parent_version": (parent.version or parent.source) if warm else "scratch",
        "parent_source": parent.source if parent is not None else "scratch",
        "init_reason": parent.reason if parent is not None else "no parent given",
    }
    if warm:
        lineage["batches"] = sorted(set(batches) | set(parent.batches))
    meta = {**(meta or {}), "train_md5": train_md5, "git_commit": git_commit(), "profile": cfg.profile, **lineage}
    args = train_args(
        cfg, train_index, dev_index, out_dir, tokenizer, epochs=epochs, max_minutes=max_minutes,
        checkpoint_dir=checkpoint_dir, meta=meta, parent=parent, new_batches=fresh, speed_indexes=speed_indexes,
    )

    # ---- MLflow run
    # Tracking failures are tolerated (services.tracking.mlflow_call): no run means no logging.
    active = mlflow.active_run()
    opened = False
    run = active
    if active is None:
        run = mlflow_call("start run", lambda: (mlflow_setup(cfg), mlflow.start_run(run_name="train"))[1])
        opened = run is not None
    elif mlflow_nested:
        run = mlflow_call("start nested run", lambda: mlflow.start_run(run_name="fit", nested=True))
        opened = run is not None
    run_id = run.info.run_id if run is not None else None
    sink = _MlflowSink(run_id)
    status = "FINISHED"

    def track(what: str, fn: Callable[[], Any]) -> None:
        if run_id is not None:
            mlflow_call(what, fn, retries=2)

    try:
        if run_id is not None:
            try:
                mlflow.log_params({**flat_params(cfg.dump()), "train.epochs_effective": args.epochs})
            except Exception as e:  # a resumed run already holds these params
                log.info("mlflow params not logged again: %s", e)
        track("set tags", lambda: mlflow.set_tags(
            {"train_md5": train_md5, "git_commit": meta["git_commit"], "asrflow.parent_version": lineage["parent_version"],
             "asrflow.init": "warm" if warm else "scratch", "asrflow.init_reason": lineage["init_reason"][:4000],
             **(mlflow_tags or {})}
        ))

        def epoch_cb(epoch: int, rec: dict[str, Any]) -> None:
            sink.epoch(epoch, rec)
            if on_epoch_end is not None:
                on_epoch_end(epoch, rec)

        def on_event(e: dict[str, Any]) -> None:  # rank 0's events.jsonl, for launched ranks
            if e.get("type") == "step":
                sink.step(e)
            elif e.get("type") == "epoch":
                epoch_cb(int(e["epoch"]), e)

        world = int(cfg.train.world_size) * int(cfg.train.nnodes)
        if runner is not None:  # ranks started elsewhere (a PyTorchJob)
            res = runner(args, on_event)
        elif node is not None:  # node 0 of a multi-node training (services.multinode)
            from model_code.ds_launch import launch

            res = launch(args, int(cfg.train.world_size), on_event=on_event, **node)
        elif world <= 1:
            from model_code.training import train

            res = train(args, on_step=sink.step, on_epoch_end=epoch_cb)
        else:
            from model_code.ds_launch import launch

            launcher = "torchrun" if cfg.train.launcher in ("inprocess", "pytorchjob") else cfg.train.launcher
            res = launch(args, world, launcher=launcher, on_event=on_event, max_restarts=int(cfg.train.max_restarts))
        sink.flush()
        history = res["history"]
        (out_dir / "history.json").write_text(
            json.dumps({"epochs": history, "steps": res["step_log"]}, indent=1, sort_keys=True)
        )
        plot_curve(history, res["step_log"], out_dir / "curve.png")
        for name in ("curve.png", "history.json", "ds_config.json"):
            if (out_dir / name).exists():
                track("log artifact", lambda n=name: mlflow.log_artifact(str(out_dir / n)))
        final = {
            "dev_wer": res.get("dev_wer"),
            "dev_cer": res.get("dev_cer"),
            "steps": res["steps"],
            "epochs_done": res["epochs"],
            "train_s": res["train_s"],
        }
        track("log final", lambda: mlflow.log_metrics({f"final/{k}": float(v) for k, v in final.items() if v is not None}))
        if res.get("ema"):  # the weight average: its dev figures and the raw weights', and which was published
            ema = res["ema"]
            track("log ema", lambda: mlflow.log_metrics(
                {f"final/ema_{k}": float(v) for k, v in ema.items() if k.startswith("dev_") and v is not None}))
            track("tag ema", lambda: mlflow.set_tag("asrflow.ema_used", ema["used"]))
        if res.get("precision"):  # what `auto` resolved to on this machine (bf16-autocast, fp32, ...)
            track("tag precision", lambda: mlflow.set_tag("asrflow.precision", res["precision"]))
        from pipeline_tasks.services.multinode import throughput, throughput_metrics

        tput = throughput(res.get("rank_stats") or [])
        if tput:  # per node audio-s/s, per rank data-wait and all-reduce shares (issue 15)
            track("log throughput", lambda: mlflow.log_metrics(throughput_metrics(tput)))
    except BaseException:
        status = "KILLED"
        sink.flush()
        raise
    finally:
        if opened:
            mlflow_call("end run", lambda: mlflow.end_run(status=status), retries=1)
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
        "throughput": tput,
        "train_md5": train_md5,
        "init": "warm" if warm else "scratch",
        "lineage": lineage,
        "ema": res.get("ema"),
        "precision": res.get("precision"),
    }

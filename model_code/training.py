"""The DeepSpeed training loop for Conformer-CTC (CPU with gloo, GPU with NCCL).

One function, :func:`train`, runs on every rank (world size 1 in the calling process, or N
processes started by ``torchrun`` / the ``deepspeed`` launcher through
:mod:`model_code.ds_launch`). It takes plain arguments (:class:`TrainArgs`, JSON-able so the
launcher can hand it to child processes) and never imports ``pipeline_tasks``.

Per optimizer step::

    batch indices (DynamicBucketingSampler, this rank's share)
      → features (FeatureTable, float32 (T_i, n_mels); with speed perturbation, one of the
        speed-perturbed copies per utterance and epoch) + token ids (tokenizer)
      → VTLP / noise / reverb per utterance (model_code.augment.FeatureAugment, drawn from (seed, epoch, index))
      → collate: feats (B, T, F), feat_lens (B,), tokens (B, L), token_lens (B,)
      → SpecAugment (training only, main process, torch's global RNG)
      → ConformerCTC: log_probs (B, T', V), out_lens (B,)      [T' ≈ T/4]
      → CTC loss (blank 0, mean over utterances of per-token loss) → engine.backward / engine.step
        (DeepSpeed: gradient accumulation, clipping, AdamW, our LambdaLR warmup+cosine/Noam)

Resume: a :class:`~model_code.checkpoint.CheckpointManager` saves every N optimizer steps or M
minutes (and at every epoch end): DeepSpeed's module/optimizer/scheduler files plus a JSON
trainer state per rank (epoch, sampler position, global step, per-step log, per-epoch
history, RNG states). Data order, the speed copy and the noise/reverb of each utterance depend
only on (seed, epoch, index), SpecAugment and dropout only on the restored RNG, so a run killed
with SIGKILL and restarted replays the same loss curve (bitwise on CPU in deterministic mode;
tested in ``tests/model_code/test_checkpoint.py``).

Per-step records (loss, lr, grad norm, audio-seconds/s, data-wait share, batch load time,
padding) go to callbacks in-process and, on rank 0, to ``<out_dir>/events.jsonl`` (the parent
of a multi-process launch tails it to log MLflow metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainArgs:
    """Everything one training run needs, as plain JSON-able values (no config objects)."""

    train_index: str
    out_dir: str  # rank 0 writes model/, events.jsonl, result.json here
    tokenizer: dict[str, Any]  # tokenizer.to_dict()
    model_kwargs: dict[str, Any]  # ConformerCTC(**model_kwargs); n_mels and vocab_size included
    feature_kwargs: dict[str, Any] = field(default_factory=dict)  # stored with the packaged model
    dev_index: str | None = None
    checkpoint_dir: str | None = None  # None: no checkpoints (e.g. short tuning trials)
    epochs: int = 1
    lr: float = 2e-3
    weight_decay: float = 1e-3
    warmup_steps: int = 200
    schedule: str = "cosine"  # cosine | noam
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0
    grad_accum: int = 1
    zero_stage: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 1234
    deterministic: bool = False
    num_workers: int = 1
    torch_threads: int = 0  # 0: all cores (divided among the ranks of this node)
    max_minutes: float | None = None
    max_steps: int | None = None  # stop (like the time cap) after this many optimizer steps
    checkpoint_every_steps: int = 200
    checkpoint_every_minutes: float = 5.0
    keep_checkpoints: int = 2
    sampler: dict[str, Any] = field(default_factory=lambda: {"max_duration_s": 120.0, "num_buckets": 30})
    specaugment: dict[str, Any] = field(default_factory=dict)
    # speed perturbation: indexes of the same utterances, same order, from the speed-perturbed
    # feature caches (split's train_sp0.9.parquet...). Each epoch trains every utterance on one of
    # [train_index, *variant_indexes] (model_code.augment.variant_choice); [] = train_index only
    variant_indexes: list[str] = field(default_factory=list)
    # FeatureAugment(**augment): noise_prob, noise_snr_db, reverb_prob, reverb_t60_s ({} = off)
    augment: dict[str, Any] = field(default_factory=dict)
    dev_max_duration_s: float | None = None  # eval batch budget (default: 2 × sampler budget)
    save_model: bool = True
    lm_texts: bool = True  # ship lexicon + n-gram LM built from the training transcripts
    lm_order: int = 3
    meta: dict[str, Any] = field(default_factory=dict)
    record_batches: bool = False  # write each rank's utterance ids per step (tests)
    ds_shm_comm: bool = False  # DeepSpeed's shared-memory CPU all-reduce op (JIT-compiled, ~40 s once)
    log_every_steps: int = 1
    # warm start: a packaged model's weights.pt (state_dict, loaded with weights_only=True) whose
    # architecture equals model_kwargs; the caller checked compatibility. None: from scratch.
    init_weights: str | None = None
    # replay: {"new_batches": [...], "share": float, "new_repeats": int} — each epoch holds every
    # utterance of new_batches (new_repeats times) plus old ones making up `share` of the epoch
    # (model_code.sampler). None: every utterance once per epoch.
    replay: dict[str, Any] | None = None
    # exponential moving average of the weights (0 = off): the packaged model gets the averaged
    # weights unless the raw ones score a lower dev CER at the end (both are recorded)
    ema_decay: float = 0.0
    # intermediate CTC (Lee & Watanabe 2021): loss = (1 - w) * CTC(final) + w * CTC(block k's
    # output through the shared head); w = inter_ctc_weight (0 = off), k = inter_ctc_layer
    # (0 = n_layers // 2). No extra parameters; the logged "loss" stays the final layer's CTC loss
    inter_ctc_weight: float = 0.0
    inter_ctc_layer: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> TrainArgs:
        d = json.loads(s)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------
# DeepSpeed config, schedule, distributed setup
# ---------------------------------------------------------------------------------------------
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 / AMX-BF16, Arm BF16).

    Without it, PyTorch emulates bf16 on the CPU and autocast is slower than fp32, so CPU
    bf16 is only used where this holds. Read from ``/proc/cpuinfo`` (False where there is none).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


CPU_BF16 = "bf16-autocast"  # the resolved precision of bf16 on a CPU: fp32 weights, bf16 compute


def resolve_precision(precision: str, device_type: str, native_bf16: bool | None = None) -> str:
    """The precision a run really uses: ``fp32``, ``bf16``, ``fp16`` or ``bf16-autocast``.

    ``auto`` → ``bf16`` on CUDA; on a CPU, ``bf16-autocast`` where the CPU has native bf16,
    else ``fp32``. ``bf16-autocast``: DeepSpeed keeps fp32 weights and optimizer state, and the
    forward runs under ``torch.autocast("cpu", torch.bfloat16)`` (matmuls and convolutions in
    bf16; the CTC loss, feature normalization and log-softmax in fp32): 1.14× the optimizer
    steps in 10 minutes on the local profile, dev CER 0.311 vs 0.328 (``bench/capacity.py``).
    ``bf16`` on a CPU without native bf16 (emulated: slower than fp32), and fp16 on any CPU,
    fall back to fp32 with a warning. ``native_bf16`` overrides the CPU probe (tests).
    """
    if device_type == "cuda":
        return "bf16" if precision == "auto" else precision
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    if precision == "auto":
        return CPU_BF16 if native else "fp32"
    if precision in ("bf16", "fp16"):
        if precision == "bf16" and native:
            return CPU_BF16
        why = "no native bf16 on this CPU" if precision == "bf16" else "fp16 is GPU-only"
        log.warning("precision %s requested on %s (%s): using fp32", precision, device_type, why)
        return "fp32"
    return precision


def build_ds_config(args: TrainArgs, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config JSON generated from the typed training arguments.

    ``train_micro_batch_size_per_gpu`` is 1 because a batch is a *list of utterances* chosen
    by audio duration (DynamicBucketingSampler), not a fixed count; DeepSpeed only uses the
    figure for bookkeeping. On CPU the optimizer is ``torch.optim.AdamW`` (``torch_adam``):
    DeepSpeed's own CPU Adam would first JIT-compile a C++ op (~95 s on 2 cores).
    """
    prec = resolve_precision(args.precision, device_type)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": int(args.grad_accum),
        "gradient_clipping": float(args.grad_clip),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": int(args.zero_stage)},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(args.lr),
                "betas": [0.9, 0.98],
                "eps": 1e-9,
                "weight_decay": float(args.weight_decay),
                "torch_adam": device_type != "cuda",
            },
        },
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "initial_scale_power": 12},
    }
    return cfg


def lr_lambda_factory(
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    time_progress: Callable[[], float] | None = None,
) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``s`` (0-based, before the step).

    cosine: linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at
    ``total_steps``. With ``time_progress`` (a run under a wall-clock cap: elapsed / cap, 0..1)
    the decay follows whichever is further, steps or time, so a capped run still ends at the
    low LR instead of being cut off mid-schedule. noam: linear warmup, then
    ``sqrt(warmup / s)`` decay (peak 1 at warmup), floored at ``min_lr_ratio``.
    """
    w = max(int(warmup_steps), 0)
    total = max(int(total_steps), 1)
    floor = float(min_lr_ratio)

    def cosine(s: int) -> float:
        s1 = s + 1
        if w and s1 <= w:
            return s1 / w
        prog = min(max((s1 - w) / max(total - w, 1), 0.0), 1.0)
        if time_progress is not None:
            tp = min(max(time_progress(), 0.0), 1.0)
            # decay over the time left after warmup (no jump at the end of warmup); the time
            # fraction at which warmup ended is kept on the function (and in checkpoints)
            if cosine.warm_end is None:
                cosine.warm_end = tp
            we = cosine.warm_end
            prog = max(prog, (tp - we) / (1.0 - we) if we < 1.0 else 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * prog))

    def noam(s: int) -> float:
        s1 = s + 1
        if w and s1 <= w:
            return s1 / w
        return max(math.sqrt(max(w, 1) / s1), floor)

    cosine.warm_end = None  # type: ignore[attr-defined]
    if schedule == "cosine":
        return cosine
    if schedule == "noam":
        return noam
    raise ValueError(f"unknown LR schedule {schedule!r}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str, shm_comm: bool = False) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed → ``(rank, world_size, local_rank)``.

    In the calling process (no launcher) the env vars DeepSpeed needs (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) are set for world size 1; without them it
    would look for MPI (mpi4py). Backend: gloo on CPU, NCCL on CUDA. Unless ``shm_comm``,
    DeepSpeed's shared-memory all-reduce op is marked incompatible first, so CPU start-up does
    not JIT-compile it (~40 s on 2 cores; gloo's all-reduce is used instead).
    """
    import deepspeed
    import deepspeed.ops

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if not shm_comm:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ["LOCAL_RANK"])


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # CUDA's CTC backward has no deterministic kernel: warn there instead of failing
        torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
        torch.backends.cudnn.benchmark = False


def set_threads(torch_threads: int, local_world_size: int) -> int:
    """``torch_threads`` (0 = all cores, shared among the ranks of this node)."""
    n = torch_threads or max((os.cpu_count() or 1) // max(local_world_size, 1), 1)
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is the *collated batch* of ``batches[i]``.

    Runs in DataLoader workers, so it uses no RNG state: SpecAugment happens in the main process
    (the restored RNG governs it), and what happens here is a pure function of (seed, epoch,
    index): utterance ``j`` is read from ``tables[variants[j]]`` (its speed copy this epoch) and
    goes through ``augment(feats, epoch, j)`` (noise / reverb). Item: ``collate(...)`` dict plus
    ``idx`` (B,) dataset indices, ``audio_s`` (float, of the copies loaded), ``load_s`` (seconds
    spent building the batch).
    """

    def __init__(
        self,
        table,
        token_ids: list[list[int]],
        durations: np.ndarray,
        batches: list[list[int]],
        *,
        tables: list | None = None,
        variants: np.ndarray | None = None,
        augment=None,
        epoch: int = 0,
    ):
        self.table, self.token_ids, self.durations, self.batches = table, token_ids, durations, batches
        self.tables = tables or [table]
        self.variants = variants
        self.augment = augment if augment is not None and augment.enabled else None
        self.epoch = int(epoch)

    def _features(self, j: int) -> np.ndarray:
        t = self.tables[int(self.variants[j])] if self.variants is not None else self.table
        f = t.features(j)
        return self.augment(f, self.epoch, j) if self.augment is not None else f

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from model_code.dataset import collate

        t0 = time.perf_counter()
        idx = self.batches[i]
        out = collate([self._features(j) for j in idx], [self.token_ids[j] for j in idx])
        out["idx"] = torch.tensor(idx, dtype=torch.long)
        out["audio_s"] = float(self.durations[idx].sum())
        out["load_s"] = time.perf_counter() - t0
        return out


def _loader(ds: BatchDataset, num_workers: int, seed: int) -> torch.utils.data.DataLoader:
    # A private generator: creating the iterator must not draw from torch's global RNG, or a
    # resumed run (iterator created mid-epoch) would diverge from an uninterrupted one.
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        generator=g,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context="fork" if num_workers > 0 else None,
    )


def ctc_loss(log_probs: torch.Tensor, out_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor):
    """CTC loss: log_probs (B, T', V) → scalar (per-utterance loss / target length, batch mean)."""
    return F.ctc_loss(
        log_probs.float().transpose(0, 1),  # (T', B, V)
        tokens,
        out_lens,
        token_lens,
        blank=0,
        reduction="mean",
        zero_infinity=True,
    )


@torch.no_grad()
def evaluate(model, table, tokenizer, device, max_duration_s: float, dtype=torch.float32) -> dict[str, Any]:
    """Greedy-decode every utterance of ``table``; WER/CER and the CTC loss over the set.

    Batches of utterances sorted by duration (padded cost ≤ ``max_duration_s``); the model is
    put in eval mode and restored afterwards. Returns ``wer, cer, loss, n_utts, examples``
    (first 5). ``loss`` (mean per-token CTC loss, as in training) still ranks models while
    their greedy output is all blanks (WER = CER = 1), early in a run.
    """
    from model_code.dataset import collate
    from model_code.decoding import greedy_decode
    from model_code.metrics import error_counts

    was_training = model.training
    model.eval()
    d = table.durations()
    order = np.argsort(d, kind="stable")
    hyps: dict[int, str] = {}
    batch: list[int] = []
    texts = table.texts()
    loss = {"sum": 0.0, "n": 0}

    def flush(b: list[int]) -> None:
        x = collate([table.features(i) for i in b], [tokenizer.encode(texts[i]) or [1] for i in b])
        lp, ol = model(x["feats"].to(device, dtype=dtype), x["feat_lens"].to(device))
        lv = ctc_loss(lp, ol, x["tokens"].to(device), x["token_lens"].to(device))
        loss["sum"] += float(lv) * len(b)
        loss["n"] += len(b)
        for i, h in zip(b, greedy_decode(lp.float().cpu().numpy(), ol.cpu().numpy(), tokenizer), strict=True):
            hyps[i] = h

    for i in order.tolist():
        if batch and (len(batch) + 1) * d[i] > max_duration_s:
            flush(batch)
            batch = []
        batch.append(i)
    if batch:
        flush(batch)
    model.train(was_training)
    hyp_list = [hyps[i] for i in range(len(texts))]
    if not texts:
        return {"wer": float("nan"), "cer": float("nan"), "loss": float("nan"), "n_utts": 0, "examples": []}
    ec = error_counts(texts, hyp_list)
    return {
        "wer": float(ec["wer"]),
        "cer": float(ec["cer"]),
        "loss": loss["sum"] / max(loss["n"], 1),
        "n_utts": len(texts),
        "examples": [{"ref": r, "hyp": h} for r, h in list(zip(texts, hyp_list, strict=True))[:5]],
    }


def params_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order (equal across ranks after training)."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else 0.0


class _EventLog:
    """Rank 0's append-only JSONL of step/epoch records (flushed per line)."""

    def __init__(self, path: Path | None):
        self.f = open(path, "a") if path is not None else None  # noqa: SIM115

    def write(self, rec: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def train(
    args: TrainArgs,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train on this rank; returns this rank's result record (rank 0 also writes ``result.json``).

    ``on_step(record)`` gets every logged step record (rank 0); ``on_epoch_end(epoch, record)``
    gets ``{"dev_wer", "dev_cer", "loss", ...}`` after each epoch's dev evaluation (rank 0) and
    may raise (e.g. ``optuna.TrialPruned``) to stop: the exception propagates after the
    DataLoader and the event log are closed.

    Result: ``rank, world_size, steps, epochs, dev_wer, dev_cer, history, step_log, params_sha256,
    model_dir (rank 0, relative to out_dir), wall_s, train_s, audio_s, ...``.
    """
    t_start = time.monotonic()
    # process-global torch settings this run changes; restored on return (in-process callers)
    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    # the rendezvous env vars an in-process run sets must not leak into later child processes
    # (a child would inherit RANK/MASTER_PORT and try to bind the port this process holds)
    prev_env = {k: os.environ.get(k) for k in _DIST_ENV}
    try:
        return _train(args, on_step, on_epoch_end, t_start)
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
        for k, v in prev_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def probe_bucket_batch_sizes(
    args: TrainArgs, bucket_max_durations: list[float], device_type: str, rank: int, world: int
) -> list[int]:
    """Per-bucket max batch sizes from :mod:`model_code.memory_probe`, the same on every rank.

    Rank 0 probes (a fresh model of ``args.model_kwargs`` on this rank's device, against
    ``sampler["memory_budget_gb"]``; cached in ``sampler["memory_probe_cache"]`` per model config
    and hardware) and broadcasts, so every rank builds identical batches.
    """
    from model_code.conformer import ConformerCTC
    from model_code.memory_probe import probe_batch_sizes

    sc = dict(args.sampler)
    sizes: list[int] | None = None
    if rank == 0:
        device = f"cuda:{torch.cuda.current_device()}" if device_type == "cuda" else "cpu"
        sizes = probe_batch_sizes(
            model_factory=lambda: ConformerCTC(**args.model_kwargs),
            bucket_max_durations=bucket_max_durations,
            device=device,
            memory_budget_gb=float(sc.get("memory_budget_gb", 4.0)),
            max_batch_size=int(sc.get("memory_probe_max_batch", 512)),
            cache_path=sc.get("memory_probe_cache"),
            model_config=dict(args.model_kwargs),
        )
        if device_type == "cuda":
            torch.cuda.empty_cache()
    if world > 1:
        box = [sizes]
        torch.distributed.broadcast_object_list(box, src=0)
        sizes = box[0]
    assert sizes is not None
    return [int(x) for x in sizes]


def replay_kwargs(replay: dict[str, Any] | None, batches: list[str]) -> dict[str, Any]:
    """Sampler arguments for ``TrainArgs.replay``: which utterances are new, and the mix."""
    if not replay:
        return {}
    new_batches = set(replay.get("new_batches") or [])
    return {
        "new_mask": np.asarray([b in new_batches for b in batches], dtype=bool),
        "replay_share": float(replay.get("share", 0.0)),
        "new_repeats": int(replay.get("new_repeats", 1)),
    }


class WeightEMA:
    """Exponential moving average of a module's parameters (fp32 copies, updated per optimizer step).

    The effective decay is ``min(decay, (1 + n) / (10 + n))`` at update ``n`` (the usual warm-up, so
    a short run is not dominated by its random or parent start). It follows the optimizer step
    count, so a resumed run continues the same average; its tensors travel in the checkpoint.
    Only for replicated parameters (ZeRO stage 0-2).
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, n: int) -> None:
        d = min(self.decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [t.cpu() for t in self.shadow]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if len(sd["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(sd['shadow'])} tensors, the model {len(self.shadow)}")
        for dst, src in zip(self.shadow, sd["shadow"], strict=True):
            dst.copy_(src)

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in the module for the duration of the block, the raw ones after."""
        raw = [p.detach().clone() for p in self.params]
        self.copy_to_module()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, raw, strict=True):
                    p.copy_(t)

    @torch.no_grad()
    def copy_to_module(self) -> None:
        for p, t in zip(self.params, self.shadow, strict=True):
            p.copy_(t.to(p.dtype))


def _train(args: TrainArgs, on_step, on_epoch_end, t_start: float) -> dict[str, Any]:
    import deepspeed

    from model_code.augment import FeatureAugment
    from model_code.checkpoint import CheckpointManager, _fault
    from model_code.conformer import ConformerCTC, SpecAugment, count_parameters
    from model_code.dataset import FeatureTable
    from model_code.sampler import DynamicBucketingSampler
    from model_code.tokenizer import tokenizer_from_dict

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, local_rank = init_distributed(device_type, shm_comm=args.ds_shm_comm)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    n_threads = set_threads(args.torch_threads, local_world)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    seed_everything(args.seed, args.deterministic)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- data
    tokenizer = tokenizer_from_dict(args.tokenizer)
    table = FeatureTable(args.train_index)
    durations = table.durations()
    # speed-perturbed copies: every table holds the same utterances in the same order
    tables = [table] + [FeatureTable(p) for p in args.variant_indexes]
    for p, t in zip(args.variant_indexes, tables[1:], strict=True):
        if t.ids() != table.ids():
            raise ValueError(f"variant index {p} does not list the utterances of {args.train_index} in its order")
    variant_durations = np.stack([t.durations() for t in tables], axis=1) if len(tables) > 1 else None  # (N, V)
    fk = args.feature_kwargs
    augment = FeatureAugment(
        **args.augment,
        frame_s=float(fk.get("hop_length", 160)) / float(fk.get("sample_rate", 16000)),
        log_offset=float(fk.get("log_offset", 1e-6)),
        sample_rate=int(fk.get("sample_rate", 16000)),
        f_min=float(fk.get("f_min", 0.0)),
        f_max=None if fk.get("f_max") is None else float(fk["f_max"]),
        seed=args.seed,
    )
    texts = table.texts()
    token_ids = [tokenizer.encode(t) for t in texts]
    sc = dict(args.sampler)
    sampler = DynamicBucketingSampler(
        durations,
        max_duration_s=float(sc.get("max_duration_s", 120.0)),
        num_buckets=int(sc.get("num_buckets", 30)),
        seed=args.seed,
        shuffle=True,
        rank=rank,
        world_size=world,
        quadratic_duration_s=sc.get("quadratic_duration_s"),
        token_lengths=[len(t) for t in token_ids] if sc.get("two_d_buckets") else None,
        num_token_buckets=int(sc.get("num_token_buckets", 1)) if sc.get("two_d_buckets") else 1,
        bucket_batch_sizes=sc.get("bucket_batch_sizes"),
        variant_durations=variant_durations,
        **replay_kwargs(args.replay, table.batches()),
    )
    probed: list[int] | None = None
    if sc.get("use_memory_probe") and not sc.get("bucket_batch_sizes"):
        probed = probe_bucket_batch_sizes(args, sampler.bucket_max_durations(), device_type, rank, world)
        sampler.set_bucket_batch_sizes(probed)
    steps_per_epoch = len(sampler) // args.grad_accum  # optimizer steps (equal on every rank)
    total_steps = max(steps_per_epoch * args.epochs, 1)  # (replay: epochs differ by a batch or two)

    # ---- model + engine
    model = ConformerCTC(**args.model_kwargs)
    inter_layer = 0
    if args.inter_ctc_weight > 0:
        inter_layer = args.inter_ctc_layer or len(model.blocks) // 2
        if not 0 < inter_layer < len(model.blocks):
            raise ValueError(
                f"train.inter_ctc_layer must be in 1..{len(model.blocks) - 1} for a {len(model.blocks)}-block "
                f"model, got {inter_layer}"
            )
    if args.init_weights:
        # the parent's weights (a checkpoint of this run, if any, overrides them below)
        model.load_state_dict(torch.load(args.init_weights, map_location="cpu", weights_only=True), strict=True)
    specaug = SpecAugment(**args.specaugment) if args.specaugment else None
    ds_config = build_ds_config(args, device_type)
    base_opt_params = [p for p in model.parameters() if p.requires_grad]

    clock = {"before": 0.0, "t0": time.monotonic()}  # filled in after a resume
    cap_s = args.max_minutes * 60.0 if args.max_minutes else None

    def time_progress() -> float:
        return (clock["before"] + time.monotonic() - clock["t0"]) / cap_s

    lr_fn = lr_lambda_factory(
        args.schedule, args.warmup_steps, total_steps, args.min_lr_ratio, time_progress if cap_s else None
    )

    def sched_factory(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=base_opt_params, config=ds_config, lr_scheduler=sched_factory
    )
    device = engine.device
    if args.ema_decay and args.zero_stage >= 3:
        raise ValueError("train.ema_decay needs replicated parameters (zero_stage 0-2), not ZeRO-3")
    ema = WeightEMA(engine.module, args.ema_decay) if args.ema_decay else None
    # throughput accounting (issue 15): this rank's own figures since this session started
    mine = {"audio_s": 0.0, "wait_s": 0.0, "allreduce_s": 0.0, "step_s": 0.0, "steps": 0}
    _time_allreduce(engine, mine, device_type, world)
    prec = resolve_precision(args.precision, device_type)
    in_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
    cpu_autocast = prec == CPU_BF16
    if rank == 0:
        (out_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2, sort_keys=True))

    # ---- resume
    ckpt = (
        CheckpointManager(args.checkpoint_dir, rank=rank, world_size=world, keep=args.keep_checkpoints)
        if args.checkpoint_dir
        else None
    )
    state: dict[str, Any] = {
        "epoch": 0,
        "sampler": None,
        "global_step": 0,
        "history": [],
        "step_log": [],
        "elapsed_s": 0.0,
        "audio_s": 0.0,
        "stopped_early": False,
    }
    resumed_from = None
    if ckpt is not None:
        loaded = ckpt.load(engine)
        if loaded is not None:
            client = loaded.pop("client_state", None) or {}
            state.update(loaded)
            if ema is not None:
                if "ema" not in client:
                    raise RuntimeError("train.ema_decay is set but the checkpoint holds no EMA state")
                ema.load_state_dict(client["ema"])
            resumed_from = int(state["global_step"])
            if hasattr(lr_fn, "warm_end"):
                lr_fn.warm_end = state.get("lr_warm_end")
            log.info("rank %d: resumed from step %d (epoch %d)", rank, resumed_from, state["epoch"])

    events = _EventLog(out_dir / "events.jsonl" if rank == 0 else None)
    batch_log = open(out_dir / f"batches_rank{rank}.jsonl", "a") if args.record_batches else None  # noqa: SIM115
    dev_table = FeatureTable(args.dev_index) if (args.dev_index and rank == 0) else None
    dev_budget = args.dev_max_duration_s or 2.0 * float(sc.get("max_duration_s", 120.0))
    if rank == 0:
        events.write(
            {
                "type": "start",
                "rank": rank,
                "world_size": world,
                "params": count_parameters(model),
                "threads": n_threads,
                "steps_per_epoch": steps_per_epoch,
                "resumed_from": resumed_from,
                "device": str(device),
                "precision": prec,
            }
        )

    session_t0 = time.monotonic()
    elapsed_before = float(state["elapsed_s"])
    clock.update(before=elapsed_before, t0=session_t0)
    last_ckpt_t = time.monotonic()
    load_times: list[float] = []
    stop = bool(state["stopped_early"])  # a capped run that was already finished stays finished
    engine.train()

    def save(step: int) -> None:
        nonlocal last_ckpt_t
        if ckpt is None:
            return
        state["elapsed_s"] = elapsed_before + (time.monotonic() - session_t0)
        state["lr_warm_end"] = getattr(lr_fn, "warm_end", None)
        ckpt.save(engine, step, state, client_state={"ema": ema.state_dict()} if ema is not None else None)
        last_ckpt_t = time.monotonic()

    try:
        while state["epoch"] < args.epochs and not stop:
            epoch = int(state["epoch"])
            sampler.set_epoch(epoch)
            if state.get("sampler") and int(state["sampler"]["epoch"]) == epoch:
                sampler.load_state_dict(state["sampler"])
            start_batch = sampler.state_dict()["batches_yielded"] if state.get("sampler") else 0
            batches = list(iter(sampler))  # the rest of this epoch (after a restored position)
            # whole optimizer steps only; every rank has the same count (sampler guarantees it)
            n_use = (len(sampler) // args.grad_accum) * args.grad_accum - start_batch
            batches = batches[: max(n_use, 0)]
            ds = BatchDataset(
                table, token_ids, sampler.epoch_durations(epoch), batches,
                tables=tables, variants=sampler.epoch_variants(epoch) if len(tables) > 1 else None,
                augment=augment, epoch=epoch,
            )
            loader = _loader(ds, args.num_workers, args.seed + epoch)
            it = iter(loader)
            ep = {"loss_sum": 0.0, "n": 0, "audio_s": 0.0, "wait_s": 0.0, "busy_s": 0.0, "frames": 0, "padded": 0}
            micro = 0
            acc = {"loss": 0.0, "audio_s": 0.0, "wait_s": 0.0, "load_s": [], "frames": 0, "padded": 0, "utts": 0}
            t_step = time.perf_counter()
            try:
                for _ in range(len(batches)):
                    t0 = time.perf_counter()
                    b = next(it)
                    wait = time.perf_counter() - t0
                    feats = b["feats"].to(device)
                    feat_lens = b["feat_lens"].to(device)
                    if specaug is not None:
                        feats = specaug(feats, feat_lens)
                    tokens, token_lens = b["tokens"].to(device), b["token_lens"].to(device)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_autocast):
                        out = engine(feats.to(in_dtype), feat_lens, inter_layer=inter_layer)
                    loss = ctc_loss(out[0], out[1], tokens, token_lens)
                    if inter_layer:
                        inter_loss = ctc_loss(out[2], out[1], tokens, token_lens)
                        engine.backward((1.0 - args.inter_ctc_weight) * loss + args.inter_ctc_weight * inter_loss)
                    else:
                        engine.backward(loss)
                    lr_used = float(scheduler.get_last_lr()[0])  # the LR this optimizer step applies
                    own_gn = None
                    if args.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
                        # DeepSpeed only records the norm for ZeRO >= 1 / fp16; compute it (pre-clip)
                        grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
                        own_gn = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
                    engine.step()
                    micro += 1
                    acc["loss"] += float(loss.detach())
                    acc["audio_s"] += b["audio_s"]
                    acc["wait_s"] += wait
                    acc["load_s"].append(b["load_s"])
                    acc["frames"] += int(b["feat_lens"].sum())
                    acc["padded"] += int(b["feats"].shape[0] * b["feats"].shape[1])
                    acc["utts"] += int(b["feats"].shape[0])
                    if batch_log is not None:
                        batch_log.write(json.dumps({"step": state["global_step"] + 1, "idx": b["idx"].tolist()}) + "\n")
                        batch_log.flush()
                    if micro % args.grad_accum:
                        continue
                    # ---- one optimizer step done
                    state["global_step"] += 1
                    step = int(state["global_step"])
                    if ema is not None:
                        ema.update(step)
                    now = time.perf_counter()
                    dt = now - t_step
                    t_step = now
                    loss_val = acc["loss"] / args.grad_accum
                    want_ckpt = ckpt is not None and (
                        step % args.checkpoint_every_steps == 0
                        or time.monotonic() - last_ckpt_t >= args.checkpoint_every_minutes * 60.0
                    )
                    want_stop = (cap_s is not None and elapsed_before + (time.monotonic() - session_t0) >= cap_s) or (
                        args.max_steps is not None and step >= args.max_steps
                    )
                    if world > 1:  # global mean loss; any rank's flag decides for all
                        v = torch.tensor(
                            [loss_val, acc["audio_s"], float(want_ckpt), float(want_stop)],
                            dtype=torch.float64,
                            device=device if device_type == "cuda" else "cpu",
                        )
                        torch.distributed.all_reduce(v)
                        loss_val = float(v[0]) / world
                        audio_global = float(v[1])
                        want_ckpt, want_stop = bool(v[2] > 0), bool(v[3] > 0)
                    else:
                        audio_global = acc["audio_s"]
                    gn = own_gn if own_gn is not None else engine.get_global_grad_norm()
                    rec = {
                        "type": "step",
                        "step": step,
                        "epoch": epoch,
                        "loss": loss_val,
                        "lr": lr_used,
                        "grad_norm": float(gn) if gn is not None else None,
                        "audio_s_per_s": audio_global / max(dt, 1e-9),
                        "data_wait_share": acc["wait_s"] / max(dt, 1e-9),
                        "batch_load_s": float(np.mean(acc["load_s"])),
                        "padding_share": 1.0 - acc["frames"] / max(acc["padded"], 1),
                        "batch_utts": acc["utts"],
                        "step_s": dt,
                    }
                    state["step_log"].append([step, loss_val, rec["lr"]])
                    state["audio_s"] = float(state["audio_s"]) + audio_global
                    load_times.extend(acc["load_s"])
                    ep["loss_sum"] += loss_val
                    ep["n"] += 1
                    ep["audio_s"] += audio_global
                    ep["wait_s"] += acc["wait_s"]
                    ep["busy_s"] += dt
                    ep["frames"] += acc["frames"]
                    ep["padded"] += acc["padded"]
                    mine["audio_s"] += acc["audio_s"]
                    mine["wait_s"] += acc["wait_s"]
                    mine["step_s"] += dt
                    mine["steps"] += 1
                    acc = {"loss": 0.0, "audio_s": 0.0, "wait_s": 0.0, "load_s": [], "frames": 0, "padded": 0, "utts": 0}
                    if rank == 0 and step % args.log_every_steps == 0:
                        events.write(rec)
                        if on_step is not None:
                            on_step(rec)
                    pos = start_batch + micro
                    state["sampler"] = {**sampler.state_dict(), "epoch": epoch, "batches_yielded": pos}
                    if want_stop:
                        stop = True
                        state["stopped_early"] = True
                        break
                    if want_ckpt:
                        save(step)
                    _fault(f"after_step:{step}")
            finally:
                del it, loader
            # ---- epoch end (or time cap): evaluate, record, checkpoint
            ep_rec: dict[str, Any] = {
                "epoch": epoch,
                "step": int(state["global_step"]),
                "loss": ep["loss_sum"] / max(ep["n"], 1),
                "steps_in_session": ep["n"],
                "audio_s_per_s": ep["audio_s"] / max(ep["busy_s"], 1e-9),
                "data_wait_share": ep["wait_s"] / max(ep["busy_s"], 1e-9),
                "padding_share": 1.0 - ep["frames"] / max(ep["padded"], 1),
                "batch_load_p95_s": _percentile(load_times, 95),
                "complete": not stop,
            }
            if dev_table is not None:
                t_ev = time.perf_counter()
                with ema.swapped() if ema is not None else contextlib.nullcontext():
                    ev = evaluate(engine.module, dev_table, tokenizer, device, dev_budget, dtype=in_dtype)
                ep_rec.update(dev_wer=ev["wer"], dev_cer=ev["cer"], dev_loss=ev["loss"], dev_examples=ev["examples"])
                ep_rec["eval_s"] = time.perf_counter() - t_ev
            if not stop:
                state["epoch"] = epoch + 1
                state["sampler"] = None
            state["history"].append(ep_rec)
            if rank == 0:
                events.write({"type": "epoch", **ep_rec})
            save(int(state["global_step"]))
            if rank == 0 and on_epoch_end is not None:
                on_epoch_end(epoch, ep_rec)
            load_times = []

        # ---- finish
        ema_rec = _finish_ema(ema, engine.module, state["history"], dev_table, tokenizer, device, dev_budget,
                              in_dtype, world) if ema is not None else None
        result: dict[str, Any] = {
            "rank": rank,
            "world_size": world,
            "steps": int(state["global_step"]),
            "epochs": int(state["epoch"]),
            "stopped_early": bool(state["stopped_early"]),
            "history": state["history"],
            "step_log": state["step_log"],
            "params_sha256": params_digest(engine.module),
            "params": count_parameters(model),
            "resumed_from": resumed_from,
            "audio_s": float(state["audio_s"]),
            "train_s": elapsed_before + (time.monotonic() - session_t0),
            "threads": n_threads,
            "precision": prec,
            "device": str(device),
            "bucket_batch_sizes": sampler.bucket_batch_sizes,
            "memory_probed": probed is not None,
        }
        last = state["history"][-1] if state["history"] else {}
        result["dev_wer"] = last.get("dev_wer")
        result["dev_cer"] = last.get("dev_cer")
        result["dev_loss"] = last.get("dev_loss")
        if ema_rec is not None:
            result["ema"] = ema_rec
            if ema_rec["used"] == "raw":
                result.update(dev_wer=ema_rec["dev_wer_raw"], dev_cer=ema_rec["dev_cer_raw"], dev_loss=ema_rec["dev_loss_raw"])
        if rank == 0 and args.save_model:
            from model_code.packaging import save_model_dir

            save_model_dir(
                out_dir / "model",
                engine.module,
                args.model_kwargs,
                tokenizer,
                args.feature_kwargs,
                lm_texts=texts if args.lm_texts else None,
                meta={**args.meta, "steps": result["steps"], "epochs": result["epochs"], "dev_wer": result["dev_wer"],
                      "dev_cer": result["dev_cer"]},
                lm_order=args.lm_order,
            )
            result["model_dir"] = "model"
        result["wall_s"] = time.monotonic() - t_start
        result["rank_stats"] = _gather_rank_stats(mine, rank, local_rank, world)
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            events.write({"type": "end", "steps": result["steps"], "epochs": result["epochs"]})
            _write_json(out_dir / "result.json", result)
        if args.record_batches:
            _write_json(out_dir / f"rank{rank}.json", {"rank": rank, "params_sha256": result["params_sha256"]})
        return result
    finally:
        events.close()
        if batch_log is not None:
            batch_log.close()


def _finish_ema(ema: WeightEMA, module, history, dev_table, tokenizer, device, dev_budget, dtype, world) -> dict:
    """Leave the weights to publish in ``module``: the average, unless the raw weights score a
    lower dev CER (rank 0 decides on its dev set, every rank follows). The epoch-end dev figures
    in ``history`` are the average's."""
    last = history[-1] if history else {}
    rec: dict[str, Any] = {"decay": ema.decay, "dev_wer_ema": last.get("dev_wer"), "dev_cer_ema": last.get("dev_cer"),
                           "dev_loss_ema": last.get("dev_loss"), "used": "ema"}
    use_raw = 0.0
    if dev_table is not None and last.get("dev_cer") is not None:
        ev = evaluate(module, dev_table, tokenizer, device, dev_budget, dtype=dtype)
        rec.update(dev_wer_raw=ev["wer"], dev_cer_raw=ev["cer"], dev_loss_raw=ev["loss"])
        # CER, then loss: early in a run both are 1.0 and only the loss still ranks them
        use_raw = float((ev["cer"], ev["loss"]) < (last["dev_cer"], last["dev_loss"]))
    if world > 1:
        flag = torch.tensor([use_raw], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        torch.distributed.broadcast(flag, src=0)
        use_raw = float(flag[0])
    if use_raw:
        rec["used"] = "raw"
    else:
        ema.copy_to_module()
    return rec


def _time_allreduce(engine, mine: dict[str, Any], device_type: str, world: int) -> None:
    """Time DeepSpeed's gradient all-reduce on this rank (``engine.allreduce_gradients``, which
    ``engine.backward`` calls at each gradient-accumulation boundary) into ``mine["allreduce_s"]``.

    The time includes waiting for the slowest rank to reach the collective (that is what a rank
    loses to it). On CUDA the device is synchronized before and after, so the (asynchronous)
    NCCL call is timed to its end. With ZeRO 2/3 most of the reduction overlaps the backward
    pass and only the remainder is seen here."""
    fn = getattr(engine, "allreduce_gradients", None)
    if world <= 1 or fn is None:
        return

    def timed(*a, **k):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            if device_type == "cuda":
                torch.cuda.synchronize()
            mine["allreduce_s"] += time.perf_counter() - t0

    engine.allreduce_gradients = timed


def _gather_rank_stats(mine: dict[str, Any], rank: int, local_rank: int, world: int) -> list[dict[str, Any]]:
    """Every rank's throughput figures of this session (collective), ordered by rank.

    Per rank: ``audio_s`` (its own batches), ``step_s`` (wall time of its optimizer steps,
    data wait included), ``wait_s`` (waiting for the next batch), ``allreduce_s`` (in the
    gradient all-reduce), their shares of ``step_s``, and where it ran (``node``: the
    ``ASRFLOW_NODE_INDEX`` a multi-node launch sets, else torchrun's ``GROUP_RANK`` (the node's
    rank in the rendezvous, e.g. in a PyTorchJob pod), else 0; ``host``)."""
    import socket

    step_s = max(float(mine["step_s"]), 1e-9)
    rec = {
        **mine,
        "rank": int(rank),
        "local_rank": int(local_rank),
        "node": int(os.environ.get("ASRFLOW_NODE_INDEX") or os.environ.get("GROUP_RANK") or 0),  # ds_launch.NODE_ENV
        "host": socket.gethostname(),
        "audio_s_per_s": float(mine["audio_s"]) / step_s,
        "data_wait_share": float(mine["wait_s"]) / step_s,
        "allreduce_share": float(mine["allreduce_s"]) / step_s if world > 1 else 0.0,
    }
    if world <= 1:
        return [rec]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, rec)
    return sorted(out, key=lambda r: r["rank"])


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=float))
    os.replace(tmp, path)


def shutdown_distributed() -> None:
    """Destroy the process group (so a later in-process run can initialise a new one)."""
    with contextlib.suppress(Exception):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    with contextlib.suppress(Exception):
        import deepspeed.comm.comm as dscomm

        dscomm.cdb = None

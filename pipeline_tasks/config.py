"""Typed configuration for every asrflow step.

A profile is a YAML file (``configs/local.yaml``, ``configs/prod.yaml``...) that is
validated into :class:`AsrflowConfig`. Command-line ``key.sub=value`` overrides are
applied to the raw mapping *before* validation, so an override gets exactly the same
type checks as the file. Unknown keys are rejected (``extra="forbid"``): a typo in a
profile is an error, not a silently ignored setting.

Each step reads only its own section; the step key (see :mod:`pipeline_tasks.contract`)
hashes that section, so changing the tuning space does not invalidate cached features.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data; `configs/` at the repo root links here


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    """Where things live. Relative paths are resolved against ``root`` at load time."""

    root: str = "artifacts/local"  # artifact root: every step writes under <root>/<step>/<key>/
    landing_url: str = "landing"  # landing zone: a folder or an fsspec URL (file://, s3://, gs://, memory://)
    golden_dir: str = "golden_set"  # the fixed golden set (manifest.jsonl + audio)
    data_workspace: str = "data_repo"  # the git + DVC repo that versions ingested snapshots
    dvc_remote: str = "dvc_remote"  # DVC remote: a folder locally, s3://bucket/prefix in production
    quarantine_dir: str = "quarantine"


class CorpusConfig(_Section):
    """The embedded synthetic corpus (espeak-ng + Festival, channel conditions; `synth.corpus`);
    used by `make pipeline-local` and tests. The mix fields below go to ``synth.corpus.Mix``
    (``Mix.from_config(cfg.corpus)``); the golden set's slices and ranges are fixed in code."""

    utterances_per_week: int = Field(400, ge=1)
    golden_utterances: int = Field(120, ge=1)
    seed: int = 1234
    long_form_share: float = Field(0.02, ge=0.0, le=1.0)
    noise_snr_db: tuple[float, float] = (15.0, 40.0)  # light background noise on every row, clean ones too
    jobs: int = Field(0, ge=0)  # 0 = all cores
    # share of each synthesizer besides espeak-ng (espeak gets the rest); flite is golden-only, refused here
    synth_shares: dict[str, float] = {"festival": 0.35}
    # share of rows with each channel condition (clean gets the rest); one condition per row
    condition_shares: dict[str, float] = {
        "reverb": 0.15,
        "telephone": 0.10,
        "noisy": 0.12,
        "babble": 0.08,
        "clipped": 0.05,
    }
    # channel ramp: week w gets min(1, w / N) of condition_shares and of the condition strengths
    # (ranges narrowed to their mild end): week 1 trained from scratch on the full channel mix stays
    # on the CTC plateau (golden WER 0.969, bench/README.md; FINDINGS.md). 0 = the full mix from week 1
    diversity_ramp_weeks: int = Field(4, ge=0)
    # voice ramp: week w gets min(1, w / N) of synth_shares and warp_share. 1 = all voices from week 1
    # (more Festival and warped voices in week 1: flite 0.784 vs 0.895 golden WER at the same overall)
    voice_ramp_weeks: int = Field(1, ge=0)
    warp_share: float = Field(0.3, ge=0.0, le=1.0)  # espeak rows with a pitch/formant warp (±100-300 cents)
    festival_stretch: tuple[float, float] = (0.85, 1.2)  # Festival Duration_Stretch per utterance
    level_dbfs: tuple[float, float] = (-20.0, -1.5)  # peak level of every row
    reverb_rt60_s: tuple[float, float] = (0.2, 1.0)  # synthetic room impulse responses
    noisy_snr_db: tuple[float, float] = (0.0, 15.0)  # white / pink / brown noise of `noisy` rows
    babble_snr_db: tuple[float, float] = (0.0, 15.0)  # babble of `babble` rows
    babble_talkers: tuple[int, int] = (3, 7)
    clip_fraction: tuple[float, float] = (0.15, 0.5)  # `clipped` rows: clip level as a fraction of the peak

    @field_validator("synth_shares", "condition_shares")
    @classmethod
    def _shares(cls, v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        if info.field_name == "synth_shares":
            allowed = {"festival"}  # espeak is the rest; flite is golden-only
        else:
            allowed = {"reverb", "telephone", "noisy", "babble", "clipped"}  # clean is the rest
        if "flite" in v:
            raise ValueError("flite is the golden set's unseen synthesizer and is never trained on")
        if set(v) - allowed:
            raise ValueError(f"unknown keys {sorted(set(v) - allowed)}; allowed: {sorted(allowed)}")
        if any(not 0.0 <= s <= 1.0 for s in v.values()) or sum(v.values()) > 1.0 + 1e-9:
            raise ValueError(f"shares must be in [0, 1] and sum to at most 1, got {v}")
        return v

    @field_validator(
        "noise_snr_db",
        "festival_stretch",
        "level_dbfs",
        "reverb_rt60_s",
        "noisy_snr_db",
        "babble_snr_db",
        "babble_talkers",
        "clip_fraction",
    )
    @classmethod
    def _low_high(cls, v: tuple) -> tuple:
        if v[0] > v[1]:
            raise ValueError(f"must be (low, high) with low <= high, got {v}")
        return v


class TextNormConfig(_Section):
    lowercase: bool = True
    strip_punctuation: bool = True
    collapse_whitespace: bool = True
    digits: Literal["spell", "reject"] = "spell"
    allowed_chars: str = "abcdefghijklmnopqrstuvwxyz' "

    def normalize(self, text: Any) -> str:
        """``model_code.text.normalize_text`` with these settings (raises ``TextRejected``)."""
        from model_code.text import normalize_text

        return normalize_text(text, **self.model_dump())


class IngestConfig(_Section):
    target_sample_rate: int = 16000
    manifest_glob: str = "**/*.jsonl"
    max_duration_mismatch_s: float = Field(0.5, ge=0)  # declared vs decoded duration
    max_duration_mismatch_ratio: float = Field(0.1, ge=0)
    text: TextNormConfig = TextNormConfig()
    dvc_push: bool = True
    lock_timeout_s: float = 600.0  # how long a second ingest waits for the data-workspace lock
    jobs: int = Field(0, ge=0)  # decoding processes; 0 = all cores
    # fewer items are decoded in-process: a spawned worker must import torch (measured: 128 tiny-corpus
    # utterances decode in 2.9 s in-process vs 18.5 s with a fresh 2-process pool on the loaded CI box)
    pool_min_items: int = Field(512, ge=1)
    copy_quarantined: bool = True  # copy the offending source file under paths.quarantine_dir/<batch>/
    # hardening (issue 13): checked from the audio header *before* decoding (a 23 KB FLAC of silence
    # can declare hours of audio); the duration cap is validate.max_duration_s
    max_decoded_mb: float = Field(512.0, gt=0)  # decoded float32 samples (all channels) of one file
    max_channels: int = Field(16, ge=1)
    max_sample_rate: int = Field(384000, ge=8000)
    max_manifest_line_bytes: int = Field(1 << 20, ge=1024)  # a longer manifest line is quarantined
    decode_batch: int = Field(0, ge=0)  # files in flight at once in the decode pool; 0 = 4 x jobs


class ValidateConfig(_Section):
    min_duration_s: float = 0.3
    max_train_duration_s: float = 20.0  # longer audio is kept for long-form use but not trained on
    max_duration_s: float = 600.0
    min_chars_per_s: float = 2.0
    max_chars_per_s: float = 30.0
    max_quarantine_share: float = Field(0.2, ge=0, le=1)
    min_utterances: int = 1
    median_duration_s: tuple[float, float] = (0.5, 30.0)  # allowed range of the batch median
    max_hours_per_speaker_share: float = Field(1.0, ge=0, le=1)


class FeatureConfig(_Section):
    """Log-mel front end. Shared by featurize, training, export and transcribe."""

    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400  # 25 ms
    win_length: int = 400
    hop_length: int = 160  # 10 ms
    f_min: float = 0.0
    f_max: float | None = None
    log_offset: float = 1e-6
    dtype: Literal["float16", "float32"] = "float16"
    shard_size: int = Field(500, ge=1)  # utterances per Parquet shard
    row_group_size: int = Field(64, ge=1)
    jobs: int = Field(0, ge=0)  # 0 = all cores
    # a process pool only pays off for enough audio (a worker start costs ~0.5 CPU-s; log-mel ~0.2 CPU-s
    # per audio-minute): below this much new audio, featurize computes in-process
    parallel_min_audio_s: float = Field(1800.0, ge=0)
    # speed perturbation (Kaldi-style copies, e.g. [0.9, 1.0, 1.1]): featurize caches each factor
    # f != 1 as its own shards in <root>/feature_cache/<feature_hash>-sp<f>/, incrementally like
    # the plain cache, and split writes train_sp<f>.parquet / proxy_sp<f>.parquet; training uses
    # them with train.augment.speed_perturb. Not part of feature_hash: the 1.0 cache is the same
    speed_factors: list[float] = Field(default_factory=lambda: [1.0])

    @field_validator("speed_factors")
    @classmethod
    def _speed_factors(cls, v: list[float]) -> list[float]:
        v = sorted(float(f) for f in v)
        if 1.0 not in v or len(set(v)) != len(v) or any(not 0.5 <= f <= 2.0 for f in v):
            raise ValueError(f"speed_factors must hold 1.0 and distinct factors in [0.5, 2], got {v}")
        return v

    @property
    def speed_variants(self) -> list[float]:
        """The perturbed factors (``speed_factors`` without 1.0), ascending."""
        return [f for f in self.speed_factors if f != 1.0]


class SplitConfig(_Section):
    dev_share: float = Field(0.1, gt=0, lt=1)
    proxy_share: float = Field(0.1, gt=0, le=1)  # share of *train* sampled for tuning
    speaker_disjoint_dev: bool = False
    salt: str = "asrflow-split-v1"
    # proxy strata: duration buckets (fixed edges, so a bucket never changes as data grows) x speaker
    proxy_duration_edges_s: list[float] = Field(default_factory=lambda: [2.0, 4.0, 8.0, 12.0, 16.0])


class ModelConfig(_Section):
    vocab: Literal["char", "bpe"] = "char"
    bpe_vocab_size: int = 128
    d_model: int = 144
    n_layers: int = 4
    n_heads: int = 4
    ff_mult: int = 4
    conv_kernel: int = 15
    dropout: float = Field(0.1, ge=0, lt=1)
    subsampling_channels: int = 144
    # absolute sinusoidal positions after subsampling, or none (positions only via convolutions)
    # "none" keeps the encoder shift-equivariant (chunked long-form decoding sees speech at any
    # offset the way training did); not the default: it did not train faster in 10-minute runs
    pos_encoding: Literal["sinusoidal", "none"] = "sinusoidal"


class SpecAugmentConfig(_Section):
    freq_masks: int = Field(2, ge=0)
    freq_mask_width: int = Field(15, ge=0)
    time_masks: int = Field(2, ge=0)
    time_mask_width: int = Field(25, ge=0)


class AugmentConfig(_Section):
    """Training augmentation besides SpecAugment (``model_code.augment``), each draw a pure
    function of (train.seed, epoch, utterance), so resuming stays exact."""

    # train each utterance, each epoch, on one of its features.speed_factors copies (uniformly)
    speed_perturb: bool = False
    # additive stationary coloured noise on the linear mel energies, SNR ~ U(noise_snr_db)
    noise_prob: float = Field(0.0, ge=0, le=1)
    noise_snr_db: tuple[float, float] = (5.0, 30.0)
    # exponential-decay reverb tail smeared across frames, T60 ~ U(reverb_t60_s)
    reverb_prob: float = Field(0.0, ge=0, le=1)
    reverb_t60_s: tuple[float, float] = (0.2, 0.8)
    # vocal-tract-length perturbation: the mel axis warped by alpha ~ U(vtlp_alpha) (> 1: formants up)
    vtlp_prob: float = Field(0.0, ge=0, le=1)
    vtlp_alpha: tuple[float, float] = (0.9, 1.1)

    @field_validator("noise_snr_db", "reverb_t60_s", "vtlp_alpha")
    @classmethod
    def _low_high(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"must be (low, high) with low <= high, got {v}")
        if info.field_name == "reverb_t60_s" and v[0] <= 0:
            raise ValueError(f"T60 must be > 0, got {v}")
        if info.field_name == "vtlp_alpha" and v[0] <= 0:
            raise ValueError(f"warp factors must be > 0, got {v}")
        return v

    def feature_kwargs(self) -> dict[str, Any]:
        """``model_code.augment.FeatureAugment`` keyword arguments (VTLP, noise and reverb)."""
        return self.model_dump(mode="json", exclude={"speed_perturb"})


class SamplerConfig(_Section):
    max_duration_s: float = Field(120.0, gt=0)  # audio seconds per batch (per rank)
    num_buckets: int = Field(30, ge=1)
    quadratic_duration_s: float | None = None  # attention cost term (Lhotse's quadratic_duration)
    two_d_buckets: bool = False
    num_token_buckets: int = 4
    use_memory_probe: bool = False
    memory_budget_gb: float = 4.0


class PyTorchJobConfig(_Section):
    """``train.launcher: pytorchjob``: the train task submits a Kubeflow Training Operator
    ``PyTorchJob`` (kubeflow.org/v1) and waits for it (:mod:`pipeline_tasks.services.pytorchjob`).

    The pods mount the shared artifact volume at ``paths.root`` (the same path the Airflow
    workers see), so rank 0 writes the model and its result where the train task reads them."""

    namespace: str = "asrflow"
    image: str = "registry.example.com/asrflow:0.1.0"  # the project's image (infra/Dockerfile)
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    service_account: str = ""  # "" = the namespace's default
    artifact_claim: str = "asrflow-data"  # PVC (ReadWriteMany) holding paths.root
    gpu_resource: str = "nvidia.com/gpu"  # per pod: train.world_size of these ("" = CPU-only pods)
    cpu: str = "32"  # per pod request
    memory: str = "400Gi"  # per pod request (and limit)
    shm_size: str = "64Gi"  # /dev/shm (DataLoader workers, NCCL)
    node_selector: dict[str, str] = Field(default_factory=lambda: {"pool": "gpu"})
    tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    min_nodes: int = Field(0, ge=0)  # elastic: fewest nodes training goes on with (0 = train.nnodes)
    rdzv_port: int = Field(29400, ge=1, le=65535)
    active_deadline_s: int = Field(7 * 24 * 3600, ge=60)  # the job fails after this
    backoff_limit: int = Field(3, ge=0)  # pod restarts (OnFailure) before the job fails
    ttl_after_finished_s: int = Field(24 * 3600, ge=0)  # the finished job (and its logs) is kept this long
    kubectl: str = "kubectl"
    context: str = ""  # kubeconfig context ("" = current; in-cluster: the task pod's service account)
    poll_s: float = Field(10.0, gt=0)


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = 1e-3
    warmup_steps: int = Field(200, ge=0)
    schedule: Literal["cosine", "noam"] = "cosine"
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0
    grad_accum: int = Field(1, ge=1)
    zero_stage: int = Field(0, ge=0, le=3)
    # auto: bf16 on GPU; on CPU bf16 autocast (fp32 weights) where the CPU has native bf16, else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    world_size: int = Field(1, ge=1)  # processes on this node
    # nodes: > 1 runs one mapped `train_node` task per node (each world_size ranks) that meet in
    # torchrun's c10d rendezvous, node 0 hosting it (pipeline_tasks/services/multinode.py)
    nnodes: int = Field(1, ge=1)
    # nnodes > 1 with a Celery GPU pool: always torchrun; pytorchjob: a Kubeflow PyTorchJob of nnodes pods
    launcher: Literal["inprocess", "torchrun", "deepspeed", "pytorchjob"] = "inprocess"
    rdzv_host: str = ""  # address the other nodes reach node 0's rendezvous at ("" = node 0's FQDN)
    rdzv_port: int = Field(0, ge=0, le=65535)  # 0 = a free port chosen by node 0 at start
    rdzv_join_timeout_s: float = Field(600.0, gt=0)  # a node that never comes fails the step after this
    max_restarts: int = Field(3, ge=0)  # torchrun --max-restarts: a dead rank restarts the group from the last checkpoint; multi-node: elastic re-rendezvous
    checkpoint_every_steps: int = Field(200, ge=1)
    checkpoint_every_minutes: float = Field(5.0, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 1234
    deterministic: bool = False
    num_workers: int = Field(1, ge=0)
    torch_threads: int = Field(0, ge=0)  # 0 = all cores
    max_minutes: float | None = None  # wall-clock cap (local profile)
    dev_decode: Literal["greedy", "beam"] = "greedy"
    sampler: SamplerConfig = SamplerConfig()
    specaugment: SpecAugmentConfig = SpecAugmentConfig()
    augment: AugmentConfig = AugmentConfig()
    gpu_pool_slots: int = Field(1, ge=1)
    pytorchjob: PyTorchJobConfig = PyTorchJobConfig()
    keep_checkpoint_after_publish: bool = False  # keep <root>/checkpoints/train/<key>/ once the model is published
    ds_shm_comm: bool = False  # DeepSpeed's shared-memory CPU all-reduce (JIT-compiles a C++ op, ~40 s once)
    build_lm: bool = True  # ship a lexicon + n-gram LM built from the training transcripts with the model
    # -- continual training: start from a registered model and fine-tune on the new weeks ----------
    # auto: the `production` model, else `staging`, else from scratch (an incompatible parent:
    # scratch, with the reason recorded); scratch; production; staging; models:/<name>/<N>; or a
    # path to a packaged model folder (weights.pt + model.json). A named parent that does not fit
    # the config is an error.
    init_from: str = "auto"
    finetune_lr_factor: float = Field(0.3, gt=0, le=1)  # peak LR of a warm-started run = lr × this
    finetune_warmup_steps: int = Field(20, ge=0)  # warm runs need little warmup
    replay_share: float = Field(0.5, ge=0, lt=1)  # share of older weeks' utterances in each warm epoch
    new_data_repeats: int = Field(1, ge=1)  # times each new utterance appears per warm epoch
    # exponential moving average of the weights (0 = off); the model is published with the average
    # unless the raw weights score a lower dev CER at the end (model_code.training.WeightEMA)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    # intermediate CTC: loss = (1 - w) CTC(final) + w CTC(block k through the same head), w this
    # weight (0 = off), k = inter_ctc_layer (0 = model.n_layers // 2); no new weights, inference
    # and export unchanged (model_code.conformer.ConformerCTC.forward)
    inter_ctc_weight: float = Field(0.0, ge=0, lt=1)
    inter_ctc_layer: int = Field(0, ge=0)

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, v: str) -> str:
        v = v.strip()
        if v in ("auto", "scratch", "production", "staging") or v.startswith("models:/") or "/" in v or v.endswith(".pt"):
            return v
        raise ValueError("train.init_from: auto | scratch | production | staging | models:/<name>/<N> | a path")


class SearchParam(_Section):
    """One dimension of the tuning space."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    condition: dict[str, Any] | None = None  # only sampled when another param has this value
    warm_only: bool = False  # only sampled when the trials warm-start (fine-tuning LR factor, replay share)

    @model_validator(mode="after")
    def _check(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical search param needs 'choices'")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"{self.type} search param needs low <= high")
        return self


class TuneConfig(_Section):
    enabled: bool = True
    n_trials: int = Field(8, ge=1)
    n_workers: int = Field(2, ge=1)
    storage: str = "sqlite:///{root}/optuna.db"  # {root} = paths.root; postgresql://... in prod
    sampler_seed: int = 42
    pruner: Literal["asha", "hyperband", "median", "none"] = "asha"
    min_resource: int = 1
    reduction_factor: int = 3
    epochs: int = Field(3, ge=1)  # max fidelity per trial
    proxy_fraction: float = Field(1.0, gt=0, le=1)  # of the proxy split
    multi_objective: bool = False
    # what trials minimize: dev WER; or dev CER / dev CTC loss where low-fidelity trials all sit
    # at WER 1.0 (the loss ranks trials even while their greedy output is still all blanks);
    # auto: dev WER when the trials warm-start from a parent model (their WER is a real signal),
    # dev loss when they start from scratch
    metric: Literal["dev_wer", "dev_cer", "dev_loss", "auto"] = "dev_wer"
    # a trial whose final greedy dev CER is at least this never left the CTC plateau (it decodes to
    # blanks); when no complete trial left it, their dev-loss ranking is noise (measured: 2.960 vs
    # 2.971, all at CER 1.0) and training uses the profile's config instead of an arbitrary draw
    plateau_cer: float = Field(0.95, gt=0, le=1.0)
    heartbeat_interval_s: int = 20
    grace_period_s: int = 60
    fidelity_check_top_k: int = 0  # 0 disables the proxy-vs-higher-fidelity rank correlation
    fidelity_epochs_factor: float = Field(2.0, ge=1.0)  # higher fidelity = this x epochs on the full proxy
    timeout_s: float | None = None  # a worker starts no new trial after this many seconds
    max_retry: int = Field(2, ge=0)  # re-runs of a trial whose worker died (heartbeat went stale)
    n_startup_trials: int | None = None  # random trials before TPE models; None = max(2, n_trials // 4)
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"  # lr vs sampled batch duration (see tune.py)
    max_params: int | None = None  # parameter budget: bigger sampled models are rejected (pruned, 0 epochs)
    trial_max_minutes: float | None = None  # wall-clock cap passed to fit for one trial
    latency_max_utts: int = Field(32, ge=1)  # dev utterances timed for the multi-objective latency
    plots: bool = True  # optimization history / intermediate values / importances plots (HTML + PNG)
    # a worker stops after this many failed trials in a row (NaN scores, crashes): failed trials
    # also count toward n_trials, so a study whose trials all fail ends instead of looping forever
    max_consecutive_failures: int = Field(3, ge=1)
    space: dict[str, SearchParam] = Field(default_factory=dict)


class GateConfig(_Section):
    min_wer_improvement: float = 0.0  # δ (absolute WER)
    min_probability: float = 0.9  # p
    max_slice_regression: float = 0.05  # ε (absolute WER)
    min_slice_words: int = 50
    absolute_wer_ceiling: float = 0.6  # with no production model yet
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0
    decode: Literal["greedy", "beam"] = "beam"
    # resampling unit of the paired bootstrap: speaker blocks when every golden utterance has a
    # speaker and there are at least min_speaker_blocks of them (auto), else utterances
    bootstrap_unit: Literal["auto", "speaker", "utterance"] = "auto"
    min_speaker_blocks: int = Field(4, ge=2)
    duration_buckets_s: list[float] = Field(default_factory=lambda: [2.0, 5.0, 10.0, 20.0])  # slice edges


class DecodeConfig(_Section):
    mode: Literal["greedy", "beam"] = "beam"  # asrflow transcribe / evaluate --model (the gate uses gate.decode)
    beam_size: int = 50
    lm_order: int = 3
    lm_weight: float = 0.8
    word_score: float = 0.0
    chunk_s: float = 16.0
    chunk_overlap_s: float = 2.0


class ExportConfig(_Section):
    opset: int = Field(17, ge=17)
    quantize_int8: bool = True
    int8_max_wer_delta: float = 0.01
    parity_atol: float = 1e-3
    register_file: Literal["int8_if_kept", "fp32"] = "int8_if_kept"  # which file promote registers


class RegistryConfig(_Section):
    tracking_uri: str = "sqlite:///{root}/mlflow.db"
    artifact_location: str = "{root}/mlruns"
    experiment: str = "asrflow"
    model_name: str = "asr"
    # the canary's WER ceiling on the newest week's dev data; None: the gate's own ceiling
    # (gate.absolute_wer_ceiling), so the canary is never looser than the gate by default
    canary_max_wer: float | None = None
    canary_max_utts: int = Field(2000, ge=1)  # newest-week dev utterances the canary decodes (at most)
    # `make pipeline-local WEEKS=N` (devstack.local_run): after a week whose gate passed, also move
    # `production` to it (canary included), so the next week starts from it. Production promotion
    # stays manual wherever this is false (the prod profile).
    auto_promote_production: bool = False


class AirflowConfig(_Section):
    gpu_pool: str = "gpu_pool"
    gpu_pool_size: int = 1
    retries: int = 2
    retry_delay_s: int = 30
    train_queue: str = "default"
    # hardening (issue 13): one hung task must not block every later run (max_active_runs=1)
    execution_timeout_s: float = Field(6 * 3600.0, gt=0)  # every task but the long ones
    long_execution_timeout_s: float = Field(72 * 3600.0, gt=0)  # train, tune workers
    # config keys a *trigger* (the DAG form's `overrides`) may set: fnmatch patterns on the dotted
    # key. The CLI (`--set`) is not limited: whoever runs it already has the machine. Default: the
    # training and model sections and the tuning budget; prod.yaml lists a strict set.
    trigger_override_allow: list[str] = Field(
        default_factory=lambda: [
            "train.*",
            "model.*",
            "tune.enabled",
            "tune.n_trials",
            "tune.n_workers",
            "tune.epochs",
            "tune.timeout_s",
            "tune.trial_max_minutes",
            "tune.proxy_fraction",
        ]
    )
    # profiles a trigger may pick (the form's enum); empty: every shipped profile. Read from the
    # scheduler's default profile (ASRFLOW_PROFILE): prod lists only itself, so a trigger cannot
    # pick a developer profile whose allow-list is "*"
    trigger_profiles: list[str] = Field(default_factory=list)
    # where the form's `landing_url` may point: URL / folder prefixes ({root} = paths.root; "*" =
    # anywhere). Empty: only the profile's own paths.landing_url and folders below it.
    allowed_landing_prefixes: list[str] = Field(default_factory=list)


class AsrflowConfig(_Section):
    profile: str = "local"
    paths: PathsConfig = PathsConfig()
    corpus: CorpusConfig = CorpusConfig()
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    features: FeatureConfig = FeatureConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    gate: GateConfig = GateConfig()
    decode: DecodeConfig = DecodeConfig()
    export: ExportConfig = ExportConfig()
    registry: RegistryConfig = RegistryConfig()
    airflow: AirflowConfig = AirflowConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    @field_validator("profile")
    @classmethod
    def _profile_name(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("profile must be a plain name")
        return v

    @model_validator(mode="after")
    def _speed_perturb_needs_factors(self) -> AsrflowConfig:
        if self.train.augment.speed_perturb and not self.features.speed_variants:
            raise ValueError(
                "train.augment.speed_perturb needs speed-perturbed features: set features.speed_factors "
                "(e.g. [0.9, 1.0, 1.1])"
            )
        return self

    @model_validator(mode="after")
    def _inter_ctc_layer_in_model(self) -> AsrflowConfig:
        if self.train.inter_ctc_weight > 0:
            k = self.train.inter_ctc_layer or self.model.n_layers // 2
            if not 0 < k < self.model.n_layers:
                raise ValueError(
                    f"train.inter_ctc_layer must be in 1..{self.model.n_layers - 1} (a block below the last) "
                    f"for model.n_layers={self.model.n_layers}, got {k}"
                )
        return self

    @model_validator(mode="after")
    def _ema_needs_replicated_params(self) -> AsrflowConfig:
        if self.train.ema_decay and self.train.zero_stage >= 3:
            raise ValueError("train.ema_decay averages full parameters: use train.zero_stage 0-2, or ema_decay 0")
        return self

    # -- helpers -----------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.paths.root)

    def path(self, name: str) -> str:
        """A path from ``paths``, already resolved against the root (may be a URL)."""
        return getattr(self.paths, name)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# ---------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------

_URL_PREFIXES = ("s3://", "gs://", "gcs://", "memory://", "file://", "http://", "https://", "az://")


def _is_url(s: str) -> bool:
    return s.startswith(_URL_PREFIXES) or "://" in s


def parse_value(raw: str) -> Any:
    """Parse an override's value with YAML rules (``3`` → int, ``true`` → bool, ``[1,2]`` → list)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def set_dotted(data: dict[str, Any], key: str, value: Any, *, create: bool = False) -> None:
    """Set ``data["a"]["b"]["c"] = value`` for ``key = "a.b.c"`` in place.

    With ``create``, missing sections are made (the typed config then rejects unknown keys);
    without it, a key that is not already there raises ``KeyError``.
    """
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"empty config key {key!r}")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None and create:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            if nxt is None:
                raise KeyError(key)
            raise ValueError(f"config key {key!r}: {p!r} is not a section")
        node = nxt
    if not create and parts[-1] not in node:
        raise KeyError(key)
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping; returns a new one."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        if not key.strip().strip("."):
            raise ValueError(f"override {item!r} has an empty key")
        try:
            set_dotted(out, key, parse_value(raw), create=True)
        except ValueError as e:
            raise ValueError(f"override {item!r}: {e}") from e
    return out


def with_overrides(cfg: AsrflowConfig, overrides: dict[str, Any] | None) -> AsrflowConfig:
    """A validated copy of ``cfg`` with ``{"train.lr": 0.002, ...}`` applied (typed values).

    The one applier for overrides that are already values (tuned configs, trial configs); an
    unknown key raises ``ValueError("... is not a config key")``. ``cfg`` itself when empty.
    """
    if not overrides:
        return cfg
    d = cfg.dump()
    for k, v in overrides.items():
        try:
            set_dotted(d, k, v)
        except KeyError as e:
            raise ValueError(f"{k!r} is not a config key") from e
    return config_from_dict(d)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str) -> str:
    """Fill ``${VAR}`` / ``${VAR:-default}`` from the environment (server URLs: ports, hosts).

    Used for ``tune.storage`` and ``registry.*``, so a profile can name a server whose port
    the environment chooses (``configs/distributed.yaml``: the local stack's ports).
    """

    def sub(m: re.Match[str]) -> str:
        val = os.environ.get(m.group(1))
        if val:
            return val
        if m.group(2) is not None:
            return m.group(2)
        raise ValueError(f"the config refers to ${{{m.group(1)}}}, which is not set in the environment")

    return _ENV_REF.sub(sub, value)


# profile values that may hold ${VAR} references (server URLs: ports, hosts, credentials). They
# are expanded in the profile file's own values only, before any override is applied: a value
# from an override or a trigger param is never expanded (``tune.storage=${SECRET}`` from the
# Airflow form must not resolve a secret of the worker's environment into the config).
_ENV_EXPANDED_KEYS = ("tune.storage", "registry.tracking_uri", "registry.artifact_location")


def _norm_key(key: str) -> str:
    return ".".join(p for p in key.strip().split(".") if p)


def _expand_profile_env(data: dict[str, Any], overridden: set[str]) -> None:
    """Expand ``${VAR}`` in the profile's :data:`_ENV_EXPANDED_KEYS` (in place), except for keys
    an override replaces anyway (so an overridden profile value needs no environment)."""
    for dotted in _ENV_EXPANDED_KEYS:
        parts = dotted.split(".")
        if any(".".join(parts[:i]) in overridden for i in range(1, len(parts) + 1)):
            continue
        node: Any = data
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(parts[-1]), str):
            node[parts[-1]] = expand_env(node[parts[-1]])


# ---------------------------------------------------------------------------------
# secrets: redaction of everything logged, stored in XCom or sent to MLflow
# ---------------------------------------------------------------------------------

REDACTED = "***"
# a key whose last component names a secret (password, db_password, aws_secret_access_key, api_key...)
_SECRET_KEY = re.compile(
    r"(?i)(^|[_.\-])(password|passwd|pwd|secret|token|api_?key|access_?key|private_?key|credentials?|auth)($|[_.\-])"
)
# userinfo of a URL: scheme://user:password@host or scheme://token@host
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<auth>[^/?#\s]*)@")
_URL_SECRET_QUERY = re.compile(
    r"(?i)(?P<k>[?&;](?:[A-Za-z0-9_.\-]*(?:password|passwd|pwd|secret|token|api_?key|access_?key|signature|credential)"
    r"[A-Za-z0-9_.\-]*|sig)=)[^&#\s]*"
)


def is_secret_key(key: str) -> bool:
    """Whether a config/record key names a credential (``password``, ``aws_secret_access_key``...)."""
    last = str(key).rsplit(".", 1)[-1]
    return bool(_SECRET_KEY.search(last))


def redact_url(value: str) -> str:
    """``value`` with URL credentials masked: ``user:pw@`` → ``user:***@``, ``token@`` → ``***@``,
    ``?password=x`` / ``?token=x`` / ``?X-Amz-Signature=x`` → ``...=***``. Other text is unchanged."""

    def userinfo(m: re.Match[str]) -> str:
        user, colon, _ = m.group("auth").partition(":")  # up to the authority's last '@'
        return f"{m.group('scheme')}{user}:{REDACTED}@" if colon else f"{m.group('scheme')}{REDACTED}@"

    out = _URL_USERINFO.sub(userinfo, value)
    return _URL_SECRET_QUERY.sub(lambda m: m.group("k") + REDACTED, out)


def redact_secrets(obj: Any, key: str = "") -> Any:
    """A copy of ``obj`` (dicts, lists, strings, scalars; a pydantic model is dumped first) with
    every credential masked: values under a key named like a secret, and URL userinfo / secret
    query parameters inside any string. Use it on every config or record that is logged, pushed
    to XCom or sent to MLflow."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json", by_alias=True)
    if key and is_secret_key(key) and obj not in (None, "", [], {}) and not isinstance(obj, (dict, bool)):
        return REDACTED
    if isinstance(obj, dict):
        return {k: redact_secrets(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    if isinstance(obj, str):
        return redact_url(obj)
    return obj


def redact_override(item: str) -> str:
    """A ``key=value`` override as it may be logged: the value masked when the key names a secret."""
    key, sep, value = str(item).partition("=")
    if sep and is_secret_key(_norm_key(key)):
        return f"{key}={REDACTED}"
    return redact_url(str(item))


# ---------------------------------------------------------------------------------
# what a trigger (the Airflow form) may change
# ---------------------------------------------------------------------------------


class TriggerOverrideError(ValueError):
    """A trigger tried to set a config key or landing zone its profile does not allow."""


def _under_prefix(value: str, prefix: str) -> bool:
    if prefix == "*":
        return True
    if _is_url(value) or _is_url(prefix):
        if not (_is_url(value) and _is_url(prefix)):
            return False
        if "\x00" in value or any(seg in ("..", ".") for seg in value.split("://", 1)[1].split("/")):
            return False  # no traversal inside a URL
        p = prefix.rstrip("/")
        return value.rstrip("/") == p or value.startswith(p + "/")
    try:
        v, p = os.path.realpath(value), os.path.realpath(prefix)
    except (ValueError, OSError):
        return False
    return v == p or v.startswith(p.rstrip(os.sep) + os.sep)


def check_landing_url(cfg: AsrflowConfig, profile_cfg: AsrflowConfig) -> None:
    """Raise :class:`TriggerOverrideError` unless ``cfg.paths.landing_url`` (already resolved)
    falls under one of ``profile_cfg.airflow.allowed_landing_prefixes`` (default: the profile's
    own landing zone)."""
    url = cfg.paths.landing_url
    root = profile_cfg.paths.root
    prefixes = list(profile_cfg.airflow.allowed_landing_prefixes) or [profile_cfg.paths.landing_url]
    resolved = []
    for pre in prefixes:
        pre = pre.replace("{root}", root)
        if pre != "*" and not _is_url(pre) and not os.path.isabs(os.path.expanduser(pre)):
            pre = str(Path(root) / pre)
        resolved.append(pre if pre == "*" or _is_url(pre) else os.path.expanduser(pre))
    if not any(_under_prefix(url, pre) for pre in resolved):
        raise TriggerOverrideError(
            f"landing_url {redact_url(url)!r} is not under an allowed landing prefix of profile "
            f"{profile_cfg.profile!r} (airflow.allowed_landing_prefixes: {[redact_url(p) for p in resolved]})"
        )


def check_trigger_overrides(profile_cfg: AsrflowConfig, overrides: list[str]) -> None:
    """Raise :class:`TriggerOverrideError` naming every override whose key the profile's
    ``airflow.trigger_override_allow`` patterns do not match."""
    from fnmatch import fnmatchcase

    allow = list(profile_cfg.airflow.trigger_override_allow)
    bad = []
    for item in overrides:
        key = _norm_key(str(item).split("=", 1)[0])
        if not any(fnmatchcase(key, pat) for pat in allow):
            bad.append(key or str(item))
    if bad:
        raise TriggerOverrideError(
            f"the trigger may not set {', '.join(repr(b) for b in bad)}: profile {profile_cfg.profile!r} "
            f"allows only {allow} (airflow.trigger_override_allow); change the profile file, or run the "
            "step from the CLI with --set"
        )


def load_trigger_config(
    profile: str | os.PathLike[str],
    overrides: list[str] | None = None,
    landing_url: str | None = None,
    form_overrides: list[str] | None = None,
) -> AsrflowConfig:
    """The config of a triggered run: ``overrides`` typed by the person who triggered it must
    match the profile's allow-list, ``landing_url`` must fall under an allowed prefix, and no
    value from either is ``${VAR}``-expanded. ``form_overrides`` are overrides the form's own
    typed fields stand for (``tune.n_trials``, ``train.epochs``): bounded by the form, not
    allow-listed. Everything applies in the order landing_url, form_overrides, overrides."""
    base = load_config(profile)
    user = [str(o) for o in overrides or []]
    check_trigger_overrides(base, user)
    pre = [f"paths.landing_url={landing_url}"] if landing_url else []
    cfg = load_config(profile, pre + list(form_overrides or []) + user)
    if landing_url:
        check_landing_url(cfg, base)
    return cfg


def _resolve_paths(cfg: AsrflowConfig, base: Path) -> AsrflowConfig:
    """Make ``paths.root`` absolute (relative to ``base``) and the other paths absolute under it."""
    p = cfg.paths
    root = p.root
    if not _is_url(root):
        root_path = Path(os.path.expanduser(root))
        if not root_path.is_absolute():
            root_path = (base / root_path).resolve()
        root = str(root_path)
    updates: dict[str, str] = {"root": root}
    for name in ("landing_url", "golden_dir", "data_workspace", "dvc_remote", "quarantine_dir"):
        val = getattr(p, name)
        if _is_url(val):
            updates[name] = val
        else:
            vp = Path(os.path.expanduser(val))
            updates[name] = str(vp if vp.is_absolute() else Path(root) / vp)
    new_paths = p.model_copy(update=updates)
    # ${VAR} was expanded in the profile's values before overrides (_expand_profile_env); only
    # {root} is filled here, by plain replacement (str.format would also evaluate {root.attr})
    tune = cfg.tune.model_copy(update={"storage": cfg.tune.storage.replace("{root}", root)})
    reg = cfg.registry.model_copy(
        update={
            "tracking_uri": cfg.registry.tracking_uri.replace("{root}", root),
            "artifact_location": cfg.registry.artifact_location.replace("{root}", root),
        }
    )
    return cfg.model_copy(update={"paths": new_paths, "tune": tune, "registry": reg})


def profile_path(profile: str | os.PathLike[str]) -> Path:
    """``local`` → ``configs/local.yaml``; a path is taken as it is."""
    p = Path(profile)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / f"{profile}.yaml"


def load_config(
    profile: str | os.PathLike[str] = "local",
    overrides: list[str] | None = None,
    base_dir: Path | None = None,
) -> AsrflowConfig:
    """Load a profile, apply overrides, validate and resolve paths.

    ``ASRFLOW_ROOT`` in the environment overrides ``paths.root`` (tests use it to point
    a profile at a temporary folder); explicit overrides win over it.
    """
    path = profile_path(profile)
    if not path.exists():
        raise FileNotFoundError(f"no config profile {profile!r} (looked for {path})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile must be a mapping")
    data.setdefault("profile", path.stem)
    env_root = os.environ.get("ASRFLOW_ROOT")
    pre = [f"paths.root={env_root}"] if env_root else []
    _expand_profile_env(data, {_norm_key(str(o).split("=", 1)[0]) for o in overrides or []})
    data = apply_overrides(data, pre + list(overrides or []))
    cfg = AsrflowConfig.model_validate(data)
    return _resolve_paths(cfg, base_dir or REPO_ROOT)


def config_from_dict(data: dict[str, Any]) -> AsrflowConfig:
    """Rebuild a config that was dumped with :meth:`AsrflowConfig.dump` (paths already resolved)."""
    return AsrflowConfig.model_validate(data)


def canary_limit(cfg: AsrflowConfig) -> float:
    """The canary's WER ceiling: ``registry.canary_max_wer``, else the gate's absolute ceiling."""
    r = cfg.registry.canary_max_wer
    return float(cfg.gate.absolute_wer_ceiling if r is None else r)

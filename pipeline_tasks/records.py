"""Typed step result records: what each step returns, and so what its downstream steps read.

Results travel as XCom values (JSON), so they are plain dicts at run time; these ``TypedDict``
classes give them names and fields in one place (``docs/INTERFACES.md`` describes each field),
and steps annotate their inputs with :class:`StepInputs` so a type checker catches a misspelt
key. File names in a record are relative to its ``output_dir`` (use ``contract.resolve``).
Fields every record has (added by ``contract.run_step``) are in :class:`StepResult`.
"""

from __future__ import annotations

from typing import Any, TypedDict


class StepResult(TypedDict, total=False):
    step: str
    key: str
    output_dir: str  # absolute: <root>/<step>/<key>


class IngestResult(StepResult, total=False):
    manifest: str  # UTTERANCE_SCHEMA parquet: every ingested utterance
    manifest_md5: str
    snapshot_md5: str  # DVC md5 of the workspace data
    dvc_tag: str
    dvc_commit: str
    new_commit: bool
    n_rows: int
    n_new: int
    n_landing_rows: int
    n_skipped: int  # landing rows ingested before from the same bytes: not decoded again
    n_manifests_unchanged: int  # landing manifests fully ingested before and unchanged: not parsed again
    n_orphans_removed: int  # raw files stored for rows then refused (duplicates): deleted again
    quarantine: str  # QUARANTINE_SCHEMA parquet
    n_quarantined: int
    quarantine_reasons: dict[str, int]
    workspace: str  # absolute: the data workspace audio paths are relative to
    batches: list[str]
    landing_fingerprint: str
    timings: dict[str, float]


class ValidateResult(StepResult, total=False):
    manifest: str  # accepted rows, UTTERANCE_SCHEMA
    manifest_md5: str
    quarantine: str
    n_accepted: int
    n_quarantined: int
    n_quarantined_validate: int
    n_long_form: int
    n_rows_checked: int  # rows run through the row suite; the rest passed it before with the same values
    report_html: str  # GX Data Docs
    summary: str
    snapshot_md5: str
    workspace: str
    dvc_tag: str
    batches: list[str]


class FeaturizeResult(StepResult, total=False):
    index: str  # FEATURE_INDEX_SCHEMA parquet
    index_md5: str
    feature_hash: str
    n_utts: int
    n_long_form: int
    n_computed: int
    n_shards_written: int
    audio_hours_computed: float
    cache_dir: str
    snapshot_md5: str | None  # the DVC snapshot the features come from
    dvc_tag: str | None
    # only with features.speed_factors: factor ("0.9") -> index of the speed copy (same rows as index)
    speed_indexes: dict[str, str]
    speed_indexes_md5: dict[str, str]
    n_computed_by_speed: dict[str, int]  # "1" = the plain cache


class GoldenResult(StepResult, total=False):
    index: str
    manifest: str
    slices: str  # parquet: id + slice labels (synth, condition) from the golden manifest
    slice_kinds: list[str]
    golden_md5: str
    n_utts: int
    feature_hash: str


class SplitResult(StepResult, total=False):
    train: str
    dev: str
    proxy: str
    train_md5: str
    dev_md5: str
    proxy_md5: str
    n_train: int
    n_dev: int
    n_proxy: int
    n_golden_excluded: int
    hours_train: float
    hours_dev: float
    hours_proxy: float
    golden_md5: str
    feature_hash: str
    index_md5: str
    snapshot_md5: str | None
    dvc_tag: str | None
    # only when featurize wrote speed copies: factor ("0.9") -> train_sp0.9.parquet / proxy_sp0.9.parquet
    train_speed: dict[str, str]
    train_speed_md5: dict[str, str]
    proxy_speed: dict[str, str]
    proxy_speed_md5: dict[str, str]


class TuneResult(StepResult, total=False):
    best_overrides: dict[str, Any]  # dotted config key -> value; {} when disabled or no signal
    best_value: float | None
    metric: str
    study_name: str
    storage: str  # credentials redacted
    n_trials_complete: int
    n_trials_pruned: int
    best_config: str
    workers: list[int]
    trials: str
    importances: str
    plots: list[str]
    pareto_front: str | None
    fidelity_check: str | None
    fidelity_spearman: float | None
    mlflow_run_id: str | None
    no_signal: str | None


class TrainResult(StepResult, total=False):
    model_dir: str  # packaging format (model_code.packaging)
    history: str
    curve: str
    dev_wer: float | None
    dev_cer: float | None
    epochs: int
    steps: int
    train_md5: str
    dev_md5: str
    mlflow_run_id: str
    train_hours: float | None
    wall_s: float
    train_s: float
    audio_s_per_s: float
    stopped_early: bool
    resumed_from: int | None
    params: int
    world_size: int
    applied_overrides: dict[str, Any]
    init: str  # "warm" | "scratch"
    parent: dict[str, Any]  # services.parent.Parent.record()
    lineage: dict[str, Any]  # batches, new_batches, parent_version, snapshot, train minutes
    # throughput accounting (services.multinode.throughput): per node audio-s/s, per rank
    # data-wait and all-reduce shares of step time (all-reduce 0 for world size 1)
    throughput: dict[str, Any]
    nnodes: int  # nodes (mapped train_node tasks) that trained it; 1: the single train task
    # train.ema_decay > 0: decay, dev_{wer,cer,loss}_{ema,raw}, used ("ema" | "raw"); else None
    ema: dict[str, Any] | None
    # the precision the run used: train.precision resolved on its device (fp32, bf16, fp16,
    # bf16-autocast = bf16 compute with fp32 weights on a CPU with native bf16)
    precision: str | None


class EvaluateResult(StepResult, total=False):
    decision: str
    report: str
    report_html: str
    plot: str
    passed: bool
    reason: str
    candidate_wer: float
    candidate_cer: float
    champion_wer: float | None
    champion_version: str | None
    champion_alias: str | None  # "production" | "staging"
    staging_version: str | None  # staging, judged too when it is not the champion
    staging_wer: float | None
    beats_staging: bool | None
    served: str
    p_better: float | None
    ci95: list[float] | None
    mlflow_run_id: str
    decode_used: str
    lineage: dict[str, Any]


class ExportResult(StepResult, total=False):
    served: str  # "int8" | "fp32": the file the gate judges and promote registers
    served_onnx: str
    served_md5: str
    torch_model_dir: str  # absolute: the train step's packaged model (weights.pt, model.json)
    onnx: str
    onnx_md5: str
    onnx_int8: str | None
    onnx_int8_md5: str | None
    int8_kept: bool
    parity_max_abs_diff: float
    parity_transcripts_equal: bool
    wer_fp32: float
    wer_int8: float | None
    lexicon: str | None
    lm: str | None
    report: str
    rtfx: dict[str, Any]
    n_mels: int
    vocab_size: int
    lineage: dict[str, Any]


class PromoteResult(StepResult, total=False):
    registered: bool
    model_name: str
    version: str | None
    alias: str | None
    alias_moved: bool
    reason: str
    new_version_created: bool
    candidate_key: str
    onnx_file: str  # "int8" | "fp32"
    model_uri: str


class StepInputs(TypedDict, total=False):
    """A step's ``inputs``: its upstream steps' results by step name (``pipeline_tasks.graph``)."""

    ingest: IngestResult
    validate: ValidateResult
    featurize: FeaturizeResult
    golden: GoldenResult
    split: SplitResult
    tune: TuneResult
    train: TrainResult
    evaluate: EvaluateResult
    export: ExportResult


RECORDS: dict[str, type] = {
    "ingest": IngestResult,
    "validate": ValidateResult,
    "featurize": FeaturizeResult,
    "golden": GoldenResult,
    "split": SplitResult,
    "tune": TuneResult,
    "train": TrainResult,
    "evaluate": EvaluateResult,
    "export": ExportResult,
    "promote": PromoteResult,
}

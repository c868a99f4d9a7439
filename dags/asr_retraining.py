"""
### asr_retraining — weekly retraining of the speech recognizer

Runs every **Monday 03:00 UTC** (or when you press *Trigger*; `ASRFLOW_RETRAIN_SCHEDULE=none` in
the scheduler's environment turns the weekly run off). It takes the speech batches
that arrived in the landing zone, checks them against the data contracts, caches log-mel
features, tunes hyperparameters on a proxy subset, trains the full model (GPU pool),
exports it to ONNX, evaluates the exported file on the fixed golden set against the current champion, and
moves the MLflow alias **`staging`** to it only if the gate passes.

| task | what it does |
| --- | --- |
| `ingest` | decode/resample the new landing batches, content-hash, DVC-track + push the raw snapshot (retried) |
| `validate` | manifest schema + Great Expectations suite; bad rows to quarantine; a bad batch stops the run |
| `featurize_plan` → `featurize_shard` (mapped) → `featurize_finalize` | log-mel features in Parquet shards, one mapped task per shard; only new utterances are computed |
| `golden` | the fixed golden set (features), independent of the week's data |
| `split` | train / dev / proxy split (golden utterances excluded) |
| `tune_prepare` → `tune_worker` (mapped) → `tune_finalize` | Optuna study on the proxy set; workers share one study; finalize picks the best config |
| `train_plan` → `train_node` (mapped) → `train` | DeepSpeed training, warm-started from the current model with replay of older weeks (pool `gpu_pool`). One node (`train.nnodes: 1`): no `train_node`, `train` trains. N nodes: one `train_node` per node (gpu queue, pool) meeting in torchrun's c10d rendezvous, then `train` gathers rank 0's result. `train.launcher: pytorchjob`: no `train_node`, `train` submits and follows a Kubernetes PyTorchJob |
| `export` | ONNX export + onnxruntime parity check (+ int8); picks the file that serves |
| `evaluate` | golden-set WER/CER per slice of that exact file, vs the champion (production, else staging), CI → gate decision |
| `promote_gate` | short-circuit: skips `promote` (reason logged and in XCom `skip_reason`) when the gate failed or **promote** is off |
| `promote` | register the model version in MLflow and point `staging` at it |

Every step is keyed by its config and input hashes and cached: a rerun with unchanged data
recomputes nothing and registers nothing new.

**Params** (trigger form; a scheduled run uses the defaults):
`profile` — configs/&lt;name&gt;.yaml to run with; `landing_url` — landing zone folder/URL (empty: the
profile's); `n_trials` — Optuna trials; `epochs` — training epochs; `force` — recompute every step;
`promote` — off = only evaluate/export, never move `staging`; `overrides` — extra `key.sub=value`
config overrides, one per line.

Published assets: `asrflow://raw-snapshot`, `asrflow://features`, `asrflow://candidate-model`,
`asrflow://model-staging`. Production promotion is the separate manual DAG `asr_promote_production`.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime

# DAG-side helpers live next to this file (dags/_common.py); make them importable however the
# file is loaded (dag-processor, task runner, a DagBag on another folder in tests).
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    default_args,
    force_flag,
    retrain_schedule,
    retry_kwargs,
    run_config,
    run_params,
    run_step,
    task_settings,
)
from airflow.sdk import Asset, TriggerRule, dag, task

RAW_SNAPSHOT = Asset("asrflow://raw-snapshot")
FEATURES = Asset("asrflow://features")
CANDIDATE_MODEL = Asset("asrflow://candidate-model")
STAGING_MODEL = Asset("asrflow://model-staging")

_S = task_settings()


@dag(
    dag_id="asr_retraining",
    schedule=retrain_schedule(),  # "0 3 * * 1": Mondays 03:00 UTC
    start_date=datetime(2026, 1, 5, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    params=run_params(),
    doc_md=__doc__,
    tags=["asrflow", "retraining"],
    default_args=default_args(),  # finite execution_timeout on every task (airflow.execution_timeout_s)
    render_template_as_native_obj=False,
)
def asr_retraining():
    @task(task_id="ingest", multiple_outputs=False, outlets=[RAW_SNAPSHOT], **retry_kwargs(task="ingest"))
    def ingest() -> dict:
        return run_step("ingest", {})

    @task(task_id="validate", multiple_outputs=False)
    def validate(ingest_res: dict) -> dict:
        return run_step("validate", {"ingest": ingest_res})

    @task(task_id="featurize_plan", multiple_outputs=False)
    def featurize_plan(validate_res: dict) -> list[dict]:
        from pipeline_tasks.steps import featurize

        shards = list(featurize.plan(run_config(), {"validate": validate_res}))
        print(f"featurize: {len(shards)} shard(s) to compute")
        return shards

    @task(task_id="featurize_shard", multiple_outputs=False, **retry_kwargs(1, task="featurize_shard"))
    def featurize_shard(shard: dict, validate_res: dict) -> dict:
        from pipeline_tasks.steps import featurize

        return featurize.run_shard(run_config(), {"validate": validate_res}, shard)

    @task(
        task_id="featurize_finalize",
        multiple_outputs=False,
        outlets=[FEATURES],
        trigger_rule=TriggerRule.NONE_FAILED,
    )
    def featurize_finalize(validate_res: dict, shard_results) -> dict:
        from pipeline_tasks.steps import featurize

        results = [shard_results[i] for i in range(len(shard_results))] if shard_results else []
        return featurize.finalize(run_config(), {"validate": validate_res}, results, force=force_flag())

    @task(task_id="golden", multiple_outputs=False)
    def golden() -> dict:
        return run_step("golden", {})

    @task(task_id="split", multiple_outputs=False)
    def split(featurize_res: dict, golden_res: dict) -> dict:
        return run_step("split", {"featurize": featurize_res, "golden": golden_res})

    @task(task_id="tune_prepare", multiple_outputs=False, **retry_kwargs(task="tune_prepare"))
    def tune_prepare(split_res: dict, **context) -> list[int]:
        """Open (or find) the Optuna study; returns the worker indices to map over."""
        from pipeline_tasks.steps import tune

        cfg = run_config()
        prep = tune.prepare(cfg, {"split": split_res})
        context["ti"].xcom_push(key="prepare", value=prep)
        workers = list(range(cfg.tune.n_workers)) if cfg.tune.enabled else []
        print(f"tune: {len(workers)} worker(s), {cfg.tune.n_trials} trial(s), enabled={cfg.tune.enabled}")
        return workers

    @task(task_id="tune_worker", multiple_outputs=False, **retry_kwargs(task="tune_worker"))
    def tune_worker(worker_index: int, split_res: dict) -> dict:
        from pipeline_tasks.steps import tune

        return tune.run_worker(run_config(), {"split": split_res}, int(worker_index))

    @task(
        task_id="tune_finalize",
        multiple_outputs=False,
        trigger_rule=TriggerRule.NONE_FAILED,
        **retry_kwargs(task="tune_finalize"),
    )
    def tune_finalize(split_res: dict, worker_results) -> dict:
        from pipeline_tasks.steps import tune

        results = [worker_results[i] for i in range(len(worker_results))] if worker_results else []
        return tune.finalize(run_config(), {"split": split_res}, results, force=force_flag())

    @task(task_id="train_plan", multiple_outputs=False, **retry_kwargs(task="train_plan"))
    def train_plan(split_res: dict, tune_res: dict) -> list[dict]:
        """The nodes of a multi-node training (`train.nnodes` > 1); none for one node: `train` trains."""
        from pipeline_tasks.steps import train as train_step

        nodes = train_step.plan(run_config(), {"split": split_res, "tune": tune_res}, force=force_flag())
        print(f"train: {len(nodes) or 'no'} mapped train_node task(s)")
        return nodes

    @task(
        task_id="train_node",
        multiple_outputs=False,
        pool=_S["gpu_pool"],
        pool_slots=_S["gpu_pool_slots"],
        queue=_S["train_queue"],
        **retry_kwargs(1, task="train_node"),
    )
    def train_node(node: dict, split_res: dict, tune_res: dict) -> dict:
        """One node of a multi-node training: torchrun with the c10d rendezvous node 0 publishes."""
        from pipeline_tasks.config import redact_secrets
        from pipeline_tasks.steps import train as train_step

        inputs = {"split": split_res, "tune": tune_res}
        return redact_secrets(train_step.run_node(run_config(), inputs, node, force=force_flag()))

    @task(
        task_id="train",
        multiple_outputs=False,
        pool=_S["gpu_pool"],
        pool_slots=_S["gpu_pool_slots"],
        queue=_S["train_queue"],
        trigger_rule=TriggerRule.NONE_FAILED,  # runs when train_node was skipped (one node)
        **retry_kwargs(1, task="train"),
    )
    def train(split_res: dict, tune_res: dict, node_results) -> dict:
        nodes = [node_results[i] for i in range(len(node_results))] if node_results else []
        if not nodes:  # one node: train here, exactly as a single task always did
            return run_step("train", {"split": split_res, "tune": tune_res})
        from pipeline_tasks.config import redact_secrets
        from pipeline_tasks.steps import train as train_step

        inputs = {"split": split_res, "tune": tune_res}
        return redact_secrets(train_step.finalize_nodes(run_config(), inputs, nodes, force=force_flag()))

    @task(task_id="export", multiple_outputs=False, outlets=[CANDIDATE_MODEL])
    def export(train_res: dict, golden_res: dict) -> dict:
        return run_step("export", {"train": train_res, "golden": golden_res})

    @task(task_id="evaluate", multiple_outputs=False, **retry_kwargs(task="evaluate"))
    def evaluate(train_res: dict, golden_res: dict, export_res: dict) -> dict:
        return run_step("evaluate", {"train": train_res, "golden": golden_res, "export": export_res})

    @task.short_circuit(task_id="promote_gate")
    def promote_gate(evaluate_res: dict, **context) -> bool:
        """Go on to `promote` only when the gate passed and the run's `promote` param is on."""
        from pipeline_tasks.steps import promote

        gate = promote.gate_decision(evaluate_res, bool(context["params"].get("promote", True)))
        ok, reason = gate["promote"], gate["reason"]
        figures = {k: v for k, v in gate.items() if k not in ("promote", "reason")}
        print(f"promote_gate: {'PROMOTE' if ok else 'SKIP'} — {reason}; figures: {figures}")
        ti = context["ti"]
        ti.xcom_push(key="skip_reason", value=None if ok else reason)
        ti.xcom_push(key="gate", value=gate)
        return ok

    @task(task_id="promote", multiple_outputs=False, outlets=[STAGING_MODEL], **retry_kwargs(task="promote"))
    def promote(export_res: dict, evaluate_res: dict) -> dict:
        return run_step("promote", {"export": export_res, "evaluate": evaluate_res})

    ing = ingest()
    val = validate(ing)
    shards = featurize_plan(val)
    shard_results = featurize_shard.partial(validate_res=val).expand(shard=shards)
    feat = featurize_finalize(val, shard_results)
    gold = golden()
    spl = split(feat, gold)
    prep = tune_prepare(spl)
    worker_results = tune_worker.partial(split_res=spl).expand(worker_index=prep)
    tuned = tune_finalize(spl, worker_results)
    nodes = train_plan(spl, tuned)
    node_results = train_node.partial(split_res=spl, tune_res=tuned).expand(node=nodes)
    trained = train(spl, tuned, node_results)
    ex = export(trained, gold)
    ev = evaluate(trained, gold, ex)
    gate = promote_gate(ev)
    ex >> gate
    promoted = promote(ex, ev)
    gate >> promoted


asr_retraining()

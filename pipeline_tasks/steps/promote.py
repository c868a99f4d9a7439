"""The ``promote`` step and the production promotion / rollback of the MLflow registry.

``run`` (the pipeline step, inputs ``export`` + ``evaluate``): when the gate passed, register the
exported ONNX model (int8 when export kept it, else fp32; ``export.register_file``) as a new version
of ``registry.model_name`` with the ONNX flavor (``onnx_execution_providers=["CPUExecutionProvider"]``,
a tensor signature), tagged with the gate's figures and the lineage (training-data md5, golden md5,
git commit, Optuna study, Airflow run id), and point the alias ``staging`` at it. A failed gate
registers nothing (``registered: false`` + the gate's reason).

``promote_production`` (manual DAG / ``asrflow promote-production``): canary-check the ``staging``
version (its registered ONNX, decoded like the gate) on the newest week's dev data (dev rows of the
latest split whose ``batch`` is the newest), require WER < ``registry.canary_max_wer``, then move
``previous-production`` to the old production version and ``production`` to staging.

``rollback``: ``production`` ← ``previous-production``; the rolled-back version is tagged
``asrflow.rolled_back`` (and is never promoted again by ``promote_production``).

Idempotency (side effects outside the artifact root): every version carries the tag
``asrflow.candidate_key`` (the export step's key); registration first searches for it, so a rerun
creates no second version. The ``staging`` alias is set once per version (tag ``asrflow.staged``),
so a rerun of an old pipeline run never moves ``staging`` back. ``promote_production`` and
``rollback`` are no-ops when the aliases already say what they would set. Registry mutations are
serialized by a file lock under the artifact root.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig, canary_limit
from pipeline_tasks.contract import file_md5, resolve, run_step, step_key
from pipeline_tasks.records import PromoteResult, StepInputs
from pipeline_tasks.services.registry import (
    PREVIOUS,
    PRODUCTION,
    STAGING,
    TAG_CANDIDATE,
    TAG_CHAMPION_ALIAS,
    TAG_CHAMPION_VERSION,
    TAG_ROLLED_BACK,
    TAG_STAGED,
)

log = logging.getLogger(__name__)

STEP = "promote"
CODE_VERSION = "1"



def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@contextmanager
def registry_lock(cfg: AsrflowConfig, timeout_s: float = 600):
    """Serialize registry mutations of this artifact root (a file lock next to the MLflow DB)."""
    from filelock import FileLock

    cfg.root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cfg.root / f".registry-{cfg.registry.model_name}.lock"), timeout=timeout_s):
        yield


def _tag_str(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:4900]


def find_candidate(client, name: str, candidate_key: str):
    """Registered versions of ``name`` tagged with ``candidate_key`` (oldest first)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and tags.`{TAG_CANDIDATE}` = '{candidate_key}'")
    except MlflowException:
        return []
    return sorted(found, key=lambda mv: int(str(mv.version)))


def _signature(n_mels: int, vocab_size: int):
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from model_code.onnx_runtime import INPUT_FEATURES, INPUT_LENGTHS, OUTPUT_LENGTHS, OUTPUT_LOGPROBS

    return ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, -1, n_mels), INPUT_FEATURES),
                TensorSpec(np.dtype(np.int64), (-1,), INPUT_LENGTHS),
            ]
        ),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, -1, vocab_size), OUTPUT_LOGPROBS),
                TensorSpec(np.dtype(np.int64), (-1,), OUTPUT_LENGTHS),
            ]
        ),
    )


def _version_tags(cfg: AsrflowConfig, export: dict[str, Any], evaluate: dict[str, Any], which: str) -> dict[str, str]:
    lin = {**(export.get("lineage") or {}), **{k: v for k, v in (evaluate.get("lineage") or {}).items() if v}}
    tags = {
        TAG_CANDIDATE: export["key"],
        "asrflow.export_key": export["key"],
        "asrflow.evaluate_key": evaluate["key"],
        "asrflow.onnx_file": which,
        "asrflow.onnx_md5": export["onnx_int8_md5"] if which == "int8" else export["onnx_md5"],
        "asrflow.train_md5": lin.get("train_md5"),
        "asrflow.golden_md5": lin.get("golden_md5"),
        "asrflow.git_commit": lin.get("git_commit"),
        "asrflow.train_key": lin.get("train_key"),
        "asrflow.optuna_study": lin.get("study_name"),
        "asrflow.train_mlflow_run_id": lin.get("train_mlflow_run_id"),
        "asrflow.evaluate_mlflow_run_id": evaluate.get("mlflow_run_id"),
        "asrflow.airflow_run_id": os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"),
        "asrflow.gate_passed": str(bool(evaluate["passed"])).lower(),
        "asrflow.gate_reason": evaluate["reason"],
        "asrflow.gate_candidate_wer": evaluate["candidate_wer"],
        "asrflow.gate_candidate_cer": evaluate["candidate_cer"],
        "asrflow.gate_champion_wer": evaluate.get("champion_wer"),
        TAG_CHAMPION_VERSION: evaluate.get("champion_version") or "none",
        TAG_CHAMPION_ALIAS: evaluate.get("champion_alias"),
        "asrflow.gate_staging_version": evaluate.get("staging_version"),
        "asrflow.gate_staging_wer": evaluate.get("staging_wer"),
        # lineage of continual training
        "asrflow.parent_version": lin.get("parent_version") or "scratch",
        "asrflow.data_snapshot_tag": lin.get("data_snapshot_tag"),
        "asrflow.data_snapshot_md5": lin.get("data_snapshot_md5"),
        "asrflow.batches": ",".join(lin.get("batches") or []) or None,
        "asrflow.new_batches": ",".join(lin.get("new_batches") or []) or None,
        "asrflow.train_minutes": lin.get("train_minutes"),
        "asrflow.gate_p_better": evaluate.get("p_better"),
        "asrflow.gate_ci95": evaluate.get("ci95"),
        "asrflow.gate_decode": evaluate.get("decode_used"),
        "asrflow.export_wer_fp32": export.get("wer_fp32"),
        "asrflow.export_wer_int8": export.get("wer_int8"),
        "asrflow.parity_max_abs_diff": export.get("parity_max_abs_diff"),
    }
    return {k: _tag_str(v) for k, v in tags.items() if v is not None}


def _log_and_register(
    cfg: AsrflowConfig, export: dict[str, Any], onnx_path: Path, tags: dict[str, str], torch_model_dir: str | None
):
    """Log the ONNX model in an MLflow run (reused by candidate key) and register it with ``tags``."""
    import mlflow
    import onnx
    import onnxruntime

    from pipeline_tasks.services.registry import registry_client
    from pipeline_tasks.services.tracking import mlflow_setup

    exp_id = mlflow_setup(cfg)
    client = registry_client(cfg)
    ckey = tags[TAG_CANDIDATE]
    runs = client.search_runs([exp_id], filter_string=f"tags.`{TAG_CANDIDATE}` = '{ckey}'", max_results=1)
    run_id = runs[0].info.run_id if runs else client.create_run(
        exp_id, run_name=f"promote-{ckey}", tags={"asrflow.step": STEP, TAG_CANDIDATE: ckey}
    ).info.run_id
    extra = [str(resolve(export, export[k])) for k in ("lexicon", "lm") if export.get(k)]
    # the torch weights travel with the ONNX file: the next week's training starts from them
    torch_dir = Path(torch_model_dir) if torch_model_dir else None
    if torch_dir is not None and (torch_dir / "weights.pt").is_file():
        extra += [str(torch_dir / "weights.pt"), str(torch_dir / "model.json")]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="model",
            onnx_execution_providers=["CPUExecutionProvider"],
            signature=_signature(int(export["n_mels"]), int(export["vocab_size"])),
            save_as_external_data=False,
            extra_files=extra or None,
            pip_requirements=[f"onnxruntime=={onnxruntime.__version__}", f"onnx=={onnx.__version__}", "numpy"],
            tags={TAG_CANDIDATE: ckey},
        )
        mlflow.log_artifact(str(resolve(export, export["report"])), artifact_path="export")
    mv = mlflow.register_model(info.model_uri, cfg.registry.model_name, tags=tags)
    return mv


def run(cfg: AsrflowConfig, inputs: StepInputs, force: bool = False) -> PromoteResult:
    export, evaluate = inputs["export"], inputs["evaluate"]
    key = step_key(
        STEP,
        {"registry": cfg.registry.model_name, "register": cfg.export.register_file},
        {"export": export["key"], "evaluate": evaluate["key"]},
        CODE_VERSION,
    )

    def work(tmp: Path) -> dict[str, Any]:
        from pipeline_tasks.services.registry import registry_client

        name = cfg.registry.model_name
        client = registry_client(cfg)
        base = {"model_name": name, "candidate_key": export["key"], "airflow_run_id": os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")}
        if not evaluate["passed"]:
            existing = find_candidate(client, name, export["key"])
            out = {
                **base,
                "registered": False,
                "version": None,
                "alias": None,
                "alias_moved": False,
                "new_version_created": False,
                "reason": f"gate failed, not registered: {evaluate['reason']}",
                "existing_version": existing[0].version if existing else None,
            }
            (tmp / "promote.json").write_text(json.dumps(out, indent=2) + "\n")
            return out
        # exactly the file the gate judged (export decided which one serves)
        which = export.get("served") or ("int8" if export.get("onnx_int8") else "fp32")
        onnx_path = resolve(export, export.get("served_onnx") or (export["onnx_int8"] if which == "int8" else export["onnx"]))
        expect_md5 = export.get("served_md5") or (export["onnx_int8_md5"] if which == "int8" else export["onnx_md5"])
        judged = (evaluate.get("lineage") or {}).get("served_md5")
        if judged and judged != expect_md5:
            raise RuntimeError("the gate judged another file than the one export serves: re-run evaluate")
        if file_md5(onnx_path) != expect_md5:
            raise RuntimeError(f"{onnx_path} changed since export (md5 mismatch); re-run export with --force")
        with registry_lock(cfg):
            found = find_candidate(client, name, export["key"])
            created = not found
            if found:
                mv = found[0]
                log.info("candidate %s is already version %s of %s: nothing registered", export["key"], str(mv.version), name)
            else:
                mv = _log_and_register(
                    cfg, export, onnx_path, _version_tags(cfg, export, evaluate, which), export.get("torch_model_dir")
                )
                log.info("registered %s version %s", name, str(mv.version))
                client.update_model_version(name, str(mv.version), description=model_card(cfg, export, evaluate,
                                                                                           str(mv.version), which))
                if not (client.get_registered_model(name).description or "").strip():
                    client.update_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
            mv = client.get_model_version(name, str(mv.version))
            moved = False
            hold = staging_hold(client, name, mv, evaluate)
            if hold:
                log.info("staging stays: %s", hold)
            elif mv.tags.get(TAG_STAGED) != "true":
                client.set_registered_model_alias(name, STAGING, str(mv.version))
                client.set_model_version_tag(name, str(mv.version), TAG_STAGED, "true")
                client.set_model_version_tag(name, str(mv.version), "asrflow.staged_at", _now())
                moved = True
        out = {
            **base,
            "registered": True,
            "version": str(mv.version),
            "alias": None if hold else STAGING,
            "alias_moved": moved,
            "staging_held": hold,
            "new_version_created": created,
            "onnx_file": which,
            "model_uri": f"models:/{name}/{str(mv.version)}",
            "reason": evaluate["reason"] + (f"; {hold}" if hold else ""),
        }
        (tmp / "promote.json").write_text(json.dumps(out, indent=2) + "\n")
        return out

    return run_step(cfg.root, STEP, key, work, force=force)


REGISTERED_MODEL_DESCRIPTION = """\
Speech recognizer (Conformer-CTC, character or BPE tokens) retrained weekly by **asrflow** from the
speech that landed that week, exported to ONNX. Each version's description is its model card:
what it was trained on, its parent, the gate's figures per golden slice and how to run it.
Aliases: `staging` (passed the gate), `production` (serving; moved by `asr_promote_production`),
`previous-production` (the rollback target).
"""


def model_card(cfg: AsrflowConfig, export: dict[str, Any], evaluate: dict[str, Any], version: str, which: str) -> str:
    """The markdown model card shown by the MLflow UI as the version's description."""
    lin = {**(export.get("lineage") or {}), **{k: v for k, v in (evaluate.get("lineage") or {}).items() if v}}
    name = cfg.registry.model_name
    batches = lin.get("batches") or []
    lines = [f"## {name} v{version}", ""]
    lines += ["### Trained on", ""]
    lines += [f"- data snapshot: `{lin.get('data_snapshot_tag') or '?'}` (DVC md5 `{lin.get('data_snapshot_md5') or '?'}`)",
              f"- weeks seen: {len(batches)} ({', '.join(batches) or '?'}); new in this version: "
              f"{', '.join(lin.get('new_batches') or []) or '–'}",
              f"- parent: {'from scratch' if lin.get('parent_version', 'scratch') == 'scratch' else 'v' + str(lin['parent_version'])}",
              f"- training minutes: {lin.get('train_minutes') or '?'}; train split md5 `{lin.get('train_md5') or '?'}`",
              f"- code: `{lin.get('git_commit') or '?'}`; model: `{json.dumps(lin.get('model_kwargs') or {}, sort_keys=True)}`", ""]
    lines += ["### Gate (golden set)", ""]
    champ = evaluate.get("champion_version")
    ci = evaluate.get("ci95")
    lines += [f"- decision: **{'PASS' if evaluate.get('passed') else 'FAIL'}** — {evaluate.get('reason', '')}",
              f"- candidate WER {_num(evaluate.get('candidate_wer'))}, CER {_num(evaluate.get('candidate_cer'))} "
              f"({evaluate.get('decode_used', '?')} decoding)",
              f"- champion: {('v' + str(champ) + ' (' + str(evaluate.get('champion_alias')) + ')') if champ else 'none'}"
              + (f", WER {_num(evaluate.get('champion_wer'))}, P(better) {_num(evaluate.get('p_better'), 3)}, "
                 f"95 % CI of ΔWER [{_num(ci[0])}, {_num(ci[1])}]" if champ and ci else ""), ""]
    slices = _card_slices(evaluate)
    if slices:
        lines += ["| slice | WER | CER | words |", "| --- | --- | --- | --- |"]
        lines += [f"| {s['slice']} | {_num(s.get('wer_candidate'))} | {_num(s.get('cer_candidate'))} | {s.get('ref_words')} |"
                  for s in slices]
        lines += [""]
    rtfx = (export.get("rtfx") or {}).get(f"onnx_{which}")
    lines += ["### Export", "",
              f"- file: {'int8 (dynamic quantization)' if which == 'int8' else 'fp32'} ONNX, md5 "
              f"`{export.get('served_md5') or '?'}`; golden WER fp32 {_num(export.get('wer_fp32'))}, int8 "
              f"{_num(export.get('wer_int8'))}; RTFx {_num(rtfx, 1)} (model forward, golden set, export host)", ""]
    lines += ["### Run it", "", "```bash",
              f"asrflow transcribe --model models:/{name}/{version} audio.wav",
              "```", ""]
    return "\n".join(lines)


def _num(v: Any, nd: int = 4) -> str:
    try:
        return f"{float(v):.{nd}f}"
    except (TypeError, ValueError):
        return "–"


def _card_slices(evaluate: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-slice rows of the gate's decision, speakers left out (many, and personal)."""
    try:
        dec = json.loads(resolve(evaluate, evaluate["decision"]).read_text())
    except (KeyError, OSError, ValueError):
        return []
    return [s for s in dec.get("slices", []) if s.get("kind") != "speaker"]


def staging_hold(client, name: str, mv, evaluate: dict[str, Any]) -> str | None:
    """Why ``staging`` must not move to ``mv`` (``None``: it may).

    ``staging`` never moves to a version older than the one it points at, nor to one that lost to
    it on the golden set (``evaluate`` judges the staging model too when it is not the champion).
    """
    from pipeline_tasks.services.registry import alias_version_client

    cur = alias_version_client(client, name, STAGING)
    if cur is None or str(cur.version) == str(mv.version):
        return None
    if int(str(cur.version)) > int(str(mv.version)):
        return f"staging points at version {cur.version}, newer than {mv.version}"
    if evaluate.get("staging_version") == str(cur.version) and evaluate.get("beats_staging") is False:
        return (f"version {mv.version} lost to staging version {cur.version} on the golden set "
                f"(WER {evaluate.get('candidate_wer'):.4f} vs {evaluate.get('staging_wer'):.4f})")
    return None


# ---------------------------------------------------------------------------------------------
# canary + production promotion + rollback
# ---------------------------------------------------------------------------------------------


def latest_split(cfg: AsrflowConfig) -> dict[str, Any] | None:
    """The most recently published split result under ``<root>/split/`` (by its ``_SUCCESS.json`` mtime)."""
    from pipeline_tasks.contract import SUCCESS

    d = cfg.root / "split"
    if not d.is_dir():
        return None
    found = [p for p in d.glob(f"*/{SUCCESS}") if not p.parent.name.startswith(".")]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    return json.loads(newest.read_text())


def newest_dev_rows(split: dict[str, Any], max_utts: int) -> tuple[Any, str]:
    """The dev index rows of the newest ``batch`` (at most ``max_utts``, by id) → ``(pyarrow table, batch)``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(resolve(split, split["dev"]))
    if t.num_rows == 0:
        raise LookupError("the latest split has no dev rows")
    batch = max(t.column("batch").to_pylist())
    t = t.filter(pc.equal(t.column("batch"), batch)).sort_by("id").slice(0, max_utts)
    return t, batch


def canary(cfg: AsrflowConfig, mv, split: dict[str, Any] | None = None) -> dict[str, Any]:
    """WER of a registered version's ONNX on the newest week's dev rows (cached under ``<root>/canary/<key>/``)."""
    import pyarrow.parquet as pq

    from pipeline_tasks.services.registry import download_version

    split = split or latest_split(cfg)
    if split is None:
        raise LookupError(f"no split result under {cfg.root / 'split'}: run the pipeline first")
    rows, batch = newest_dev_rows(split, cfg.registry.canary_max_utts)
    import hashlib

    rows_md5 = hashlib.md5(json.dumps(rows.select(["id", "audio_hash", "text"]).to_pylist()).encode()).hexdigest()
    key = step_key(
        "canary",
        {"decode": cfg.decode, "gate_decode": cfg.gate.decode},
        {"model": mv.name, "version": str(mv.version), "source": str(mv.source), "rows": rows_md5},
        CODE_VERSION,
    )

    def work(tmp: Path) -> dict[str, Any]:
        from model_code.dataset import FeatureTable
        from model_code.metrics import error_counts
        from model_code.onnx_runtime import OnnxAsr

        pq.write_table(rows, tmp / "rows.parquet")
        table = FeatureTable(tmp / "rows.parquet")
        d = cfg.decode
        asr = OnnxAsr(
            download_version(cfg, mv),
            decode=cfg.gate.decode,
            beam_size=d.beam_size,
            lm_weight=d.lm_weight,
            word_score=d.word_score,
            chunk_s=d.chunk_s,
            chunk_overlap_s=d.chunk_overlap_s,
        )
        hyps = asr.transcribe_features([table.features(i) for i in range(len(table))])
        c = error_counts(table.texts(), hyps)
        return {
            "rows": "rows.parquet",
            "batch": batch,
            "n_utts": len(table),
            "wer": c["wer"],
            "cer": c["cer"],
            "ref_words": c["ref_words"],
            "version": str(mv.version),
            "decode_used": asr.decode_mode,
            "split_key": split.get("key"),
        }

    return run_step(cfg.root, "canary", key, work)


class CanaryFailed(RuntimeError):
    """The ``staging`` model may not go to production (no staging version, or its canary WER is too high).

    Not transient: the orchestrator fails the run at once instead of retrying.
    """


def canary_check(cfg: AsrflowConfig, split: dict[str, Any] | None = None) -> dict[str, Any]:
    """Canary of the ``staging`` version with the verdict: ``{...canary, passed, version, verdict}``.

    Raises :class:`CanaryFailed` when there is no ``staging`` version or its WER on the newest
    week's dev rows is ``>= registry.canary_max_wer``.
    """
    from pipeline_tasks.services.registry import alias_version

    name = cfg.registry.model_name
    staging = alias_version(cfg, STAGING, name)
    if staging is None:
        raise CanaryFailed(f"no version of {name!r} has alias {STAGING!r}")
    res = canary(cfg, staging, split)
    limit = canary_limit(cfg)
    passed = res["wer"] < limit
    verdict = (
        f"canary: staging v{staging.version} WER {res['wer']:.4f} on {res['n_utts']} utterances of "
        f"{res['batch']} (max {limit:g}): {'PASS' if passed else 'FAIL'}"
    )
    log.info("%s", verdict)
    if not passed:
        raise CanaryFailed(f"canary failed: WER {res['wer']:.4f} >= {limit:g}")
    return {**res, "passed": passed, "version": str(staging.version), "verdict": verdict}


_GATE_FIGURES = ("candidate_wer", "candidate_cer", "champion_wer", "champion_version", "p_better", "ci95")


def gate_decision(evaluate: dict[str, Any], promote_param: bool = True) -> dict[str, Any]:
    """Whether a run goes on to ``promote``: ``{"promote": bool, "reason": str, **gate figures}``.

    The gate itself is decided by ``evaluate`` (``passed``/``reason``); this adds the run's
    ``promote`` switch (off: evaluate and export only, ``staging`` untouched).
    """
    if not promote_param:
        ok, reason = False, "promote=false: this run only evaluates; staging is left as it is"
    elif not evaluate.get("passed"):
        ok, reason = False, f"gate failed: {evaluate.get('reason') or 'candidate not better'}"
    else:
        ok, reason = True, f"gate passed: {evaluate.get('reason') or ''}".rstrip(": ")
    return {"promote": ok, "reason": reason, **{k: evaluate.get(k) for k in _GATE_FIGURES}}


def promote_production(cfg: AsrflowConfig, split: dict[str, Any] | None = None) -> dict[str, Any]:
    """Canary-check ``staging`` and move ``production`` to it (old production → ``previous-production``)."""
    from pipeline_tasks.services.registry import alias_version, registry_client

    name = cfg.registry.model_name
    client = registry_client(cfg)
    staging = alias_version(cfg, STAGING, name, client)
    prod = alias_version(cfg, PRODUCTION, name, client)
    base = {"model_name": name, "previous_version": str(prod.version) if prod else None}
    if staging is None:
        return {**base, "promoted": False, "version": None, "reason": f"no version of {name!r} has alias {STAGING!r}"}
    if prod is not None and str(prod.version) == str(staging.version):
        return {
            **base,
            "promoted": False,
            "already_production": True,
            "version": str(staging.version),
            "reason": f"version {str(staging.version)} is already {PRODUCTION}",
        }
    if staging.tags.get(TAG_ROLLED_BACK) == "true":
        return {
            **base,
            "promoted": False,
            "version": str(staging.version),
            "reason": f"version {str(staging.version)} was rolled back from {PRODUCTION}; stage a new candidate",
        }
    can = canary(cfg, staging, split)
    ok = can["wer"] < canary_limit(cfg)
    out = {
        **base,
        "version": str(staging.version),
        "canary_wer": can["wer"],
        "canary_cer": can["cer"],
        "canary_batch": can["batch"],
        "canary_n_utts": can["n_utts"],
        "canary_max_wer": canary_limit(cfg),
    }
    with registry_lock(cfg):
        for k, v in {
            "asrflow.canary_wer": can["wer"],
            "asrflow.canary_batch": can["batch"],
            "asrflow.canary_passed": str(ok).lower(),
        }.items():
            client.set_model_version_tag(name, str(staging.version), k, _tag_str(v))
        if not ok:
            return {
                **out,
                "promoted": False,
                "reason": f"canary failed: WER {can['wer']:.4f} on {can['n_utts']} dev utterances of "
                f"{can['batch']} >= {canary_limit(cfg):g}",
            }
        prod = alias_version(cfg, PRODUCTION, name, client)  # re-read under the lock
        if prod is not None and str(prod.version) == str(staging.version):
            return {**out, "promoted": False, "already_production": True, "reason": "promoted concurrently"}
        if prod is not None:
            client.set_registered_model_alias(name, PREVIOUS, str(prod.version))
        client.set_registered_model_alias(name, PRODUCTION, str(staging.version))
        client.set_model_version_tag(name, str(staging.version), "asrflow.promoted_to_production_at", _now())
    log.info("production: %s v%s (previous: %s)", name, str(staging.version), str(prod.version) if prod else None)
    return {
        **out,
        "promoted": True,
        "previous_version": str(prod.version) if prod else None,
        "reason": f"canary WER {can['wer']:.4f} < {canary_limit(cfg):g}",
    }


def rollback(cfg: AsrflowConfig) -> dict[str, Any]:
    """``production`` ← ``previous-production``; tag the rolled-back version. A no-op when already done."""
    from pipeline_tasks.services.registry import alias_version, registry_client

    name = cfg.registry.model_name
    client = registry_client(cfg)
    with registry_lock(cfg):
        prev = alias_version(cfg, PREVIOUS, name, client)
        prod = alias_version(cfg, PRODUCTION, name, client)
        if prev is None:
            return {
                "model_name": name,
                "rolled_back": False,
                "version": str(prod.version) if prod else None,
                "reason": f"no version has alias {PREVIOUS!r}: nothing to roll back to",
            }
        if prod is not None and str(prod.version) == str(prev.version):
            return {
                "model_name": name,
                "rolled_back": False,
                "already_rolled_back": True,
                "version": str(prod.version),
                "reason": f"{PRODUCTION} is already version {str(prev.version)}",
            }
        client.set_registered_model_alias(name, PRODUCTION, str(prev.version))
        client.set_model_version_tag(name, str(prev.version), "asrflow.restored_by_rollback_at", _now())
        if prod is not None:
            client.set_model_version_tag(name, str(prod.version), TAG_ROLLED_BACK, "true")
            client.set_model_version_tag(name, str(prod.version), "asrflow.rolled_back_at", _now())
    log.info("rollback: %s production v%s -> v%s", name, str(prod.version) if prod else None, str(prev.version))
    return {
        "model_name": name,
        "rolled_back": True,
        "version": str(prev.version),
        "rolled_back_version": str(prod.version) if prod else None,
        "reason": f"{PRODUCTION} moved back from {str(prod.version) if prod else None} to {str(prev.version)}",
    }

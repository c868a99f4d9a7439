"""The ``evaluate`` step: the golden-set gate, candidate vs the current ``production`` champion.

What: decodes the fixed golden set with the candidate (the train step's model folder) and, when
the registry has a model with alias ``production``, with that champion (its registered ONNX);
computes WER and CER overall and per slice (speaker, duration bucket); runs a paired bootstrap
over the golden set (:mod:`model_code.bootstrap`, Bisani & Ney 2004; speaker blocks when speakers
are known) for a 95 % CI of ``Δ = WER_candidate - WER_champion`` and P(candidate better); and
applies the decision rule of ``cfg.gate``:

* with a champion: pass iff ``P(Δ* < -δ) ≥ p`` (δ = ``min_wer_improvement``, p =
  ``min_probability``) AND no slice with ≥ ``min_slice_words`` reference words has a candidate
  WER more than ε = ``max_slice_regression`` above the champion's;
* without a champion: pass iff the candidate WER < ``absolute_wer_ceiling``.

A failed gate is a normal outcome (``passed: false`` and a ``reason``), not an exception. Outputs:
``decision.json`` (every figure), ``report.md`` + ``report.html`` with ``wer_by_slice.png``,
``utterances.jsonl`` (reference and both hypotheses per utterance), all logged to an MLflow run
in ``cfg.registry.experiment``.

How both models are decoded the same way: the candidate's log-probs come from torch (its model
folder; the export step later proves the ONNX file equal within ``export.parity_atol``), the
champion's from onnxruntime (the file that is actually serving). Both go through the same
:func:`model_code.onnx_runtime.batched_logprobs` (same batching and long-form chunking) and the
same :class:`model_code.onnx_runtime.CtcDecoder` (``gate.decode``; beam search uses the lexicon + LM
shipped with each model, so a model is judged with the LM it will serve with). If either model
ships no LM, both are decoded greedily (recorded as ``decode_used``).

Key: train key + md5 of the candidate weights + golden md5 + gate and decode config + champion
(model name, version): a new champion re-evaluates the same candidate.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import file_md5, resolve, run_step, step_key
from pipeline_tasks.records import EvaluateResult, StepInputs
from pipeline_tasks.services.golden_features import golden_features

log = logging.getLogger(__name__)

STEP = "evaluate"
CODE_VERSION = "2"  # 2: judges the served ONNX file; champion production, else staging


# ---------------------------------------------------------------------------------------------
# slices and the decision rule (pure functions)
# ---------------------------------------------------------------------------------------------


def duration_slice(duration_s: float, edges_s: list[float]) -> str:
    """Bucket label of a duration: edges ``[2, 5]`` → ``"<2s"``, ``"2-5s"``, ``">=5s"``."""
    edges = sorted(edges_s)
    i = bisect.bisect_right(edges, float(duration_s))
    if i == 0:
        return f"<{edges[0]:g}s"
    if i == len(edges):
        return f">={edges[-1]:g}s"
    return f"{edges[i - 1]:g}-{edges[i]:g}s"


def slice_table(
    labels: dict[str, list[str]], counts: dict[str, list[dict[str, int]]]
) -> list[dict[str, Any]]:
    """Per-slice WER/CER of each system.

    ``labels``: slice kind → ``(N,)`` slice value per utterance (e.g. ``{"speaker": [...],
    "duration": [...]}``); ``counts``: system → ``(N,)`` per-utterance dicts (``word_errors``,
    ``ref_words``, ``char_errors``, ``ref_chars``). Returns one row per (kind, value) with
    ``n_utts``, ``ref_words`` and ``wer_<system>``/``cer_<system>``.
    """
    rows = []
    for kind, vals in labels.items():
        for v in sorted(set(vals), key=str):
            idx = [i for i, x in enumerate(vals) if x == v]
            row: dict[str, Any] = {"slice": f"{kind}={v}", "kind": kind, "value": v, "n_utts": len(idx)}
            for sysname, c in counts.items():
                w = sum(c[i]["ref_words"] for i in idx)
                ch = sum(c[i]["ref_chars"] for i in idx)
                row["ref_words"] = w
                row[f"wer_{sysname}"] = sum(c[i]["word_errors"] for i in idx) / w if w else None
                row[f"cer_{sysname}"] = sum(c[i]["char_errors"] for i in idx) / ch if ch else None
            rows.append(row)
    return rows


def decide(
    candidate_wer: float,
    champion_wer: float | None,
    p_better: float | None,
    slices: list[dict[str, Any]],
    min_wer_improvement: float,
    min_probability: float,
    max_slice_regression: float,
    min_slice_words: int,
    absolute_wer_ceiling: float,
) -> dict[str, Any]:
    """The gate's decision rule → ``{"passed", "reason", "regressed_slices", "checks"}``.

    See the module docstring for the rule. ``slices`` rows carry ``wer_candidate``,
    ``wer_champion`` and ``ref_words``.
    """
    if champion_wer is None:
        ok = candidate_wer < absolute_wer_ceiling
        reason = (
            f"no production model; candidate WER {candidate_wer:.4f} "
            f"{'<' if ok else '>='} absolute ceiling {absolute_wer_ceiling:.4f}"
        )
        return {"passed": ok, "reason": reason, "regressed_slices": [], "checks": {"ceiling": ok}}
    regressed = []
    for s in slices:
        if s["ref_words"] < min_slice_words or s.get("wer_champion") is None or s.get("wer_candidate") is None:
            continue
        d = s["wer_candidate"] - s["wer_champion"]
        if d > max_slice_regression:
            regressed.append({"slice": s["slice"], "delta": d, "ref_words": s["ref_words"]})
    better = p_better is not None and p_better >= min_probability
    reasons = []
    reasons.append(
        f"P(candidate WER lower by > {min_wer_improvement:g}) = {p_better:.3f} "
        f"{'>=' if better else '<'} {min_probability:g} "
        f"(WER {candidate_wer:.4f} vs champion {champion_wer:.4f})"
    )
    if regressed:
        worst = max(regressed, key=lambda r: r["delta"])
        reasons.append(
            f"{len(regressed)} slice(s) regress by more than {max_slice_regression:g}, worst "
            f"{worst['slice']} +{worst['delta']:.4f} ({worst['ref_words']} words)"
        )
    else:
        reasons.append(f"no slice with >= {min_slice_words} words regresses by more than {max_slice_regression:g}")
    passed = better and not regressed
    return {
        "passed": passed,
        "reason": ("passed: " if passed else "failed: ") + "; ".join(reasons),
        "regressed_slices": regressed,
        "checks": {"probability": better, "slices": not regressed},
    }


# ---------------------------------------------------------------------------------------------
# decoding the golden set
# ---------------------------------------------------------------------------------------------


def _decode_all(cfg: AsrflowConfig, golden: dict[str, Any], models: dict[str, Path]) -> dict[str, Any]:
    """Golden-set hypotheses of each ONNX file in ``models`` (``candidate``, ``champion``, ``staging``).

    Every model is decoded from the exact file that serves (or will): its own tokenizer, log-mel
    front end and lexicon + LM (from the ONNX metadata), all with ``gate.decode``; if one of them
    ships no lexicon/LM, all are decoded greedily, so the comparison stays fair.
    """
    from model_code.onnx_runtime import CtcDecoder, OnnxAsr

    d = cfg.decode
    asrs = {k: OnnxAsr(p, decode="greedy", chunk_s=d.chunk_s, chunk_overlap_s=d.chunk_overlap_s) for k, p in models.items()}
    mode = cfg.gate.decode
    if mode == "beam" and not all(a.lexicon_path and a.lm_path for a in asrs.values()):
        log.warning("gate.decode=beam but a model ships no lexicon/LM: decoding every model greedily")
        mode = "greedy"
    out: dict[str, Any] = {"decode_used": mode}
    feats_by_front: dict[str, list] = {}
    for k, asr in asrs.items():
        front = json.dumps(asr.feature_kwargs, sort_keys=True)
        if front not in feats_by_front:
            feats_by_front[front] = golden_features(cfg, golden, asr.feature_kwargs)
        t0 = time.perf_counter()
        lp = asr.logprobs(feats_by_front[front])
        dec = CtcDecoder(asr.tokenizer, mode, asr.lexicon_path, asr.lm_path, d.beam_size, d.lm_weight, d.word_score)
        out[k] = dec(lp)
        out[f"{k}_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _plot(slices: list[dict[str, Any]], has_champion: bool, path: Path) -> None:
    """Grouped bar chart of WER per slice (candidate vs champion)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["overall"] + [s["slice"] for s in slices[1:]] if slices else []
    cand = [s["wer_candidate"] or 0.0 for s in slices]
    x = np.arange(len(names))
    w = 0.4 if has_champion else 0.7
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) + 2), 4.0))
    ax.bar(x - (w / 2 if has_champion else 0), cand, w, label="candidate", color="#2b7bba")
    if has_champion:
        champ = [s.get("wer_champion") or 0.0 for s in slices]
        ax.bar(x + w / 2, champ, w, label="champion", color="#a0a0a0")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("WER")
    ax.set_title("Golden-set WER by slice")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report_md(dec: dict[str, Any]) -> str:
    ch = dec["champion"]
    lines = [
        "# asrflow golden-set gate",
        "",
        f"**{'PASSED' if dec['passed'] else 'FAILED'}** — {dec['reason']}",
        "",
        f"- candidate: train `{dec['lineage']['train_key']}`, weights md5 `{dec['lineage']['model_md5']}`",
        f"- champion: {('`' + ch['name'] + '` v' + str(ch['version'])) if ch else 'none (no production model)'}",
        f"- golden set: md5 `{dec['lineage']['golden_md5']}`, {dec['n_utts']} utterances, {dec['ref_words']} words",
        f"- decoder: {dec['decode_used']}",
        "",
        "| system | WER | CER |",
        "|---|---|---|",
        f"| candidate | {dec['candidate_wer']:.4f} | {dec['candidate_cer']:.4f} |",
    ]
    if ch:
        lines.append(f"| production v{ch['version']} | {dec['champion_wer']:.4f} | {dec['champion_cer']:.4f} |")
        b = dec["bootstrap"]
        lines += [
            "",
            f"Paired bootstrap ({b['n_samples']} replicates over {b['n_blocks']} {dec['bootstrap_unit']} blocks): "
            f"Δ WER = {b['delta']:+.4f}, 95% CI [{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}], "
            f"P(candidate better by > {dec['gate']['min_wer_improvement']:g}) = {b['p_better']:.3f}",
        ]
    lines += ["", "![WER by slice](wer_by_slice.png)", "", "| slice | utts | words | WER cand | WER prod |", "|---|---|---|---|---|"]
    for s in dec["slices"]:
        wc = "" if s.get("wer_champion") is None else f"{s['wer_champion']:.4f}"
        lines.append(f"| {s['slice']} | {s['n_utts']} | {s['ref_words']} | {s['wer_candidate']:.4f} | {wc} |")
    return "\n".join(lines) + "\n"


def _report_html(md: str) -> str:
    """A minimal HTML rendering of the Markdown report (tables, bold, image) without extra deps."""
    import html

    out, in_table = ["<html><head><meta charset='utf-8'><title>asrflow gate</title></head><body>"], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                out.append("<table border='1' cellspacing='0' cellpadding='3'>")
                in_table = True
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            out.append("<img src='wer_by_slice.png' alt='WER by slice'>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    if in_table:
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _log_mlflow(cfg: AsrflowConfig, key: str, folder: Path, dec: dict[str, Any]) -> str:
    """Log the gate into an MLflow run (reused when a run with this key exists). Returns the run id."""
    from mlflow.entities import Metric, Param

    from pipeline_tasks.services.tracking import flat_params, mlflow_setup

    exp_id = mlflow_setup(cfg)
    from pipeline_tasks.services.registry import registry_client

    client = registry_client(cfg)
    found = client.search_runs([exp_id], filter_string=f"tags.`asrflow.evaluate_key` = '{key}'", max_results=1)
    tags = {
        "asrflow.step": STEP,
        "asrflow.evaluate_key": key,
        "asrflow.gate_passed": str(dec["passed"]).lower(),
        "asrflow.train_key": dec["lineage"]["train_key"],
        "asrflow.golden_md5": str(dec["lineage"]["golden_md5"]),
        "asrflow.champion_version": str(dec["champion"]["version"]) if dec["champion"] else "none",
    }
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(exp_id, run_name=f"evaluate-{key}", tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = {"candidate_wer": dec["candidate_wer"], "candidate_cer": dec["candidate_cer"]}
    if dec["champion"]:
        metrics.update(
            champion_wer=dec["champion_wer"],
            champion_cer=dec["champion_cer"],
            wer_delta=dec["bootstrap"]["delta"],
            wer_delta_ci95_lo=dec["bootstrap"]["ci95"][0],
            wer_delta_ci95_hi=dec["bootstrap"]["ci95"][1],
            p_better=dec["bootstrap"]["p_better"],
        )
    metrics["passed"] = float(dec["passed"])
    params = flat_params({"gate": dec["gate"], "decode_used": dec["decode_used"]})
    if not found:  # params are write-once in MLflow
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], tags=[])
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    client.log_artifacts(run_id, str(folder), artifact_path="gate")
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------


def _lineage(train: dict[str, Any], golden: dict[str, Any], model_dir: Path, model_md5: str) -> dict[str, Any]:
    from model_code.packaging import read_model_info

    meta = read_model_info(model_dir).get("meta") or {}
    return {
        "train_key": train["key"],
        "model_md5": model_md5,
        "train_md5": train.get("train_md5") or meta.get("train_md5"),
        "golden_md5": golden["golden_md5"],
        "train_mlflow_run_id": train.get("mlflow_run_id"),
        "study_name": train.get("study_name") or meta.get("study_name") or meta.get("tune_study"),
    }


def golden_slice_labels(golden: dict[str, Any], ids: list[str]) -> dict[str, list[str]]:
    """Slice labels the golden manifest carries (synthesizer, channel condition), per golden id.

    Transfer is measured here: unseen synthesizers (flite), reverberant, telephone and noisy
    copies each get a row in the report, and the gate's worst-slice guard covers them.
    """
    if not golden.get("slices"):
        return {}
    import pyarrow.parquet as pq

    t = pq.read_table(resolve(golden, golden["slices"])).to_pylist()
    by_id = {r["id"]: r for r in t}
    out: dict[str, list[str]] = {}
    for kind in golden.get("slice_kinds") or []:
        out[kind] = [str((by_id.get(i) or {}).get(kind) or "unknown") for i in ids]
    return out


def _bootstrap_blocks(speakers: list[str | None], unit: str, min_blocks: int) -> tuple[list[str] | None, str]:
    known = all(s for s in speakers)
    if unit == "utterance" or not known:
        return None, "utterance"
    if unit == "auto" and len(set(speakers)) < min_blocks:
        return None, "utterance"
    return [str(s) for s in speakers], "speaker"


def run(cfg: AsrflowConfig, inputs: StepInputs, force: bool = False) -> EvaluateResult:
    from pipeline_tasks.services.registry import (
        STAGING,
        alias_version,
        as_of,
        champion_version,
        download_version,
        registry_client,
        version_ref,
    )

    train, golden, export = inputs["train"], inputs["golden"], inputs["export"]
    model_dir = resolve(train, train["model_dir"])
    model_md5 = file_md5(model_dir / "weights.pt")
    served = resolve(export, export["served_onnx"])
    client = registry_client(cfg)
    seen = (export.get("lineage") or {}).get("batches") or None  # the landing batches this model has seen
    champ_mv, champ_alias = champion_version(cfg, export["key"], client, seen)
    champion = version_ref(champ_mv, champ_alias)
    # staging is judged too when it is not the champion: staging never moves to a model that lost to it
    stag_mv, stag_self = as_of(client, alias_version(cfg, STAGING, cfg.registry.model_name, client), export["key"],
                               set(seen) if seen else None)
    if stag_self or (stag_mv is not None and champ_mv is not None and str(stag_mv.version) == str(champ_mv.version)):
        stag_mv = None
    staging = version_ref(stag_mv, STAGING)
    key = step_key(
        STEP,
        {"gate": cfg.gate, "decode": cfg.decode, "registry": cfg.registry.model_name},
        {
            "train": train["key"],
            "model_md5": model_md5,
            "export": export["key"],
            "served_md5": export["served_md5"],
            "golden": golden["golden_md5"],
            "golden_index": golden.get("index_md5"),
            "champion": champion,
            "staging": staging,
        },
        CODE_VERSION,
    )

    def work(tmp: Path) -> dict[str, Any]:
        from model_code.bootstrap import bootstrap_wer_ci, paired_bootstrap
        from model_code.dataset import FeatureTable
        from model_code.metrics import per_utterance_counts

        g = cfg.gate
        table = FeatureTable(resolve(golden, golden["index"]), in_memory=False)
        refs, ids, spk, dur = table.texts(), table.ids(), table.speakers(), table.durations()
        models = {"candidate": served}
        if champ_mv is not None:
            models["champion"] = download_version(cfg, champ_mv)
        if stag_mv is not None:
            models["staging"] = download_version(cfg, stag_mv)
        hyps = _decode_all(cfg, golden, models)
        counts = {k: per_utterance_counts(refs, hyps[k]) for k in models}

        def totals(c: list[dict[str, int]]) -> tuple[float, float, int]:
            w = sum(x["ref_words"] for x in c)
            ch = sum(x["ref_chars"] for x in c)
            return sum(x["word_errors"] for x in c) / w, sum(x["char_errors"] for x in c) / ch, w

        cand_wer, cand_cer, ref_words = totals(counts["candidate"])
        labels = {
            "speaker": [s if s else "unknown" for s in spk],
            "duration": [duration_slice(x, g.duration_buckets_s) for x in dur],
            **golden_slice_labels(golden, ids),
        }
        overall = {"slice": "overall", "kind": "overall", "value": "all", "n_utts": len(refs), "ref_words": ref_words}
        overall["wer_candidate"], overall["cer_candidate"] = cand_wer, cand_cer
        blocks, unit = _bootstrap_blocks(spk, g.bootstrap_unit, g.min_speaker_blocks)
        boot = None
        champ_wer = champ_cer = None
        if champion:
            champ_wer, champ_cer, _ = totals(counts["champion"])
            overall["wer_champion"], overall["cer_champion"] = champ_wer, champ_cer
            boot = paired_bootstrap(
                [x["word_errors"] for x in counts["candidate"]],
                [x["word_errors"] for x in counts["champion"]],
                [x["ref_words"] for x in counts["candidate"]],
                blocks=blocks,
                n_samples=g.bootstrap_samples,
                seed=g.bootstrap_seed,
                margin=g.min_wer_improvement,
            )
            boot.pop("block_labels", None)
        staging_cmp = None
        if staging:
            st_wer, st_cer, _ = totals(counts["staging"])
            staging_cmp = {**staging, "wer": st_wer, "cer": st_cer, "candidate_better": cand_wer < st_wer}
        slices = [overall] + slice_table(labels, {k: v for k, v in counts.items() if k != "staging"})
        verdict = decide(
            cand_wer,
            champ_wer,
            boot["p_better"] if boot else None,
            slices[1:],
            g.min_wer_improvement,
            g.min_probability,
            g.max_slice_regression,
            g.min_slice_words,
            g.absolute_wer_ceiling,
        )
        cand_ci = bootstrap_wer_ci(
            [x["word_errors"] for x in counts["candidate"]],
            [x["ref_words"] for x in counts["candidate"]],
            blocks=blocks,
            n_samples=g.bootstrap_samples,
            seed=g.bootstrap_seed,
        )
        dec = {
            **verdict,
            "candidate_wer": cand_wer,
            "candidate_cer": cand_cer,
            "candidate_wer_ci95": cand_ci,
            "champion_wer": champ_wer,
            "champion_cer": champ_cer,
            "champion": champion,
            "staging": staging_cmp,
            "judged_file": {"served": export.get("served"), "onnx_md5": export["served_md5"]},
            "bootstrap": boot,
            "bootstrap_unit": unit,
            "p_better": boot["p_better"] if boot else None,
            "ci95": boot["ci95"] if boot else None,
            "slices": slices,
            "n_utts": len(refs),
            "ref_words": ref_words,
            "decode_used": hyps["decode_used"],
            "decode": cfg.decode.model_dump(mode="json"),
            "gate": g.model_dump(mode="json"),
            "lineage": {**_lineage(train, golden, model_dir, model_md5), "served": export.get("served"),
                        "served_md5": export["served_md5"]},
            "seconds": {k: round(v, 3) for k, v in hyps.items() if k.endswith("_s")},
        }
        (tmp / "decision.json").write_text(json.dumps(dec, indent=2, sort_keys=True, default=str) + "\n")
        with open(tmp / "utterances.jsonl", "w") as f:
            for i, r in enumerate(refs):
                rec = {"id": ids[i], "speaker": spk[i], "duration_s": float(dur[i]), "ref": r, "candidate": hyps["candidate"][i]}
                rec["candidate_word_errors"] = counts["candidate"][i]["word_errors"]
                if champion:
                    rec["champion"] = hyps["champion"][i]
                    rec["champion_word_errors"] = counts["champion"][i]["word_errors"]
                f.write(json.dumps(rec) + "\n")
        _plot(slices, champion is not None, tmp / "wer_by_slice.png")
        md = _report_md(dec)
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(_report_html(md))
        run_id = _log_mlflow(cfg, key, tmp, dec)
        log.info("gate %s: %s", "passed" if dec["passed"] else "failed", dec["reason"])
        return {
            "decision": "decision.json",
            "report": "report.md",
            "report_html": "report.html",
            "plot": "wer_by_slice.png",
            "passed": bool(dec["passed"]),
            "reason": dec["reason"],
            "candidate_wer": cand_wer,
            "candidate_cer": cand_cer,
            "champion_wer": champ_wer,
            "champion_version": champion["version"] if champion else None,
            "champion_alias": champion["alias"] if champion else None,
            "staging_version": staging["version"] if staging else None,
            "staging_wer": staging_cmp["wer"] if staging_cmp else None,
            "beats_staging": staging_cmp["candidate_better"] if staging_cmp else None,
            "served": export.get("served"),
            "p_better": dec["p_better"],
            "ci95": dec["ci95"],
            "mlflow_run_id": run_id,
            "decode_used": hyps["decode_used"],
            "lineage": dec["lineage"],
        }

    return run_step(cfg.root, STEP, key, work, force=force)

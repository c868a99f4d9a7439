"""The golden-set gate: decision rule, slices, report files, MLflow logging, champion comparison."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from pipeline_tasks.contract import resolve
from pipeline_tasks.steps import evaluate, promote
from tests.conftest import make_tiny_cfg
from tests.pipeline_tasks.gate_helpers import export_and_evaluate, greedy_wer


def _cfg(tmp_path, tiny_landing, tiny_golden, *extra):
    return make_tiny_cfg(tmp_path / "art", tiny_landing, tiny_golden, list(extra))


# -- the decision rule (pure) ---------------------------------------------------------------------


def _slice(name, wc, wp, words):
    return {"slice": name, "wer_candidate": wc, "wer_champion": wp, "ref_words": words}


def test_decide_without_champion_uses_the_ceiling():
    kw = dict(min_wer_improvement=0.0, min_probability=0.9, max_slice_regression=0.05, min_slice_words=50,
              absolute_wer_ceiling=0.5)
    assert evaluate.decide(0.4, None, None, [], **kw)["passed"]
    d = evaluate.decide(0.5, None, None, [], **kw)
    assert not d["passed"] and "ceiling" in d["reason"]


def test_decide_needs_probability_and_no_big_slice_regression():
    kw = dict(min_wer_improvement=0.01, min_probability=0.9, max_slice_regression=0.05, min_slice_words=50,
              absolute_wer_ceiling=0.5)
    ok = [_slice("speaker=a", 0.20, 0.30, 100), _slice("speaker=b", 0.40, 0.20, 10)]  # b too small to count
    assert evaluate.decide(0.25, 0.30, 0.95, ok, **kw)["passed"]
    d = evaluate.decide(0.25, 0.30, 0.85, ok, **kw)
    assert not d["passed"] and d["checks"] == {"probability": False, "slices": True}
    bad = ok + [_slice("duration=<2s", 0.40, 0.30, 60)]
    d = evaluate.decide(0.25, 0.30, 0.99, bad, **kw)
    assert not d["passed"] and d["regressed_slices"][0]["slice"] == "duration=<2s" and "duration=<2s" in d["reason"]


def test_duration_slices_and_slice_table():
    assert [evaluate.duration_slice(x, [2, 5]) for x in (1.0, 2.0, 4.9, 7.0)] == ["<2s", "2-5s", "2-5s", ">=5s"]
    counts = {
        "candidate": [dict(word_errors=1, ref_words=4, char_errors=2, ref_chars=20)] * 2
        + [dict(word_errors=0, ref_words=6, char_errors=0, ref_chars=30)],
    }
    rows = evaluate.slice_table({"speaker": ["a", "a", "b"]}, counts)
    assert [(r["slice"], r["ref_words"], r["wer_candidate"]) for r in rows] == [("speaker=a", 8, 0.25), ("speaker=b", 6, 0.0)]


# -- the step on the tiny golden set ------------------------------------------------------------------


def test_models_have_controlled_quality(models, golden_res):
    """Precondition of the gate tests: the trained model is clearly better than its noised copy."""
    good, bad = greedy_wer(models["good"], golden_res), greedy_wer(models["bad"], golden_res)
    assert good < 0.85 and bad >= 0.95 and bad - good > 0.15


def test_first_candidate_against_the_ceiling_writes_report_and_mlflow_run(tmp_path, tiny_landing, tiny_golden, golden_res, models):
    cfg = _cfg(tmp_path, tiny_landing, tiny_golden)
    res = export_and_evaluate(cfg, models["good"], golden_res)[1]
    assert res["passed"] and res["champion_version"] is None and res["champion_wer"] is None
    assert res["candidate_wer"] < 1.5 and "ceiling" in res["reason"]
    dec = json.loads(resolve(res, res["decision"]).read_text())
    assert dec["decode_used"] == "beam"  # the tiny models ship a lexicon + LM
    assert dec["slices"][0]["slice"] == "overall"
    assert {s["kind"] for s in dec["slices"]} == {"overall", "speaker", "duration", "synth", "condition"}
    # every golden slice of the corpus is reported: the unseen synthesizer and each channel condition
    import pyarrow.parquet as pq

    lab = pq.read_table(resolve(golden_res, golden_res["slices"])).to_pylist()
    for kind in ("synth", "condition"):
        want = {f"{kind}={r[kind]}" for r in lab}
        assert want <= {s["slice"] for s in dec["slices"]}, kind
    assert "synth=flite" in {s["slice"] for s in dec["slices"]}
    assert dec["lineage"]["golden_md5"] == golden_res["golden_md5"] and dec["lineage"]["study_name"] == "study-good"
    assert len(dec["candidate_wer_ci95"]) == 2 and dec["candidate_wer_ci95"][0] <= res["candidate_wer"] <= dec["candidate_wer_ci95"][1]
    png = resolve(res, res["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASSED" in resolve(res, res["report"]).read_text() and "<table" in resolve(res, res["report_html"]).read_text()
    assert len(resolve(res, "utterances.jsonl").read_text().splitlines()) == golden_res["n_utts"]
    client = mlflow.MlflowClient(cfg.registry.tracking_uri)
    run = client.get_run(res["mlflow_run_id"])
    assert run.data.metrics["candidate_wer"] == pytest.approx(res["candidate_wer"])
    assert run.data.tags["asrflow.evaluate_key"] == res["key"]
    assert "gate/decision.json" in {a.path for a in client.list_artifacts(res["mlflow_run_id"], "gate")}
    # cached: same key, same result, no second run
    assert export_and_evaluate(cfg, models["good"], golden_res)[1] == res
    # a failed gate is a normal outcome
    strict = _cfg(tmp_path, tiny_landing, tiny_golden, "gate.absolute_wer_ceiling=0.01")
    res2 = export_and_evaluate(strict, models["good"], golden_res)[1]
    assert res2["passed"] is False and res2["key"] != res["key"] and "ceiling" in res2["reason"]


def _make_production(cfg, model_res, golden_res):
    """Register a model as `production` through the real export + promote steps."""
    ex, ev = export_and_evaluate(cfg, model_res, golden_res)
    pr = promote.run(cfg, {"export": ex, "evaluate": ev})
    split = {"key": "golden-as-dev", "dev": golden_res["index"], "output_dir": golden_res["output_dir"]}
    out = promote.promote_production(cfg, split=split)
    assert out["promoted"] and out["version"] == pr["version"]
    return pr["version"]


def test_champion_comparison_rejects_worse_and_accepts_better(tmp_path, tiny_landing, tiny_golden, golden_res, models):
    # champion = the trained model; the noised candidate must fail
    cfg = _cfg(tmp_path / "a", tiny_landing, tiny_golden, "registry.canary_max_wer=5.0")
    v = _make_production(cfg, models["good"], golden_res)
    res = export_and_evaluate(cfg, models["bad"], golden_res)[1]
    assert res["champion_version"] == v and not res["passed"]
    assert res["candidate_wer"] > res["champion_wer"] and res["p_better"] < 0.5 and res["ci95"][0] > 0
    # champion = the noised model; the trained candidate must pass, with a CI below zero
    cfg_b = _cfg(tmp_path / "b", tiny_landing, tiny_golden, "registry.canary_max_wer=5.0", "gate.absolute_wer_ceiling=10")
    _make_production(cfg_b, models["bad"], golden_res)
    res_b = export_and_evaluate(cfg_b, models["good"], golden_res)[1]
    assert res_b["passed"], res_b["reason"]
    assert res_b["p_better"] >= 0.9 and res_b["ci95"][1] < 0
    dec = json.loads(resolve(res_b, res_b["decision"]).read_text())
    assert dec["bootstrap_unit"] == "speaker" and dec["bootstrap"]["n_blocks"] == len(golden_speakers(golden_res))


def golden_speakers(golden_res) -> set[str]:
    from model_code.dataset import FeatureTable

    return set(FeatureTable(Path(golden_res["output_dir"]) / golden_res["index"], in_memory=False).speakers())

"""Continual training: the parent a run starts from, and the gate on the exact file it promotes.

Real registry (MLflow on SQLite), real export/evaluate/promote steps, the tiny golden set and the
trained model ladder of ``gate_helpers`` (``good`` is clearly better than its noised copy ``bad``).
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipeline_tasks.contract import resolve
from pipeline_tasks.services.parent import ParentError, incompatibilities, resolve_parent
from pipeline_tasks.services.registry import alias_version, lineage
from pipeline_tasks.steps import promote
from tests.conftest import make_tiny_cfg
from tests.pipeline_tasks.gate_helpers import export_and_evaluate

# the gate_helpers ladder's architecture, as config overrides (so its models fit as parents)
FITS = ["model.ff_mult=2", "model.subsampling_channels=8", "model.d_model=32", "model.n_layers=1",
        "model.n_heads=2", "model.conv_kernel=7"]


def _cfg(tmp_path, tiny_landing, tiny_golden, *extra):
    return make_tiny_cfg(tmp_path / "art", tiny_landing, tiny_golden, [*FITS, *extra])


def _register(cfg, model_res, golden_res):
    ex, ev = export_and_evaluate(cfg, model_res, golden_res)
    return ex, ev, promote.run(cfg, {"export": ex, "evaluate": ev})


def test_parent_is_staging_then_scratch_when_it_does_not_fit(tmp_path, tiny_landing, tiny_golden, golden_res, models):
    cfg = _cfg(tmp_path, tiny_landing, tiny_golden, "gate.absolute_wer_ceiling=10")
    assert not resolve_parent(cfg).warm  # empty registry: from scratch
    _, _, pr = _register(cfg, models["good"], golden_res)
    # auto: no production yet, so staging; its registered files carry the torch weights
    p = resolve_parent(cfg)
    assert p.warm and p.source == "staging" and p.version == pr["version"]
    with open(f"{p.model_dir}/weights.pt", "rb") as f:
        assert f.read() == (resolve(models["good"], models["good"]["model_dir"]) / "weights.pt").read_bytes()
    assert incompatibilities(cfg, p.info()) == []
    # a config the parent does not fit: auto falls back to scratch and says why; explicit is an error
    wide = cfg.model_copy(update={"model": cfg.model.model_copy(update={"d_model": 48})})
    q = resolve_parent(wide)
    assert not q.warm and "model.d_model" in q.reason
    explicit = wide.model_copy(update={"train": wide.train.model_copy(update={"init_from": "staging"})})
    with pytest.raises(ParentError, match="d_model"):
        resolve_parent(explicit)
    named = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": f"models:/asr/{pr['version']}"})})
    assert resolve_parent(named).version == pr["version"]
    scratch = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": "scratch"})})
    assert not resolve_parent(scratch).warm
    # a run on this very data (a rerun after promotion) does not start from its own model
    assert not resolve_parent(cfg, train_md5=models["good"]["train_md5"]).warm


def test_gate_judges_the_file_that_is_registered(tmp_path, tiny_landing, tiny_golden, golden_res, models):
    """The champion is the candidate's own fp32 export; the candidate serves int8. The gate must
    score the int8 file (what promote would register), not the torch/fp32 model: no improvement
    over an identical fp32 champion is possible, and nothing is registered."""
    fp32 = _cfg(tmp_path / "a", tiny_landing, tiny_golden, "gate.absolute_wer_ceiling=10", "export.register_file=fp32")
    ex1, _, pr1 = _register(fp32, models["good"], golden_res)
    assert ex1["served"] == "fp32" and pr1["registered"]
    client = MlflowClient(tracking_uri=fp32.registry.tracking_uri, registry_uri=fp32.registry.tracking_uri)
    assert client.get_model_version("asr", pr1["version"]).tags["asrflow.onnx_file"] == "fp32"
    # same registry, int8 served (kept within a generous tolerance)
    int8 = fp32.model_copy(update={"export": fp32.export.model_copy(update={"register_file": "int8_if_kept",
                                                                             "int8_max_wer_delta": 1.0})})
    ex2, ev2 = export_and_evaluate(int8, models["good"], golden_res)
    assert ex2["served"] == "int8" and ex2["served_md5"] == ex2["onnx_int8_md5"] != ex1["served_md5"]
    dec = json.loads(resolve(ev2, ev2["decision"]).read_text())
    assert dec["judged_file"] == {"served": "int8", "onnx_md5": ex2["onnx_int8_md5"]}
    assert ev2["champion_version"] == pr1["version"] and ev2["champion_alias"] == "staging"
    assert ev2["candidate_wer"] == pytest.approx(ex2["wer_int8"])  # the int8 file's own WER
    assert not ev2["passed"]
    pr2 = promote.run(int8, {"export": ex2, "evaluate": ev2})
    assert not pr2["registered"] and str(alias_version(int8, "staging").version) == pr1["version"]


def test_staging_never_moves_to_a_worse_model(tmp_path, tiny_landing, tiny_golden, golden_res, models):
    """No production yet: staging is the champion, so a worse candidate is neither registered nor staged."""
    cfg = _cfg(tmp_path, tiny_landing, tiny_golden, "gate.absolute_wer_ceiling=10")
    _, _, good = _register(cfg, models["good"], golden_res)
    assert good["alias"] == "staging" and alias_version(cfg, "production") is None
    ex, ev, bad = _register(cfg, models["bad"], golden_res)
    assert ev["champion_alias"] == "staging" and ev["champion_version"] == good["version"]
    assert not ev["passed"] and not bad["registered"]
    assert str(alias_version(cfg, "staging").version) == good["version"]
    # a staging version newer than the candidate is never replaced by it
    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri, registry_uri=cfg.registry.tracking_uri)
    older = client.get_model_version("asr", good["version"])
    assert promote.staging_hold(client, "asr", older, {}) is None  # staging points at it already
    v = client.create_model_version("asr", older.source, tags={"asrflow.candidate_key": "newer"})
    client.set_registered_model_alias("asr", "staging", v.version)
    assert "newer than" in promote.staging_hold(client, "asr", older, {})
    # the model card: the version's description in the registry (what the MLflow UI shows)
    card = older.description
    for field in ("### Trained on", "data snapshot", "parent: from scratch", "### Gate (golden set)",
                  "decision: **PASS**", "candidate WER", "| synth=flite |", "| condition=clean |", "### Export",
                  f"asrflow transcribe --model models:/asr/{good['version']}"):
        assert field in card, (field, card)
    assert "speaker=" not in card  # per-speaker rows stay in the gate report, not on the card
    assert "Conformer-CTC" in client.get_registered_model("asr").description
    # lineage: the chain of a version, with its parent
    chain = lineage(cfg, f"models:/asr/{good['version']}")
    assert chain[0]["version"] == good["version"] and chain[0]["parent"] == "scratch"

"""The export step: ONNX parity with torch on the golden set, metadata, int8 keep/drop, parity failure."""

from __future__ import annotations

import json

import onnx
import pytest

from model_code.features import feature_kwargs
from model_code.onnx_runtime import OnnxAsr
from pipeline_tasks.contract import resolve
from pipeline_tasks.steps import export
from tests.conftest import make_tiny_cfg


def test_export_parity_metadata_and_int8(tmp_path, tiny_landing, tiny_golden, golden_res, models):
    cfg = make_tiny_cfg(tmp_path / "art", tiny_landing, tiny_golden, ["export.int8_max_wer_delta=1.0"])
    res = export.run(cfg, {"train": models["good"], "golden": golden_res})
    assert res["parity_transcripts_equal"] is True
    assert 0 <= res["parity_max_abs_diff"] <= cfg.export.parity_atol
    m = onnx.load(str(resolve(res, res["onnx"])))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= cfg.export.opset
    props = {p.key: p.value for p in m.metadata_props}
    assert props["asrflow.golden_md5"] == golden_res["golden_md5"]
    assert props["asrflow.train_md5"] == models["good"]["train_md5"]
    assert props["asrflow.git_commit"] and json.loads(props["asrflow.features"]) == feature_kwargs(cfg.features)
    assert props["asrflow.lexicon"] == resolve(res, res["lexicon"]).read_text()
    # int8 kept (the delta allowed is huge), readable, and says it is quantized
    assert res["int8_kept"] and res["onnx_int8"] == "model.int8.onnx"
    q = OnnxAsr(resolve(res, res["onnx_int8"]), decode="greedy")
    assert q.quantization["weight_type"] == "QInt8" and q.quantization["op_types"] == ["MatMul", "Gemm"]
    assert abs(res["wer_int8"] - res["wer_fp32"]) <= 1.0
    report = json.loads(resolve(res, res["report"]).read_text())
    assert report["parity"]["n_utts"] == golden_res["n_utts"] and report["rtfx"]["onnx_fp32"] > 0
    # cached
    assert export.run(cfg, {"train": models["good"], "golden": golden_res}) == res


def test_int8_is_dropped_when_worse_and_parity_failure_raises(tmp_path, tiny_landing, tiny_golden, golden_res, models):
    cfg = make_tiny_cfg(tmp_path / "art", tiny_landing, tiny_golden, ["export.int8_max_wer_delta=-1.0"])
    res = export.run(cfg, {"train": models["good"], "golden": golden_res})
    assert res["int8_kept"] is False and res["onnx_int8"] is None and res["wer_int8"] is not None
    assert not resolve(res, "model.int8.onnx").exists()
    strict = make_tiny_cfg(tmp_path / "art2", tiny_landing, tiny_golden, ["export.parity_atol=1e-12", "export.quantize_int8=false"])
    with pytest.raises(export.ExportParityError, match="parity failed"):
        export.run(strict, {"train": models["good"], "golden": golden_res})
    assert not list((strict.root / "export").glob("*/_SUCCESS.json"))  # nothing published

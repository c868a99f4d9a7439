"""ONNX export of the Conformer-CTC: dynamic axes, parity with torch, metadata, int8 quantization."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_code.conformer import ConformerCTC
from model_code.onnx_export import (
    build_metadata,
    compare_logprobs,
    export_onnx,
    quantize_int8,
    set_metadata,
    torch_run_fn,
)
from model_code.onnx_runtime import META_FEATURES, META_LM_ARPA, META_QUANT, META_TOKENIZER, batched_logprobs
from model_code.tokenizer import CharTokenizer

KW = dict(n_mels=40, vocab_size=29, d_model=32, n_layers=1, n_heads=2, ff_mult=2, conv_kernel=7, dropout=0.1,
          subsampling_channels=16)
FEATS = dict(sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=40, f_min=0.0, f_max=None,
             log_offset=1e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = ConformerCTC(**KW)
    model.train()  # export must switch to eval (dropout off) and restore the mode
    md = build_metadata(CharTokenizer(), FEATS, "a\ta |\n", "\\data\\\n", extra={"train_md5": "abc", "golden_md5": "def"})
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "m.onnx", 40, opset=17, metadata=md)
    assert model.training
    return model, path


def test_graph_has_dynamic_axes_opset_and_metadata(exported):
    _, path = exported
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    feats = m.graph.input[0]
    assert feats.name == "features"
    dims = feats.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_param == "time" and dims[2].dim_value == 40
    assert [o.name for o in m.graph.output] == ["log_probs", "out_lengths"]
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props[META_TOKENIZER]) == CharTokenizer().to_dict()
    assert json.loads(props[META_FEATURES])["n_mels"] == 40
    assert props["asrflow.train_md5"] == "abc" and props[META_LM_ARPA].startswith("\\data\\")


@pytest.mark.parametrize("batch,frames", [(1, 17), (3, 333), (2, 1201)])
def test_onnxruntime_matches_torch_for_any_batch_and_length(exported, batch, frames):
    model, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(frames)
    x = rng.standard_normal((batch, frames, 40)).astype(np.float32)
    lens = np.array([frames] + [max(frames - 7 * i, 1) for i in range(1, batch)], dtype=np.int64)
    lp, ol = sess.run(None, {"features": x, "lengths": lens})
    tlp, tol = torch_run_fn(model)(x, lens)
    assert lp.shape == tlp.shape and (ol == tol).all()
    for i in range(batch):
        assert np.abs(lp[i, : ol[i]] - tlp[i, : tol[i]]).max() < 1e-4


def test_padding_does_not_change_an_utterance(exported):
    """An utterance gives the same log-probs alone and padded in a batch (batched_logprobs relies on it)."""
    model, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feats = [rng.standard_normal((n, 40)).astype(np.float32) for n in (50, 90, 130)]

    def run(x, lens):
        return sess.run(None, {"features": x, "lengths": lens})

    batched = batched_logprobs(run, feats, chunk_frames=1000, overlap_frames=0)
    alone = [run(f[None], np.array([f.shape[0]]))[0][0] for f in feats]
    cmp = compare_logprobs(batched, alone)
    assert cmp["shapes_equal"] and cmp["max_abs_diff"] < 1e-4


def test_int8_quantization_is_smaller_keeps_metadata_and_stays_close(exported, tmp_path):
    model, path = exported
    settings = quantize_int8(path, tmp_path / "q.onnx")
    q = onnx.load(str(tmp_path / "q.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    props = {p.key: p.value for p in q.metadata_props}
    assert json.loads(props[META_QUANT]) == settings and settings["weight_type"] == "QInt8"
    assert props["asrflow.golden_md5"] == "def"
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 200, 40)).astype(np.float32)
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"features": x, "lengths": np.array([200])})[0]
    b = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"features": x, "lengths": np.array([200])})[0]
    assert 0 < np.abs(a - b).max() < 1.0  # quantized: different, but not garbage
    assert (tmp_path / "q.onnx").stat().st_size < path.stat().st_size


def test_set_metadata_updates_in_place_and_old_opset_is_rejected(exported, tmp_path):
    model, path = exported
    p = tmp_path / "copy.onnx"
    p.write_bytes(path.read_bytes())
    set_metadata(p, {"asrflow.train_md5": "new", "x.y": "1"})
    props = {e.key: e.value for e in onnx.load(str(p)).metadata_props}
    assert props["asrflow.train_md5"] == "new" and props["x.y"] == "1" and META_TOKENIZER in props
    with pytest.raises(ValueError):
        export_onnx(model, tmp_path / "old.onnx", 40, opset=16)

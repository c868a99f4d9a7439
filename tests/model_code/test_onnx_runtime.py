"""Torch-free inference: resampling, batching, long-form chunking, LM files, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model_code.audio import resample as resample_np
from model_code.conformer import ConformerCTC
from model_code.lm import build_arpa, build_lexicon, lexicon_words
from model_code.onnx_export import build_metadata, compare_logprobs, export_onnx, torch_run_fn
from model_code.onnx_runtime import CtcDecoder, OnnxAsr, batched_logprobs, pad_batch
from model_code.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[2]
KW = dict(n_mels=80, vocab_size=29, d_model=32, n_layers=1, n_heads=2, ff_mult=2, conv_kernel=7, dropout=0.0,
          subsampling_channels=16)
FEATS = dict(sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=80, f_min=0.0, f_max=None,
             log_offset=1e-6)
TEXTS = ["the cat sat", "a dog ran home", "the dog sat on the mat"]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    torch.manual_seed(0)
    model = ConformerCTC(**KW).eval()
    tok = CharTokenizer()
    md = build_metadata(tok, FEATS, build_lexicon(lexicon_words(TEXTS), tok), build_arpa(TEXTS, 3))
    path = export_onnx(model, tmp_path_factory.mktemp("ort") / "model.onnx", 80, metadata=md)
    return model, path


def _tone(sr: int, seconds: float, hz: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    w = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return np.stack([w] * channels, axis=1) if channels > 1 else w


def test_resample_keeps_the_frequency_and_duration():
    for sr in (8000, 44100, 22050):
        out = resample_np(_tone(sr, 1.0, 1000.0), sr, 16000)
        assert abs(out.shape[0] - 16000) <= 1
        spec = np.abs(np.fft.rfft(out))
        assert abs(np.argmax(spec) * 16000 / out.shape[0] - 1000.0) < 2.0
    w = _tone(16000, 0.1)
    assert np.array_equal(resample_np(w, 16000, 16000), w)


@pytest.mark.parametrize("sr,target,n", [(44100, 16000, 44100), (8000, 16000, 8001), (16000, 8000, 999), (48000, 16000, 4321)])
def test_resample_equals_scipy_resample_poly(sr, target, n):
    from math import gcd

    from scipy.signal import resample_poly

    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    g = gcd(sr, target)
    ref = resample_poly(x.astype(np.float64), target // g, sr // g)
    out = resample_np(x, sr, target, block=1000)  # several blocks
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-5


def test_batched_logprobs_keeps_order_and_equals_single_runs(onnx_model):
    model, path = onnx_model
    asr = OnnxAsr(path, decode="greedy")
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((n, 80)).astype(np.float32) for n in (300, 40, 170, 90, 41)]
    out = batched_logprobs(asr.run, feats, chunk_frames=1000, overlap_frames=100, max_batch_frames=400)
    single = [asr.run(*pad_batch([f]))[0][0] for f in feats]
    assert [o.shape[0] for o in out] == [(((n - 1) // 2 + 1) - 1) // 2 + 1 for n in (300, 40, 170, 90, 41)]
    assert compare_logprobs(out, single)["max_abs_diff"] < 1e-4
    # the torch model through the same function gives the same numbers (the gate relies on it)
    assert compare_logprobs(out, batched_logprobs(torch_run_fn(model), feats, 1000, 100))["max_abs_diff"] < 1e-4


def test_long_input_is_chunked_and_merged_at_frame_level(onnx_model):
    _, path = onnx_model
    asr = OnnxAsr(path, decode="greedy", chunk_s=4.0, chunk_overlap_s=1.0)
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((3001, 80)).astype(np.float32)  # 30 s: 400-frame chunks
    calls = []

    def run(x, lens):
        calls.append(x.shape[1])
        return asr.run(x, lens)

    out = batched_logprobs(run, [feats], asr.chunk_frames, asr.overlap_frames)[0]
    assert out.shape == ((3001 + 3) // 4, 29)
    assert len(calls) > 5 and max(calls) <= asr.chunk_frames
    assert np.allclose(np.exp(out).sum(-1), 1.0, atol=1e-3)  # every merged frame is a distribution


def test_beam_decoder_uses_the_embedded_lm_and_falls_back_to_greedy(onnx_model, tmp_path):
    _, path = onnx_model
    asr = OnnxAsr(path, decode="beam", beam_size=4)
    assert asr.decode_mode == "beam"
    # lexicon-constrained: whatever a random model emits, the beam output uses lexicon words only
    words = set(lexicon_words(TEXTS))
    rng = np.random.default_rng(2)
    texts = asr.transcribe_features([rng.standard_normal((200, 80)).astype(np.float32) for _ in range(3)])
    assert all(set(t.split()) <= words for t in texts)
    # sidecar files next to the model win over the embedded copies
    side = tmp_path / "m.onnx"
    side.write_bytes(path.read_bytes())
    (tmp_path / "lexicon.txt").write_text("zzz\tz z z |\n")
    (tmp_path / "lm.arpa").write_text(build_arpa(["zzz"], 2))
    asr2 = OnnxAsr(side, decode="beam", beam_size=4)
    assert all(set(t.split()) <= {"zzz"} for t in asr2.transcribe_features([rng.standard_normal((200, 80)).astype(np.float32)]))
    assert CtcDecoder(CharTokenizer(), "beam").mode == "greedy"  # no LM: greedy, and it says so


def test_not_an_asrflow_model_is_rejected(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="not an asrflow export"):
        OnnxAsr(tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        OnnxAsr(tmp_path / "missing.onnx")


def test_transcribe_runs_without_torch(onnx_model, tmp_path):
    """onnx_runtime and everything it imports work with torch made unimportable."""
    _, path = onnx_model
    sf.write(tmp_path / "a8k.wav", _tone(8000, 1.5), 8000)
    sf.write(tmp_path / "b44k.wav", _tone(44100, 1.2, channels=2), 44100)
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        sys.path.insert(0, {str(REPO)!r})
        from model_code.onnx_runtime import OnnxAsr
        asr = OnnxAsr({str(path)!r}, decode="beam", beam_size=4)
        out = [asr.transcribe_file({str(tmp_path)!r} + "/" + n) for n in ("a8k.wav", "b44k.wav")]
        print(json.dumps({{"out": out, "torch": [m for m in sys.modules if m.startswith("torch")]}}))
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["torch"] == ["torch"]  # only the blocked placeholder
    a, b = res["out"]
    assert a["orig_sample_rate"] == 8000 and abs(a["duration"] - 1.5) < 1e-3
    assert b["orig_sample_rate"] == 44100 and b["orig_channels"] == 2 and abs(b["duration"] - 1.2) < 1e-3
    assert all(isinstance(x["text"], str) and x["rtf"] > 0 for x in res["out"])

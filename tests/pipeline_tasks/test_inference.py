"""`asrflow transcribe` / `asrflow evaluate --model`: manifests, other sample rates, long-form, registry URIs, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from model_code.audio import resample as resample_np
from model_code.metrics import error_counts
from pipeline_tasks.contract import resolve
from pipeline_tasks.services import inference, registry
from pipeline_tasks.steps import promote
from tests.conftest import make_tiny_cfg
from tests.pipeline_tasks.gate_helpers import export_and_evaluate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_landing, tiny_golden, golden_res, models):
    """The trained model exported and registered as `staging` (real evaluate → export → promote)."""
    cfg = make_tiny_cfg(tmp_path_factory.mktemp("inf") / "art", tiny_landing, tiny_golden, ["decode.beam_size=8"])
    ex, ev = export_and_evaluate(cfg, models["good"], golden_res)
    pr = promote.run(cfg, {"export": ex, "evaluate": ev})
    assert pr["alias"] == "staging"
    return cfg, ex


@pytest.fixture(scope="module")
def golden_manifest(tiny_golden) -> Path:
    return Path(tiny_golden) / "manifest.jsonl"


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]


def test_transcribe_manifest_and_evaluate_manifest(staged, golden_manifest, tmp_path, models):
    cfg, ex = staged
    out = tmp_path / "out" / "hyp.jsonl"
    recs = inference.transcribe_cli(cfg, str(resolve(ex, ex["onnx"])), [], golden_manifest, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == recs and len(lines) == len(_rows(golden_manifest))
    assert set(lines[0]) >= {"id", "audio_filepath", "text", "duration", "rtf"}
    assert all(r["rtf"] > 0 and r["duration"] > 0.3 for r in lines)
    # the registry URI resolves to the same model (downloaded once into the model cache)
    res = inference.evaluate_manifest(cfg, "models:/asr@staging", golden_manifest)
    assert res["version"] == "1" and res["n_utts"] == len(lines) and res["decode"] == "beam"
    # the trained model transcribes the golden set much better than chance
    assert 0 <= res["wer"] < 0.9 and res["cer"] < 0.5 and res["rtfx"] > 0
    assert list((cfg.root / "model_cache" / "asr").iterdir())
    with pytest.raises(LookupError):
        registry.resolve_model(cfg, "models:/asr@production")


def test_other_sample_rates_and_stereo(staged, golden_manifest, tmp_path):
    cfg, ex = staged
    asr, _ = inference.load_model(cfg, str(resolve(ex, ex["onnx"])), decode="greedy")
    row = _rows(golden_manifest)[0]
    wave, sr = sf.read(golden_manifest.parent / row["audio_filepath"], dtype="float32")
    ref16 = tmp_path / "ref16.wav"
    sf.write(ref16, wave if wave.ndim == 1 else wave.mean(1), sr)
    base = asr.transcribe_file(ref16)
    mono = wave if wave.ndim == 1 else wave.mean(1)
    up = resample_np(resample_np(mono, sr, 16000), 16000, 44100)
    sf.write(tmp_path / "st44.wav", np.stack([up, up], axis=1), 44100, subtype="PCM_16")
    sf.write(tmp_path / "m8.flac", resample_np(resample_np(mono, sr, 16000), 16000, 8000), 8000)
    recs = inference.transcribe_cli(cfg, str(resolve(ex, ex["onnx"])), [tmp_path / "st44.wav", tmp_path / "m8.flac"], None, tmp_path / "o.jsonl")
    st, m8 = recs
    assert st["orig_sample_rate"] == 44100 and m8["orig_sample_rate"] == 8000
    assert abs(st["duration"] - base["duration"]) < 0.01 and abs(m8["duration"] - base["duration"]) < 0.01
    # 44.1 kHz stereo of the same speech is transcribed about as well as the original file
    from model_code.text import normalize_text

    ref = normalize_text(row["text"])
    cer_base = error_counts([ref], [base["text"]])["cer"]
    assert error_counts([ref], [st["text"]])["cer"] <= cer_base + 0.1
    # 8 kHz lost the 4-8 kHz band the model was trained with: it still runs and yields text
    assert isinstance(m8["text"], str)


def test_seventy_second_recording_is_chunked(staged, golden_manifest, tmp_path):
    cfg, ex = staged
    # 4 s windows: the tiny model only ever saw <= 6 s inputs (its per-input feature normalization
    # over a 16 s window of several utterances and pauses is out of its training distribution)
    cfg = cfg.model_copy(update={"decode": cfg.decode.model_copy(update={"chunk_s": 4.0, "chunk_overlap_s": 1.0})})
    asr, _ = inference.load_model(cfg, str(resolve(ex, ex["onnx"])), decode="greedy")
    rows = _rows(golden_manifest)
    pieces, refs = [], []
    gap = np.zeros(4800, dtype=np.float32)
    while sum(p.shape[0] for p in pieces) < 70 * 16000:
        for r in rows:
            w, sr = sf.read(golden_manifest.parent / r["audio_filepath"], dtype="float32")
            w = resample_np(w if w.ndim == 1 else w.mean(1), sr, 16000)
            pieces += [w, gap]
            refs.append(r["text"].lower())
    long_wave = np.concatenate(pieces)
    sf.write(tmp_path / "long.wav", long_wave, 16000)
    calls = []
    run = asr.run

    def counting_run(x, lens):
        calls.append(x.shape[1])
        return run(x, lens)

    asr.run = counting_run
    rec = asr.transcribe_file(tmp_path / "long.wav")
    assert rec["duration"] >= 70.0 and len(calls) >= 5 and max(calls) <= asr.chunk_frames
    assert len(rec["text"].split()) >= len(refs)  # the whole recording was decoded, not one chunk
    # stitching: up to the middle of the first overlap, the recording's log-probs are exactly those
    # of the first window run alone (a quality-free check: the tiny model's words are not the point)
    from model_code.features import logmel

    asr.run = run
    feats = logmel(long_wave, **asr.feature_kwargs)
    whole = asr.logprobs([feats])[0]
    c, o = asr.chunk_frames // 4 * 4, asr.overlap_frames // 4 * 4
    alone, _ = asr.run(feats[None, :c].astype(np.float32), np.array([c], dtype=np.int64))
    end = ((c - o) + c) // 2 // 4
    np.testing.assert_allclose(whole[:end], alone[0][:end], atol=1e-4)
    assert not np.allclose(whole[end:end + 8], alone[0][end:end + 8], atol=1e-4)  # the next window takes over


def test_cli_transcribe_from_registry_without_torch(staged, golden_manifest, tmp_path):
    """`asrflow transcribe --model models:/asr@staging` end to end in a process where torch cannot be imported."""
    cfg, _ = staged
    out = tmp_path / "cli.jsonl"
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        sys.path.insert(0, {str(REPO)!r})
        from pipeline_tasks.cli import app
        try:
            app(["transcribe", "--model", "models:/asr@staging", "--manifest", {str(golden_manifest)!r},
                 "--output", {str(out)!r}, "--profile", "tiny", "--set", "paths.root={cfg.root}",
                 "--set", "paths.golden_dir={cfg.paths.golden_dir}"])
        except SystemExit as e:
            if e.code:
                raise
        print("TORCH_LOADED=" + str(any(m.startswith("torch.") for m in sys.modules)))
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TORCH_LOADED=False" in r.stdout
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(_rows(golden_manifest)) and all(isinstance(x["text"], str) for x in lines)

"""The numpy log-mel front end equals torchaudio's MelSpectrogram + log, and stays torch-free."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchaudio

from model_code.features import logmel, logmel_batch, mel_filterbank, num_frames


def _espeak_wave(tmp_path) -> np.ndarray:
    """Real synthesized speech (espeak-ng, the corpus' synthesizer), resampled to 16 kHz."""
    from model_code.audio import load_audio

    wav = tmp_path / "say.wav"
    subprocess.run(
        [
            shutil.which("espeak-ng") or "espeak-ng",
            "-w",
            str(wav),
            "the quick brown fox jumps over the lazy dog",
        ],
        check=True,
        capture_output=True,
    )
    wave, orig_sr, _ = load_audio(wav, target_sr=16000)
    assert orig_sr != 16000 or wave.size > 16000
    return wave


def _torch_logmel(
    wave, sr=16000, n_fft=400, win_length=400, hop=160, n_mels=80, f_min=0.0, f_max=None, off=1e-6
):
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=sr,
        n_fft=n_fft,
        win_length=win_length,
        hop_length=hop,
        f_min=f_min,
        f_max=f_max,
        n_mels=n_mels,
        power=2.0,
        center=True,
        pad_mode="reflect",
        norm=None,
        mel_scale="htk",
    )(torch.from_numpy(wave))
    return torch.log(mel + off).T.numpy()  # (T, n_mels)


@pytest.mark.parametrize(
    "kw",
    [
        {},  # the pipeline default: 80 mels, 25 ms / 10 ms
        {"n_mels": 40, "f_min": 20.0, "f_max": 7600.0},
        {"n_fft": 512, "win_length": 400, "hop_length": 128, "n_mels": 64},  # window padded inside n_fft
    ],
)
def test_logmel_matches_torchaudio_on_speech(tmp_path, kw):
    wave = _espeak_wave(tmp_path)
    ours = logmel(wave, **kw)
    ref = _torch_logmel(
        wave,
        n_fft=kw.get("n_fft", 400),
        win_length=kw.get("win_length", 400),
        hop=kw.get("hop_length", 160),
        n_mels=kw.get("n_mels", 80),
        f_min=kw.get("f_min", 0.0),
        f_max=kw.get("f_max"),
    )
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert ours.shape[0] == num_frames(wave.shape[0], kw.get("hop_length", 160))
    # log domain: absolute error; speech frames span ~25 nats, float32 rounding gives ~1e-4
    assert np.abs(ours - ref).max() < 2e-3
    assert np.abs(ours - ref).mean() < 1e-4


def test_filterbank_matches_torchaudio():
    import torchaudio.functional as AF

    for n_freqs, f_min, f_max, n_mels, sr in [(201, 0.0, 8000.0, 80, 16000), (257, 50.0, 4000.0, 23, 8000)]:
        ref = AF.melscale_fbanks(n_freqs, f_min, f_max, n_mels, sr, norm=None, mel_scale="htk").numpy()
        np.testing.assert_allclose(
            mel_filterbank(n_freqs, f_min, f_max, n_mels, sr), ref, atol=1e-5
        )  # torch builds it in float32


def test_edge_inputs_and_batch(tmp_path):
    silence = np.zeros(3000, np.float32)
    np.testing.assert_allclose(logmel(silence), _torch_logmel(silence), atol=1e-5)
    assert np.allclose(logmel(silence), np.log(1e-6), atol=1e-5)  # offset floors the log
    short = np.random.default_rng(0).standard_normal(150).astype(np.float32) * 0.1  # < n_fft/2 samples
    assert logmel(short).shape == (1, 80) and np.isfinite(logmel(short)).all()
    with pytest.raises(ValueError, match="mono"):
        logmel(np.zeros((2, 1600), np.float32))
    wave = _espeak_wave(tmp_path)
    waves = [wave, wave[:5000], wave[7000:9000]]
    for b, w in zip(logmel_batch(waves), waves, strict=True):
        np.testing.assert_allclose(b, logmel(w), atol=1e-5)


def test_features_module_does_not_import_torch():
    code = "import sys, model_code.features as f, numpy as np; f.logmel(np.zeros(1600, np.float32)); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

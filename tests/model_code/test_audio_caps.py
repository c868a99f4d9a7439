"""Decompression bombs are refused from the header, before a sample is decoded (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from model_code import audio
from model_code.audio import AudioDecodeError, load_audio


@pytest.fixture()
def no_decode(monkeypatch):
    """Fail the test if anything is decoded."""

    def boom(*a, **k):
        raise AssertionError("decoded although the header is over the cap")

    monkeypatch.setattr(audio.sf, "read", boom)


def _flac_silence(path, seconds: float, sr: int = 16000, channels: int = 1):
    sf.write(str(path), np.zeros((int(seconds * sr), channels), np.float32), sr, format="FLAC", subtype="PCM_16")
    return path


def test_a_small_flac_that_declares_long_audio_is_refused_without_decoding(tmp_path, no_decode):
    bomb = _flac_silence(tmp_path / "bomb.flac", 120.0)  # 2 minutes of silence: a few KB, 7.7 MB decoded
    assert bomb.stat().st_size < 50_000
    with pytest.raises(AudioDecodeError) as ei:
        load_audio(bomb, max_duration_s=10.0)
    assert ei.value.reason == "audio_too_long" and "120.0 s" in ei.value.message
    with pytest.raises(AudioDecodeError) as ei:
        load_audio(bomb, max_decoded_bytes=1 << 20)  # 1 MiB cap
    assert ei.value.reason == "audio_too_large"


def test_channel_and_rate_caps(tmp_path, no_decode):
    wide = _flac_silence(tmp_path / "wide.flac", 0.5, channels=8)
    with pytest.raises(AudioDecodeError) as ei:
        load_audio(wide, max_channels=2)
    assert ei.value.reason == "audio_too_large" and "8 channels" in ei.value.message
    fast = tmp_path / "fast.wav"
    sf.write(str(fast), np.zeros(4800, np.float32), 96000, subtype="PCM_16")
    with pytest.raises(AudioDecodeError) as ei:
        load_audio(fast, max_sample_rate=48000)
    assert ei.value.reason == "audio_too_large" and "96000" in ei.value.message


def test_audio_within_the_caps_decodes_as_before(tmp_path):
    ok = _flac_silence(tmp_path / "ok.flac", 2.0)
    wave, sr, ch = load_audio(ok, max_duration_s=2.0, max_decoded_bytes=1 << 20, max_channels=1, max_sample_rate=16000)
    assert (wave.shape[0], sr, ch) == (32000, 16000, 1)
    assert np.array_equal(wave, load_audio(ok)[0])

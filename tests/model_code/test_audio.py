"""model_code.audio: real files of every supported format, and every way a file can be bad."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from model_code.audio import AudioDecodeError, load_audio, pcm16_hash, to_pcm16, write_flac


def _tone(seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    w = (0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    return np.stack([w, 0.5 * w], axis=1) if channels == 2 else w


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_decodes_each_format_to_16k_mono(tmp_path, fmt):
    p = tmp_path / f"a.{fmt.lower()}"
    sf.write(str(p), _tone(1.0, 16000), 16000, format=fmt)
    wave, sr, ch = load_audio(p)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert (sr, ch) == (16000, 1)
    assert abs(len(wave) - 16000) < 1200  # MP3 adds encoder padding
    assert 0.2 < np.abs(wave).max() < 0.5


def test_resamples_8k_and_downmixes_44k_stereo(tmp_path):
    sf.write(str(tmp_path / "a.wav"), _tone(1.5, 8000), 8000)
    wave, sr, ch = load_audio(tmp_path / "a.wav")
    assert (len(wave), sr, ch) == (24000, 8000, 1)
    sf.write(str(tmp_path / "b.wav"), _tone(1.5, 44100, channels=2), 44100)
    wave, sr, ch = load_audio(tmp_path / "b.wav")
    assert (len(wave), sr, ch) == (24000, 44100, 2)
    # downmix = mean of (w, 0.5 w) = 0.75 w -> peak about 0.3
    assert 0.27 < np.abs(wave).max() < 0.33


def test_file_objects_and_target_none(tmp_path):
    buf = io.BytesIO()
    sf.write(buf, _tone(0.5, 22050), 22050, format="WAV")
    buf.seek(0)
    wave, sr, _ = load_audio(buf, target_sr=None)
    assert (len(wave), sr) == (11025, 22050)


def _bad(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(AudioDecodeError) as ei:
        load_audio(p)
    return ei.value


def test_bad_files_raise_with_reason(tmp_path):
    buf = io.BytesIO()
    sf.write(buf, _tone(2.0, 16000), 16000, format="WAV", subtype="PCM_16")
    wav = buf.getvalue()
    e = _bad(tmp_path, "trunc.wav", wav[: len(wav) // 2])
    assert e.reason == "audio_truncated" and "declares" in e.message
    buf = io.BytesIO()
    sf.write(buf, _tone(2.0, 16000), 16000, format="FLAC")
    flac = buf.getvalue()
    assert _bad(tmp_path, "trunc.flac", flac[: len(flac) // 2]).reason == "audio_truncated"
    assert _bad(tmp_path, "text.wav", b"definitely not audio\n" * 10).reason == "not_audio"
    assert _bad(tmp_path, "zero.wav", b"").reason == "audio_empty"
    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, np.float32), 16000, format="WAV")
    assert _bad(tmp_path, "noframes.wav", buf.getvalue()).reason == "audio_empty"
    with pytest.raises(AudioDecodeError) as ei:
        load_audio(tmp_path / "does-not-exist.wav")
    assert ei.value.reason == "audio_missing"
    buf = io.BytesIO()
    sf.write(buf, np.array([0.1, np.nan, 0.2] * 100, np.float32), 16000, format="WAV", subtype="FLOAT")
    assert _bad(tmp_path, "nan.wav", buf.getvalue()).reason == "audio_nonfinite"


def test_error_pickles_with_reason():
    import pickle

    e = pickle.loads(pickle.dumps(AudioDecodeError("not_audio", "x")))
    assert (e.reason, e.message) == ("not_audio", "x")


def test_write_flac_round_trip_keeps_hash(tmp_path):
    rng = np.random.default_rng(0)
    wave = np.clip(rng.standard_normal(16000) * 0.3, -1, 1).astype(np.float32)
    dest = tmp_path / "x" / "y.flac"
    write_flac(dest, wave, 16000)
    assert [p.name for p in dest.parent.iterdir()] == ["y.flac"]  # no temp file left
    info = sf.info(str(dest))
    assert (info.format, info.subtype, info.samplerate) == ("FLAC", "PCM_16", 16000)
    back, sr, ch = load_audio(dest)
    assert np.array_equal(to_pcm16(back), to_pcm16(wave))
    assert pcm16_hash(back) == pcm16_hash(wave)
    assert pcm16_hash(wave) != pcm16_hash(wave * 0.5)
    assert to_pcm16(np.array([2.0, -2.0, 1.0, -1.0], np.float32)).tolist() == [32767, -32768, 32767, -32768]

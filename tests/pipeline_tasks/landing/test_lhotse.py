"""Lhotse manifests (recordings + supervisions, cuts; JSONL and JSONL.gz) → landing batch, without lhotse."""

from __future__ import annotations

import gzip
import json

import numpy as np
import soundfile as sf

from pipeline_tasks.landing import import_batch
from tests.pipeline_tasks.landing.helpers import check_rows, read_batch, reasons


def _write_jsonl(path, items):
    data = "".join(json.dumps(x) + "\n" for x in items).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _rec(rid, path, sr, frames, channels=(0,), stype="file", **extra):
    return {
        "id": rid,
        "sources": [{"type": stype, "channels": list(channels), "source": str(path)}],
        "sampling_rate": sr,
        "num_samples": frames,
        "duration": frames / sr,
        "channel_ids": list(channels),
        **extra,
    }


def _sup(sid, rid, start, duration, text, speaker, **extra):
    return {"id": sid, "recording_id": rid, "start": start, "duration": duration, "channel": 0, "text": text,
            "language": "English", "speaker": speaker, **extra}


def _corpus(tmp_path, speech):
    """Audio + recordings: rec1 = two utterances with a gap, rec2 = one whole utterance, rec3 = stereo."""
    sr = speech[0].sr
    audio = tmp_path / "audio"
    audio.mkdir()
    gap = np.zeros(sr // 4, np.int16)
    long = np.concatenate([speech[0].pcm, gap, speech[1].pcm])
    sf.write(str(audio / "rec1.flac"), long, sr)
    sf.write(str(audio / "rec2.wav"), speech[2].pcm, sr)
    n = len(speech[3].pcm)
    other = np.resize(speech[4].pcm, n)
    sf.write(str(audio / "rec3.wav"), np.stack([other, speech[3].pcm], axis=1), sr)
    recs = [
        _rec("rec1", "audio/rec1.flac", sr, len(long)),  # relative: against the manifest's folder
        _rec("rec2", audio / "rec2.wav", sr, len(speech[2].pcm)),
        _rec("rec3", audio / "rec3.wav", sr, n, channels=(0, 1)),
        _rec("rec4", "https://example.invalid/a.flac", sr, sr, stype="url"),
        _rec("rec5", audio / "rec2.wav", sr, len(speech[2].pcm), transforms=[{"name": "Speed", "kwargs": {"factor": 1.1}}]),
    ]
    s1_start = (len(speech[0].pcm) + len(gap)) / sr
    return sr, recs, s1_start


def test_lhotse_recordings_and_supervisions(tmp_path, speech):
    sr, recs, s1_start = _corpus(tmp_path, speech)
    sups = [
        _sup("s0", "rec1", 0.0, speech[0].seconds, speech[0].text, "spk0"),
        _sup("s1", "rec1", s1_start, speech[1].seconds, speech[1].text, "spk1"),
        _sup("s2", "rec2", 0.0, speech[2].seconds, speech[2].text, "spk2"),  # the whole file: copied
        _sup("s3", "rec3", 0.0, speech[3].seconds, speech[3].text, "spk3", channel=1),  # right channel only
        _sup("s4", "rec4", 0.0, 1.0, "from a url", "spk4"),
        _sup("s5", "rec5", 0.0, 1.0, "speed perturbed", "spk4"),
        _sup("s6", "nope", 0.0, 1.0, "no recording", "spk4"),
        _sup("s7", "rec1", 30.0, 1.0, "after the end", "spk4"),
        _sup("s8", "rec1", 0.0, 1.0, None, "spk4"),
        _sup("s9", "rec3", 0.0, 1.0, "no such channel", "spk4", channel=5),
    ]
    _write_jsonl(tmp_path / "mini_recordings_dev.jsonl.gz", recs)
    _write_jsonl(tmp_path / "mini_supervisions_dev.jsonl.gz", sups)

    # SRC = the supervision manifest: its recordings are found beside it by lhotse's naming
    res = import_batch("lhotse", tmp_path / "mini_supervisions_dev.jsonl.gz", "lh", tmp_path / "landing", jobs=2)
    batch = tmp_path / "landing" / "lh"
    rows, report = read_batch(batch)
    assert [(r["id"], r["speaker"], r["text"]) for r in rows] == [
        ("s0", "spk0", speech[0].text), ("s1", "spk1", speech[1].text),
        ("s2", "spk2", speech[2].text), ("s3", "spk3", speech[3].text),
    ]
    by = {r["id"]: r for r in rows}
    assert by["s2"]["audio_filepath"] == "audio/s2.wav"  # whole-file supervision: the file, not a cut
    assert by["s0"]["audio_filepath"] == "audio/s0.flac"
    for sid, u in zip(["s0", "s1", "s2", "s3"], speech[:4], strict=True):
        data, _ = sf.read(str(batch / by[sid]["audio_filepath"]), dtype="int16")
        assert data.tolist() == u.pcm.tolist(), sid  # segment and channel cuts are exact
        assert abs(by[sid]["duration"] - u.seconds) < 1e-3
    check_rows(batch, rows)
    assert reasons(report) == {
        "s4": "unsupported_source", "s5": "unsupported_source", "s6": "unknown_recording",
        "s7": "bad_segment", "s8": "missing_transcript", "s9": "bad_segment",
    }
    assert res["audio"] == {"copied": 1, "cut": 3}

    # SRC = the folder: the same result (same batch content, so a no-op)
    again = import_batch("lhotse", tmp_path, "lh", tmp_path / "landing", jobs=1)
    assert again["status"] == "unchanged"


def test_lhotse_cuts(tmp_path, speech):
    sr, recs, s1_start = _corpus(tmp_path, speech)
    rec1 = recs[0]
    rec1 = {**rec1, "sources": [{**rec1["sources"][0], "source": str(tmp_path / "audio" / "rec1.flac")}]}
    s1 = {"id": "s1", "recording_id": "rec1", "start": 0.25, "duration": speech[1].seconds, "channel": 0,
          "text": speech[1].text, "speaker": "spk1"}
    s0 = {"id": "s0", "recording_id": "rec1", "start": 0.0, "duration": speech[0].seconds, "channel": 0,
          "text": speech[0].text, "speaker": "spk0"}
    cuts = [
        # a cut starting 0.25 s before s1: s1's start is relative to the cut
        {"id": "c1", "start": s1_start - 0.25, "duration": speech[1].seconds + 0.25, "channel": 0,
         "supervisions": [s1], "recording": rec1, "type": "MonoCut"},
        # two overlapping windows both holding s0: imported once
        {"id": "c2", "start": 0.0, "duration": 2.0, "channel": 0, "supervisions": [s0], "recording": rec1, "type": "MonoCut"},
        {"id": "c3", "start": 0.0, "duration": 3.0, "channel": 0, "supervisions": [s0], "recording": rec1, "type": "MonoCut"},
        {"id": "c4", "start": 0.0, "duration": 1.0, "channel": 0, "supervisions": [], "recording": rec1, "type": "MonoCut"},
        {"id": "c5", "tracks": [], "type": "MixedCut"},
        {"id": "c6", "start": 0.0, "duration": 1.0, "channel": 0, "supervisions": [s0], "features": {}, "type": "MonoCut"},
    ]
    _write_jsonl(tmp_path / "cuts.jsonl", cuts)
    (tmp_path / "cuts.jsonl").write_text((tmp_path / "cuts.jsonl").read_text() + "{not json\n")
    res = import_batch("lhotse", tmp_path / "cuts.jsonl", "lh-cuts", tmp_path / "landing", jobs=1)
    batch = tmp_path / "landing" / "lh-cuts"
    rows, report = read_batch(batch)
    assert [(r["id"], r["speaker"], r["text"]) for r in rows] == [("s1", "spk1", speech[1].text), ("s0", "spk0", speech[0].text)]
    for r, u in zip(rows, [speech[1], speech[0]], strict=True):
        assert sf.read(str(batch / r["audio_filepath"]), dtype="int16")[0].tolist() == u.pcm.tolist()
    check_rows(batch, rows)
    assert reasons(report) == {
        "c4": "missing_transcript", "c5": "unsupported_source", "c6": "unsupported_source", "cuts.jsonl:7": "bad_line",
    }
    assert any("more than one cut" in n for n in res["notes"])

"""Kaldi data dir → landing batch: segments cut into their own files, pipes and bad bounds reported."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from pipeline_tasks.landing import import_batch
from tests.pipeline_tasks.landing.helpers import check_rows, read_batch, reasons


def _recording(path, parts, sr):
    """Concatenate utterances with 0.5 s of silence between them; returns each part's (start, end) in s."""
    gap = np.zeros(sr // 2, np.int16)
    pcm, bounds, pos = [], [], 0
    for p in parts:
        pcm += [p, gap]
        bounds.append((pos / sr, (pos + len(p)) / sr))
        pos += len(p) + len(gap)
    sf.write(str(path), np.concatenate(pcm), sr, subtype="PCM_16")
    return bounds


def test_kaldi_segments(tmp_path, speech):
    sr = speech[0].sr
    d = tmp_path / "s5" / "data" / "train"
    d.mkdir(parents=True)
    wav = tmp_path / "s5" / "wav"
    wav.mkdir()
    b1 = _recording(wav / "rec1.wav", [speech[0].pcm, speech[1].pcm], sr)
    b2 = _recording(wav / "rec2.wav", [speech[2].pcm, speech[3].pcm], sr)
    rec2_s = sf.info(str(wav / "rec2.wav")).duration
    # rec1: a path relative to the recipe folder (s5/), as Kaldi recipes write them; rec2: absolute
    (d / "wav.scp").write_text(
        f"rec1 wav/rec1.wav\nrec2 {wav / 'rec2.wav'}\nrec3 sox {wav / 'rec1.wav'} -t wav - |\nrec4 {wav / 'gone.wav'}\n"
    )
    segs = {
        "spkA-u1": ("rec1", *b1[0]),
        "spkA-u2": ("rec1", *b1[1]),
        "spkB-u3": ("rec2", *b2[0]),
        "spkB-u4": ("rec2", b2[1][0], -1),  # -1: to the end of the recording
        "spkA-u5": ("rec3", 0.0, 1.0),  # pipe
        "spkA-u6": ("rec2", 1.0, rec2_s + 3.0),  # ends 3 s past the recording
        "spkA-u7": ("rec9", 0.0, 1.0),  # not in wav.scp
        "spkA-u8": ("rec4", 0.0, 1.0),  # file missing
        "spkA-u9": ("rec1", 2.0, 1.0),  # end before start
        "spkB-u10": ("rec1", 0.0, 0.5),  # no transcript
    }
    (d / "segments").write_text("".join(f"{u} {r} {s} {e}\n" for u, (r, s, e) in segs.items()))
    texts = {"spkA-u1": speech[0].text, "spkA-u2": speech[1].text, "spkB-u3": speech[2].text, "spkB-u4": speech[3].text}
    texts.update({u: "some words" for u in ("spkA-u5", "spkA-u6", "spkA-u7", "spkA-u8", "spkA-u9", "spkX-u11")})
    (d / "text").write_text("".join(f"{u} {t}\n" for u, t in texts.items()))
    (d / "utt2spk").write_text("".join(f"{u} {u.split('-')[0]}\n" for u in list(segs) + ["spkX-u11"]))

    res = import_batch("kaldi", d, "kaldi-train", tmp_path / "landing", jobs=2)
    batch = tmp_path / "landing" / "kaldi-train"
    rows, report = read_batch(batch)

    assert [r["id"] for r in rows] == ["spkA-u1", "spkA-u2", "spkB-u3", "spkB-u4"]
    src = {"spkA-u1": speech[0], "spkA-u2": speech[1], "spkB-u3": speech[2]}
    for r in rows:
        assert r["speaker"] == r["id"].split("-")[0] and r["text"] == texts[r["id"]]
        assert r["audio_filepath"] == f"audio/{r['id']}.flac"
        cut, cut_sr = sf.read(str(batch / r["audio_filepath"]), dtype="int16")
        assert cut_sr == sr
        if r["id"] in src:  # the cut is exactly the utterance that was put there
            assert cut.tolist() == src[r["id"]].pcm.tolist()
            assert abs(r["duration"] - src[r["id"]].seconds) < 1e-3
    u4 = rows[3]  # to the end: the utterance plus the trailing 0.5 s gap
    assert abs(u4["duration"] - (speech[3].seconds + 0.5)) < 1e-3
    check_rows(batch, rows)
    assert reasons(report) == {
        "spkA-u5": "unsupported_source",
        "spkA-u6": "bad_segment",
        "spkA-u7": "unknown_recording",
        "spkA-u8": "audio_missing",
        "spkA-u9": "bad_segment",
        "spkB-u10": "missing_transcript",
        "spkX-u11": "audio_missing",
    }
    msgs = {e["id"]: e["message"] for e in report["rejected"]}
    assert "pipe command" in msgs["spkA-u5"] and "long" in msgs["spkA-u6"]
    assert res["audio"] == {"cut": 4} and res["n_rejected"] == 7


def test_kaldi_without_segments(tmp_path, speech):
    d = tmp_path / "data"
    d.mkdir()
    for u in speech[:3]:
        sf.write(str(d / f"{u.id}.wav"), u.pcm, u.sr)
    (d / "wav.scp").write_text("".join(f"{u.id} {u.id}.wav\n" for u in speech[:3]))  # relative to the data dir
    (d / "text").write_text("".join(f"{u.id} {u.text}\n" for u in speech[:2]))
    (d / "utt2spk").write_text("".join(f"{u.id} {u.speaker}\n" for u in speech[:3]))
    res = import_batch("kaldi", d, "k2", tmp_path / "landing", jobs=1)
    rows, report = read_batch(tmp_path / "landing" / "k2")
    assert [(r["id"], r["speaker"], r["text"]) for r in rows] == [(u.id, u.speaker, u.text) for u in speech[:2]]
    assert all(r["audio_filepath"].endswith(".wav") for r in rows)  # whole files are copied as they are
    check_rows(tmp_path / "landing" / "k2", rows)
    assert reasons(report) == {speech[2].id: "missing_transcript"}
    assert res["audio"] == {"copied": 2}

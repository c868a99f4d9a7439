"""LibriSpeech layout → landing batch: ids, speakers, durations, transcripts, and every unmappable entry reported."""

from __future__ import annotations

import soundfile as sf

from pipeline_tasks.landing import import_batch
from tests.pipeline_tasks.landing.helpers import check_rows, make_librispeech, read_batch, reasons


def test_librispeech_batch(tmp_path, speech):
    src = tmp_path / "LibriSpeech"
    made = make_librispeech(src, speech, n=4)
    chapter = src / "dev-clean" / "19" / "198"
    trans = chapter / "19-198.trans.txt"
    # a transcript line whose audio is gone, a line with no transcript, and audio no line names
    sf.write(str(chapter / "19-198-0098.flac"), speech[4].pcm, speech[4].sr)
    sf.write(str(chapter / "19-198-0099.flac"), speech[5].pcm, speech[5].sr)
    trans.write_text(trans.read_text() + "19-198-0097 THIS AUDIO IS MISSING\n19-198-0098\n")

    res = import_batch("librispeech", src, "libri-dev", tmp_path / "landing", jobs=1)
    batch = tmp_path / "landing" / "libri-dev"
    rows, report = read_batch(batch)

    assert res["status"] == "written"
    assert [r["id"] for r in rows] == sorted(made)  # source order: trans files sorted, lines in order
    for r in rows:
        u = made[r["id"]]
        assert r["speaker"] == r["id"].split("-")[0]
        assert r["text"] == u.text.upper()  # original transcript: not normalized here
        assert abs(r["duration"] - u.seconds) < 1e-3
        assert r["audio_filepath"] == f"audio/{r['id']}.flac"
        assert sf.read(str(batch / r["audio_filepath"]), dtype="int16")[0].tolist() == u.pcm.tolist()
    check_rows(batch, rows)
    assert reasons(report) == {
        "19-198-0097": "audio_missing",
        "19-198-0098": "missing_transcript",
        "19-198-0099": "missing_transcript",
    }
    assert all(e["message"] and e["source"] for e in report["rejected"])
    assert res["n_imported"] == 4 and res["n_rejected"] == 3 and res["n_entries"] == 7
    assert res["rejected_reasons"] == {"audio_missing": 1, "missing_transcript": 2}
    assert res["n_speakers"] == 2 and res["audio"] == {"copied": 4}

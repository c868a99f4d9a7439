"""Hugging Face audiofolder (metadata.csv / metadata.jsonl + audio in subfolders) → landing batch."""

from __future__ import annotations

import csv
import json

import pytest
import soundfile as sf

from pipeline_tasks.landing import LandingImportError, import_batch
from tests.pipeline_tasks.landing.helpers import check_rows, read_batch, reasons


def test_audiofolder_csv(tmp_path, speech):
    src = tmp_path / "ds"
    (src / "data" / "a").mkdir(parents=True)
    (src / "data" / "b").mkdir(parents=True)
    files = []
    for i, u in enumerate(speech[:4]):
        rel = f"data/{'ab'[i % 2]}/{u.id}.{'wav' if i < 2 else 'flac'}"
        sf.write(str(src / rel), u.pcm, u.sr)
        files.append((rel, u))
    with open(src / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "transcription", "speaker_id", "duration"])
        for rel, u in files:
            w.writerow([rel, u.text, u.speaker, "99"])  # a wrong duration column is ignored: audio is measured
        w.writerow(["data/a/missing.wav", "not there", "s9", ""])
        w.writerow(["data/a/notext.wav", "", "s9", ""])
        f.write("data/a/short_row.wav\n")
    sf.write(str(src / "data/a/notext.wav"), speech[5].pcm, speech[5].sr)

    res = import_batch("audiofolder", src, "hf", tmp_path / "landing", jobs=2)
    batch = tmp_path / "landing" / "hf"
    rows, report = read_batch(batch)
    assert [(r["id"], r["speaker"], r["text"]) for r in rows] == [
        (rel.rsplit(".", 1)[0].replace("/", "-"), u.speaker, u.text) for rel, u in files
    ]
    for r, (rel, u) in zip(rows, files, strict=True):
        assert abs(r["duration"] - u.seconds) < 1e-3
        assert r["audio_filepath"].endswith(rel.rsplit(".", 1)[1])
    check_rows(batch, rows)
    assert reasons(report) == {"data-a-missing": "audio_missing", "data-a-notext": "missing_transcript", "metadata.csv:8": "bad_line"}
    assert res["n_imported"] == 4


def test_audiofolder_jsonl_text_column(tmp_path, speech):
    src = tmp_path / "ds"
    (src / "train" / "clips").mkdir(parents=True)
    lines = []
    for i, u in enumerate(speech[:3]):
        sf.write(str(src / "train" / "clips" / f"{i}.wav"), u.pcm, u.sr)
        lines.append({"file_name": f"clips/{i}.wav", "id": f"utt-{i}", "normalized": u.text.lower(), "raw": u.text.upper()})
    (src / "train" / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(LandingImportError, match="--text-column"):
        import_batch("audiofolder", src, "hf2", tmp_path / "landing")
    import_batch("audiofolder", src, "hf2", tmp_path / "landing", text_column="raw", jobs=1)
    rows, report = read_batch(tmp_path / "landing" / "hf2")
    assert [(r["id"], r["text"], "speaker" in r) for r in rows] == [(f"utt-{i}", u.text.upper(), False) for i, u in enumerate(speech[:3])]
    assert report["rejected"] == []

"""Common Voice release (TSV + MP3 clips) → landing batch; MP3 is written and read through libsndfile."""

from __future__ import annotations

import hashlib

import pytest
import soundfile as sf

from pipeline_tasks.landing import LandingImportError, import_batch
from tests.pipeline_tasks.landing.helpers import audio_seconds, check_rows, read_batch, reasons

HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age", "gender"]


def _client(n: int) -> str:
    return hashlib.sha512(f"client{n}".encode()).hexdigest()


def _release(root, speech):
    clips = root / "clips"
    clips.mkdir(parents=True)
    rows = []
    for i, u in enumerate(speech[:4]):
        name = f"common_voice_en_{1000 + i}.mp3"
        sf.write(str(clips / name), u.pcm, u.sr, format="MP3")
        rows.append([_client(i % 2), name, f"s{i}", u.text, "", "2", "0", "", ""])
    rows.append([_client(0), "common_voice_en_1098.mp3", "s8", "this clip was never downloaded", "", "2", "0", "", ""])
    sf.write(str(clips / "common_voice_en_1099.mp3"), speech[4].pcm, speech[4].sr, format="MP3")
    rows.append([_client(1), "common_voice_en_1099.mp3", "s9", "", "", "2", "0", "", ""])  # empty sentence
    lines = ["\t".join(HEADER)] + ["\t".join(r) for r in rows] + ["broken\trow"]
    (root / "validated.tsv").write_text("\n".join(lines) + "\n")
    # train.tsv: a different split, with a quote in a sentence (QUOTE_NONE: kept as is)
    (root / "train.tsv").write_text(
        "\t".join(HEADER) + "\n" + "\t".join([_client(0), "common_voice_en_1000.mp3", "s0", '"quoted" words', "", "", "", "", ""]) + "\n"
    )


def test_commonvoice_mp3_batch(tmp_path, speech):
    src = tmp_path / "cv-corpus" / "en"
    _release(src, speech)
    res = import_batch("commonvoice", src, "cv-en", tmp_path / "landing", jobs=2)
    batch = tmp_path / "landing" / "cv-en"
    rows, report = read_batch(batch)

    assert [r["id"] for r in rows] == [f"common_voice_en_{1000 + i}" for i in range(4)]
    for i, r in enumerate(rows):
        assert r["text"] == speech[i].text
        assert r["speaker"] == _client(i % 2)[:16]
        assert r["audio_filepath"] == f"audio/{r['id']}.mp3"  # copied as MP3: ingest decodes it
        # the declared duration is the decoded MP3 length (exact frames, not the header estimate)
        assert abs(r["duration"] - audio_seconds(src / "clips" / f"{r['id']}.mp3")) < 1e-3
        assert abs(r["duration"] - speech[i].seconds) < 0.1  # MP3 keeps the length, up to codec padding
    check_rows(batch, rows)
    assert reasons(report) == {
        "common_voice_en_1098": "audio_missing",
        "common_voice_en_1099": "missing_transcript",
        "validated.tsv:8": "bad_line",
    }
    assert res["n_rejected"] == 3 and res["n_imported"] == 4


def test_commonvoice_split_and_missing_split(tmp_path, speech):
    src = tmp_path / "en"
    _release(src, speech)
    import_batch("commonvoice", src, "cv-train", tmp_path / "landing", split="train", jobs=1)
    rows, _ = read_batch(tmp_path / "landing" / "cv-train")
    assert [(r["id"], r["text"]) for r in rows] == [("common_voice_en_1000", '"quoted" words')]
    with pytest.raises(LandingImportError, match="no dev.tsv"):
        import_batch("commonvoice", src, "cv-dev", tmp_path / "landing", split="dev")

"""End to end: imported batches (LibriSpeech copied, LibriSpeech in place, Common Voice MP3, Kaldi cuts)
go through the real ingest step and every imported row is accepted."""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq
import soundfile as sf

from pipeline_tasks.config import load_config
from pipeline_tasks.contract import resolve
from pipeline_tasks.graph import step_module
from pipeline_tasks.landing import import_batch
from tests.pipeline_tasks.landing.helpers import make_librispeech, read_batch


def test_imported_batches_are_ingested(tmp_path, speech):
    landing = tmp_path / "landing"
    make_librispeech(tmp_path / "LibriSpeech", speech, n=4)
    import_batch("librispeech", tmp_path / "LibriSpeech", "libri", landing, jobs=1)
    # already in the landing zone: referenced. Other audio than `libri` (half as loud): the same audio
    # under two ids is quarantined as duplicate_audio (it would land in both train and dev)
    quieter = [dataclasses.replace(u, pcm=(u.pcm // 2).astype(u.pcm.dtype)) for u in speech[:2]]
    make_librispeech(landing / "_src" / "LibriSpeech", quieter, n=2)
    res = import_batch("librispeech", landing / "_src" / "LibriSpeech", "libri-inplace", landing, mode="link", id_prefix="ip-")
    assert res["audio"] == {"in_place": 2}
    cv = tmp_path / "cv" / "en"
    (cv / "clips").mkdir(parents=True)
    sf.write(str(cv / "clips" / "cv1.mp3"), speech[4].pcm, speech[4].sr, format="MP3")
    (cv / "validated.tsv").write_text(f"client_id\tpath\tsentence\nabc\tcv1.mp3\t{speech[4].text}\n")
    import_batch("commonvoice", cv, "cv", landing, jobs=1)
    kd = tmp_path / "kaldi"
    kd.mkdir()
    sf.write(str(kd / "r.wav"), speech[5].pcm, speech[5].sr)
    (kd / "wav.scp").write_text(f"r {kd / 'r.wav'}\n")
    (kd / "segments").write_text("k1 r 0.2 1.4\n")
    (kd / "text").write_text("k1 a piece of it\n")
    import_batch("kaldi", kd, "kaldi", landing, jobs=1)

    imported = {}
    for b in ("libri", "libri-inplace", "cv", "kaldi"):
        rows, _ = read_batch(landing / b)
        imported.update({r["id"]: (b, r) for r in rows})
    assert len(imported) == 4 + 2 + 1 + 1

    cfg = load_config("tiny", [f"paths.root={tmp_path / 'art'}", f"paths.landing_url={landing}"])
    out = step_module("ingest").run(cfg, {})
    assert out["n_quarantined"] == 0, pq.read_table(resolve(out, out["quarantine"])).to_pylist()
    assert out["n_new"] == len(imported) and sorted(out["batches"]) == ["cv", "kaldi", "libri", "libri-inplace"]
    got = {r["id"]: r for r in pq.read_table(resolve(out, out["manifest"])).to_pylist()}
    assert set(got) == set(imported)
    for uid, (batch, row) in imported.items():
        g = got[uid]
        assert g["batch"] == batch and g["text_raw"] == row["text"] and g["speaker"] == row.get("speaker")
        assert abs(g["duration_s"] - row["duration"]) < 2e-3  # ingest resamples to 16 kHz

"""The batch writer, whatever the format: atomic, idempotent, refuses to overwrite, links, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import soundfile as sf
from typer.testing import CliRunner

from pipeline_tasks.cli import app
from pipeline_tasks.landing import BatchExistsError, LandingImportError, common, import_batch, resolve_landing
from tests.pipeline_tasks.landing.helpers import check_rows, make_librispeech, read_batch, reasons


def _files(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_rerun_is_a_noop_and_other_content_is_refused(tmp_path, speech):
    src = tmp_path / "src"
    made = make_librispeech(src, speech, n=4)
    landing = tmp_path / "landing"
    assert import_batch("librispeech", src, "b1", landing, jobs=1)["status"] == "written"
    before = _files(landing)
    again = import_batch("librispeech", src, "b1", landing, jobs=1)
    assert again["status"] == "unchanged" and again["n_imported"] == 4
    assert _files(landing) == before  # nothing rewritten, no staging folder left behind

    trans = next(src.rglob("19-198.trans.txt"))
    trans.write_text(trans.read_text().replace(made["19-198-0000"].text.upper(), "A DIFFERENT TRANSCRIPT"))
    with pytest.raises(BatchExistsError, match="different content.*line 1"):
        import_batch("librispeech", src, "b1", landing, jobs=1)
    assert _files(landing) == before
    # audio replaced by other audio of the same length (the manifest would be identical): refused as well
    trans.write_text(trans.read_text().replace("A DIFFERENT TRANSCRIPT", made["19-198-0000"].text.upper()))
    u = made["19-198-0000"]
    sf.write(str(next(src.rglob("19-198-0000.flac"))), u.pcm[::-1], u.sr)
    with pytest.raises(BatchExistsError, match="differs from its source"):
        import_batch("librispeech", src, "b1", landing, jobs=1)
    assert _files(landing) == before


def test_changed_audio_of_the_same_size_is_noticed(tmp_path, speech):
    """WAV copies and segment cuts: same size, same length, other samples; a touched file is still the same."""
    d = tmp_path / "data"
    d.mkdir()
    for u in speech[:2]:
        sf.write(str(d / f"{u.id}.wav"), u.pcm, u.sr, subtype="PCM_16")
    (d / "wav.scp").write_text("".join(f"{u.id} {u.id}.wav\n" for u in speech[:2]))
    (d / "text").write_text("".join(f"{u.id} {u.text}\n" for u in speech[:2]))
    landing = tmp_path / "landing"
    import_batch("kaldi", d, "whole", landing, jobs=1)
    seg = f"seg {speech[1].id} 0.2 {0.8 * len(speech[1].pcm) / speech[1].sr:.3f}\n"  # inside the utterance
    (d / "segments").write_text(seg)
    (d / "text").write_text("seg a few words\n")
    import_batch("kaldi", d, "cuts", landing, jobs=1)
    before = _files(landing)

    os.utime(d / f"{speech[1].id}.wav", ns=(1, 1))  # touched, same content: still a no-op
    assert import_batch("kaldi", d, "cuts", landing, jobs=1)["status"] == "unchanged"
    (d / "segments").unlink()
    (d / "text").write_text("".join(f"{u.id} {u.text}\n" for u in speech[:2]))
    assert import_batch("kaldi", d, "whole", landing, jobs=1)["status"] == "unchanged"

    size = (d / f"{speech[1].id}.wav").stat().st_size
    sf.write(str(d / f"{speech[1].id}.wav"), speech[1].pcm[::-1], speech[1].sr, subtype="PCM_16")
    assert (d / f"{speech[1].id}.wav").stat().st_size == size
    with pytest.raises(BatchExistsError, match="differs from its source"):
        import_batch("kaldi", d, "whole", landing, jobs=1)
    (d / "segments").write_text(seg)
    (d / "text").write_text("seg a few words\n")
    with pytest.raises(BatchExistsError, match="differs from its source"):
        import_batch("kaldi", d, "cuts", landing, jobs=1)
    assert _files(landing) == before


def test_link_mode_hardlinks_and_in_place(tmp_path, speech):
    landing = tmp_path / "landing"
    src = tmp_path / "src"
    make_librispeech(src, speech, n=2)
    res = import_batch("librispeech", src, "linked", landing, mode="link", jobs=1)
    assert res["audio"] == {"linked": 2}
    rows, _ = read_batch(landing / "linked")
    for r in rows:
        assert os.path.samefile(landing / "linked" / r["audio_filepath"], next(src.rglob(f"{r['id']}.flac")))
    # copied or linked: the same content, so a no-op
    assert import_batch("librispeech", src, "linked", landing, mode="copy")["status"] == "unchanged"

    # a source already inside the landing zone is referenced where it is (no copy)
    inside = landing / "_sources" / "LibriSpeech"
    make_librispeech(inside, speech, n=2)
    res = import_batch("librispeech", inside, "in-place", landing, mode="link", jobs=1)
    rows, _ = read_batch(landing / "in-place")
    assert res["audio"] == {"in_place": 2}
    assert all(r["audio_filepath"].startswith("../_sources/LibriSpeech/dev-clean/") for r in rows)
    check_rows(landing / "in-place", rows)
    assert not (landing / "in-place" / "audio").exists() or not any((landing / "in-place" / "audio").iterdir())


def test_failure_mid_write_leaves_nothing(tmp_path, speech, monkeypatch):
    src = tmp_path / "src"
    make_librispeech(src, speech, n=3)
    calls = []

    def flaky(s, d, mode):
        calls.append(d)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed half-way")
        return real(s, d, mode)

    real = common.place_file
    monkeypatch.setattr(common, "place_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        import_batch("librispeech", src, "b", tmp_path / "landing", jobs=1)
    assert list((tmp_path / "landing").iterdir()) == []  # no batch, no staging folder
    monkeypatch.setattr(common, "place_file", real)
    assert import_batch("librispeech", src, "b", tmp_path / "landing", jobs=1)["n_imported"] == 3


def test_write_time_failure_is_reported_and_rerun_is_a_noop(tmp_path, speech):
    """A FLAC whose header is fine but whose frames are cut short only fails when the segment is read."""
    d = tmp_path / "data"
    d.mkdir()
    sf.write(str(d / "good.flac"), speech[0].pcm, speech[0].sr)
    sf.write(str(d / "full.flac"), speech[1].pcm, speech[1].sr)
    data = (d / "full.flac").read_bytes()
    (d / "cut.flac").write_bytes(data[: len(data) // 3])
    (d / "wav.scp").write_text(f"good {d / 'good.flac'}\nbad {d / 'cut.flac'}\n")
    end = speech[1].seconds - 0.1
    (d / "segments").write_text(f"u1 good 0.1 1.0\nu2 bad 0.1 {end}\n")
    (d / "text").write_text("u1 first words\nu2 second words\n")
    res = import_batch("kaldi", d, "k", tmp_path / "landing", jobs=1)
    rows, report = read_batch(tmp_path / "landing" / "k")
    assert [r["id"] for r in rows] == ["u1"]
    assert reasons(report) == {"u2": "audio_unreadable"} and res["n_rejected"] == 1
    assert import_batch("kaldi", d, "k", tmp_path / "landing", jobs=1)["status"] == "unchanged"


def test_duplicates_prefixes_and_nothing_to_import(tmp_path, speech):
    src = tmp_path / "ds"
    src.mkdir()
    for i, u in enumerate(speech[:3]):
        sf.write(str(src / f"{i}.wav"), u.pcm, u.sr)
    meta = [{"file_name": f"{i}.wav", "id": "same" if i < 2 else "other", "text": u.text, "speaker": "s"} for i, u in enumerate(speech[:3])]
    (src / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    import_batch("audiofolder", src, "dups", tmp_path / "landing", id_prefix="hf-", speaker_prefix="hf-", jobs=1)
    rows, report = read_batch(tmp_path / "landing" / "dups")
    assert [(r["id"], r["speaker"]) for r in rows] == [("hf-same", "hf-s"), ("hf-other", "hf-s")]
    assert reasons(report) == {"hf-same": "duplicate_id"} and report["rejected"][0]["source"] == "metadata.jsonl:2"

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.csv").write_text("file_name,text\nnope.wav,hello\n")
    with pytest.raises(LandingImportError, match=r"nothing to import.*audio_missing"):
        import_batch("audiofolder", empty, "none", tmp_path / "landing")
    assert not (tmp_path / "landing" / "none").exists()


def test_landing_and_names_are_checked(tmp_path):
    assert resolve_landing(f"file://{tmp_path}") == tmp_path
    with pytest.raises(LandingImportError, match="remote URL"):
        resolve_landing("s3://bucket/landing")
    for bad in ("", "a/b", ".hidden", ".."):
        with pytest.raises(LandingImportError, match="batch name"):
            common.check_batch_name(bad)
    # the report must never look like a manifest to ingest
    assert common.check_glob("**/*.jsonl", "b") == []
    with pytest.raises(LandingImportError, match="import_report.json"):
        common.check_glob("**/*.json*", "b")
    assert common.check_glob("**/manifest_*.jsonl", "b")  # a note: ingest would not read the batch


def test_cli_landing_import(tmp_path, speech):
    src = tmp_path / "src"
    make_librispeech(src, speech, n=2)
    runner = CliRunner()
    landing = tmp_path / "landing"
    # default landing zone: the profile's paths.landing_url
    args = ["landing", "import", "--format", "librispeech", str(src), "--batch", "cli", "--profile", "tiny",
            "--set", f"paths.landing_url={landing}", "--jobs", "1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["status"] == "written" and out["n_imported"] == 2 and out["batch_dir"] == str(landing / "cli")
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "already imported" in r.stderr
    r = runner.invoke(app, [*args[:7], "--landing", "s3://bucket/landing"])
    assert r.exit_code == 1 and "remote URL" in r.stderr
    r = runner.invoke(app, ["landing", "import", "--format", "nope", str(src), "--batch", "x", "--landing", str(landing)])
    assert r.exit_code == 1 and "unknown format" in r.stderr

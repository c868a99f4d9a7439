"""Issue 13, item 1: no landing input can stop a batch.

Every landing line ends as a row or a quarantine entry, never as an exception (a property-based
fuzz test of the manifest parser and the row checks, and one real ingest of the hostile rows
that used to abort it); a FIFO in the landing zone does not hang ingest; a decompression bomb is
refused from its header with a small cap; a decode worker killed for memory does not fail the
batch; decode work is submitted in bounded batches; the same audio under two ids is quarantined.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from data_contracts.schema import QUARANTINE_SCHEMA, UTTERANCE_SCHEMA
from pipeline_tasks.config import TextNormConfig, load_config
from pipeline_tasks.contract import resolve
from pipeline_tasks.steps import ingest
from tests.pipeline_tasks.landing_helpers import good_entries, tone, write_manifest, write_wav

# lines that aborted a whole ingest before issue 13
DEEP = b'{"id": "deep", "audio_filepath": "audio/a.wav", "text": "x", "n": ' + b"[" * 3000 + b"]" * 3000 + b"}"
HUGE_DURATION = b'{"id": "bigdur", "audio_filepath": "audio/a.wav", "text": "hi", "duration": 1' + b"0" * 5000 + b"}"
HUGE_NUMBER_TEXT = json.dumps({"id": "bignum", "audio_filepath": "audio/a.wav", "text": "call 1" + "0" * 5000}).encode()
NUL_PATH = json.dumps({"id": "nul", "audio_filepath": "audio/a.wav\u0000.x", "text": "nul byte"}).encode()
SURROGATE_ID = b'{"id": "\\ud800", "audio_filepath": "audio/a.wav", "text": "lone surrogate"}'
SURROGATE_TEXT = b'{"id": "surtext", "audio_filepath": "audio/a.wav", "text": "ok \\udfff"}'
HUGE_FLOAT_INT = b'{"id": "bigint", "audio_filepath": "audio/a.wav", "text": "hi", "duration": ' + b"9" * 400 + b"}"


def _cfg(root: Path, landing: str | Path, *extra: str):
    return load_config("tiny", [f"paths.root={root}", f"paths.landing_url={landing}", *extra])


# ------------------------------------------------------------------------------ the fuzz test
@pytest.fixture(scope="module")
def fuzz_landing(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    landing = root / "landing"
    write_wav(landing / "week-001" / "audio" / "a.wav", tone(1.0), 16000)
    return ingest.Landing(str(landing)), root / "quarantine"


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
_json_values = st.recursive(
    _json_scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)),
    max_leaves=8,
)
_paths = st.one_of(
    st.sampled_from(["audio/a.wav", "./audio/a.wav", "../x.wav", "/etc/passwd", "audio/a.wav\x00", "audio/none.wav",
                     "s3://bucket/key", "audio", "", "audio/../audio/a.wav", "\ud800.wav"]),
    st.text(max_size=30),
    _json_values,
)
_texts = st.one_of(st.text(max_size=60), st.from_regex(r"[a-z ]{0,10}[0-9,.%]{1,60}(st|th)?", fullmatch=True), _json_values)
_records = st.fixed_dictionaries(
    {},
    optional={
        "id": _json_values,
        "audio_filepath": _paths,
        "duration": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), _json_values),
        "text": _texts,
        "speaker": _json_values,
    },
)
_lines = st.one_of(
    st.binary(max_size=200),
    _records.map(lambda d: json.dumps(d, allow_nan=True).encode()),
    _records.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
)


def _utterance_record(r: ingest.Row) -> dict:
    """What ingest's merge stores for an accepted row (with made-up decode metadata)."""
    return {
        "id": r.id, "audio_hash": "0" * 64, "audio_path": "raw/00/x.flac", "duration_s": 1.0, "num_samples": 16000,
        "sample_rate": 16000, "orig_sample_rate": 16000, "orig_channels": 1, "text": r.text, "text_raw": r.text_raw,
        "speaker": r.speaker, "batch": r.batch, "source": r.source, "long_form": False,
    }  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_lines, min_size=1, max_size=4))
@example(lines=[DEEP])
@example(lines=[HUGE_DURATION, HUGE_NUMBER_TEXT])
@example(lines=[NUL_PATH, SURROGATE_ID, SURROGATE_TEXT, HUGE_FLOAT_INT])
@example(lines=[b"\xff\xfe\x00", b"[]", b"null", b'{"audio_filepath": "audio/a.wav", "text": "ok"}'])
def test_fuzz_every_line_is_a_row_or_a_quarantine_entry(fuzz_landing, lines):
    landing, qdir = fuzz_landing
    manifest = Path(landing.root) / "week-001" / "manifest.jsonl"
    content = b"\n".join(lines)
    manifest.write_bytes(content)
    expected = sum(1 for seg in content.split(b"\n") if seg.rstrip(b"\r\n").strip())

    rows = ingest._parse_manifest(landing, str(manifest), TextNormConfig(), max_line_bytes=16384)  # never raises

    assert len(rows) == expected
    for r in rows:
        if r.reason is None:  # a row: everything the next stages need is there
            assert r.id and r.audio_full and r.text is not None and r.text_raw is not None
        else:  # a quarantine entry with a reason and a readable message
            assert r.reason and r.message
    bad = [r for r in rows if r.reason is not None]
    q = ingest._quarantine_table(bad, landing, qdir, copy=True)  # storable, copies made
    assert q.num_rows == len(bad) and q.schema.equals(QUARANTINE_SCHEMA, check_metadata=False)
    good = [r for r in rows if r.reason is None]
    t = pa.Table.from_pylist([_utterance_record(r) for r in good], schema=UTTERANCE_SCHEMA)
    assert t.num_rows == len(good)


def test_manifests_are_streamed_with_a_line_cap(tmp_path, monkeypatch):
    landing_dir = tmp_path / "landing"
    entries = good_entries(landing_dir / "week-001", 2)
    long_line = json.dumps({"id": "long", "audio_filepath": "audio/g0.wav", "text": "x", "pad": "y" * 50_000})
    write_manifest(landing_dir / "week-001" / "manifest.jsonl", [entries[0], long_line, entries[1]])
    landing = ingest.Landing(str(landing_dir))
    monkeypatch.setattr(landing.fs, "cat_file", lambda *a, **k: pytest.fail("a manifest was read whole"))
    rows = ingest._parse_manifest(landing, str(landing_dir / "week-001" / "manifest.jsonl"), TextNormConfig(), 4096)
    assert [(r.line_no, r.reason) for r in rows] == [(1, None), (2, "manifest_bad_row"), (3, None)]
    assert "longer than the line cap" in rows[1].message and len(rows[1].line) <= 1024


def test_unreadable_files_are_fingerprinted_and_quarantined(tmp_path, monkeypatch):
    """Tests run as root, where chmod 000 does not stop a read: the store raises PermissionError instead."""
    landing_dir = tmp_path / "landing"
    write_manifest(landing_dir / "week-001" / "manifest.jsonl", good_entries(landing_dir / "week-001", 1))
    landing = ingest.Landing(str(landing_dir))
    real_open = landing.fs.open

    def deny(path, *a, **k):
        if str(path).endswith((".jsonl", "g0.wav")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(landing.fs, "open", deny)
    fp = landing.fingerprint()  # no exception; the unreadable files are named in it
    assert fp == landing.fingerprint()
    rows = ingest._parse_manifest(landing, str(landing_dir / "week-001" / "manifest.jsonl"), TextNormConfig())
    assert [r.reason for r in rows] == ["manifest_unreadable"] and "PermissionError" in rows[0].message


# ------------------------------------------------------------------------------ one real ingest
def _silent_flac(path: Path, seconds: float, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.zeros(int(seconds * sr), np.float32), sr, format="FLAC", subtype="PCM_16")
    return path


@pytest.mark.timeout(300)  # a FIFO that is opened blocks forever: fail instead of hanging the suite
def test_hostile_rows_fifo_bomb_and_duplicate_audio_never_stop_the_batch(tmp_path, caplog):
    landing = tmp_path / "landing"
    d = landing / "week-001"
    entries: list = list(good_entries(d, 6))
    expected: dict[str, str] = {}

    def add(entry, reason, key=None):
        entries.append(entry)
        expected[key or f"L{len(entries)}"] = reason

    add(DEEP, "manifest_bad_row")
    add(HUGE_DURATION, "manifest_bad_row")
    add(HUGE_NUMBER_TEXT, "manifest_bad_row", "bignum")
    add(NUL_PATH.replace(b"audio/a.wav", b"audio/g0.wav"), "manifest_bad_row", "nul")
    add(SURROGATE_ID.replace(b"audio/a.wav", b"audio/g0.wav"), "manifest_bad_row")
    add(json.dumps({"id": "toolong", "audio_filepath": "audio/g1.wav", "text": "x", "pad": "p" * 20_000}), "manifest_bad_row")
    # a FIFO: as a referenced audio file and as a stray landing file (the fingerprint must not open it)
    os.mkfifo(d / "audio" / "pipe.wav")
    os.mkfifo(d / "stray.fifo")
    add({"id": "fifo", "audio_filepath": "audio/pipe.wav", "duration": 1.0, "text": "a pipe"}, "audio_missing", "fifo")
    # decompression bombs, caught from the header with small caps: 30 s of silence is a few KB of FLAC
    bomb = _silent_flac(d / "audio" / "bomb.flac", 30.0)
    assert bomb.stat().st_size < 40_000
    add({"id": "bomb", "audio_filepath": "audio/bomb.flac", "text": "silence"}, "audio_too_long", "bomb")
    write_wav(d / "audio" / "wide.wav", tone(1.0, channels=6, seed=9), 16000)
    add({"id": "wide", "audio_filepath": "audio/wide.wav", "text": "six channels"}, "audio_too_large", "wide")
    # the same audio under another id (a copy of g0): would land in train and dev
    shutil.copyfile(d / "audio" / "g0.wav", d / "audio" / "copy.wav")
    add({"id": "copy", "audio_filepath": "audio/copy.wav", "duration": 1.5, "text": "the same audio"},
        "duplicate_audio", "copy")
    # a transcript is personal data: its rejection message quotes it, the log at INFO must not
    add({"id": "pii", "audio_filepath": "audio/g2.wav", "text": "jane doe lives at elm street ж"}, "disallowed_chars", "pii")
    write_manifest(d / "manifest.jsonl", entries)

    cfg = _cfg(tmp_path / "art", landing, "ingest.max_manifest_line_bytes=16384", "validate.max_duration_s=10",
               "ingest.max_channels=4")
    caplog.set_level("INFO")
    res = ingest.run(cfg, {})
    assert "(disallowed_chars)" in caplog.text and "elm street" not in caplog.text

    q = pq.read_table(resolve(res, res["quarantine"])).to_pylist()
    got = {}
    for rec in q:
        line = rec["source"].rsplit(":", 1)[1]
        got[rec["id"] if rec["id"] in expected else f"L{line}"] = rec["reason"]
        assert rec["message"]
    assert got == expected
    m = pq.read_table(resolve(res, res["manifest"]))
    assert sorted(m.column("id").to_pylist()) == [f"g{i}" for i in range(6)]
    assert len(set(m.column("audio_hash").to_pylist())) == m.num_rows
    # the next week brings the same audio again under a new id: still one copy
    d2 = landing / "week-002"
    write_wav(d2 / "audio" / "again.wav", sf.read(str(d / "audio" / "g3.wav"), dtype="float32")[0], 16000)
    write_manifest(d2 / "manifest.jsonl", [{"id": "again", "audio_filepath": "audio/again.wav", "text": "again"}])
    res2 = ingest.run(cfg, {})
    assert res2["n_new"] == 0 and res2["quarantine_reasons"].get("duplicate_audio") == 2  # copy + again


# ------------------------------------------------------------------------------ the decode pool
def test_a_killed_decode_worker_does_not_fail_the_batch_and_work_is_bounded(tmp_path, monkeypatch):
    """A worker SIGKILLed on one file (as the OOM killer would) costs that file only; and at most
    ``window`` files are ever in flight (an s3:// landing never holds every file in memory)."""
    ws = tmp_path / "ws"
    srcs = [write_wav(tmp_path / "in" / f"f{i}.wav", tone(0.3, seed=i), 16000) for i in range(6)]
    monkeypatch.setenv(ingest.FAULT_ENV, "kill:f2.wav")
    window = 2
    made = []

    def make_task(i: int) -> dict:
        done = len(list((ws / "raw").rglob("*.flac"))) if (ws / "raw").exists() else 0
        made.append((i, done))
        return {"src": str(srcs[i]), "declared": None, "target_sr": 16000, "workspace": str(ws),
                "tol_s": 0.5, "tol_ratio": 0.1, "caps": {"max_duration_s": 10.0}}  # fmt: skip

    res = ingest._decode_pool(len(srcs), make_task, jobs=1, window=window)

    assert res[2] == {"ok": False, "reason": ingest.DECODER_DIED, "message": res[2]["message"]}
    assert all(res[i]["ok"] for i in range(6) if i != 2)
    # bounded: whenever a file is read, at most `window` earlier files are read but not yet decoded
    # (item 2 never produces a file: its worker dies)
    assert len(made) >= len(srcs)
    for k, (_, done) in enumerate(made):
        pending = len({j for j, _ in made[:k]} - {2}) - done
        assert pending <= window, made

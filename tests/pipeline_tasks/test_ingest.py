"""The ingest step on real landing zones: real audio files, a real git + DVC workspace and remote."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from typer.testing import CliRunner

from data_contracts.schema import QUARANTINE_SCHEMA, UTTERANCE_SCHEMA
from pipeline_tasks.config import load_config
from pipeline_tasks.contract import resolve
from pipeline_tasks.services.dvc_store import DataWorkspace
from pipeline_tasks.steps import ingest
from tests.pipeline_tasks.landing_helpers import build_bad_batch, good_entries, tone, write_manifest


def _cfg(root: Path, landing: str | Path, *extra: str):
    return load_config("tiny", [f"paths.root={root}", f"paths.landing_url={landing}", *extra])


def _tables(res):
    m = pq.read_table(resolve(res, res["manifest"]))
    q = pq.read_table(resolve(res, res["quarantine"]))
    return m, q


def test_bad_batch_each_row_gets_its_reason_and_good_rows_survive(tmp_path):
    landing = tmp_path / "landing"
    expected = build_bad_batch(landing)
    sources_before = sorted((p, p.stat().st_size) for p in landing.rglob("*") if p.is_file())
    cfg = _cfg(tmp_path / "art", landing, "ingest.jobs=2", "ingest.pool_min_items=2")
    res = ingest.run(cfg, {})

    m, q = _tables(res)
    assert m.schema.equals(UTTERANCE_SCHEMA, check_metadata=False)
    assert q.schema.equals(QUARANTINE_SCHEMA, check_metadata=False)
    got = {}
    for rec in q.to_pylist():
        line = rec["source"].rsplit(":", 1)[1]
        key = f"L{line}" if (rec["id"] is None or rec["reason"] == "duplicate_id") else rec["id"]
        got[key] = rec["reason"]
        assert rec["stage"] == "ingest" and rec["message"] and rec["batch"] == "week-001"
    assert got == expected
    assert res["n_quarantined"] == len(expected)
    assert res["quarantine_reasons"]["path_escape"] == 4

    rows = {r["id"]: r for r in m.to_pylist()}
    assert sorted(rows) == sorted([f"g{i}" for i in range(6)] + ["sr8k", "st44", "long"])
    assert res["n_rows"] == res["n_new"] == 9
    assert (rows["sr8k"]["orig_sample_rate"], rows["sr8k"]["orig_channels"], rows["sr8k"]["num_samples"]) == (8000, 1, 24000)
    assert (rows["st44"]["orig_sample_rate"], rows["st44"]["orig_channels"], rows["st44"]["num_samples"]) == (44100, 2, 24000)
    assert rows["long"]["long_form"] and not rows["g0"]["long_form"]
    assert rows["g0"]["source"] == "week-001/manifest.jsonl:1" and rows["g0"]["speaker"] == "spk0"
    assert rows["g5"]["text"] == "it's time to go home now"
    ws = Path(res["workspace"])
    for r in rows.values():
        assert r["sample_rate"] == 16000
        assert r["audio_path"] == f"raw/{r['batch']}/{r['audio_hash'][:2]}/{r['audio_hash']}.flac"
        info = sf.info(str(ws / r["audio_path"]))
        assert (info.samplerate, info.channels, info.frames) == (16000, 1, r["num_samples"])

    # copies of offending files in quarantine; sources untouched; nothing copied from outside
    qrows = {r["id"]: r for r in q.to_pylist() if r["id"]}
    trunc_copy = Path(qrows["trunc"]["quarantined_copy"])
    assert trunc_copy.parent == Path(cfg.paths.quarantine_dir) / "week-001"
    assert trunc_copy.read_bytes() == (landing / "week-001/audio/trunc.wav").read_bytes()
    assert Path(qrows["esc2"]["quarantined_copy"]).suffix == ".jsonl"  # the manifest line, not /etc/passwd
    assert b"passwd" in Path(qrows["esc2"]["quarantined_copy"]).read_bytes()
    assert sorted((p, p.stat().st_size) for p in landing.rglob("*") if p.is_file()) == sources_before

    # versioned: tag on the commit, data pushed to the folder remote
    dws = DataWorkspace(ws, cfg.paths.dvc_remote)
    assert res["dvc_tag"] in dws.tags() and res["dvc_tag"] == f"snapshot-{res['snapshot_md5'][:12]}"
    assert dws.git("status", "--porcelain").stdout.strip() == ""
    assert len([p for p in Path(cfg.paths.dvc_remote).rglob("*") if p.is_file()]) >= 9 + 2


def test_rerun_is_idempotent_and_weeks_accumulate(tmp_path):
    landing = tmp_path / "landing"
    d1 = landing / "week-001"
    write_manifest(d1 / "manifest.jsonl", good_entries(d1, 3, prefix="a"))
    cfg = _cfg(tmp_path / "art", landing)
    r1 = ingest.run(cfg, {})
    ws = DataWorkspace(r1["workspace"], cfg.paths.dvc_remote)
    state = (ws.head(), ws.tags())
    assert ingest.run(cfg, {}) == r1  # cached by content
    r1f = ingest.run(cfg, {}, force=True)  # recomputed: same data, no new commit or tag
    assert (r1f["manifest_md5"], r1f["snapshot_md5"], r1f["n_rows"]) == (r1["manifest_md5"], r1["snapshot_md5"], 3)
    assert r1f["n_new"] == 0 and not r1f["new_commit"]
    # another artifact root, same workspace (the step cache is gone): still no new snapshot
    other = _cfg(tmp_path / "art2", landing, f"paths.data_workspace={r1['workspace']}", f"paths.dvc_remote={cfg.paths.dvc_remote}")
    r1o = ingest.run(other, {})
    assert r1o["snapshot_md5"] == r1["snapshot_md5"] and r1o["n_rows"] == 3
    assert (ws.head(), ws.tags()) == state

    # touching a file (mtime) does not change the key; new content does
    p = d1 / "audio" / "a0.wav"
    p.touch()
    assert ingest.run(cfg, {})["key"] == r1["key"]

    d2 = landing / "week-002"
    write_manifest(d2 / "manifest.jsonl", good_entries(d2, 2, prefix="b", seed0=100))
    r2 = ingest.run(cfg, {})
    assert r2["key"] != r1["key"] and r2["n_new"] == 2 and r2["n_rows"] == 5
    m, _ = _tables(r2)
    assert sorted(m.column("batch").to_pylist()) == ["week-001"] * 3 + ["week-002"] * 2
    assert len(set(m.column("id").to_pylist())) == 5
    assert r2["dvc_tag"] != r1["dvc_tag"] and ws.n_commits() == 3  # init, week 1, week 2
    # week 1 archived away from the landing zone: its rows stay in the cumulative manifest
    (d1 / "manifest.jsonl").rename(tmp_path / "archived.jsonl")
    r3 = ingest.run(cfg, {})
    assert r3["n_rows"] == 5 and r3["n_new"] == 0 and r3["snapshot_md5"] == r2["snapshot_md5"]


def _ingest_in_process(root, landing, workspace, remote, out):
    cfg = _cfg(Path(root), landing, f"paths.data_workspace={workspace}", f"paths.dvc_remote={remote}")
    res = ingest.run(cfg, {})
    Path(out).write_text(json.dumps(res))


def test_concurrent_ingests_both_succeed(tmp_path):
    """Two processes ingesting different landing zones into one workspace: one waits, both land."""
    ws, remote = tmp_path / "ws", tmp_path / "remote"
    procs = []
    ctx = mp.get_context("spawn")
    for i in range(2):
        d = tmp_path / f"landing{i}" / f"week-00{i + 1}"
        write_manifest(d / "manifest.jsonl", good_entries(d, 2, prefix=f"p{i}-", seed0=10 * i))
        args = (str(tmp_path / f"art{i}"), str(d.parent), str(ws), str(remote), str(tmp_path / f"res{i}.json"))
        procs.append(ctx.Process(target=_ingest_in_process, args=args))
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"res{i}.json").read_text()) for i in range(2)]
    assert sorted(r["n_rows"] for r in results) == [2, 4]  # the second merged on top of the first
    final = pq.read_table(ws / ingest.MANIFEST_REL)
    assert sorted(final.column("id").to_pylist()) == ["p0-0", "p0-1", "p1-0", "p1-1"]
    dws = DataWorkspace(ws, str(remote))
    assert dws.n_commits() == 3 and len(dws.tags()) == 2
    assert dws.git("status", "--porcelain").stdout.strip() == ""


def test_memory_landing_zone(tmp_path):
    fs = fsspec.filesystem("memory")
    base = f"/landing-{tmp_path.name}"
    buf = __import__("io").BytesIO()
    sf.write(buf, tone(1.2, sr=22050, seed=3), 22050, format="WAV", subtype="PCM_16")
    fs.pipe(f"{base}/week-007/audio/x.wav", buf.getvalue())
    fs.pipe(f"{base}/week-007/audio/bad.wav", b"not audio at all")
    lines = [
        {"audio_filepath": "audio/x.wav", "duration": 1.2, "text": "Hello there, 2 friends!"},
        {"audio_filepath": "audio/bad.wav", "duration": 1.0, "text": "broken"},
    ]
    fs.pipe(f"{base}/week-007/manifest.jsonl", b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    try:
        cfg = _cfg(tmp_path / "art", f"memory://{base}")
        res = ingest.run(cfg, {})
        m, q = _tables(res)
        row = m.to_pylist()[0]
        assert m.num_rows == 1 and row["batch"] == "week-007" and row["orig_sample_rate"] == 22050
        assert row["text"] == "hello there two friends" and row["text_raw"] == "Hello there, 2 friends!"
        assert len(row["id"]) == 16  # no id in the manifest: sha1(source)[:16]
        assert q.column("reason").to_pylist() == ["not_audio"]
        assert Path(q.column("quarantined_copy")[0].as_py()).read_bytes() == b"not audio at all"
        assert ingest.run(cfg, {})["key"] == res["key"]
        fs.pipe(f"{base}/week-007/audio/x.wav", buf.getvalue()[:-2000])  # content changed -> new key
        res2 = ingest.run(cfg, {})
        assert res2["key"] != res["key"] and res2["quarantine_reasons"] == {"audio_truncated": 1, "not_audio": 1}
    finally:
        fs.rm(base, recursive=True)


def test_tiny_landing_and_cli(tmp_path, tiny_landing):
    from pipeline_tasks.cli import app

    out = CliRunner().invoke(
        app, ["ingest", "--profile", "tiny", "--set", f"paths.root={tmp_path}", "--set", f"paths.landing_url={tiny_landing}"]
    )
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout[out.stdout.index("{") :])
    assert res["n_rows"] == 48 and res["n_quarantined"] == 0 and res["batches"] == ["week-001"]
    m = pq.read_table(resolve(res, "manifest.parquet"))
    assert set(m.column("orig_sample_rate").to_pylist()) == {22050}
    durations = np.array(m.column("duration_s").to_pylist())
    assert (durations > 0.3).all()


def test_missing_or_empty_landing_zone_is_a_clear_error(tmp_path):
    with pytest.raises(ingest.LandingError, match="does not exist"):
        ingest.run(_cfg(tmp_path / "art", tmp_path / "nowhere"), {})
    (tmp_path / "empty" / "week-001").mkdir(parents=True)
    with pytest.raises(ingest.LandingError, match="no manifests"):
        ingest.run(_cfg(tmp_path / "art", tmp_path / "empty"), {})
    assert not (tmp_path / "art" / "ingest").exists() or not any(
        (p / "_SUCCESS.json").exists() for p in (tmp_path / "art" / "ingest").iterdir()
    )

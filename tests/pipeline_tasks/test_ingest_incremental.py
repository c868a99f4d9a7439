"""Issue 18: a week's ingest costs what the new data costs, not what the history costs.

Rows ingested before from the same landing bytes are not decoded again (and the result is what
decoding them would have given); unchanged landing files are not re-read to fingerprint the
landing zone; the raw store is not a second copy in the DVC cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from pipeline_tasks.config import load_config
from pipeline_tasks.contract import resolve
from pipeline_tasks.steps import ingest
from tests.pipeline_tasks.landing_helpers import good_entries, tone, write_manifest, write_wav


def _cfg(root: Path, landing: str | Path, *extra: str):
    return load_config("tiny", [f"paths.root={root}", f"paths.landing_url={landing}", *extra])


def _count_decodes(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = ingest.decode_item

    def counting(task):
        seen.append(os.path.basename(task["src"]) if isinstance(task["src"], str) else "<bytes>")
        return real(task)

    monkeypatch.setattr(ingest, "decode_item", counting)  # small batches decode in-process
    return seen


def test_known_rows_are_not_decoded_again_and_changed_ones_are(tmp_path, monkeypatch):
    landing = tmp_path / "landing"
    d1, d2 = landing / "week-001", landing / "week-002"
    write_manifest(d1 / "manifest.jsonl", good_entries(d1, 3, prefix="a"))
    cfg = _cfg(tmp_path / "art", landing)
    decoded = _count_decodes(monkeypatch)
    r1 = ingest.run(cfg, {})
    assert sorted(decoded) == ["a0.wav", "a1.wav", "a2.wav"] and r1["n_skipped"] == 0
    ws = Path(r1["workspace"])
    assert (ws / ingest.SOURCES_REL).exists()

    # week 2 lands: only its two files are decoded; week 1's manifest is not even parsed, its rows not lost
    decoded.clear()
    write_manifest(d2 / "manifest.jsonl", good_entries(d2, 2, prefix="b", seed0=100))
    r2 = ingest.run(cfg, {})
    assert sorted(decoded) == ["b0.wav", "b1.wav"]
    assert (r2["n_skipped"], r2["n_new"], r2["n_rows"], r2["n_quarantined"]) == (0, 2, 5, 0)
    assert r2["n_manifests_unchanged"] == 1
    assert {"skip_s", "decode_s", "merge_s", "dvc_add_s", "dvc_commit_push_s", "fingerprint_s"} <= set(r2["timings"])
    m2 = pq.read_table(resolve(r2, r2["manifest"]))
    assert m2.column("id").to_pylist() == ["a0", "a1", "a2", "b0", "b1"]  # old rows first, unchanged
    # the same result as decoding everything again (forced, with both skip indexes gone)
    os.unlink(ws / ingest.SOURCES_REL)
    os.unlink(ws / ingest.LANDED_REL)
    decoded.clear()
    r2f = ingest.run(cfg, {}, force=True)
    assert len(decoded) == 5 and r2f["n_skipped"] == 0 and r2f["manifest_md5"] == r2["manifest_md5"]
    decoded.clear()
    assert ingest.run(cfg, {}, force=True)["n_manifests_unchanged"] == 2 and decoded == []
    # without the manifest ledger, the rows are parsed and skipped one by one, still not decoded
    os.unlink(ws / ingest.LANDED_REL)
    r2s = ingest.run(cfg, {}, force=True)
    assert r2s["n_skipped"] == 5 and decoded == [] and r2s["manifest_md5"] == r2["manifest_md5"]

    # an old id whose landing file now holds other audio is decoded again: duplicate_id, as before
    write_wav(d1 / "audio" / "a1.wav", tone(1.5, seed=77), 16000)
    # and an old id whose raw FLAC vanished from the store is decoded again and stored again
    raw_a0 = ws / dict(zip(m2.column("id").to_pylist(), m2.column("audio_path").to_pylist(), strict=True))["a0"]
    raw_a0.unlink()
    decoded.clear()
    r3 = ingest.run(cfg, {})
    assert sorted(decoded) == ["a0.wav", "a1.wav"]
    assert r3["quarantine_reasons"] == {"duplicate_id": 1} and r3["n_new"] == 0 and r3["n_rows"] == 5
    assert raw_a0.exists()


def test_fingerprint_reads_only_changed_files(tmp_path, monkeypatch):
    landing_dir = tmp_path / "landing"
    d = landing_dir / "week-001"
    write_manifest(d / "manifest.jsonl", good_entries(d, 4))
    cache = tmp_path / "stat.json"
    reads: list[str] = []
    real = ingest.Landing.content_id

    def counting(self, path, info):
        reads.append(os.path.basename(path))
        return real(self, path, info)

    monkeypatch.setattr(ingest.Landing, "content_id", counting)
    fp1 = ingest.Landing(str(landing_dir)).fingerprint(cache)
    assert len(reads) == 5  # 4 wavs + the manifest
    reads.clear()
    assert ingest.Landing(str(landing_dir)).fingerprint(cache) == fp1 and reads == []
    # touched (new mtime/ctime, same bytes): read again, same fingerprint
    (d / "audio" / "g1.wav").touch()
    assert ingest.Landing(str(landing_dir)).fingerprint(cache) == fp1 and reads == ["g1.wav"]
    reads.clear()
    # same size, other bytes, mtime put back: ctime still moves, so it is read and the key changes
    p = d / "audio" / "g2.wav"
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ingest.Landing(str(landing_dir)).fingerprint(cache) != fp1 and reads == ["g2.wav"]
    # no cache: everything is read (the old behaviour), same answer
    reads.clear()
    fp_nocache = ingest.Landing(str(landing_dir)).fingerprint()
    assert len(reads) == 5 and fp_nocache == ingest.Landing(str(landing_dir)).fingerprint(cache)


def test_raw_store_is_not_copied_into_the_dvc_cache(tmp_path, monkeypatch):
    from pipeline_tasks.services.dvc_store import CACHE_TYPE_ENV, can_reflink

    monkeypatch.delenv(CACHE_TYPE_ENV, raising=False)
    landing = tmp_path / "landing"
    d = landing / "week-001"
    write_manifest(d / "manifest.jsonl", good_entries(d, 4, seconds=3.0))
    res = ingest.run(_cfg(tmp_path / "art", landing), {})
    ws = Path(res["workspace"])
    raw = [p for p in (ws / ingest.RAW_DIR).rglob("*.flac")]
    assert len(raw) == 4
    if can_reflink(tmp_path):
        return  # shared extents: st_blocks cannot show it
    ws_inodes = {p.stat().st_ino for p in raw}
    cache_inodes = {p.stat().st_ino for p in (ws / ".dvc" / "cache").rglob("*") if p.is_file()}
    assert ws_inodes <= cache_inodes  # one stored copy: the workspace file is the cache file


def _count_parses(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = ingest._parse_manifest

    def counting(landing, manifest_path, *a, **k):
        seen.append(landing.rel(manifest_path))
        return real(landing, manifest_path, *a, **k)

    monkeypatch.setattr(ingest, "_parse_manifest", counting)
    return seen


def _count_pushes(monkeypatch) -> list[list[str]]:
    from pipeline_tasks.services.dvc_store import DataWorkspace

    pushed: list[list[str]] = []
    real = DataWorkspace.push

    def counting(self, paths):
        out = real(self, paths)
        pushed.append(out)
        return out

    monkeypatch.setattr(DataWorkspace, "push", counting)
    return pushed


def test_a_week_parses_adds_and_pushes_only_its_own_batch(tmp_path, monkeypatch):
    """Issue 18 item 2: an unchanged, fully ingested manifest is not parsed again; each landing batch
    is its own DVC output, so a week adds and pushes its batch and the manifests, not the history."""
    landing = tmp_path / "landing"
    d1, d2, d3 = landing / "week-001", landing / "week-002", landing / "week-003"
    write_manifest(d1 / "manifest.jsonl", good_entries(d1, 3, prefix="a"))
    cfg = _cfg(tmp_path / "art", landing)
    parsed, pushed = _count_parses(monkeypatch), _count_pushes(monkeypatch)
    r1 = ingest.run(cfg, {})
    ws = Path(r1["workspace"])
    assert parsed == ["week-001/manifest.jsonl"] and pushed == [["raw/week-001", "manifests"]]
    assert (ws / "raw" / "week-001.dvc").exists() and not (ws / "raw.dvc").exists()

    write_manifest(d2 / "manifest.jsonl", good_entries(d2, 2, prefix="b", seed0=100))
    parsed.clear(), pushed.clear()
    r2 = ingest.run(cfg, {})
    assert parsed == ["week-002/manifest.jsonl"]
    assert pushed == [["raw/week-002", "manifests"]]  # week 1's output was pushed before and is unchanged
    assert (r2["n_new"], r2["n_rows"], r2["n_landing_rows"], r2["n_manifests_unchanged"]) == (2, 5, 5, 1)
    assert r2["batches"] == ["week-001", "week-002"]
    m2 = pq.read_table(resolve(r2, r2["manifest"])).to_pylist()
    assert {r["audio_path"].split("/")[1] for r in m2} == {"week-001", "week-002"}
    assert all((ws / r["audio_path"]).exists() for r in m2)
    from pipeline_tasks.services.dvc_store import DataWorkspace

    wsobj = DataWorkspace(ws, cfg.paths.dvc_remote)
    assert wsobj.raw_outputs() == ["raw/week-001", "raw/week-002"]
    assert r2["snapshot_md5"] == wsobj.snapshot_md5(["raw/week-001", "raw/week-002", "manifests"])
    assert wsobj.has_tag(r2["dvc_tag"]) and wsobj.push(["raw/week-001", "raw/week-002", "manifests"]) == []

    # week 3 reuses week 1's id a1 with other audio, and a0's audio under a new id: both are
    # refused, naming what was there first; the refused audio is not left in the store
    e3 = good_entries(d3, 1, prefix="c", seed0=200)
    e3.append({**good_entries(d3, 1, prefix="x", seed0=300)[0], "id": "a1"})
    a0 = good_entries(d3, 1, prefix="dup", seed0=0)[0]  # same samples as week 1's a0
    e3.append({**a0, "id": "c-copy-of-a0"})
    write_manifest(d3 / "manifest.jsonl", e3)
    parsed.clear()
    r3 = ingest.run(cfg, {})
    assert parsed == ["week-003/manifest.jsonl"]
    assert r3["quarantine_reasons"] == {"duplicate_audio": 1, "duplicate_id": 1} and r3["n_new"] == 1
    q = {r["id"]: r for r in pq.read_table(resolve(r3, r3["quarantine"])).to_pylist()}
    assert "week-001/manifest.jsonl:2" in q["a1"]["message"]
    assert r3["n_orphans_removed"] == 1
    stored3 = sorted(p.name for p in (ws / "raw" / "week-003").rglob("*.flac"))
    m3 = pq.read_table(resolve(r3, r3["manifest"])).to_pylist()
    assert stored3 == sorted(Path(r["audio_path"]).name for r in m3 if r["batch"] == "week-003")
    # week 3 has quarantined rows: it is parsed again next time (its rows may be fixed); 1 and 2 are not
    parsed.clear()
    ingest.run(cfg, {}, force=True)
    assert parsed == ["week-003/manifest.jsonl"]
    # a changed file in week 1's folder makes its manifest parsed again
    (d1 / "notes.txt").write_text("a late addition")
    parsed.clear()
    ingest.run(cfg, {})
    assert sorted(parsed) == ["week-001/manifest.jsonl", "week-003/manifest.jsonl"]


def test_a_workspace_with_one_raw_output_keeps_its_layout(tmp_path):
    """A data workspace made before per-batch outputs (``raw.dvc``) keeps ``raw/<h[:2]>/<h>.flac``
    and its snapshot hash formula, so its tags and manifests stay valid."""
    import hashlib

    from pipeline_tasks.services.dvc_store import DataWorkspace

    landing = tmp_path / "landing"
    d1 = landing / "week-001"
    write_manifest(d1 / "manifest.jsonl", good_entries(d1, 2))
    cfg = _cfg(tmp_path / "art", landing)
    ws = DataWorkspace(cfg.paths.data_workspace, cfg.paths.dvc_remote).ensure()
    (ws.path / "raw" / "zz").mkdir(parents=True)
    (ws.path / "raw" / "zz" / "old.flac").write_bytes(b"an older ingest's file")
    ws.add_commit_push(["raw"], "the old layout", push=False)
    res = ingest.run(cfg, {})
    rows = pq.read_table(resolve(res, res["manifest"])).to_pylist()
    assert [r["audio_path"] for r in rows] == [f"raw/{r['audio_hash'][:2]}/{r['audio_hash']}.flac" for r in rows]
    assert ws.raw_outputs() == ["raw"] and not list((ws.path / "raw").glob("*.dvc"))
    legacy = hashlib.md5(f"raw:{ws.md5('raw')}\nmanifests:{ws.md5('manifests')}".encode()).hexdigest()
    assert res["snapshot_md5"] == legacy


def test_a_batch_written_by_an_interrupted_run_is_added_next_time(tmp_path):
    """Raw files written by a run killed before ``dvc add`` are listed in a pending record; the next
    run adds those batches even when none of its own rows go there."""
    import json

    landing = tmp_path / "landing"
    d1 = landing / "week-001"
    write_manifest(d1 / "manifest.jsonl", good_entries(d1, 2))
    cfg = _cfg(tmp_path / "art", landing)
    ws = Path(cfg.paths.data_workspace)
    ingest.run(cfg, {})
    (ws / "raw" / "week-009" / "ab").mkdir(parents=True)
    (ws / "raw" / "week-009" / "ab" / "ab12.flac").write_bytes(b"decoded before the kill")
    (ws / ingest.PENDING_REL).write_text(json.dumps(["raw/week-009"]))
    ingest.run(cfg, {}, force=True)
    assert (ws / "raw" / "week-009.dvc").exists() and not (ws / ingest.PENDING_REL).exists()

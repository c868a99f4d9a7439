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

    # week 2 lands: only its two files are decoded; week 1's rows are skipped, not lost
    decoded.clear()
    write_manifest(d2 / "manifest.jsonl", good_entries(d2, 2, prefix="b", seed0=100))
    r2 = ingest.run(cfg, {})
    assert sorted(decoded) == ["b0.wav", "b1.wav"]
    assert (r2["n_skipped"], r2["n_new"], r2["n_rows"], r2["n_quarantined"]) == (3, 2, 5, 0)
    assert {"skip_s", "decode_s", "merge_s", "dvc_add_s", "dvc_commit_push_s", "fingerprint_s"} <= set(r2["timings"])
    m2 = pq.read_table(resolve(r2, r2["manifest"]))
    assert m2.column("id").to_pylist() == ["a0", "a1", "a2", "b0", "b1"]  # old rows first, unchanged
    # the same result as decoding everything again (forced, with the skip index gone)
    os.unlink(ws / ingest.SOURCES_REL)
    decoded.clear()
    r2f = ingest.run(cfg, {}, force=True)
    assert len(decoded) == 5 and r2f["n_skipped"] == 0 and r2f["manifest_md5"] == r2["manifest_md5"]
    decoded.clear()
    assert ingest.run(cfg, {}, force=True)["n_skipped"] == 5 and decoded == []

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

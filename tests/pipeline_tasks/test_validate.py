"""The validate step: real ingest output checked by the real GX suites."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts.schema import QUARANTINE_SCHEMA, UTTERANCE_SCHEMA
from pipeline_tasks.config import load_config
from pipeline_tasks.contract import file_md5, resolve
from pipeline_tasks.steps import ingest, validate
from pipeline_tasks.steps.validate import DataContractError
from tests.pipeline_tasks.landing_helpers import good_entries, tone, write_manifest, write_wav


def _cfg(root: Path, landing: Path, *extra: str):
    return load_config("tiny", [f"paths.root={root}", f"paths.landing_url={landing}", *extra])


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """One ingested week: 6 good rows + rows that pass ingest but break the row contract + a long-form row."""
    base = tmp_path_factory.mktemp("validate")
    landing = base / "landing"
    d = landing / "week-001"
    entries = good_entries(d, 6)
    specs = [
        ("short", 0.2, "hi"),  # below min_duration_s 0.3
        ("slowtext", 10.0, "hi there"),  # 0.8 chars/s: transcript of other audio
        ("fasttext", 1.0, "this transcript is far too long for one second"),  # 46 chars/s
        ("long", 25.0, " ".join(["speech"] * 60)),  # long-form: kept, flagged
    ]
    for i, (rid, secs, text) in enumerate(specs):
        write_wav(d / "audio" / f"{rid}.wav", tone(secs, seed=200 + i), 16000)
        entries.append({"id": rid, "audio_filepath": f"audio/{rid}.wav", "duration": secs, "text": text, "speaker": "spkL"})
    write_manifest(d / "manifest.jsonl", entries)
    cfg = _cfg(base / "art", landing)
    return base, landing, ingest.run(cfg, {})


def test_rows_quarantined_long_form_kept_and_report_written(ingested):
    base, landing, ing = ingested
    cfg = _cfg(base / "art", landing, "validate.max_quarantine_share=0.5")
    res = validate.run(cfg, {"ingest": ing})

    m = pq.read_table(resolve(res, res["manifest"]))
    assert m.schema.equals(UTTERANCE_SCHEMA, check_metadata=False)
    rows = {r["id"]: r for r in m.to_pylist()}
    assert sorted(rows) == sorted([f"g{i}" for i in range(6)] + ["long"])
    assert rows["long"]["long_form"] and not rows["g0"]["long_form"]
    assert res["n_accepted"] == 7 and res["n_long_form"] == 1

    q = pq.read_table(resolve(res, res["quarantine"]))
    assert q.schema.equals(QUARANTINE_SCHEMA, check_metadata=False)
    got = {r["id"]: r for r in q.to_pylist() if r["stage"] == "validate"}
    assert {k: v["reason"] for k, v in got.items()} == {
        "short": "duration_out_of_bounds",
        "slowtext": "text_audio_mismatch",
        "fasttext": "text_audio_mismatch",
    }
    assert "characters per second" in got["slowtext"]["message"] and "0.8" in got["slowtext"]["message"]
    assert Path(got["short"]["quarantined_copy"]).read_bytes()[:4] == b"fLaC"

    summary = json.loads(resolve(res, res["summary"]).read_text())
    wk = summary["batches"]["week-001"]
    assert wk["success"] and wk["n_accepted"] == 7 and wk["n_quarantined_validate"] == 3
    assert wk["quarantine_share"] == pytest.approx(0.3) and wk["median_duration_s"] == pytest.approx(1.5)
    assert json.loads(resolve(res, "summaries/week-001.json").read_text())["batch"] == "week-001"
    html = resolve(res, res["report_html"]).read_text()
    assert "utterance_rows" in html and "utterance_batch" in html

    assert res["snapshot_md5"] == ing["snapshot_md5"] and res["workspace"] == ing["workspace"]
    assert validate.run(cfg, {"ingest": ing}) == res  # cached
    again = validate.run(cfg, {"ingest": ing}, force=True)
    assert again["manifest_md5"] == res["manifest_md5"] and again["n_quarantined"] == res["n_quarantined"]


def test_batch_contract_failure_stops_with_readable_summary(ingested):
    base, landing, ing = ingested
    cfg = _cfg(base / "art", landing, "validate.median_duration_s=[2.0,30.0]")  # quarantine share 0.3 > 0.2 too
    with pytest.raises(DataContractError) as ei:
        validate.run(cfg, {"ingest": ing})
    msg = str(ei.value)
    assert "week-001: share of quarantined rows at most 0.2 — observed 0.3" in msg
    assert "week-001: median duration of accepted rows within [2.0, 30.0] s — observed 1.5" in msg
    assert {f["expectation"] for f in ei.value.failures} == {
        "expect_column_mean_to_be_between",
        "expect_column_median_to_be_between",
    }
    assert Path(ei.value.report).exists()  # the report survives the failed run
    failed_key = Path(ei.value.report).parent.parent.name.removeprefix("failed-")
    assert not (Path(cfg.root) / "validate" / failed_key).exists()  # nothing published for this key
    assert not any(p.name.startswith(".tmp-") for p in (Path(cfg.root) / "validate").iterdir())


def test_tampered_manifest_rows_map_back_by_id(ingested, tmp_path):
    """Checks ingest never lets through (missing FLAC, wrong rate, duplicate id) are still caught."""
    base, landing, ing = ingested
    m = pq.read_table(resolve(ing, ing["manifest"])).to_pylist()
    good = [r for r in m if r["id"].startswith("g")]
    good[1]["audio_path"] = "raw/00/" + "0" * 64 + ".flac"
    good[2]["sample_rate"] = 8000
    rows = good + [dict(good[3], source="week-001/manifest.jsonl:99")]
    out = tmp_path / "fake-ingest"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=UTTERANCE_SCHEMA), out / "manifest.parquet")
    pq.write_table(QUARANTINE_SCHEMA.empty_table(), out / "quarantine.parquet")
    fake = dict(ing, output_dir=str(out), manifest_md5=file_md5(out / "manifest.parquet"))
    cfg = _cfg(tmp_path / "art", landing, "validate.max_quarantine_share=0.8")
    res = validate.run(cfg, {"ingest": fake})
    q = pq.read_table(resolve(res, res["quarantine"])).to_pylist()
    got = sorted((r["id"], r["reason"]) for r in q)
    assert got == [("g1", "audio_not_decodable"), ("g2", "bad_sample_rate"), ("g3", "duplicate_id"), ("g3", "duplicate_id")]
    assert sorted(pq.read_table(resolve(res, res["manifest"])).column("id").to_pylist()) == ["g0", "g4", "g5"]

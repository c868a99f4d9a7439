"""Issue 18: validate does not run the batch suite again over every earlier week."""

from __future__ import annotations

import json
from pathlib import Path

from data_contracts.suites import ContractRunner
from pipeline_tasks.config import load_config
from pipeline_tasks.steps import ingest, validate
from tests.pipeline_tasks.landing_helpers import good_entries, write_manifest


def _cfg(root: Path, landing: Path, *extra: str):
    return load_config("tiny", [f"paths.root={root}", f"paths.landing_url={landing}", *extra])


def test_passed_batches_are_not_validated_again_failing_ones_are(tmp_path, monkeypatch):
    landing = tmp_path / "landing"
    for w in (1, 2):
        d = landing / f"week-00{w}"
        write_manifest(d / "manifest.jsonl", good_entries(d, 3, prefix=f"w{w}-", seed0=10 * w))
    cfg = _cfg(tmp_path / "art", landing)
    checked: list[str] = []
    real = ContractRunner.validate_batch

    def counting(self, frame, batch):
        checked.append(batch)
        return real(self, frame, batch)

    monkeypatch.setattr(ContractRunner, "validate_batch", counting)
    v1 = validate.run(cfg, {"ingest": ingest.run(cfg, {})})
    assert checked == ["week-001", "week-002"]

    d3 = landing / "week-003"
    write_manifest(d3 / "manifest.jsonl", good_entries(d3, 3, prefix="w3-", seed0=30))
    checked.clear()
    v2 = validate.run(cfg, {"ingest": ingest.run(cfg, {})})
    assert checked == ["week-003"]  # weeks 1 and 2 are unchanged and passed before
    s2 = json.loads((Path(v2["output_dir"]) / v2["summary"]).read_text())
    assert sorted(s2["batches"]) == ["week-001", "week-002", "week-003"] and s2["success"]
    assert s2["batches"]["week-001"] == json.loads((Path(v1["output_dir"]) / v1["summary"]).read_text())["batches"]["week-001"]

    # other limits: every batch is validated again; a failing batch is never remembered
    strict = _cfg(tmp_path / "art", landing, "validate.median_duration_s=[2.0,30.0]")
    for _ in range(2):
        checked.clear()
        try:
            validate.run(strict, {"ingest": ingest.run(strict, {})})
        except validate.DataContractError:
            pass
        assert checked == ["week-001", "week-002", "week-003"]


def test_rows_that_passed_are_not_checked_again_and_failing_ones_are(tmp_path, monkeypatch):
    """The row suite runs over the rows it has not passed before with the same values (issue 18)."""
    import pyarrow.parquet as pq

    from pipeline_tasks.contract import resolve

    landing = tmp_path / "landing"
    d1 = landing / "week-001"
    write_manifest(d1 / "manifest.jsonl", good_entries(d1, 4, prefix="a"))
    cfg = _cfg(tmp_path / "art", landing)
    checked: list[list[str]] = []
    real = ContractRunner.validate_rows

    def counting(self, frame):
        checked.append(sorted(frame["id"].astype(str)))
        return real(self, frame)

    monkeypatch.setattr(ContractRunner, "validate_rows", counting)
    v1 = validate.run(cfg, {"ingest": ingest.run(cfg, {})})
    assert checked == [["a0", "a1", "a2", "a3"]] and v1["n_rows_checked"] == 4 and v1["n_accepted"] == 4

    d2 = landing / "week-002"
    write_manifest(d2 / "manifest.jsonl", good_entries(d2, 3, prefix="b", seed0=50))
    checked.clear()
    v2 = validate.run(cfg, {"ingest": ingest.run(cfg, {})})
    assert checked == [["b0", "b1", "b2"]] and v2["n_rows_checked"] == 3 and v2["n_accepted"] == 7
    # the accepted manifest is the one a full check gives
    full = _cfg(tmp_path / "art2", landing)
    monkeypatch.setattr(ContractRunner, "validate_rows", real)
    v2_full = validate.run(full, {"ingest": ingest.run(full, {})})
    assert v2_full["n_rows_checked"] == 7
    cols = ["id", "audio_hash", "text", "long_form"]
    assert pq.read_table(resolve(v2, v2["manifest"]), columns=cols).equals(
        pq.read_table(resolve(v2_full, v2_full["manifest"]), columns=cols)
    )

    # tighter limits: every row is checked again, and the rows that now fail are never remembered
    monkeypatch.setattr(ContractRunner, "validate_rows", counting)
    strict = _cfg(tmp_path / "art", landing, "validate.max_chars_per_s=5", "validate.min_chars_per_s=1",
                  "validate.max_quarantine_share=1.0", "validate.min_utterances=0")  # fmt: skip
    for _ in range(2):
        checked.clear()
        try:
            v = validate.run(strict, {"ingest": ingest.run(strict, {})}, force=True)
            assert v["n_quarantined_validate"] == 7
        except validate.DataContractError:
            pass
        assert checked == [["a0", "a1", "a2", "a3", "b0", "b1", "b2"]]

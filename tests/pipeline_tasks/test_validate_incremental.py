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

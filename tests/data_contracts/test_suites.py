"""data_contracts.suites: the GX suites themselves, run on small real DataFrames."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from data_contracts.suites import (
    BATCH_SUITE,
    ROW_SUITE,
    ContractLimits,
    ContractRunner,
    allowed_regex,
    batch_frame,
    format_failures,
)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return ContractRunner(ContractLimits(), docs_dir=tmp_path_factory.mktemp("docs"))


def _rows(**overrides):
    base = {
        "id": ["a", "b", "c", "d", "e"],
        "audio_hash": [f"{i:064x}" for i in range(5)],
        "num_samples": [16000, 32000, 16000, 16000, 16000],
        "audio_frames": [16000.0, 32000.0, 16000.0, float("nan"), 16000.0],
        "audio_sample_rate": [16000.0, 16000.0, 8000.0, float("nan"), 16000.0],
        "sample_rate": [16000] * 5,
        "duration_s": [1.0, 2.0, 1.0, 1.0, 0.1],
        "text": ["hello there", "a good sentence here", "fine text", "ok ok ok", "hi"],
    }
    base.update(overrides)
    df = pd.DataFrame(base)
    df["chars_per_s"] = df["text"].str.len() / df["duration_s"]
    return df


def test_allowed_regex():
    rx = re.compile(allowed_regex("ab' "))
    assert rx.match("ab 'ba") and not rx.match("abc") and not rx.match("")


def test_row_failures_map_back_to_ids_with_reasons(runner):
    df = _rows(text=["hello there", "a good sentence here", "fine text", "ok ok ok", "HI!!"])
    df.loc[1, "id"] = "a"  # duplicate id
    failures, res = runner.validate_rows(df)
    assert not res.success
    reasons = {rid: {f["reason"] for f in fl} for rid, fl in failures.items()}
    assert reasons["a"] == {"duplicate_id"}
    assert reasons["c"] == {"bad_sample_rate"}
    assert reasons["d"] == {"audio_not_decodable"}
    assert reasons["e"] == {"duration_out_of_bounds", "disallowed_chars", "text_audio_mismatch"}
    assert failures["e"][0]["reason"] == "duration_out_of_bounds"  # suite order: bounds first
    assert {f["value"] for f in failures["e"] if f["reason"] == "duration_out_of_bounds"} == {0.1}
    good, res = runner.validate_rows(_rows().iloc[:3].assign(audio_sample_rate=16000.0))
    assert good == {} and res.success


def test_duplicate_audio_breaks_the_row_contract(runner):
    """The same audio under two ids would land in train and dev (the split hashes ids): the
    contract flags every row that shares its audio_hash with another (issue 13)."""
    df = _rows().iloc[:3].assign(audio_sample_rate=16000.0)
    df.loc[2, "audio_hash"] = df.loc[0, "audio_hash"]
    failures, res = runner.validate_rows(df)
    assert not res.success
    assert {rid: [f["reason"] for f in fl] for rid, fl in failures.items()} == {
        "a": ["duplicate_audio"],
        "c": ["duplicate_audio"],
    }


def test_batch_frame_and_suite(runner):
    acc = pd.DataFrame({"duration_s": [3.0, 1.0, 1.0, 5.0], "speaker": ["x", "y", "y", None]})
    frame = batch_frame(acc, 2)
    assert frame["quarantined"].tolist() == [0, 0, 0, 0, 1, 1]
    assert frame["speaker_hours_share"].tolist()[:4] == pytest.approx([0.3, 0.2, 0.2, 0.0])
    assert math.isnan(frame["duration_s"].iloc[-1])
    fails, _ = runner.validate_batch(frame, "week-009")
    assert [f["expectation"] for f in fails] == ["expect_column_mean_to_be_between"]
    assert fails[0]["observed"] == pytest.approx(2 / 6) and fails[0]["max_value"] == 0.2
    assert "week-009: share of quarantined rows at most 0.2 — observed 0.3333" in format_failures(fails)

    strict = ContractRunner(
        ContractLimits(max_hours_per_speaker_share=0.25, median_duration_s=(2.5, 30.0), min_utterances=5)
    )
    fails, _ = strict.validate_batch(batch_frame(acc, 0), "week-010")
    got = {f["expectation"]: f["observed"] for f in fails}
    assert got["expect_column_max_to_be_between"] == pytest.approx(0.3)
    assert got["expect_column_median_to_be_between"] == pytest.approx(2.0)  # median of accepted rows only
    assert got["expect_column_sum_to_be_between"] == 4


def test_no_stray_temp_docs_site(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ContractRunner(ContractLimits())
    assert list(tmp_path.iterdir()) == []


def test_data_docs_rendered(runner):
    index = runner.build_docs()
    html = index.read_text()
    assert ROW_SUITE in html and BATCH_SUITE in html
    assert list(index.parent.glob("validations/**/*.html"))

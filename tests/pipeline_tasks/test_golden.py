"""golden: decode + normalize like ingest, DVC-version separately, featurize into the shared cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from model_code.dataset import FeatureTable
from model_code.features import feature_kwargs, logmel
from model_code.text import normalize_text
from pipeline_tasks.config import load_config
from pipeline_tasks.contract import resolve
from pipeline_tasks.services.dvc_store import DataWorkspace
from pipeline_tasks.steps import featurize, golden
from tests.pipeline_tasks.featurize_helpers import make_rows, write_golden_dir, write_validate_result


@pytest.fixture(scope="module")
def gcfg(tmp_path_factory):
    base = tmp_path_factory.mktemp("golden")
    write_golden_dir(base / "golden_src", [f"g{i}" for i in range(5)], sr=22050, channels=2)
    return load_config(
        "tiny", [f"paths.root={base / 'art'}", f"paths.golden_dir={base / 'golden_src'}", "features.jobs=1"]
    )


@pytest.fixture(scope="module")
def gres(gcfg):
    return golden.run(gcfg, {})


def test_golden_decodes_versions_and_featurizes(gcfg, gres):
    assert gres["n_utts"] == 5 and gres["n_computed"] == 5
    m = pq.read_table(resolve(gres, gres["manifest"])).to_pylist()
    assert [r["id"] for r in m] == [f"g{i}" for i in range(5)]
    for r in m:  # resampled 22.05 kHz stereo -> 16 kHz mono; text normalized like ingest
        assert (r["sample_rate"], r["orig_sample_rate"], r["orig_channels"]) == (16000, 22050, 2)
        assert r["text"] == normalize_text(r["text_raw"]) and r["batch"] == "golden"
        assert r["audio_path"].startswith("golden/")

    ws = DataWorkspace(gcfg.paths.data_workspace, gcfg.paths.dvc_remote)
    assert gres["golden_md5"].endswith(".dir") and ws.md5("golden") == gres["golden_md5"]
    assert ws.has_tag(f"golden-{gres['golden_md5'][:12]}") and gres["dvc_tag"] in ws.tags()
    meta = yaml.safe_load((ws.path / "golden.dvc").read_text())
    assert meta["outs"][0]["nfiles"] == 5
    assert any(Path(gcfg.paths.dvc_remote).rglob("*"))  # pushed to the remote

    table = FeatureTable(resolve(gres, gres["index"]))
    assert Path(table._shards[0]).parent == featurize.feature_cache_dir(gcfg.root, gcfg.features)
    wave, sr = sf.read(ws.path / m[2]["audio_path"], dtype="float32")
    np.testing.assert_allclose(
        table.features(2), logmel(wave, **feature_kwargs(gcfg.features)), rtol=1e-3, atol=1e-3
    )  # float16


def test_golden_rerun_is_cached_and_shares_the_feature_cache(gcfg, gres, tmp_path):
    assert golden.run(gcfg, {}) == gres
    forced = golden.run(gcfg, {}, force=True)
    assert forced["n_computed"] == 0 and forced["golden_md5"] == gres["golden_md5"]
    assert forced["index_md5"] == gres["index_md5"]
    # training data that contains golden audio finds its features already cached
    g_rows = pq.read_table(resolve(gres, gres["manifest"])).to_pylist()
    rows = make_rows(Path(gcfg.paths.data_workspace), ["t1", "t2"]) + [
        dict(g_rows[0], id="copy", batch="week-001")
    ]
    r = featurize.run(gcfg, {"validate": write_validate_result(tmp_path / "v", rows)})
    assert r["n_utts"] == 3 and r["n_computed"] == 2


def test_missing_golden_manifest_says_how_to_make_one(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}", f"paths.golden_dir={tmp_path / 'nothing'}"])
    with pytest.raises(golden.GoldenSetError, match=r"asrflow corpus golden --out .*nothing"):
        golden.run(cfg, {})


def test_bad_golden_row_is_an_error(tmp_path):
    gdir = tmp_path / "g"
    write_golden_dir(gdir, ["a", "b"])
    (gdir / "audio" / "b.wav").write_bytes(b"not audio at all")
    cfg = load_config("tiny", [f"paths.root={tmp_path / 'art'}", f"paths.golden_dir={gdir}"])
    with pytest.raises(golden.GoldenSetError, match=r"manifest.jsonl:2: golden audio unusable \(not_audio"):
        golden.run(cfg, {})

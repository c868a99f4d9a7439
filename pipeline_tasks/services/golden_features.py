"""Golden-set features for a model's front end, shared by the ``evaluate`` and ``export`` steps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import resolve

log = logging.getLogger(__name__)


def golden_features(cfg: AsrflowConfig, golden: dict[str, Any], feature_kwargs: dict[str, Any]):
    """Golden features for a model's front end: the cached ones when the config matches, else
    recomputed from the golden FLACs in the data workspace with ``model_code.features.logmel``."""
    from model_code.dataset import FeatureTable
    from model_code.features import feature_kwargs as fk
    from model_code.features import logmel
    from model_code.onnx_runtime import load_wave

    table = FeatureTable(resolve(golden, golden["index"]))
    if fk(cfg.features) == fk(feature_kwargs):
        return [table.features(i) for i in range(len(table))]
    import pyarrow.parquet as pq

    log.warning("model front end differs from the golden cache's: recomputing golden features from audio")
    man = pq.read_table(resolve(golden, golden["manifest"]), columns=["id", "audio_path"]).to_pylist()
    path_of = {r["id"]: Path(cfg.paths.data_workspace) / r["audio_path"] for r in man}
    sr = int(feature_kwargs["sample_rate"])
    return [logmel(load_wave(path_of[i], sr)[0], **fk(feature_kwargs)) for i in table.ids()]

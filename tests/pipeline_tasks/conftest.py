"""Fixtures shared by the gate, export, promote and inference tests: the tiny golden set and the
trained quality ladder of models (``gate_helpers.quality_models``), built once per session."""

from __future__ import annotations

import pytest

from model_code.features import feature_kwargs
from pipeline_tasks.steps import golden
from tests.pipeline_tasks.gate_helpers import quality_models


@pytest.fixture(scope="session")
def golden_res(tiny_cfg):
    return golden.run(tiny_cfg, {})


@pytest.fixture(scope="session")
def models(tmp_path_factory, tiny_cfg, golden_res):
    return quality_models(tmp_path_factory.getbasetemp() / "gate_models", golden_res, feature_kwargs(tiny_cfg.features))

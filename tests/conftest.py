"""Shared fixtures: a tiny synthetic corpus and a tiny-profile config, made once per session.

Everything here is real: espeak-ng speech, a real artifact root with real DVC/MLflow/Optuna
stores under pytest's temporary folder. Steps are keyed and cached, so tests that need the
output of upstream steps call ``run_until(step, tiny_cfg)`` and pay for each step once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("GIT_AUTHOR_NAME", "asrflow-tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@asrflow.invalid")
os.environ.setdefault("GIT_COMMITTER_NAME", "asrflow-tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@asrflow.invalid")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")  # dvc / mlflow telemetry off
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# configs/prod.yaml takes its Optuna DB password from the environment (a secret in infra/)
os.environ.setdefault("ASRFLOW_OPTUNA_DB_PASSWORD", "test-only-password")

TINY_UTTERANCES = 48
TINY_GOLDEN = 16
TINY_SEED = 7


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="session")
def tiny_landing(corpus_dir) -> Path:
    """A landing zone with one synthetic week (48 utterances)."""
    from synth import corpus

    landing = corpus_dir / "landing"
    corpus.generate_week(landing, week=1, utterances=TINY_UTTERANCES, seed=TINY_SEED, jobs=2)
    return landing


@pytest.fixture(scope="session")
def tiny_golden(corpus_dir) -> Path:
    from synth import corpus

    golden = corpus_dir / "golden"
    corpus.generate_golden(golden, utterances=TINY_GOLDEN, seed=TINY_SEED, jobs=2)
    return golden


def make_tiny_cfg(root: Path, landing: Path, golden: Path, extra: list[str] | None = None):
    from pipeline_tasks.config import load_config

    return load_config(
        "tiny",
        [f"paths.root={root}", f"paths.landing_url={landing}", f"paths.golden_dir={golden}", *(extra or [])],
    )


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory, tiny_landing, tiny_golden):
    """A tiny-profile config with its own artifact root, shared by the whole session."""
    root = tmp_path_factory.mktemp("artifacts")
    return make_tiny_cfg(root, tiny_landing, tiny_golden)


@pytest.fixture()
def fresh_cfg(tmp_path, tiny_landing, tiny_golden):
    """A tiny-profile config with a fresh, empty artifact root (for tests that need isolation)."""
    return make_tiny_cfg(tmp_path / "artifacts", tiny_landing, tiny_golden)

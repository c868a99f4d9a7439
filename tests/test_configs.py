"""Every shipped profile loads and validates (torchtune's test_configs.py idea)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline_tasks.config import CONFIG_DIR, AsrflowConfig, apply_overrides, load_config

PROFILES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_profiles_exist():
    assert {"local", "prod", "tiny"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates(profile, tmp_path, monkeypatch):
    monkeypatch.delenv("ASRFLOW_ROOT", raising=False)
    cfg = load_config(profile)
    assert isinstance(cfg, AsrflowConfig)
    assert cfg.profile == profile
    # every path is absolute or a URL after loading
    for name in ("root", "landing_url", "golden_dir", "data_workspace", "dvc_remote", "quarantine_dir"):
        val = getattr(cfg.paths, name)
        assert "://" in val or Path(val).is_absolute(), (name, val)
    assert "{root}" not in cfg.tune.storage and "{root}" not in cfg.registry.tracking_uri
    # d_model must split into heads
    assert cfg.model.d_model % cfg.model.n_heads == 0
    # every tuning dimension names a real config key
    dumped = cfg.dump()
    for dotted in cfg.tune.space:
        node = dumped
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"{profile}: tune.space key {dotted!r} is not a config key"
            node = node[part]
    # the dump round-trips
    assert AsrflowConfig.model_validate(dumped).dump() == dumped


def test_profile_files_have_no_unknown_keys():
    for p in CONFIG_DIR.glob("*.yaml"):
        data = yaml.safe_load(p.read_text())
        AsrflowConfig.model_validate(data)  # raises on a typo'd key


def test_overrides_are_typed(monkeypatch, tmp_path):
    monkeypatch.delenv("ASRFLOW_ROOT", raising=False)
    cfg = load_config("local", ["train.epochs=3", "train.lr=1e-4", "tune.enabled=false", f"paths.root={tmp_path}"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.tune.enabled is False
    assert cfg.paths.root == str(tmp_path)
    assert cfg.paths.landing_url == str(tmp_path / "landing")
    assert cfg.tune.storage == f"sqlite:///{tmp_path}/optuna.db"


def test_bad_override_is_rejected():
    with pytest.raises(ValidationError):
        load_config("local", ["train.epochs=zero"])
    with pytest.raises(ValidationError):
        load_config("local", ["train.not_a_field=1"])
    with pytest.raises(ValueError):
        load_config("local", ["train.epochs"])


def test_env_root_and_explicit_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ASRFLOW_ROOT", str(tmp_path / "env"))
    assert load_config("tiny").paths.root == str(tmp_path / "env")
    assert load_config("tiny", [f"paths.root={tmp_path / 'cli'}"]).paths.root == str(tmp_path / "cli")


def test_apply_overrides_nested_and_pure():
    base = {"a": {"b": 1}}
    out = apply_overrides(base, ["a.c.d=[1, 2]", "a.b=x"])
    assert out == {"a": {"b": "x", "c": {"d": [1, 2]}}}
    assert base == {"a": {"b": 1}}


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no config profile"):
        load_config("nope-not-a-profile")

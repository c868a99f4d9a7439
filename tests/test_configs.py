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


def test_augmentation_keys_are_typed_validated_and_shipped(monkeypatch, tmp_path):
    from pipeline_tasks.config import check_trigger_overrides

    monkeypatch.delenv("ASRFLOW_ROOT", raising=False)
    tiny = load_config("tiny", [f"paths.root={tmp_path}"])
    # tiny computes no speed copies and augments nothing by default (fast tests)
    assert tiny.features.speed_factors == [1.0] and tiny.features.speed_variants == []
    a = tiny.train.augment
    assert (a.speed_perturb, a.noise_prob, a.reverb_prob) == (False, 0.0, 0.0)
    local, prod = load_config("local"), load_config("prod")
    assert local.features.speed_factors == [0.9, 1.0, 1.1] and not local.train.augment.speed_perturb
    assert {"train.augment.speed_perturb", "train.augment.noise_prob", "train.augment.reverb_prob",
            "train.augment.vtlp_prob"} <= set(local.tune.space)
    assert local.tune.space["train.augment.vtlp_prob"].warm_only
    assert prod.train.augment.speed_perturb and prod.features.speed_variants == [0.9, 1.1]
    check_trigger_overrides(prod, ["train.augment.noise_prob=0.3", "train.augment.speed_perturb=false"])
    ok = load_config("tiny", [f"paths.root={tmp_path}", "features.speed_factors=[1.1, 1.0, 0.9]",
                              "train.augment.speed_perturb=true", "train.augment.noise_snr_db=[0, 10]"])
    assert ok.features.speed_factors == [0.9, 1.0, 1.1] and ok.train.augment.noise_snr_db == (0.0, 10.0)
    for bad in (
        ["features.speed_factors=[0.9, 1.1]"],  # 1.0 (the plain cache) must be there
        ["features.speed_factors=[1.0, 1.0]"],
        ["features.speed_factors=[1.0, 3.0]"],
        ["train.augment.speed_perturb=true"],  # no copies to pick from
        ["train.augment.noise_prob=1.5"],
        ["train.augment.noise_snr_db=[20, 10]"],
        ["train.augment.reverb_t60_s=[0.0, 0.5]"],
        ["train.augment.vtlp_alpha=[1.1, 0.9]"],
        ["train.augment.vtlp_alpha=[0.0, 1.1]"],
        ["train.augment.vtlp_prob=-0.1"],
    ):
        with pytest.raises(ValidationError):
            load_config("tiny", [f"paths.root={tmp_path}", *bad])

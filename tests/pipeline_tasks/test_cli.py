"""The CLI: every verb has --help; config show applies overrides; unknown steps fail clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from pipeline_tasks.cli import app
from pipeline_tasks.graph import ORDER

runner = CliRunner()

VERBS = [[s] for s in ORDER] + [
    ["run"],
    ["pipeline"],
    ["transcribe"],
    ["promote-production"],
    ["corpus", "generate"],
    ["corpus", "golden"],
    ["config", "show"],
    ["lineage"],
    ["landing", "import"],
    ["status"],
]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
def test_help_on_every_verb(verb):
    res = runner.invoke(app, [*verb, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_config_show_with_override(tmp_path):
    res = runner.invoke(app, ["config", "show", "--profile", "tiny", "--set", "train.epochs=7", "--set", f"paths.root={tmp_path}"])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(res.output)
    assert data["train"]["epochs"] == 7
    assert data["paths"]["root"] == str(tmp_path)


def test_bad_override_exit_code():
    res = runner.invoke(app, ["config", "show", "--set", "train.epochs=-3"])
    assert res.exit_code == 2
    assert "config error" in res.output


def test_unknown_step():
    res = runner.invoke(app, ["run", "nosuchstep"])
    assert res.exit_code == 2


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "pipeline_tasks.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "corpus" in out.stdout


def test_quiet_by_default_verbose_brings_third_party_logs_back(tiny_cfg):
    """A CLI verb that runs Great Expectations prints only asrflow's own INFO lines by default."""
    import re
    import subprocess
    import sys

    from pipeline_tasks.graph import run_until

    run_until("ingest", tiny_cfg)  # cached upstream; validate itself is forced below
    sets = [f"paths.root={tiny_cfg.paths.root}", f"paths.landing_url={tiny_cfg.paths.landing_url}",
            f"paths.golden_dir={tiny_cfg.paths.golden_dir}"]
    cmd = [sys.executable, "-m", "pipeline_tasks.cli", "validate", "--profile", "tiny", "--force",
           *[x for s in sets for x in ("--set", s)]]
    foreign = re.compile(r" (INFO|DEBUG) (?!pipeline_tasks|model_code|synth|data_contracts|devstack)[\w.]+: ")

    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "validate" in quiet.stdout
    assert not [ln for ln in quiet.stderr.splitlines() if foreign.search(ln)], quiet.stderr[-2000:]
    assert " INFO pipeline_tasks" in quiet.stderr  # our own progress lines stay

    loud = subprocess.run([*cmd[:3], "-v", *cmd[3:]], capture_output=True, text=True, timeout=600)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert [ln for ln in loud.stderr.splitlines() if foreign.search(ln)], loud.stderr[-2000:]

"""Import layers, checked on the source (AST), so a wrong import fails here before it spreads.

    dags/ → pipeline_tasks/ → model_code/ (+ data_contracts/)
    devstack/ (tooling around the product) → pipeline_tasks/, never the other way round
    synth/ (the embedded corpus generator) stands alone

Inside pipeline_tasks: a step never imports another step (shared code lives in
``pipeline_tasks/services/``), and a service never imports a step.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = ".".join(path.relative_to(REPO).parent.parts)  # the package a relative import starts from
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def _files(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, folder
    return files


def _offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for f in _files(folder):
        bad = sorted(n for n in _imports(f) if any(n == p or n.startswith(p + ".") for p in forbidden))
        if bad:
            out[str(f.relative_to(REPO))] = bad
    return out


@pytest.mark.parametrize(
    "folder,forbidden",
    [
        ("model_code", ("pipeline_tasks", "devstack", "dags", "synth", "airflow")),
        ("data_contracts", ("pipeline_tasks", "devstack", "dags", "synth", "airflow")),
        ("synth", ("pipeline_tasks", "devstack", "dags", "model_code", "airflow")),
        ("pipeline_tasks", ("devstack", "dags", "airflow")),
        ("pipeline_tasks/services", ("pipeline_tasks.steps",)),
        ("tests/model_code", ("pipeline_tasks", "devstack", "dags")),
    ],
)
def test_layer_imports_point_one_way(folder, forbidden):
    assert _offenders(folder, forbidden) == {}


def _step_of(path: Path) -> str:
    rel = path.relative_to(REPO / "pipeline_tasks" / "steps")
    return rel.parts[0].removesuffix(".py")


def test_a_step_never_imports_another_step():
    steps_dir = REPO / "pipeline_tasks" / "steps"
    steps = {_step_of(f) for f in steps_dir.rglob("*.py") if f.name != "__init__.py" or f.parent != steps_dir}
    assert {"ingest", "validate", "featurize", "golden", "split", "tune", "train", "evaluate", "export",
            "promote"} <= steps
    offenders = {}
    for f in steps_dir.rglob("*.py"):
        if f.parent == steps_dir and f.name == "__init__.py":
            continue
        me = _step_of(f)
        bad = sorted(
            n for n in _imports(f)
            if n.startswith("pipeline_tasks.steps.") and n.split(".")[2] != me
        )
        if bad:
            offenders[str(f.relative_to(REPO))] = bad
    assert offenders == {}


def test_the_checker_sees_a_forbidden_import():
    """The AST reader catches the forms a wrong import can take (else the tests above prove nothing)."""
    pkg = REPO / "pipeline_tasks" / "steps"
    probe = pkg / "_layer_probe_tmp.py"
    probe.write_text(
        "from pipeline_tasks.steps import train\n"
        "def f():\n    from pipeline_tasks.steps.evaluate import run\n"
        "    import importlib; importlib.import_module('devstack.local_run')\n"
    )
    try:
        names = _imports(probe)
    finally:
        probe.unlink()
    assert {"pipeline_tasks.steps.train", "pipeline_tasks.steps.evaluate", "devstack.local_run"} <= names


_PROJECT = ("pipeline_tasks", "model_code", "data_contracts", "synth", "devstack", "infra")


def _missing_project_names(path: Path) -> list[str]:
    """Project modules or names imported by ``path`` (as :func:`_imports` reads them) that do not
    exist: ``a.b.c`` resolves as a module, or as attribute ``c`` of module ``a.b``."""
    import importlib

    missing = []
    for name in sorted(n for n in _imports(path) if n.split(".")[0] in _PROJECT):
        try:
            importlib.import_module(name)
            continue
        except ImportError:
            pass
        parent, _, attr = name.rpartition(".")
        try:
            if parent and hasattr(importlib.import_module(parent), attr):
                continue
        except ImportError:
            pass
        missing.append(name)
    return missing


@pytest.mark.parametrize("folder", ["bench", "devstack"])
def test_tools_import_only_names_that_exist(folder):
    """The benchmarks and dev tools import project code inside their functions, which no test runs
    on every change: a name that moved (bench/train_throughput.py imported ``make_tokenizer`` from
    the train step after it had moved to ``services.fitting``) only showed when someone ran it."""
    offenders = {str(f.relative_to(REPO)): m for f in _files(folder) if (m := _missing_project_names(f))}
    assert offenders == {}

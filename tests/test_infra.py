"""infra/: what can be checked without a Docker engine or a cluster.

The compose file parses and is internally consistent (every dependency and every host the
prod profile names is a service; every published port is bound to loopback); the Kubernetes
manifests parse; the prod profile points at these services.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from pipeline_tasks.config import REPO_ROOT, load_config

INFRA = REPO_ROOT / "infra"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((INFRA / "docker-compose.yaml").read_text())


def test_compose_services_and_dependencies(compose):
    services = compose["services"]
    for name in [
        "postgres",
        "redis",
        "minio",
        "mlflow",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-worker",
        "airflow-worker-gpu",
    ]:
        assert name in services, name
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep in deps if isinstance(deps, (list, dict)) else []:
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_compose_ports_are_loopback_only(compose):
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_uses_celery_and_gpu_queue(compose):
    sched = compose["services"]["airflow-scheduler"]
    assert sched["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    gpu_cmd = compose["services"]["airflow-worker-gpu"]["command"]
    prod = load_config("prod")
    assert f"--queues {prod.airflow.train_queue}" in gpu_cmd
    for cmd in (sched["command"],):
        assert "--skip-serve-logs" in cmd


def test_prod_profile_hosts_exist_in_compose(compose):
    prod = load_config("prod")
    services = set(compose["services"])
    hosts = {urlparse(prod.tune.storage).hostname, urlparse(prod.registry.tracking_uri).hostname}
    assert hosts <= services, hosts - services
    # S3 URLs of the profile are buckets that the compose stack creates
    mc = compose["services"]["minio-buckets"]["entrypoint"]
    for url in (prod.paths.landing_url, prod.paths.dvc_remote, prod.registry.artifact_location):
        bucket = urlparse(url).netloc
        assert bucket in mc, f"bucket {bucket} of {url} is not created by minio-buckets"
    # the Optuna database exists in the Postgres init script
    db = urlparse(prod.tune.storage).path.lstrip("/")
    assert re.search(rf"CREATE DATABASE {db}\b", (INFRA / "postgres-init.sql").read_text())


def test_k8s_manifests_parse_and_request_gpus():
    docs = {}
    for p in (INFRA / "k8s").glob("*.yaml"):
        docs[p.name] = yaml.safe_load(p.read_text())
        assert docs[p.name], p
    pod = docs["train-pod-override.yaml"]
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert docs["airflow-values.yaml"]["executor"] in {"CeleryKubernetesExecutor", "KubernetesExecutor", "CeleryExecutor"}


def test_multinode_launcher_is_valid_bash():
    script = INFRA / "deepspeed" / "launch_multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "bogus"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown mode" in out.stderr
    # every module the script launches exists in this repo
    mods = set(re.findall(r"(?:--module|-m) ([a-z_][\w.]*)", script.read_text())) - {"torch.distributed.run"}
    assert mods == {"model_code.ds_launch"}
    for m in mods:
        assert (INFRA.parent / (m.replace(".", "/") + ".py")).exists(), m


def test_celery_workers_use_the_solo_pool(compose):
    # prefork children are daemonic: the steps' process pools would fail inside them
    workers = {n: s for n, s in compose["services"].items() if "celery worker" in str(s.get("command", ""))}
    assert set(workers) >= {"airflow-worker", "airflow-worker-gpu"}
    for name, svc in workers.items():
        assert svc["environment"]["AIRFLOW__CELERY__POOL"] == "solo", name
        assert "--concurrency" not in str(svc["command"]), name
    values = yaml.safe_load((INFRA / "k8s" / "airflow-values.yaml").read_text())
    assert values["config"]["celery"]["pool"] == "solo"
    gpu = yaml.safe_load((INFRA / "k8s" / "gpu-worker.yaml").read_text())
    env = {e["name"]: e["value"] for e in gpu["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AIRFLOW__CELERY__POOL"] == "solo"
    # the distributed stack started here does the same
    from devstack import distributed_stack

    assert "AIRFLOW__CELERY__POOL" in Path(distributed_stack.__file__).read_text()


def test_a_regular_install_ships_the_profiles_and_the_lexicon(tmp_path):
    """The Docker image installs the package non-editable: the profiles and the corpus lexicon
    must be package data inside the wheel, not files that only exist in a checkout."""
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(repo)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("asrflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = {p.name for p in (repo / "pipeline_tasks" / "configs").glob("*.yaml")}
    assert {"local.yaml", "tiny.yaml", "prod.yaml"} <= profiles
    assert {f"pipeline_tasks/configs/{n}" for n in profiles} <= names
    assert "synth/corpus_data/lexicon.txt" in names
    assert any(n.startswith("devstack/") for n in names) and any(n.startswith("pipeline_tasks/steps/tune/") for n in names)


# ------------------------------------------------------------------------------ safe defaults (issue 13)
_SECRET_VAR = re.compile(r"\$\{([A-Z0-9_]*(?:PASSWORD|SECRET|USER|USERNAME|KEY)[A-Z0-9_]*)(:?[-?=+])?([^}]*)\}")


def test_compose_requires_every_secret_and_has_no_fallbacks():
    text = (INFRA / "docker-compose.yaml").read_text()
    assert "change-me" not in text.lower()
    refs = _SECRET_VAR.findall(text)
    assert {r[0] for r in refs} >= {
        "POSTGRES_PASSWORD", "AIRFLOW_JWT_SECRET", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
        "ASRFLOW_OPTUNA_DB_PASSWORD", "ASRFLOW_MLFLOW_DB_PASSWORD", "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
    }  # fmt: skip
    for name, op, _ in refs:
        assert op == ":?", f"${{{name}}} must be required (${{{name}:?...}}), not {op or 'optional'}"
    # no credential written out in a URL of the compose file
    assert not re.search(r"://[^/\s:@$]+:(?!\$\{)[^@\s]+@", text), "a URL carries a literal password"


def test_postgres_init_has_no_literal_password_and_gives_mlflow_its_own_role():
    sql = (INFRA / "postgres-init.sql").read_text()
    assert not re.search(r"PASSWORD\s+'", sql, re.I), "a literal password in postgres-init.sql"
    assert re.search(r"CREATE ROLE mlflow\b", sql) and re.search(r"CREATE DATABASE mlflow OWNER mlflow\b", sql)
    assert "\\getenv optuna_password ASRFLOW_OPTUNA_DB_PASSWORD" in sql


def test_mlflow_server_has_its_own_role_basic_auth_and_allowed_hosts(compose):
    prod = load_config("prod")
    mlflow = compose["services"]["mlflow"]
    cmd = " ".join(str(mlflow["command"]).split())
    assert "--app-name basic-auth" in cmd
    backend = re.search(r"--backend-store-uri (\S+)", cmd).group(1)
    assert urlparse(backend).username == "mlflow" and urlparse(backend).password is None
    hosts = re.search(r"--allowed-hosts (\S+)", cmd).group(1).split(",")
    tracking = urlparse(prod.registry.tracking_uri)
    assert f"{tracking.hostname}:{tracking.port}" in hosts  # the Host header the workers send
    env = mlflow["environment"]
    assert {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"} <= set(env)
    ini = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    assert not [ln for ln in ini.splitlines() if ln.strip().startswith(("admin_password", "admin_username"))]
    workers = compose["x-airflow-common"]["environment"]
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "ASRFLOW_OPTUNA_DB_PASSWORD"} <= set(workers)
    assert '"mlflow[auth]"' in (INFRA / "Dockerfile").read_text()  # Flask-WTF for the basic-auth app


def test_no_development_auth_manager_and_a_finite_default_task_timeout(compose):
    env = compose["x-airflow-common"]["environment"]
    values = yaml.safe_load((INFRA / "k8s" / "airflow-values.yaml").read_text())
    for manager in (env["AIRFLOW__CORE__AUTH_MANAGER"], values["config"]["core"]["auth_manager"]):
        assert "SimpleAuthManager" not in manager and manager.endswith("FabAuthManager")
    assert 0 < int(env["AIRFLOW__CORE__DEFAULT_TASK_EXECUTION_TIMEOUT"]) <= 7 * 24 * 3600
    assert 0 < int(values["config"]["core"]["default_task_execution_timeout"]) <= 7 * 24 * 3600
    secrets = {s["envName"] for s in values["secret"]}
    assert {"ASRFLOW_OPTUNA_DB_PASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= secrets


def test_prod_profile_holds_no_password_and_a_strict_trigger_allow_list():
    from pipeline_tasks.config import CONFIG_DIR

    raw = yaml.safe_load((CONFIG_DIR / "prod.yaml").read_text())
    storage = urlparse(raw["tune"]["storage"])
    assert storage.password == "${ASRFLOW_OPTUNA_DB_PASSWORD}"  # from the environment, never the file
    allow = raw["airflow"]["trigger_override_allow"]
    assert "*" not in allow and not any(p.split(".")[0] in {"gate", "paths", "registry", "airflow"} for p in allow)
    assert raw["airflow"]["trigger_profiles"] == ["prod"] and "*" not in raw["airflow"]["allowed_landing_prefixes"]

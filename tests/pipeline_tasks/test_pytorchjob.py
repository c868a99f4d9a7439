"""Training as a Kubernetes PyTorchJob (``train.launcher: pytorchjob``, issue 15).

The manifest of every shipped profile validates against
``pipeline_tasks/services/pytorchjob.schema.json``, and the schema rejects the mistakes that would
silently change a job. There is no cluster here: the submission path runs against ``kubectl_standin.py``, a stand-in for kubectl and the operator that
runs each replica's container command as a local process with the ``PET_*`` variables the operator
sets. So these tests prove the manifest's command trains through torchrun from those variables and
the train step follows, reads and publishes the job; they do not prove a real operator accepts it.
"""

from __future__ import annotations

import json
import logging
import signal
import stat
import sys
from pathlib import Path

import pytest
import torch

from pipeline_tasks.config import CONFIG_DIR, load_config, with_overrides
from pipeline_tasks.contract import resolve
from pipeline_tasks.graph import run_until
from pipeline_tasks.services import pytorchjob
from pipeline_tasks.steps import train as train_step

STANDIN = Path(__file__).with_name("kubectl_standin.py")
PROFILES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _job_cfg(cfg, **over):
    return with_overrides(cfg, {"train.launcher": "pytorchjob", **over})


# --------------------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nnodes", [1, 2, 4])
@pytest.mark.parametrize("profile", PROFILES)
def test_manifest_of_every_profile_validates(profile, nnodes):
    cfg = load_config(profile, ["train.launcher=pytorchjob", f"train.nnodes={nnodes}"])
    args_path = cfg.root / "train" / "tmp-x" / "train_args.json"
    man = pytorchjob.manifest(cfg, "0123456789abcdef0123456789abcdef", args_path)
    pytorchjob.validate(man)
    t, k = cfg.train, cfg.train.pytorchjob
    reps = man["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps.get("Worker", {}).get("replicas", 0) == nnodes - 1
    assert man["spec"]["nprocPerNode"] == str(t.world_size)
    el = man["spec"]["elasticPolicy"]
    assert (el["minReplicas"], el["maxReplicas"], el["maxRestarts"]) == (nnodes, nnodes, t.max_restarts)
    pod = reps["Master"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][-2:] == ["--args", str(args_path)] and "torch.distributed.run" in c["command"]
    assert {"name": "asrflow-data", "mountPath": str(cfg.root)} in c["volumeMounts"]
    assert {"name": "asrflow-data", "persistentVolumeClaim": {"claimName": k.artifact_claim}} in pod["volumes"]
    assert c["resources"]["limits"][k.gpu_resource] == t.world_size
    assert pod["nodeSelector"] == k.node_selector and pod["tolerations"] == k.tolerations
    assert man["metadata"]["namespace"] == k.namespace and len(man["metadata"]["name"]) <= 50


def test_prod_manifest_is_the_gpu_pool_of_the_readme():
    cfg = load_config("prod", ["train.launcher=pytorchjob", "train.nnodes=16", "train.pytorchjob.min_nodes=12"])
    man = pytorchjob.manifest(cfg, "k" * 32, cfg.root / "train" / "t" / "train_args.json")
    pytorchjob.validate(man)
    assert man["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 15
    assert man["spec"]["elasticPolicy"]["minReplicas"] == 12  # training goes on with 12 of 16 nodes
    assert man["spec"]["nprocPerNode"] == "8"
    c = man["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and c["image"] == cfg.train.pytorchjob.image


def _broken(man: dict, path: str, value) -> dict:
    m = json.loads(json.dumps(man))
    *head, last = path.split("/")
    node = m
    for p in head:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is KeyError:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return m


POD = "spec/pytorchReplicaSpecs/Master/template/spec"


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        ("spec/nprocsPerNode", "8", "spec"),  # a typo'd key is not ignored
        ("spec/pytorchReplicaSpecs/Master/replicas", 2, "Master/replicas"),
        ("spec/pytorchReplicaSpecs/Launcher", {"replicas": 1, "template": {"spec": {}}}, "pytorchReplicaSpecs"),
        ("spec/elasticPolicy/rdzvBackend", "zookeeper", "rdzvBackend"),
        ("spec/runPolicy/cleanPodPolicy", "Some", "cleanPodPolicy"),
        (f"{POD}/containers/0/name", "trainer", "containers"),  # the operator needs 'pytorch'
        (f"{POD}/containers/0/resources/limits/memory", "lots", "memory"),
        (f"{POD}/tolerations/0/operator", "Matches", "operator"),
        ("metadata/name", "Asrflow_Train", "name"),
        (f"{POD}/containers/0/image", KeyError, "containers/0"),
    ],
)
def test_schema_rejects_what_would_change_the_job(path, value, where):
    cfg = load_config("prod", ["train.launcher=pytorchjob", "train.nnodes=2"])
    man = pytorchjob.manifest(cfg, "k" * 32, cfg.root / "a.json")
    pytorchjob.validate(man)
    with pytest.raises(pytorchjob.PyTorchJobError, match="does not match its schema") as e:
        pytorchjob.validate(_broken(man, path, value))
    assert where in str(e.value)


def test_job_name_is_a_dns_label_from_the_key():
    a, b = pytorchjob.job_name("ABC_def" + "0" * 60), pytorchjob.job_name("ABC_def" + "0" * 60)
    assert a == b and len(a) <= 50 and a == a.lower() and "_" not in a
    assert pytorchjob.job_name("k1") != pytorchjob.job_name("k2")


# --------------------------------------------------------------------------------------------------
# submission, following, cancelling (against the stand-in)
# --------------------------------------------------------------------------------------------------
@pytest.fixture()
def kubectl(tmp_path, monkeypatch):
    """The stand-in as an executable; returns a function giving its recorded calls."""
    exe = tmp_path / "kubectl"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    state = tmp_path / "cluster"
    monkeypatch.setenv("KUBECTL_STANDIN_DIR", str(state))

    def calls(verb: str | None = None) -> list[list[str]]:
        p = state / "calls.jsonl"
        rows = [json.loads(x)["argv"] for x in p.read_text().splitlines()] if p.exists() else []
        return [r for r in rows if verb is None or verb in r]

    calls.exe = str(exe)  # type: ignore[attr-defined]
    calls.state = state  # type: ignore[attr-defined]
    return calls


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_step_runs_a_two_node_job_and_publishes_rank0s_result(fresh_cfg, kubectl, caplog):
    split = run_until("split", fresh_cfg)["split"]
    cfg = _job_cfg(
        fresh_cfg,
        **{"train.init_from": "scratch", "train.epochs": 1, "train.nnodes": 2, "train.world_size": 1,
           "train.torch_threads": 1, "train.pytorchjob.kubectl": kubectl.exe, "train.pytorchjob.poll_s": 0.5,
           "train.pytorchjob.namespace": "asr-test"},
    )  # fmt: skip
    inputs = {"split": split, "tune": {"best_overrides": {}}}
    assert train_step.plan(cfg, inputs) == []  # no mapped train_node tasks: the job holds all nodes
    with caplog.at_level(logging.INFO, logger="pipeline_tasks.services.pytorchjob"):
        res = train_step.run(cfg, inputs)
    assert res["launcher"] == "pytorchjob" and res["nnodes"] == 2 and res["world_size"] == 2
    assert res["steps"] > 0 and res["dev_wer"] is not None
    weights = torch.load(resolve(res, res["model_dir"]) / "weights.pt", map_location="cpu", weights_only=True)
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    tput = res["throughput"]  # the ranks of both pods, each with its node (torchrun's GROUP_RANK)
    assert sorted(n["node"] for n in tput["nodes"]) == [0, 1] and len(tput["ranks"]) == 2
    assert len(kubectl("apply")) == 1 and all("asr-test" in c for c in kubectl())
    text = caplog.text
    assert "submitted: 2 node(s)" in text and "Succeeded" in text
    assert "[asrflow-train-" in text  # the master pod's log reached the task log
    # published once: a rerun reads the cache and submits nothing
    assert train_step.run(cfg, inputs) == res and len(kubectl("apply")) == 1


class TaskKilled(Exception):
    """What Airflow raises in a task's main thread when it is stopped (its SIGTERM handler)."""


def _args(out: Path):
    from model_code.training import TrainArgs

    return TrainArgs(train_index="unused", out_dir=str(out), tokenizer={}, model_kwargs={}, checkpoint_dir=str(out / "ck"))


@pytest.fixture()
def command(monkeypatch):
    """Replace the pods' command (a job that sleeps, or fails) while keeping the rest of the manifest."""
    real = pytorchjob.manifest

    def use(cmd: list[str], replica: str | None = None) -> None:
        def manifest(cfg_, key, args_path):
            m = real(cfg_, key, args_path)
            for name, r in m["spec"]["pytorchReplicaSpecs"].items():
                if replica in (None, name):
                    r["template"]["spec"]["containers"][0]["command"] = cmd
            return m

        monkeypatch.setattr(pytorchjob, "manifest", manifest)

    return use


@pytest.mark.timeout(300)
def test_a_retry_follows_the_running_job_and_a_killed_task_deletes_it(fresh_cfg, kubectl, command):
    cfg = _job_cfg(fresh_cfg, **{"train.pytorchjob.kubectl": kubectl.exe, "train.pytorchjob.poll_s": 0.3})
    command(["python", "-c", "import time; time.sleep(300)"])
    args = _args(cfg.root / "train" / "tmp-job")
    name = pytorchjob.job_name("key-slow")
    def killed(*_):
        raise TaskKilled

    old = signal.signal(signal.SIGALRM, killed)
    try:
        # a first attempt submits the job, then its worker is lost (the task is killed)
        signal.setitimer(signal.ITIMER_REAL, 3.0)
        with pytest.raises(TaskKilled):
            pytorchjob.run_job(cfg, "key-slow", args)
        assert len(kubectl("apply")) == 1 and (Path(args.out_dir) / "train_args.json").exists()
        deletes = kubectl("delete")
        assert len(deletes) == 1 and name in deletes[0]  # the killed task deleted its job
        assert pytorchjob.Kubectl(cfg).get_job(name) is None
        # a job left running by a lost worker (submitted outside this process): the retry follows it
        man = pytorchjob.manifest(cfg, "key-slow", Path(args.out_dir) / "train_args.json")
        pytorchjob.Kubectl(cfg)("apply", "-f", "-", stdin=json.dumps(man))
        signal.setitimer(signal.ITIMER_REAL, 3.0)
        with pytest.raises(TaskKilled):
            pytorchjob.run_job(cfg, "key-slow", args)
        assert len(kubectl("apply")) == 2  # the retry submitted nothing: it followed the running job
        assert len(kubectl("delete")) == 2 and pytorchjob.Kubectl(cfg).get_job(name) is None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.timeout(300)
def test_failed_job_reports_why_and_a_retry_submits_it_again(fresh_cfg, kubectl, command):
    cfg = _job_cfg(fresh_cfg, **{"train.pytorchjob.kubectl": kubectl.exe, "train.pytorchjob.poll_s": 0.2})
    command(["python", "-c", "import sys; print('rank 0: out of memory'); sys.exit(3)"], replica="Master")
    args = _args(cfg.root / "train" / "tmp-fail")
    with pytest.raises(pytorchjob.PyTorchJobError, match=r"failed: .*exited non-zero"):
        pytorchjob.run_job(cfg, "key-fail", args)
    # a retry deletes the failed job and submits it again (its checkpoints make it resume)
    with pytest.raises(pytorchjob.PyTorchJobError, match="failed"):
        pytorchjob.run_job(cfg, "key-fail", args)
    assert len(kubectl("apply")) == 2 and len(kubectl("delete")) == 1


def test_output_outside_the_shared_root_is_refused(fresh_cfg, kubectl, tmp_path):
    cfg = _job_cfg(fresh_cfg, **{"train.pytorchjob.kubectl": kubectl.exe})
    with pytest.raises(pytorchjob.PyTorchJobError, match="not under paths.root"):
        pytorchjob.run_job(cfg, "k", _args(tmp_path / "elsewhere"))
    assert kubectl() == []  # nothing submitted


def test_missing_kubectl_is_a_clear_error(fresh_cfg):
    cfg = _job_cfg(fresh_cfg, **{"train.pytorchjob.kubectl": "/nonexistent/kubectl"})
    with pytest.raises(pytorchjob.PyTorchJobError, match="kubectl get pytorchjob failed: .*No such file"):
        pytorchjob.run_job(cfg, "k", _args(cfg.root / "train" / "tmp-k"))

"""Training on Kubernetes: the train step submits a Kubeflow Training Operator ``PyTorchJob``.

With ``train.launcher: pytorchjob`` the ``train`` task does not start ranks itself. It writes the
training arguments to the step's folder on the shared artifact volume, submits a ``PyTorchJob``
(kubeflow.org/v1) of ``train.nnodes`` pods (one ``Master``, ``nnodes - 1`` ``Worker``; each pod
``train.world_size`` ranks and as many GPUs) generated from ``train.pytorchjob``, follows it, and
reads rank 0's result from the volume. Everything downstream is unchanged.

* **Ranks**: every pod runs ``python -m torch.distributed.run -m model_code.ds_launch --args
  <train_args.json>``; torchrun takes its node count, processes per node and c10d rendezvous
  from the ``PET_*`` variables the operator sets from ``nprocPerNode`` and ``elasticPolicy``.
* **Elastic recovery**: ``elasticPolicy`` (c10d, ``maxRestarts = train.max_restarts``,
  ``minReplicas = train.pytorchjob.min_nodes`` or ``nnodes``) plus ``restartPolicy: OnFailure``:
  a pod that dies is restarted (or rescheduled), the others re-rendezvous, and all ranks resume
  from the last exact-resume checkpoint in ``<root>/checkpoints/train/<key>/``.
* **Idempotent**: the job is named after the step key. A retried task finds its job: a running
  one is followed again (not submitted twice), a failed one is deleted and submitted anew (the
  checkpoints make it resume), a succeeded one is read.
* **Logs**: the master pod's log (rank 0's figures) is streamed into the task log; rank 0's
  ``events.jsonl`` on the volume feeds MLflow as for a local launch.
* **Cancelling**: when the task is interrupted (marked failed or cleared in the UI, a timeout:
  Airflow sends SIGTERM, which ends the task with an exception), the job is deleted.

The manifest is checked before submission against ``pytorchjob.schema.json`` (next to this
module, shipped with the package), a JSON Schema written for the fields of kubeflow.org/v1
``PyTorchJob`` and the pod template this module generates (not the operator's CRD file itself). Talks to the cluster through ``kubectl`` (in a
task pod: its service account; elsewhere: ``train.pytorchjob.context`` of the kubeconfig).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig

log = logging.getLogger(__name__)

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the operator finds the training container by this name
SCHEMA = Path(__file__).with_name("pytorchjob.schema.json")  # package data: the image has it too
JOB_LABEL = "training.kubeflow.org/job-name"
ROLE_LABEL = "training.kubeflow.org/replica-type"
DATA_VOLUME, SHM_VOLUME = "asrflow-data", "dshm"
RANKS_DIR_IN_POD = "/tmp/asrflow-ranks"  # model_code.ds_launch's rank registry: pod-local


class PyTorchJobError(RuntimeError):
    """The job failed, could not be submitted, or its manifest is invalid."""


def job_name(key: str) -> str:
    """The job's name: from the step key (a retry finds its job), a DNS-1123 label short enough
    for the pods' names (``<job>-worker-<i>``)."""
    return "asrflow-train-" + re.sub(r"[^a-z0-9-]", "-", key.lower()).strip("-")[:36]


def manifest(cfg: AsrflowConfig, key: str, args_path: Path) -> dict[str, Any]:
    """The ``PyTorchJob`` training ``args_path`` (a ``TrainArgs`` JSON on the shared volume)."""
    t, k = cfg.train, cfg.train.pytorchjob
    n = int(t.nnodes)
    nproc = int(t.world_size)
    root = str(cfg.root)
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": k.cpu, "memory": k.memory},
        "limits": {"memory": k.memory},
    }
    if k.gpu_resource:
        resources["limits"][k.gpu_resource] = nproc
    from model_code.ds_launch import NODE_LAUNCH_ENV, RANKS_DIR_ENV

    # what ds_launch.launch sets for the ranks it starts: the rank registry, and the torch
    # workaround an elastic restart needs
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "ASRFLOW_ROOT", "value": root},
        {"name": RANKS_DIR_ENV, "value": RANKS_DIR_IN_POD},
        *({"name": k, "value": v} for k, v in NODE_LAUNCH_ENV.items()),
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": k.image,
        "imagePullPolicy": k.image_pull_policy,
        "command": ["python", "-m", "torch.distributed.run", "-m", "model_code.ds_launch", "--args", str(args_path)],
        "env": env,
        "resources": resources,
        "volumeMounts": [
            {"name": DATA_VOLUME, "mountPath": root},
            {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": k.artifact_claim}},
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}},
        ],
    }
    if k.node_selector:
        pod_spec["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        pod_spec["tolerations"] = [dict(x) for x in k.tolerations]
    if k.service_account:
        pod_spec["serviceAccountName"] = k.service_account
    name = job_name(key)
    labels = {"app.kubernetes.io/part-of": "asrflow", "asrflow.io/step": "train"}

    def replica(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        }

    replicas = {"Master": replica(1)}
    if n > 1:
        replicas["Worker"] = replica(n - 1)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": k.namespace,
            "labels": labels,
            "annotations": {"asrflow.io/train-key": key, "asrflow.io/profile": cfg.profile},
        },
        "spec": {
            "nprocPerNode": str(nproc),
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "rdzvPort": int(k.rdzv_port),
                "rdzvId": name,
                "minReplicas": int(k.min_nodes or n),
                "maxReplicas": n,
                "maxRestarts": int(t.max_restarts),
                "rdzvConf": [{"key": "join_timeout", "value": str(int(t.rdzv_join_timeout_s))}],
            },
            "runPolicy": {
                "cleanPodPolicy": "Running",
                "backoffLimit": int(k.backoff_limit),
                "activeDeadlineSeconds": int(k.active_deadline_s),
                "ttlSecondsAfterFinished": int(k.ttl_after_finished_s),
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


@functools.cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


def validate(man: dict[str, Any]) -> None:
    """Raise :class:`PyTorchJobError` listing every place ``man`` breaks the PyTorchJob schema."""
    import jsonschema

    v = jsonschema.Draft202012Validator(_schema())
    errors = sorted(v.iter_errors(man), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors[:20]]
        raise PyTorchJobError("PyTorchJob manifest does not match its schema:\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# the cluster side, through kubectl
# ---------------------------------------------------------------------------------------------
class Kubectl:
    """``kubectl`` with the configured context and namespace; errors become :class:`PyTorchJobError`."""

    def __init__(self, cfg: AsrflowConfig) -> None:
        k = cfg.train.pytorchjob
        self.base = [k.kubectl, *(["--context", k.context] if k.context else []), "--namespace", k.namespace]

    def __call__(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        try:
            p = subprocess.run([*self.base, *args], input=stdin, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PyTorchJobError(f"kubectl {' '.join(args[:2])} failed: {e}") from e
        if check and p.returncode != 0:
            raise PyTorchJobError(f"kubectl {' '.join(args[:3])} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
        return p

    def get_job(self, name: str) -> dict[str, Any] | None:
        p = self("get", "pytorchjob", name, "-o", "json", "--ignore-not-found", check=True)
        return json.loads(p.stdout) if p.stdout.strip() else None

    def stream_logs(self, name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*self.base, "logs", "-f", "--timestamps", "--tail=-1", "-l", f"{JOB_LABEL}={name},{ROLE_LABEL}=master"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip


def job_state(job: dict[str, Any] | None) -> str:
    """``Succeeded``, ``Failed``, ``Running``, ``Restarting``, ``Created``, or ``Missing``: the
    last true condition of the job's status (the operator appends them in order)."""
    if job is None:
        return "Missing"
    conds = [c for c in (job.get("status") or {}).get("conditions") or [] if str(c.get("status")) == "True"]
    for final in ("Succeeded", "Failed"):
        if any(c.get("type") == final for c in conds):
            return final
    return str(conds[-1].get("type")) if conds else "Created"


def _condition_message(job: dict[str, Any] | None) -> str:
    conds = (job or {}).get("status", {}).get("conditions") or []
    return "; ".join(f"{c.get('type')}: {c.get('reason', '')} {c.get('message', '')}".strip() for c in conds[-3:])


class _LogFollower(threading.Thread):
    """Streams the master pod's log into the task log; restarts the stream when it ends (pod not
    there yet, restarted), skipping lines already shown (by their timestamp)."""

    def __init__(self, kubectl: Kubectl, name: str, poll_s: float, sink: Callable[[str], None]) -> None:
        super().__init__(daemon=True, name=f"logs-{name}")
        self.kubectl, self.name_, self.poll_s, self.sink = kubectl, name, poll_s, sink
        self.stop = threading.Event()
        self.last_ts = ""
        self.proc: subprocess.Popen | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.proc = self.kubectl.stream_logs(self.name_)
            except OSError as e:
                self.sink(f"(cannot stream logs: {e})")
                return
            for line in self.proc.stdout:  # type: ignore[union-attr]
                ts, _, text = line.rstrip("\n").partition(" ")
                if ts[:4].isdigit() and ts <= self.last_ts:
                    continue  # shown before the stream restarted
                if ts[:4].isdigit():
                    self.last_ts = ts
                    self.sink(text)
                else:
                    self.sink(line.rstrip("\n"))
            self.proc.wait()
            self.stop.wait(self.poll_s)

    def close(self) -> None:
        self.stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        self.join(timeout=10)


def runner(cfg: AsrflowConfig, key: str) -> Callable[[Any, Callable[[dict[str, Any]], None]], dict[str, Any]]:
    """``fit(runner=...)`` for ``train.launcher: pytorchjob``: run the ranks as a PyTorchJob."""

    def run(args, on_event: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        return run_job(cfg, key, args, on_event)

    return run


def run_job(cfg: AsrflowConfig, key: str, args, on_event: Callable[[dict[str, Any]], None] | None = None) -> dict:
    """Submit (or find) the job training ``args``, follow it, return rank 0's ``result.json``."""
    from model_code.ds_launch import EventTail

    k = cfg.train.pytorchjob
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args_path, result_path, events_path = out_dir / "train_args.json", out_dir / "result.json", out_dir / "events.jsonl"
    if not Path(out_dir).resolve().is_relative_to(Path(cfg.root).resolve()):
        raise PyTorchJobError(f"{out_dir} is not under paths.root {cfg.root}: the pods would not see it")
    man = manifest(cfg, key, args_path)
    validate(man)
    name = man["metadata"]["name"]
    kubectl = Kubectl(cfg)
    existing = kubectl.get_job(name)
    state = job_state(existing)
    if state == "Failed":
        log.info("pytorchjob %s: an earlier attempt failed (%s); deleting it and submitting anew "
                 "(training resumes from its last checkpoint)", name, _condition_message(existing))  # fmt: skip
        kubectl("delete", "pytorchjob", name, "--wait=true", "--ignore-not-found")
        existing, state = None, "Missing"
    if state == "Missing":
        args_path.write_text(args.to_json())
        result_path.unlink(missing_ok=True)
        (out_dir / "pytorchjob.json").write_text(json.dumps(man, indent=1))
        kubectl("apply", "-f", "-", stdin=json.dumps(man))
        log.info("pytorchjob %s/%s submitted: %d node(s) × %s rank(s)", k.namespace, name, cfg.train.nnodes,
                 man["spec"]["nprocPerNode"])  # fmt: skip
    else:
        log.info("pytorchjob %s: found from an earlier attempt (%s); following it", name, state)
    # MLflow gets the events from here on (an earlier attempt of the task logged the ones before)
    tail = EventTail(events_path, on_event, events_path.stat().st_size if events_path.exists() else 0)
    follower = _LogFollower(kubectl, name, k.poll_s, lambda s: log.info("[%s] %s", name, s))
    follower.start()
    t0, last = time.monotonic(), state
    try:
        while True:
            tail()
            job = kubectl.get_job(name)
            state = job_state(job)
            if state != last:
                log.info("pytorchjob %s: %s after %.0fs %s", name, state, time.monotonic() - t0, _condition_message(job))
                last = state
            if state == "Succeeded":
                break
            if state in ("Failed", "Missing"):
                raise PyTorchJobError(f"pytorchjob {k.namespace}/{name} {state.lower()}: {_condition_message(job)}")
            time.sleep(k.poll_s)
    except BaseException:
        if state not in ("Succeeded", "Failed", "Missing"):  # interrupted: the job must not train on
            log.warning("pytorchjob %s: the task ended while the job ran; deleting the job", name)
            kubectl("delete", "pytorchjob", name, "--wait=false", "--ignore-not-found", check=False)
        raise
    finally:
        follower.close()
    t_end = time.monotonic() + 120  # the volume may show rank 0's file a moment later
    while not result_path.exists() and time.monotonic() < t_end:
        time.sleep(1.0)
    tail()
    if not result_path.exists():
        raise PyTorchJobError(f"pytorchjob {name} succeeded but rank 0 left no {result_path}")
    return json.loads(result_path.read_text())

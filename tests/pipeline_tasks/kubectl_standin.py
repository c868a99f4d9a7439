#!/usr/bin/env python3
"""A stand-in for ``kubectl`` plus the Training Operator, for the PyTorchJob tests (no cluster in CI).

It is NOT a cluster: it implements the few ``kubectl`` verbs asrflow uses on ``pytorchjob``
objects, and on ``apply`` it plays the operator and the container runtime on this machine:
every replica of the job becomes a local process running the pod's container ``command`` with
the pod's env plus the ``PET_*`` variables the operator derives from ``nprocPerNode`` and
``elasticPolicy`` (a c10d endpoint on 127.0.0.1 instead of the master's service). ``python``
in the command is this interpreter (the image's). The job's state comes from the processes:
Running while the master runs, Succeeded when every pod exited 0, Failed when one did not.

State lives in ``$KUBECTL_STANDIN_DIR``: ``calls.jsonl`` (every call, for the tests to read),
``<job>/manifest.json``, ``<job>/<pod>.pid|.rc|.log``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ["KUBECTL_STANDIN_DIR"])
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pods(job: Path) -> list[str]:
    man = json.loads((job / "manifest.json").read_text())
    out = []
    for rtype, spec in man["spec"]["pytorchReplicaSpecs"].items():
        out += [f"{rtype.lower()}-{i}" for i in range(int(spec["replicas"]))]
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie of ours is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _state(job: Path) -> dict:
    pods = _pods(job)
    rcs = {p: (job / f"{p}.rc").read_text().strip() for p in pods if (job / f"{p}.rc").exists()}
    conds = [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated"}]
    if any(rc != "0" for rc in rcs.values()):
        bad = sorted(p for p, rc in rcs.items() if rc != "0")
        conds.append({"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
                      "message": f"pod(s) {bad} exited non-zero"})  # fmt: skip
    elif len(rcs) == len(pods):
        conds.append({"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"})
    else:
        conds.append({"type": "Running", "status": "True", "reason": "PyTorchJobRunning"})
    man = json.loads((job / "manifest.json").read_text())
    return {**man, "status": {"conditions": conds}}


def _start(job: Path, man: dict) -> None:
    spec = man["spec"]
    el = spec.get("elasticPolicy") or {}
    port = _free_port()
    n = sum(int(r["replicas"]) for r in spec["pytorchReplicaSpecs"].values())
    for rtype, rspec in spec["pytorchReplicaSpecs"].items():
        c = next(c for c in rspec["template"]["spec"]["containers"] if c["name"] == "pytorch")
        for i in range(int(rspec["replicas"])):
            pod = f"{rtype.lower()}-{i}"
            env = {**os.environ, **{e["name"]: e["value"] for e in c.get("env", [])}}
            env.pop("KUBECTL_STANDIN_DIR", None)
            env.update(
                PYTHONPATH=str(REPO),
                PET_NPROC_PER_NODE=spec["nprocPerNode"],
                PET_NNODES=f"{el.get('minReplicas', n)}:{el.get('maxReplicas', n)}",
                PET_RDZV_BACKEND=el.get("rdzvBackend", "c10d"),
                PET_RDZV_ENDPOINT=f"127.0.0.1:{port}",
                PET_RDZV_ID=el.get("rdzvId", man["metadata"]["name"]),
                PET_MAX_RESTARTS=str(el.get("maxRestarts", 0)),
                PET_RDZV_CONF=",".join(f"{x['key']}={x['value']}" for x in el.get("rdzvConf", [])),
            )
            cmd = [sys.executable if a == "python" else a for a in c["command"]] + list(c.get("args", []))
            rc = job / f"{pod}.rc"
            with open(job / f"{pod}.log", "wb") as log:
                p = subprocess.Popen(
                    ["sh", "-c", 'tmp="$0.tmp"; "$@"; echo $? > "$tmp"; mv "$tmp" "$0"', str(rc), *cmd],
                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            (job / f"{pod}.pid").write_text(str(p.pid))


def _delete(job: Path) -> None:
    for pid_file in job.glob("*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except OSError:
            pass
    for f in job.iterdir():
        f.unlink()
    job.rmdir()


def _logs(job: Path, follow: bool) -> None:
    log, rc = job / "master-0.log", job / "master-0.rc"
    seen = 0
    while True:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        done = rc.exists()
        for k, line in enumerate(lines[seen:], start=seen):
            print(f"2026-01-01T00:00:00.{k:09d}Z {line}", flush=True)
        seen = len(lines)
        if not follow or done or not job.exists():
            return
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    stdin = sys.stdin.read() if "-f" in argv and "-" in argv else None
    with open(STATE / "calls.jsonl", "a") as f:
        f.write(json.dumps({"argv": argv, "stdin": stdin}) + "\n")
    args = list(argv)
    ns = None
    for flag in ("--namespace", "--context"):
        if flag in args:
            i = args.index(flag)
            ns = args[i + 1] if flag == "--namespace" else ns
            del args[i : i + 2]
    verb = args[0]
    if verb == "apply":
        man = json.loads(stdin or "")
        assert man["metadata"]["namespace"] == ns, "the manifest's namespace is the one kubectl is told"
        job = STATE / man["metadata"]["name"]
        if job.exists():
            print(f"pytorchjob.kubeflow.org/{job.name} unchanged")
            return 0
        job.mkdir()
        (job / "manifest.json").write_text(json.dumps(man))
        _start(job, man)
        print(f"pytorchjob.kubeflow.org/{job.name} created")
        return 0
    if verb in ("get", "delete", "logs"):
        if verb == "logs":
            sel = args[args.index("-l") + 1]
            name = dict(kv.split("=", 1) for kv in sel.split(","))["training.kubeflow.org/job-name"]
            job = STATE / name
            if not job.exists():
                print("No resources found", file=sys.stderr)
                return 0
            _logs(job, "-f" in args)
            return 0
        assert args[1] == "pytorchjob", args
        job = STATE / args[2]
        if not job.exists():
            if "--ignore-not-found" in args:
                return 0
            print(f'Error from server (NotFound): pytorchjobs.kubeflow.org "{args[2]}" not found', file=sys.stderr)
            return 1
        if verb == "get":
            print(json.dumps(_state(job)))
        else:
            _delete(job)
            print(f'pytorchjob.kubeflow.org "{args[2]}" deleted')
        return 0
    print(f"kubectl stand-in: unsupported {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``asrflow status``: where a pipeline stands, on one screen.

Four read-only views, each safe to call while the DAG runs (nothing here writes, locks or
imports Airflow):

- **registry**: the registered model's aliases (``production``, ``staging``,
  ``previous-production``) with version, registration time, golden WER, gate decision and
  parent, plus the number of versions;
- **DAG runs**: the last run of each DAG (state, logical date, real start and end, duration),
  read with one ``SELECT`` on Airflow's ``dag_run`` table through SQLAlchemy (the metadata DB is
  ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` when set, else the embedded ``<root>/airflow/airflow.db``
  that ``make pipeline-local`` uses);
- **landing**: the batches in the landing zone that are not ingested yet (a batch whose every
  row was quarantined is listed as such, not as pending);
- **storage**: bytes and files under the artifact root and the data workspace, DVC remote and
  quarantine when they lie outside it (hard links counted once).

Each view that cannot be read (no registry yet, no Airflow DB, a landing URL that is down)
reports its error instead of failing the others.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.services.dvc_store import MANIFEST_REL
from pipeline_tasks.services.manifests import batch_of
from pipeline_tasks.services.registry import PREVIOUS, PRODUCTION, STAGING, registry_client

ALIASES = (PRODUCTION, STAGING, PREVIOUS)


def _ms_iso(ms: int | None) -> str | None:
    return None if not ms else dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="seconds")


def registry_status(cfg: AsrflowConfig, client=None) -> dict[str, Any]:
    """Aliases of ``registry.model_name`` → version, registered-at, golden WER, gate, parent."""
    from mlflow.exceptions import MlflowException

    client = client or registry_client(cfg)
    name = cfg.registry.model_name
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        return {"model": name, "versions": 0, "aliases": {}}
    versions = client.search_model_versions(f"name='{name}'")
    aliases: dict[str, Any] = {}
    for alias in ALIASES:
        v = (rm.aliases or {}).get(alias)
        if v is None:
            continue
        mv = client.get_model_version(name, str(v))
        t = mv.tags
        aliases[alias] = {
            "version": str(mv.version),
            "registered_at": _ms_iso(mv.creation_timestamp),
            "golden_wer": t.get("asrflow.gate_candidate_wer"),
            "gate_passed": t.get("asrflow.gate_passed"),
            "parent": t.get("asrflow.parent_version"),
            "data_snapshot_tag": t.get("asrflow.data_snapshot_tag"),
        }
    return {"model": name, "versions": len(versions), "aliases": aliases}


def airflow_db_url(cfg: AsrflowConfig) -> str | None:
    """The Airflow metadata DB this profile's runs write to, or ``None`` when there is none yet."""
    url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    if url:
        return url
    db = cfg.root / "airflow" / "airflow.db"  # devstack.airflow_env.airflow_home(cfg) / airflow.db
    return f"sqlite:///{db}" if db.exists() else None


def dag_runs_status(db_url: str | None) -> dict[str, Any]:
    """The last run of each DAG: ``run_id``, ``state``, ``run_type``, logical date, start, end,
    duration in seconds (from the real start and end times)."""
    if db_url is None:
        return {"db": None, "dags": {}}
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            dr = sa.Table("dag_run", sa.MetaData(), autoload_with=conn)
            last = sa.select(dr.c.dag_id, sa.func.max(dr.c.id).label("id")).group_by(dr.c.dag_id).subquery()
            rows = conn.execute(
                sa.select(dr.c.dag_id, dr.c.run_id, dr.c.state, dr.c.run_type, dr.c.logical_date,
                          dr.c.start_date, dr.c.end_date)
                .join(last, dr.c.id == last.c.id)
                .order_by(dr.c.dag_id)
            ).all()
    finally:
        engine.dispose()
    dags: dict[str, Any] = {}
    for r in rows:
        start, end = _as_dt(r.start_date), _as_dt(r.end_date)
        dags[r.dag_id] = {
            "run_id": r.run_id,
            "state": r.state,
            "run_type": r.run_type,
            "logical_date": _iso(r.logical_date),
            "start_date": _iso(start),
            "end_date": _iso(end),
            "duration_s": round((end - start).total_seconds(), 1) if start and end else None,
        }
    return {"db": _redact(db_url), "dags": dags}


def _as_dt(v: Any) -> dt.datetime | None:
    if v is None or isinstance(v, dt.datetime):
        return v
    return dt.datetime.fromisoformat(str(v))  # SQLite through a reflected table may give strings


def _iso(v: Any) -> str | None:
    v = _as_dt(v)
    return None if v is None else v.isoformat(timespec="seconds")


def _redact(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


def landing_status(cfg: AsrflowConfig) -> dict[str, Any]:
    """Batches in the landing zone vs the ingested manifest: ``pending`` (not ingested),
    ``quarantined`` (nothing ingested, a quarantine folder exists), ``ingested`` (count)."""
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(cfg.paths.landing_url)
    root = root.rstrip("/") or "/"
    landed: set[str] = set()
    if fs.exists(root):
        pattern = cfg.ingest.manifest_glob
        found = fs.glob(f"{root}/{pattern}") + (fs.glob(f"{root}/{pattern[3:]}") if pattern.startswith("**/") else [])
        for p in found:
            rel = os.path.relpath(p, root)
            if not any(part.startswith(".") for part in rel.split("/")):
                landed.add(batch_of(rel, root))
    manifest = Path(cfg.paths.data_workspace) / MANIFEST_REL
    ingested = set(pq.read_table(manifest, columns=["batch"]).column("batch").to_pylist()) if manifest.exists() else set()
    qdir = Path(cfg.paths.quarantine_dir)
    not_in = sorted(landed - ingested)
    quarantined = [b for b in not_in if (qdir / b).is_dir()]
    return {
        "landing_url": cfg.paths.landing_url,
        "batches": len(landed),
        "ingested": len(landed & ingested),
        "pending": [b for b in not_in if b not in quarantined],
        "quarantined": quarantined,
    }


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``, symlinks not followed, each hard-linked inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = files = 0
    stack = [path]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        if (st.st_dev, st.st_ino) not in seen:
                            seen.add((st.st_dev, st.st_ino))
                            total += st.st_size
                            files += 1
                except OSError:
                    continue
    return total, files


def storage_status(cfg: AsrflowConfig) -> dict[str, Any]:
    """Bytes and files of the artifact root and of each data folder that lies outside it."""
    root = cfg.root.resolve()
    out: dict[str, Any] = {}
    places = {"artifact_root": root}
    for key in ("data_workspace", "dvc_remote", "quarantine_dir"):
        val = getattr(cfg.paths, key)
        if "://" in val:
            continue
        p = Path(val).resolve()
        if p != root and root not in p.parents:
            places[key] = p
    for key, p in places.items():
        b, n = tree_size(p) if p.exists() else (0, 0)
        out[key] = {"path": str(p), "bytes": b, "files": n}
    return out


def _guard(fn, *args) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as e:  # one unreadable view must not hide the others
        return {"error": f"{type(e).__name__}: {e}"}


def collect(cfg: AsrflowConfig, db_url: str | None = None) -> dict[str, Any]:
    """Every view, as a JSON-able dict (``asrflow status --json`` prints exactly this)."""
    return {
        "profile": cfg.profile,
        "root": str(cfg.root),
        "registry": _guard(registry_status, cfg),
        "dag_runs": _guard(dag_runs_status, db_url if db_url is not None else airflow_db_url(cfg)),
        "landing": _guard(landing_status, cfg),
        "storage": _guard(storage_status, cfg),
    }


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def render(st: dict[str, Any]) -> str:
    """The one-screen text form of :func:`collect`'s dict."""
    lines = [f"asrflow status — profile {st['profile']}, root {st['root']}", ""]
    reg = st["registry"]
    lines.append("registry" + (f" ({reg['model']}, {reg['versions']} version(s))" if "model" in reg else ""))
    if "error" in reg:
        lines.append(f"  unavailable: {reg['error']}")
    elif not reg["aliases"]:
        lines.append("  no alias set yet")
    for alias, v in reg.get("aliases", {}).items():
        gate = {"true": "passed", "false": "failed"}.get(v["gate_passed"] or "", "?")
        lines.append(
            f"  {alias:<20} v{v['version']:<4} registered {v['registered_at'] or '?'}  golden WER {v['golden_wer'] or '?'}"
            f"  gate {gate}  parent {v['parent'] or '?'}"
        )
    lines += ["", "last DAG runs"]
    runs = st["dag_runs"]
    if "error" in runs:
        lines.append(f"  unavailable: {runs['error']}")
    elif not runs["dags"]:
        lines.append("  none (no Airflow metadata DB yet)" if runs["db"] is None else "  none")
    for dag_id, r in runs.get("dags", {}).items():
        took = _duration(r["duration_s"]) if r["end_date"] else "running"
        lines.append(
            f"  {dag_id:<20} {r['state'] or '?':<8} data {(r['logical_date'] or '?')[:10]}  started {r['start_date'] or '?'}  {took}"
        )
    lines += ["", "landing"]
    land = st["landing"]
    if "error" in land:
        lines.append(f"  unavailable: {land['error']}")
    else:
        lines.append(f"  {land['batches']} batch(es) in {land['landing_url']}, {land['ingested']} ingested")
        lines.append(f"  not ingested yet: {', '.join(land['pending']) or 'none'}")
        if land["quarantined"]:
            lines.append(f"  every row quarantined: {', '.join(land['quarantined'])}")
    lines += ["", "storage"]
    sto = st["storage"]
    if "error" in sto:
        lines.append(f"  unavailable: {sto['error']}")
    for key, v in (sto.items() if "error" not in sto else []):
        lines.append(f"  {key:<15} {_human(v['bytes']):>9} in {v['files']} file(s)  {v['path']}")
    return "\n".join(lines)

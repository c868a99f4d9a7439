"""A DAG run's state read through Airflow's own models, for runs with no API server.

``make pipeline-local`` runs the DAG with ``airflow dags test`` (one process, no API server),
so there is no REST API to ask. Instead of hand-written SQL against Airflow's tables (which
change between releases), this reads task instances, XComs and DAG runs through Airflow's ORM
models (``TaskInstance``, ``XComModel``, ``DagRun``) and its XCom decoder: the same code the API
server runs. Airflow reads its configuration when first imported, so the environment of the
embedded Airflow home is applied to this process before that import.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any


class AirflowState:
    """View of the metadata DB named by ``env`` (an ``airflow_env(cfg)`` mapping); read-only
    except :meth:`correct_run_start`."""

    def __init__(self, env: dict[str, str]):
        os.environ.update({k: v for k, v in env.items() if k.startswith("AIRFLOW")})
        from airflow import settings

        url = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        if settings.SQL_ALCHEMY_CONN != url:  # Airflow was imported before, for another home (tests)
            settings.dispose_orm()
            settings.configure_vars()
            settings.configure_orm()
        from airflow.models.dagrun import DagRun
        from airflow.models.taskinstance import TaskInstance
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        self._DagRun, self._TI, self._XCom, self._session = DagRun, TaskInstance, XComModel, create_session

    def task_states(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run: ``task_id``, ``map_index``, ``state``, ``try_number``, ``duration``."""
        from sqlalchemy import select

        TI = self._TI
        with self._session() as s:
            rows = s.execute(
                select(TI.task_id, TI.map_index, TI.state, TI.try_number, TI.duration)
                .where(TI.dag_id == dag_id, TI.run_id == run_id)
                .order_by(TI.start_date, TI.task_id, TI.map_index)
            ).all()
        return [
            {"task_id": r[0], "map_index": r[1], "state": None if r[2] is None else str(r[2]),
             "try_number": r[3], "duration": r[4]}
            for r in rows
        ]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """The XCom value (decoded as Airflow decodes it), or ``None``."""
        with self._session() as s:
            row = s.scalars(
                self._XCom.get_many(run_id=run_id, key=key, task_ids=task_id, dag_ids=dag_id, map_indexes=map_index)
            ).first()
            return None if row is None else self._XCom.deserialize_value(row)

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        """``run_id``, ``state``, ``logical_date`` (ISO), ``start_date``, ``end_date`` of every run of the DAG."""
        from sqlalchemy import select

        DR = self._DagRun
        with self._session() as s:
            runs = s.scalars(select(DR).where(DR.dag_id == dag_id).order_by(DR.id)).all()
            return [
                {"run_id": r.run_id, "state": str(r.state), "logical_date": r.logical_date.isoformat() if r.logical_date else None,
                 "start_date": r.start_date, "end_date": r.end_date}
                for r in runs
            ]

    def correct_run_start(self, dag_id: str, run_id: str, started_at: datetime) -> bool:
        """Give a ``dags test`` run its real start time; ``True`` if the row changed.

        Airflow 3's ``DAG.test()`` creates its run with ``start_date = logical_date``, so a run of
        the week of 2025-01-06 made today reads in the UI as lasting months. The logical date and
        the data interval keep the week (that is what keys the run and its outputs); only
        ``start_date`` (and ``queued_at``) move forward to when the run really started.
        """
        from sqlalchemy import select

        DR = self._DagRun
        with self._session() as s:
            run = s.scalars(select(DR).where(DR.dag_id == dag_id, DR.run_id == run_id)).first()
            if run is None or (run.start_date is not None and run.start_date >= started_at):
                return False
            run.start_date = started_at
            if run.queued_at is None or run.queued_at < started_at:
                run.queued_at = started_at
            return True  # create_session commits on exit

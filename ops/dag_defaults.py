"""Defaults every HemaFlow DAG shares: owner, start date, the task retry policy, and the settings of
the small DAGs that poll the bucket on RAW_WATCH_SCHEDULE (the raw watcher, review feedback).

Kept outside `dags/` so both DAG files import one definition (and parsing stays cheap:
nothing here imports Airflow).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum

from ops.report import log_failure_summary

OWNER = "hemaflow"
DAG_START = pendulum.datetime(2024, 1, 1, tz="UTC")
RETRIES = 2
RETRY_BACKOFF = 2.0


def task_defaults(retry_delay: timedelta, max_retry_delay: timedelta, execution_timeout: timedelta) -> dict[str, Any]:
    """`default_args`: retries with exponential backoff, a timeout and the failure summary callback."""
    return {
        "owner": OWNER,
        "retries": RETRIES,
        "retry_delay": retry_delay,
        "retry_exponential_backoff": RETRY_BACKOFF,
        "max_retry_delay": max_retry_delay,
        "execution_timeout": execution_timeout,
        "on_failure_callback": log_failure_summary,
    }


def polling_dag_args() -> dict[str, Any]:
    """`@dag` arguments of a short DAG polling the bucket on a cron: active from creation, one run at
    a time, no catch-up, a 20-minute run timeout and quick retries (the schedule and the names are
    the caller's).

    Active at creation (the site pauses new DAGs by default): the loop "images in the bucket or
    reviews -> raw/ -> retraining" runs without a person unpausing anything. A poll that finds
    nothing is skipped and emits nothing; one that races an upload's own Asset event queues a
    retraining run that ends green with "nothing to do"."""
    return {
        "is_paused_upon_creation": False,
        "start_date": DAG_START,
        "catchup": False,
        "max_active_runs": 1,
        "dagrun_timeout": timedelta(minutes=20),
        "default_args": task_defaults(retry_delay=timedelta(seconds=20), max_retry_delay=timedelta(minutes=5),
                                      execution_timeout=timedelta(minutes=10)),
    }

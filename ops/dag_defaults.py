"""Defaults every HemaFlow DAG shares: owner, start date and the task retry policy.

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

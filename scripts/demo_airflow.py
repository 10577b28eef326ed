"""Airflow as the demo runs it (`python -m scripts.demo`): the site, its admin login, starting it,
and following a DAG run to its end with one line per finished task and per training epoch."""

from __future__ import annotations

import re
import time
from pathlib import Path

from contracts.settings import Settings

LEGACY_AIRFLOW_PROCESS = "airflow"  # `airflow standalone` of earlier demos
DAG_PARSE_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 3 * 3600.0


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what to do. (Here, the demo modules' lowest layer:
    scripts.demo and scripts.demo_data raise it too.)"""


def airflow_site(settings: Settings, admin_key: str):
    """The demo's Airflow: LocalExecutor, SQLite under HEMAFLOW_HOME, the repo's DAGs."""
    from ops.airflow_local import AirflowSite

    return AirflowSite(home=settings.hemaflow_home / "airflow", port=settings.airflow_port,
                       extra_env={"SERVING_ADMIN_API_KEYS": admin_key})


def api_settings(settings: Settings, site) -> Settings:
    """The settings with the demo's api-server and its admin login (for the asset event)."""
    from pydantic import SecretStr

    from ops.airflow_local import ADMIN_USER, admin_password

    return settings.model_copy(update={"airflow_api_url": site.api_url, "airflow_api_username": ADMIN_USER,
                                       "airflow_api_password": SecretStr(admin_password(site))})


EPOCH_MARKER = re.compile(r"epoch \d+/\d+ [^\[\"]*?(?=\s+\[|\"|$)")
FINISHED_TASK_STATES = frozenset({"success", "skipped", "failed", "upstream_failed", "removed"})


class RunProgress:
    """Turns polls of a DAG run into one line per finished task (a skipped training must not
    read as "done") and one line per training epoch, read from the train task's log."""

    def __init__(self, airflow_home: Path) -> None:
        self.airflow_home = airflow_home
        self.shown: set[tuple[str, int]] = set()
        self.log_offsets: dict[Path, int] = {}

    def task_lines(self, tis: list[dict]) -> list[str]:
        lines = []
        for ti in sorted(tis, key=lambda t: t.get("end_date") or "~"):
            key = (ti["task_id"], ti.get("try_number") or 0)
            if ti.get("state") in FINISHED_TASK_STATES and key not in self.shown:
                self.shown.add(key)
                state = "done" if ti["state"] == "success" else ti["state"]
                lines.append(f"  . {ti['task_id']} {state} ({ti.get('duration') or 0:.1f}s)")
        return lines

    def epoch_lines(self, run: dict, tis: list[dict]) -> list[str]:
        train = next((t for t in tis if t["task_id"] == "train" and t.get("state") == "running"), None)
        if train is None:
            return []
        folder = (self.airflow_home / "logs" / f"dag_id={run['dag_id']}" / f"run_id={run['dag_run_id']}"
                  / "task_id=train")
        lines = []
        for log in sorted(folder.glob("attempt=*.log")):
            with open(log, encoding="utf-8", errors="replace") as fh:
                fh.seek(self.log_offsets.get(log, 0))
                text = fh.read()
                self.log_offsets[log] = fh.tell()
            lines += ["      " + m.group(0) for m in EPOCH_MARKER.finditer(text)]
        return lines

    def feed(self, run: dict, tis: list[dict]) -> list[str]:
        return self.epoch_lines(run, tis) + self.task_lines(tis)


def format_metrics(metrics: dict[str, float]) -> str:
    """Rates with 4 decimals, counts (test_n) as integers."""
    return ", ".join(f"{k}={v:.0f}" if k == "test_n" else f"{k}={v:.4f}" for k, v in metrics.items())


def stop_legacy_airflow(settings: Settings) -> bool:
    """An `airflow standalone` left by an earlier demo holds the port: stop its process group."""
    from ops import supervisor

    return supervisor.stop_process(settings, LEGACY_AIRFLOW_PROCESS)


def start_airflow(settings: Settings, site) -> None:
    from ops import airflow_local

    stop_legacy_airflow(settings)
    airflow_local.prepare(site)
    airflow_local.start(settings, site)


def wait_for_dag(client, dag_id: str) -> None:
    from pipeline.airflow_api import get_dag

    deadline = time.monotonic() + DAG_PARSE_TIMEOUT_S
    while get_dag(client, dag_id) is None:
        if time.monotonic() > deadline:
            raise DemoError(f"Airflow has not parsed {dag_id} after {DAG_PARSE_TIMEOUT_S:.0f}s; see "
                            "HEMAFLOW_HOME/stack/logs/airflow-dag-processor.log")
        time.sleep(2)


def follow_run(client, site, dag_id: str, pick) -> dict:
    """Wait for the run `pick` chooses, echoing its progress; raises DemoError unless it succeeded."""
    from pipeline.airflow_api import wait_for_run

    progress = RunProgress(site.home)
    announced: list[str] = []

    def _show(run: dict, tis: list[dict]) -> None:
        if not announced:
            announced.append(run["dag_run_id"])
            print(f"following {dag_id} run {run['dag_run_id']} ({run['run_type']}) - also in the Airflow UI",
                  flush=True)
        for line in progress.feed(run, tis):
            print(line, flush=True)

    run = wait_for_run(client, dag_id, pick, timeout_s=RUN_TIMEOUT_S, on_poll=_show)
    if run["state"] != "success":
        raise DemoError(f"{dag_id} run {run['dag_run_id']} ended {run['state']}; see the Airflow UI "
                        f"({site.api_url}) and HEMAFLOW_HOME/airflow/logs")
    return run

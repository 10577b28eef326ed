"""Airflow as it is deployed, on this machine: one process per component, on loopback.

The api-server, scheduler, dag-processor and triggerer (and, for the CeleryExecutor, Celery
workers) run as separate processes, like the containers of docker-compose.yml, so a DAG runs
through the scheduler, the executor and the task runner exactly as in production. `make
demo` and `tests/airflow` start Airflow this way; `dag.test()` in-process is never the only
path a DAG is exercised on.

Everything lives under the site's `home` (AIRFLOW_HOME): the SQLite database (LocalExecutor;
the Celery site passes a Postgres URL), task logs, and `site-secrets.json` (0600), generated
once per home: the JWT secret every component must share, the Fernet key and the admin
password of the simple auth manager. Processes are managed with `ops.stack`
(pid + kernel start time), so `stack.down` stops them too.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet

from contracts.common import write_private_file
from contracts.settings import PROJECT_ROOT, Settings
from ops import supervisor

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
PROCESS_PREFIX = "airflow-"
ADMIN_USER = "admin"
PASSWORD_FILE = "simple_auth_manager_passwords.json.generated"
SECRETS_FILE = "site-secrets.json"
WORKER_NAME_ENV = "HEMAFLOW_WORKER_NAME"
START_TIMEOUT_S = 300.0
MIGRATE_TIMEOUT_S = 600.0


class AirflowSiteError(RuntimeError):
    """An Airflow component could not be set up or started; the message says where to look."""


@dataclass(frozen=True)
class AirflowSite:
    """One Airflow deployment on this machine."""

    home: Path
    port: int
    dags_folder: Path = PROJECT_ROOT / "dags"
    executor: str = "LocalExecutor"
    database_url: str | None = None  # None: SQLite under home
    broker_url: str | None = None  # CeleryExecutor only
    parallelism: int = 2  # task processes at once (LocalExecutor); the machine also trains
    parse_interval_s: int = 30  # how often DAG files are re-parsed and the folder re-listed
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def worker_hostname() -> str:
    """Airflow's `hostname_callable` for our workers: the worker's name when it has one, so two
    workers on one machine are told apart in the task instances (else the host name)."""
    return os.environ.get(WORKER_NAME_ENV) or socket.getfqdn()


def site_secrets(home: Path) -> dict[str, str]:
    """JWT secret, Fernet key and admin password of a site: generated once, kept owner-only."""
    path = home / SECRETS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    values = {"jwt_secret": secrets.token_urlsafe(48), "fernet_key": Fernet.generate_key().decode(),
              "admin_password": secrets.token_urlsafe(18)}
    write_private_file(path, json.dumps(values))
    return values


def admin_password(site: AirflowSite) -> str:
    return site_secrets(site.home)["admin_password"]


def site_env(site: AirflowSite) -> dict[str, str]:
    """The environment every component of the site (and so every task) runs with."""
    keys = site_secrets(site.home)
    database = site.database_url or f"sqlite:///{site.home / 'airflow.db'}"
    env = {
        "AIRFLOW_HOME": str(site.home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(site.dags_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # Airflow's defaults, stated so an inherited environment cannot change them: each DAG
        # says itself whether it starts active (is_paused_upon_creation).
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__CORE__EXECUTOR": site.executor,
        "AIRFLOW__CORE__PARALLELISM": str(site.parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(site.parallelism),
        "AIRFLOW__CORE__FERNET_KEY": keys["fernet_key"],
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "ops.airflow_local.worker_hostname",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(site.home / PASSWORD_FILE),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{site.api_url}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(site.port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": str(site.parse_interval_s),
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(site.parse_interval_s),
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": str(site.parse_interval_s),
        # Components start `airflow ...` and tasks import the repo's packages.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    if site.executor == "CeleryExecutor":
        if not site.broker_url or not site.database_url:
            raise AirflowSiteError("the CeleryExecutor needs a broker URL and a database URL")
        env["AIRFLOW__CELERY__BROKER_URL"] = site.broker_url
        env["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+" + site.database_url
    return {**env, **site.extra_env}


def airflow_bin() -> str:
    return str(Path(sys.executable).parent / "airflow")


def prepare(site: AirflowSite) -> None:
    """Migrate the metadata database and pre-seed the admin password (never printed in logs)."""
    env = site_env(site)
    passwords = site.home / PASSWORD_FILE
    if not passwords.is_file():
        write_private_file(passwords, json.dumps({ADMIN_USER: admin_password(site)}))
    done = subprocess.run([airflow_bin(), "db", "migrate"], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=MIGRATE_TIMEOUT_S, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise AirflowSiteError(f"airflow db migrate failed:\n{(done.stdout + done.stderr)[-3000:]}")


def process_name(component: str) -> str:
    return PROCESS_PREFIX + component


def start(settings: Settings, site: AirflowSite, components: tuple[str, ...] = COMPONENTS) -> list[str]:
    """Start the components not already running; waits until the api-server answers.

    Returns the names started now."""
    env = site_env(site)
    started = []
    for component in components:
        name = process_name(component)
        if supervisor.read_pid(settings, name) is None:
            supervisor.start_process(settings, name, [airflow_bin(), component], env=env, cwd=PROJECT_ROOT)
            started.append(name)
    if "api-server" in components:
        _, log, _ = supervisor.process_paths(settings, process_name("api-server"))
        supervisor.wait_until(lambda: supervisor.http_ok(f"{site.api_url}/api/v2/version"), "Airflow api-server", log,
                              lambda: supervisor.read_pid(settings, process_name("api-server")),
                              timeout_s=START_TIMEOUT_S)
    return started


def start_celery_worker(settings: Settings, site: AirflowSite, name: str, queues: str, log_server_port: int,
                        env: dict[str, str] | None = None, concurrency: int = 1) -> str:
    """One Celery worker, `name`, serving `queues`, with its own environment on top of the site's
    (e.g. its own HEMAFLOW_HOME, as each worker container has its own local disk)."""
    process = process_name(f"worker-{name}")
    worker_env = {**site_env(site), WORKER_NAME_ENV: name,
                  "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_server_port), **(env or {})}
    supervisor.start_process(settings, process, [airflow_bin(), "celery", "worker", "--queues", queues,
                                                 "--concurrency", str(concurrency), "--celery-hostname", f"{name}@%h",
                                                 "--without-gossip", "--without-mingle"],
                             env=worker_env, cwd=PROJECT_ROOT)
    return process


def stop(settings: Settings) -> list[str]:
    """Stop every Airflow process of this HEMAFLOW_HOME (components and workers)."""
    names = [n for n in supervisor.managed_names(settings) if n.startswith(PROCESS_PREFIX)]
    return [n for n in names if supervisor.stop_process(settings, n)]

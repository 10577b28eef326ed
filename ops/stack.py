"""The embedded local stack: SeaweedFS (S3) and an MLflow server as plain processes.

`up` is idempotent (a healthy service that is already running is reused), refuses guessable
secrets, waits for health, sets up MLflow's basic-auth users (`ops.mlflow_auth`) and
returns the endpoints; `down` stops exactly the processes that were started
here, found by their pid files. Everything lives under `<HEMAFLOW_HOME>/stack`:
`run/*.pid`, `logs/*.log`, `data/<service>/`. Other long-running processes of the demo
(Airflow, serving) are managed with the same supervisor (`ops.supervisor`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from contracts.common import write_private_file
from contracts.credentials import check_component, stack_secrets
from contracts.screening import serving_s3_actions
from contracts.settings import Settings, get_settings
from ops import mlflow_auth
from ops.supervisor import (StackError, find_executable, free_port, http_ok, managed_names, port_free, process_paths,
                            read_pid, stack_dir, start_process, stop_process, wait_until)
from pipeline.storage import wait_for_bucket


SERVING_S3_IDENTITY = "serving"  # the identity's name in SeaweedFS's config


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    endpoint: str
    log: Path


# --- the two services ------------------------------------------------------------------


def _identity(name: str, access_key: str, secret_key: str, actions: list[str]) -> dict:
    return {"name": name, "credentials": [{"accessKey": access_key, "secretKey": secret_key}], "actions": actions}


def _s3_identities(settings: Settings) -> dict:
    """The pipeline's admin identity and, when its secret is set, serving's least-privilege one
    (contracts.screening.serving_s3_actions: the review queue's prefixes only)."""
    identities = [_identity("hemaflow", settings.aws_access_key_id, settings.aws_secret_access_key.get_secret_value(),
                            ["Admin", "Read", "Write", "List", "Tagging"])]
    serving_secret = settings.serving_s3_secret_access_key.get_secret_value()
    if serving_secret:
        if settings.serving_s3_access_key_id == settings.aws_access_key_id:
            raise StackError("SERVING_S3_ACCESS_KEY_ID must differ from AWS_ACCESS_KEY_ID (two identities)")
        identities.append(_identity(SERVING_S3_IDENTITY, settings.serving_s3_access_key_id, serving_secret,
                                    serving_s3_actions(settings.s3_bucket)))
    return {"identities": identities}


def _s3_healthy(settings: Settings) -> bool:
    # Any HTTP answer from the S3 port means the gateway is up; the bucket check follows.
    return http_ok(settings.s3_endpoint_url.rstrip("/") + "/", accept=(200, 403, 404))


def _mlflow_healthy(settings: Settings) -> bool:
    return http_ok(settings.mlflow_tracking_uri.rstrip("/") + "/health")


def _s3_config_path(settings: Settings) -> Path:
    return stack_dir(settings) / "run" / "s3-identities.json"


def _s3_config_current(settings: Settings) -> bool:
    """Whether the running SeaweedFS was started with today's identities (it reads them at start only)."""
    path = _s3_config_path(settings)
    try:
        return json.loads(path.read_text()) == _s3_identities(settings)
    except (OSError, ValueError):
        return False


def _start_s3(settings: Settings) -> None:
    pid_file, log_file, data_dir = process_paths(settings, "s3")
    port = settings.s3_port
    config = _s3_config_path(settings)
    write_private_file(config, json.dumps(_s3_identities(settings)))  # it holds the secret key
    # Internal SeaweedFS ports are derived from the S3 port so that several stacks
    # (tests on free ports) never collide; gRPC ports are these + 10000.
    base = port + 1
    cmd = [
        find_executable("weed"),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={config}",
        f"-s3.port={port}",
        f"-master.port={base}",
        f"-volume.port={base + 1}",
        f"-filer.port={base + 2}",
        f"-admin.port={base + 3}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=256",
    ]
    start_process(settings, "s3", cmd)


def _mlflow_auth_wanted(settings: Settings) -> bool:
    """Basic auth is on whenever an admin password is configured; only the explicit insecure demo
    mode may run MLflow open (check_component refuses an empty password otherwise)."""
    return bool(settings.mlflow_admin_password.get_secret_value())


def _start_mlflow(settings: Settings) -> None:
    _, log_file, data_dir = process_paths(settings, "mlflow")
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key.get_secret_value(),
        "AWS_DEFAULT_REGION": settings.s3_region,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    auth = []
    if _mlflow_auth_wanted(settings):
        config = mlflow_auth.write_auth_config(
            stack_dir(settings) / "run" / "mlflow-auth.ini", f"sqlite:///{data_dir / 'basic_auth.db'}")
        env.update(mlflow_auth.server_env(settings, config))
        auth = ["--app-name", "basic-auth"]
    cmd = [
        find_executable("mlflow"),
        "server",
        *auth,
        "--backend-store-uri",
        f"sqlite:///{data_dir / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{settings.s3_bucket}/{settings.mlflow_artifacts_prefix}",
        "--host",
        "127.0.0.1",
        "--workers",
        "1",
        "--port",
        str(settings.mlflow_port),
    ]
    start_process(settings, "mlflow", cmd, env=env)


SERVICES = ("s3", "mlflow")


def up(settings: Settings | None = None) -> dict[str, str]:
    """Start (or reuse) SeaweedFS and MLflow, wait for health, ensure the bucket exists."""
    s = settings or get_settings()
    check_component("mlflow-server", s)  # refuses guessable secrets before anything starts
    _, s3_log, _ = process_paths(s, "s3")
    if read_pid(s, "s3") is None or not _s3_healthy(s) or not _s3_config_current(s):  # e.g. an identity added
        stop_process(s, "s3")
        _start_s3(s)
        wait_until(lambda: _s3_healthy(s), "SeaweedFS S3", s3_log, lambda: read_pid(s, "s3"))
    wait_for_bucket(s)  # the gateway answers before its filer is ready for writes

    _, ml_log, _ = process_paths(s, "mlflow")
    want_auth = _mlflow_auth_wanted(s)
    if read_pid(s, "mlflow") is None or not _mlflow_healthy(s) or \
            (want_auth and not mlflow_auth.auth_enabled(s.mlflow_tracking_uri)):  # e.g. started before auth
        stop_process(s, "mlflow")
        _start_mlflow(s)
        wait_until(lambda: _mlflow_healthy(s), "MLflow server", ml_log, lambda: read_pid(s, "mlflow"))
    if want_auth:
        mlflow_auth.ensure_users(s)
    return endpoints(s)


def endpoints(settings: Settings) -> dict[str, str]:
    return {"s3": settings.s3_endpoint_url, "mlflow": settings.mlflow_tracking_uri}


def down(settings: Settings | None = None) -> list[str]:
    """Stop every process this stack started (services and demo processes); returns names."""
    s = settings or get_settings()
    names = managed_names(s)
    # Stop dependants first (serving, airflow), storage last.
    order = sorted(names, key=lambda n: (n == "s3", n == "mlflow", n))
    return [n for n in order if stop_process(s, n)]


def status(settings: Settings | None = None) -> list[ServiceStatus]:
    s = settings or get_settings()
    result = []
    checks = {"s3": (_s3_healthy, s.s3_endpoint_url), "mlflow": (_mlflow_healthy, s.mlflow_tracking_uri)}
    for name in sorted(set(SERVICES) | set(managed_names(s))):
        pid = read_pid(s, name)
        check, endpoint = checks.get(name, (lambda _s: pid is not None, ""))
        _, log, _ = process_paths(s, name)
        result.append(ServiceStatus(name, pid, pid is not None, pid is not None and check(s), endpoint, log))
    return result


# --- private stacks (tests, benchmarks) -------------------------------------------------


def free_s3_port() -> int:
    """A port p such that p..p+4 and their gRPC twins (+10000) are free: SeaweedFS's ports (see _start_s3)."""
    for _ in range(200):
        p = 20000 + secrets.randbelow(9000)
        needed = [p + i for i in range(5)] + [p + i + 10000 for i in range(5)]
        if all(port_free(x) for x in needed):
            return p
    raise StackError("no free port range for SeaweedFS")


def private_stack_env(home: Path, bucket: str = "hemaflow") -> dict[str, str]:
    """Environment for a throw-away stack: its own home, free ports, random credentials (S3, the
    MLflow users, a bundle-signing key pair), no .env and no secrets file."""
    return {
        "HEMAFLOW_HOME": str(home),
        "HEMAFLOW_ENV_FILE": "",
        "HEMAFLOW_SECRETS_FILE": "",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_s3_port()}",
        "S3_BUCKET": bucket,
        "AWS_ACCESS_KEY_ID": "hf-" + secrets.token_hex(4),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        **stack_secrets(),
    }

"""The embedded local stack: SeaweedFS (S3) and an MLflow server as plain processes.

`up` is idempotent (a healthy service that is already running is reused), refuses guessable
secrets, waits for health, sets up MLflow's basic-auth users (`pipeline.mlflow_auth`) and
returns the endpoints; `down` stops exactly the processes that were started
here, found by their pid files. Everything lives under `<HEMAFLOW_HOME>/stack`:
`run/*.pid`, `logs/*.log`, `data/<service>/`. Other long-running processes of the demo
(Airflow, serving) are managed with the same `start_process` / `stop_process`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from contracts.common import write_private_file
from contracts.settings import Settings, get_settings

HEALTH_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


class StackError(RuntimeError):
    """A local service failed to start, or stop, cleanly."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    endpoint: str
    log: Path


def stack_dir(settings: Settings) -> Path:
    return settings.hemaflow_home / "stack"


def _paths(settings: Settings, name: str) -> tuple[Path, Path, Path]:
    base = stack_dir(settings)
    return base / "run" / f"{name}.pid", base / "logs" / f"{name}.log", base / "data" / name


def _bin(name: str) -> str:
    """An executable from this interpreter's environment, else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"'{name}' is not installed; run 'make install' first")
    return found


def pid_alive(pid: int) -> bool:
    """True when `pid` is a live (non-zombie) process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until `pid` has exited; our own child is reaped (no zombie left behind).

    A process whose main thread has exited shows as a zombie while its other threads still
    run, so for our children only waitpid() says it is really gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # not our child: its own parent (or init) reaps it
            if not pid_alive(pid):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot): with the pid it names one process
    instance, even after the process renames itself (as Airflow's components do)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def read_pid(settings: Settings, name: str) -> int | None:
    """The pid of the process we started for `name`, or None if it is gone (or the pid was reused)."""
    pid_file, _, _ = _paths(settings, name)
    try:
        meta = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return None
    pid = int(meta.get("pid", 0))
    if pid <= 0 or not pid_alive(pid):
        return None
    started = meta.get("start_time")
    if started is not None:
        return pid if process_start_time(pid) == started else None
    # Pid files written before start times were recorded: the command line must still match.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    marker = meta.get("marker")
    return pid if marker and marker in cmdline else None


def start_process(
    settings: Settings, name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> int:
    """Start `cmd` in its own session, logging to the service's log; records its pid file."""
    pid_file, log_file, data_dir = _paths(settings, name)
    for d in (pid_file.parent, log_file.parent, data_dir):
        d.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with open(log_file, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name} ---\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(cwd or data_dir),
            start_new_session=True,
        )
    tmp = pid_file.with_suffix(".tmp")
    # pid + kernel start time tell our process from a later one that reuses the pid.
    meta = {"pid": proc.pid, "start_time": process_start_time(proc.pid), "cmd": cmd}
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, pid_file)
    return proc.pid


def stop_process(settings: Settings, name: str, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the process group we started for `name`; returns True if something was stopped."""
    pid_file, _, _ = _paths(settings, name)
    pid = read_pid(settings, name)
    stopped = False
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not _wait_gone(pid, timeout_s):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(pid, 5.0)
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


def http_ok(url: str, timeout_s: float = 2.0, accept: tuple[int, ...] = (200,)) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback URLs
            return resp.status in accept
    except urllib.error.HTTPError as exc:
        return exc.code in accept
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(check, what: str, log: Path, pid_of=None, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if pid_of is not None and pid_of() is None:
            raise StackError(f"{what} exited during start-up; see {log}:\n{_tail(log)}")
        time.sleep(0.25)
    raise StackError(f"{what} was not healthy after {timeout_s:.0f}s; see {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the two services ------------------------------------------------------------------


def _s3_identities(settings: Settings) -> dict:
    return {
        "identities": [
            {
                "name": "hemaflow",
                "credentials": [
                    {
                        "accessKey": settings.aws_access_key_id,
                        "secretKey": settings.aws_secret_access_key.get_secret_value(),
                    }
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def _s3_healthy(settings: Settings) -> bool:
    # Any HTTP answer from the S3 port means the gateway is up; the bucket check follows.
    return http_ok(settings.s3_endpoint_url.rstrip("/") + "/", accept=(200, 403, 404))


def _mlflow_healthy(settings: Settings) -> bool:
    return http_ok(settings.mlflow_tracking_uri.rstrip("/") + "/health")


def _start_s3(settings: Settings) -> None:
    pid_file, log_file, data_dir = _paths(settings, "s3")
    port = settings.s3_port
    config = stack_dir(settings) / "run" / "s3-identities.json"
    write_private_file(config, json.dumps(_s3_identities(settings)))  # it holds the secret key
    # Internal SeaweedFS ports are derived from the S3 port so that several stacks
    # (tests on free ports) never collide; gRPC ports are these + 10000.
    base = port + 1
    cmd = [
        _bin("weed"),
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
    from pipeline import mlflow_auth

    _, log_file, data_dir = _paths(settings, "mlflow")
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
        _bin("mlflow"),
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
    from pipeline import mlflow_auth
    from pipeline.credentials import check_component
    from pipeline.storage import wait_for_bucket

    s = settings or get_settings()
    check_component("mlflow-server", s)  # refuses guessable secrets before anything starts
    _, s3_log, _ = _paths(s, "s3")
    if read_pid(s, "s3") is None or not _s3_healthy(s):
        stop_process(s, "s3")
        _start_s3(s)
        wait_until(lambda: _s3_healthy(s), "SeaweedFS S3", s3_log, lambda: read_pid(s, "s3"))
    wait_for_bucket(s)  # the gateway answers before its filer is ready for writes

    _, ml_log, _ = _paths(s, "mlflow")
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


def managed_names(settings: Settings) -> list[str]:
    run = stack_dir(settings) / "run"
    return sorted(p.stem for p in run.glob("*.pid")) if run.is_dir() else []


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
        _, log, _ = _paths(s, name)
        result.append(ServiceStatus(name, pid, pid is not None, pid is not None and check(s), endpoint, log))
    return result


# --- private stacks (tests, benchmarks) -------------------------------------------------


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_s3_port() -> int:
    """A port p such that p..p+4 and their gRPC twins (+10000) are free: SeaweedFS's ports (see _start_s3)."""
    import secrets

    for _ in range(200):
        p = 20000 + secrets.randbelow(9000)
        needed = [p + i for i in range(5)] + [p + i + 10000 for i in range(5)]
        if all(_port_free(x) for x in needed):
            return p
    raise StackError("no free port range for SeaweedFS")


def private_stack_env(home: Path, bucket: str = "hemaflow") -> dict[str, str]:
    """Environment for a throw-away stack: its own home, free ports, random credentials (S3, the
    MLflow users, a bundle-signing key pair), no .env and no secrets file."""
    import secrets

    from pipeline.credentials import stack_secrets

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

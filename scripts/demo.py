"""`make demo` / `make demo-down`: the whole pipeline on this machine, ending with a served model.

`python -m scripts.demo up` brings the local stack up (SeaweedFS + MLflow), uploads a
folder-per-class dataset, runs the retraining DAG as a real Airflow run (recorded in the
demo's Airflow database, so it is visible in the UI afterwards), starts the serving
container on the promoted @champion and the Airflow UI (`airflow standalone`, loopback
only), then prints the URLs, the Airflow login and the champion's test metrics.
Idempotent: a second `up` reuses what runs, uploads nothing already there, and the DAG run
skips training when nothing changed. `python -m scripts.demo down` stops all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

from pipeline.settings import PROJECT_ROOT, Settings, get_settings

DAGS_DIR = PROJECT_ROOT / "dags"
SHARED_DEMO_DATA = Path(os.environ.get("HEMAFLOW_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
AIRFLOW_PROCESS = "airflow"
SERVING_PROCESS = "serving"
AIRFLOW_START_TIMEOUT_S = 240.0
SERVING_START_TIMEOUT_S = 180.0
PASSWORD_FILE = "simple_auth_manager_passwords.json.generated"
HEADLINE_METRICS = ("test_balanced_accuracy", "test_sensitivity", "test_specificity", "test_accuracy",
                    "test_roc_auc", "test_macro_f1", "test_n")


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what to do."""


# --- Airflow on this machine --------------------------------------------------------------------


def airflow_home(settings: Settings) -> Path:
    return settings.hemaflow_home / "airflow"


def airflow_env(settings: Settings, home: Path | None = None) -> dict[str, str]:
    """Environment of every Airflow command of the demo: SQLite under HEMAFLOW_HOME, repo DAGs,
    loopback only, low parallelism (the machine also trains)."""
    from pipeline.credentials import airflow_secret_env

    home = home or airflow_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    port = settings.airflow_port
    return {
        **airflow_secret_env(settings),  # security: per-install JWT secret and Fernet key
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "60",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "60",
        # `airflow standalone` starts its components as `airflow ...` from PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }


def _airflow_bin() -> str:
    return str(Path(sys.executable).parent / "airflow")


def airflow_cli(settings: Settings, args: list[str], env: dict[str, str], log: Path | None = None,
                echo: bool = False, timeout_s: float | None = None) -> subprocess.CompletedProcess:
    """Run `airflow <args>`; with `log`, output goes there and `[DAG TEST]` progress is echoed."""
    full_env = {**os.environ, **env}
    if log is None:
        return subprocess.run([_airflow_bin(), *args], env=full_env, capture_output=True, text=True,
                              timeout=timeout_s, cwd=PROJECT_ROOT)
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env["PYTHONUNBUFFERED"] = "1"  # progress lines as they happen, not in 8 KiB chunks
    with open(log, "a", encoding="utf-8") as fh:
        proc = subprocess.Popen([_airflow_bin(), *args], env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=PROJECT_ROOT)
        assert proc.stdout is not None
        progress = DagTestProgress()
        for line in proc.stdout:
            fh.write(line)
            shown = progress.feed(line)
            if echo and shown:
                print(shown, flush=True)
        rc = proc.wait(timeout=timeout_s)
    return subprocess.CompletedProcess(proc.args, rc, "", "")


EPOCH_MARKER = re.compile(r"epoch \d+/\d+ [^\[]*?(?=\s+\[|$)")


class DagTestProgress:
    """Turns `airflow dags test` log lines into one line per finished task, with its state
    (a skipped training must not read as "done")."""

    def __init__(self) -> None:
        self.state: str | None = None  # the running task's last reported state

    def feed(self, line: str) -> str | None:
        if "new_state=" in line:
            self.state = line.split("new_state=", 1)[-1].split()[0]
        if EPOCH_MARKER.search(line):  # training progress, one line per epoch
            return "      " + EPOCH_MARKER.search(line).group(0)
        if "[DAG TEST] end task" not in line:
            return None
        task = line.split("task_id=", 1)[-1].split()[0]
        state, self.state = self.state, None
        return f"  . {task} {'done' if state in (None, 'success') else state}"


def format_metrics(metrics: dict[str, float]) -> str:
    """Rates with 4 decimals, counts (test_n) as integers."""
    return ", ".join(f"{k}={v:.0f}" if k == "test_n" else f"{k}={v:.4f}" for k, v in metrics.items())


def migrate_airflow_db(settings: Settings, env: dict[str, str]) -> None:
    done = airflow_cli(settings, ["db", "migrate"], env, timeout_s=600)
    if done.returncode != 0:
        raise DemoError(f"airflow db migrate failed:\n{(done.stdout + done.stderr)[-2000:]}")


def last_run_state(settings: Settings, dag_id: str, env: dict[str, str]) -> dict:
    done = airflow_cli(settings, ["dags", "list-runs", dag_id, "-o", "json"], env, timeout_s=120)
    runs = None
    for line in done.stdout.splitlines():  # the JSON is one line among warnings
        if line.startswith("[{") or line.strip() == "[]":
            runs = json.loads(line)
    if runs is None:
        raise DemoError(f"could not read the runs of {dag_id}:\n{(done.stdout + done.stderr)[-1500:]}")
    if not runs:
        raise DemoError(f"{dag_id} has no run")
    return max(runs, key=lambda r: r.get("start_date") or r.get("run_after") or "")


def run_retrain_dag(settings: Settings, dataset: str, env: dict[str, str], conf: dict | None = None) -> dict:
    """One real Airflow run of the dataset's retraining DAG (`airflow dags test`); returns its run row."""
    dag_id = f"hemaflow_retrain_{dataset}"
    log = settings.hemaflow_home / "stack" / "logs" / "airflow-dag-runs.log"
    args = ["dags", "test", dag_id]
    if conf:
        args += ["-c", json.dumps(conf)]
    print(f"running {dag_id} in Airflow (log: {log})", flush=True)
    done = airflow_cli(settings, args, env, log=log, echo=True)
    run = last_run_state(settings, dag_id, env)
    if done.returncode != 0 or run.get("state") != "success":
        raise DemoError(f"{dag_id} run {run.get('run_id')} ended {run.get('state')} (exit {done.returncode}); "
                        f"see {log} and the Airflow UI")
    return run


def airflow_password(settings: Settings) -> str | None:
    try:
        return json.loads((airflow_home(settings) / PASSWORD_FILE).read_text()).get("admin")
    except (OSError, ValueError):
        return None


def stop_airflow(settings: Settings, timeout_s: float = 30.0) -> bool:
    """Stop `airflow standalone` and every component it started (its whole process group):
    the api-server outlives its parent for a while after SIGTERM."""
    import signal

    from pipeline import stack

    group = stack.read_pid(settings, AIRFLOW_PROCESS)
    stopped = stack.stop_process(settings, AIRFLOW_PROCESS)
    if group is None:
        return stopped
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return stopped
        time.sleep(0.2)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return stopped


def start_airflow_ui(settings: Settings, env: dict[str, str]) -> bool:
    """`airflow standalone` as a managed process; returns True when it was started now."""
    from pipeline import stack

    url = f"http://127.0.0.1:{settings.airflow_port}/api/v2/version"
    if stack.read_pid(settings, AIRFLOW_PROCESS) is not None and stack.http_ok(url):
        return False
    stop_airflow(settings)
    stack.start_process(settings, AIRFLOW_PROCESS, [_airflow_bin(), "standalone"], env=env, cwd=PROJECT_ROOT)
    _, log, _ = stack._paths(settings, AIRFLOW_PROCESS)
    stack.wait_until(lambda: stack.http_ok(url), "Airflow UI", log,
                     lambda: stack.read_pid(settings, AIRFLOW_PROCESS), timeout_s=AIRFLOW_START_TIMEOUT_S)
    return True


# --- serving ------------------------------------------------------------------------------------


def serving_env(settings: Settings, admin_key: str) -> dict[str, str]:
    return {
        "SERVING_HOST": "127.0.0.1",
        "SERVING_PORT": str(settings.serving_port),
        "SERVING_ADMIN_API_KEYS": admin_key,
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "DATASET": settings.dataset,
    }


def start_serving(settings: Settings, admin_key: str) -> bool:
    from pipeline import stack

    base = f"http://127.0.0.1:{settings.serving_port}"
    if stack.read_pid(settings, SERVING_PROCESS) is not None and stack.http_ok(base + "/healthz"):
        return False
    stack.stop_process(settings, SERVING_PROCESS)
    stack.start_process(settings, SERVING_PROCESS, [sys.executable, "-m", "serving"],
                        env=serving_env(settings, admin_key), cwd=PROJECT_ROOT)
    _, log, _ = stack._paths(settings, SERVING_PROCESS)
    stack.wait_until(lambda: stack.http_ok(base + "/readyz"), "serving (model loaded)", log,
                     lambda: stack.read_pid(settings, SERVING_PROCESS), timeout_s=SERVING_START_TIMEOUT_S)
    return True


def demo_admin_key(settings: Settings) -> str:
    """The configured serving admin key, or one generated once for this demo (kept owner-only)."""
    keys = settings.key_list(settings.serving_admin_api_keys)
    if keys:
        return keys[0]
    path = settings.hemaflow_home / "demo" / "serving-admin-key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


# --- data and results ---------------------------------------------------------------------------


def resolve_data_dir(dataset: str) -> Path | None:
    """DATA_DIR if given, else ../shared/data/<dataset> when it exists, else None."""
    given = os.environ.get("DATA_DIR")
    if given:
        path = Path(given).expanduser().resolve()
        if not path.is_dir():
            raise DemoError(f"DATA_DIR={given} is not a folder")
        return path
    shared = SHARED_DEMO_DATA / dataset
    return shared if shared.is_dir() else None


def no_data_help(dataset: str) -> str:
    from pipeline.dataset_spec import load_spec

    spec = load_spec(dataset)
    folders = "\n".join(f"    {folder}/   ({label})" for folder, label in sorted(spec.classes.items()))
    return (
        f"No demo images found: DATA_DIR is not set and {SHARED_DEMO_DATA / dataset} does not exist.\n"
        f"Point the demo at a folder-per-class dataset, one sub-folder per class of spec '{dataset}':\n"
        f"  DATA_DIR/\n{folders}\n"
        f"then run:  make demo DATA_DIR=/path/to/images\n"
        f"(another dataset: DATASET=<name> with pipeline/specs/<name>.toml; see pipeline/specs/_template.toml)"
    )


def champion_report(settings: Settings, dataset: str) -> tuple[str | None, dict[str, float]]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    try:
        version = client.get_model_version_by_alias(settings.model_name(dataset), "champion")
    except MlflowException:
        return None, {}
    metrics = client.get_run(version.run_id).data.metrics
    shown = [k for k in HEADLINE_METRICS if k in metrics] or sorted(k for k in metrics if k.startswith("test"))
    return str(version.version), {k: metrics[k] for k in shown}


# --- commands -----------------------------------------------------------------------------------


def up() -> int:
    from pipeline import stack
    from pipeline.credentials import init_secrets
    from pipeline.upload import upload_tree

    init_secrets()  # security: random per-install secrets under HEMAFLOW_HOME (kept across runs)
    settings = get_settings()
    dataset = settings.dataset
    started = time.monotonic()
    data_dir = resolve_data_dir(dataset)
    if data_dir is None:
        print(no_data_help(dataset), file=sys.stderr)
        return 2

    print("starting the local stack (SeaweedFS S3 + MLflow)", flush=True)
    for name, url in stack.up(settings).items():
        print(f"  {name:8s} {url}")
    print(f"uploading {data_dir} as dataset '{dataset}'", flush=True)
    # No Airflow asset event: the demo runs the retraining DAG itself just below, and an event
    # would queue a second, redundant run for when the scheduler starts.
    uploaded = upload_tree(data_dir, dataset, settings=settings, show_progress=True, emit_asset_event=False)
    print(f"  {uploaded['uploaded']} uploaded, {uploaded['skipped']} already there", flush=True)

    admin_key = demo_admin_key(settings)
    env = {**airflow_env(settings), "SERVING_ADMIN_API_KEYS": admin_key}
    migrate_airflow_db(settings, env)
    # SQLite allows one writer: the DAG run goes first, the UI (scheduler and all) after it.
    stop_airflow(settings)
    run = run_retrain_dag(settings, dataset, env)
    for dag_id in (f"hemaflow_retrain_{dataset}", "hemaflow_watch_raw"):
        airflow_cli(settings, ["dags", "unpause", dag_id], env, timeout_s=120)

    version, metrics = champion_report(settings, dataset)
    if version is None:
        raise DemoError(f"no @champion for {settings.model_name(dataset)}: the gate rejected every candidate "
                        "(see the run's report task and the MLflow 'pipeline-runs' experiment)")
    print("starting the serving container on @champion", flush=True)
    start_serving(settings, admin_key)
    print("starting the Airflow UI (airflow standalone)", flush=True)
    start_airflow_ui(settings, env)

    password = airflow_password(settings)
    login = f"admin / {password}" if password else f"see {airflow_home(settings) / PASSWORD_FILE}"
    print()
    print(f"HemaFlow demo ready in {time.monotonic() - started:.0f}s")
    print(f"  Airflow UI   http://127.0.0.1:{settings.airflow_port}   login {login}")
    print(f"               run {run.get('run_id')} of hemaflow_retrain_{dataset}: {run.get('state')}")
    print(f"  MLflow UI    {settings.mlflow_tracking_uri}   model {settings.model_name(dataset)}")
    print(f"  Serving      http://127.0.0.1:{settings.serving_port}/   (API docs: /docs)")
    print(f"  Champion     version {version}: {format_metrics(metrics)}")
    print(f"  New images   AIRFLOW_API_URL=http://127.0.0.1:{settings.airflow_port} AIRFLOW_API_PASSWORD=<the "
          f"password above> .venv/bin/python -m pipeline upload DIR --dataset {dataset}")
    print(f"               retrains at once (Airflow asset event); without AIRFLOW_API_URL the watcher DAG finds "
          f"them within {settings.raw_watch_schedule}")
    print("  Stop all of it with: make demo-down")
    return 0


def down() -> int:
    from pipeline import stack

    settings = get_settings()
    airflow_stopped = stop_airflow(settings)
    stopped = (["airflow"] if airflow_stopped else []) + stack.down(settings)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    args = parser.parse_args(argv)
    try:
        return up() if args.action == "up" else down()
    except KeyboardInterrupt:
        print("interrupted; `make demo-down` stops what was started", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, the logs hold the detail
        if os.environ.get("HEMAFLOW_DEBUG"):
            raise
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`make demo` / `make demo-down`: the whole pipeline on this machine, ending with a served model.

`python -m scripts.demo up` brings the local stack up (SeaweedFS + MLflow), then Airflow as
it is deployed (api-server, scheduler, dag-processor, triggerer as separate processes,
LocalExecutor, loopback only), uploads a folder-per-class dataset with `upload`, whose Asset
event starts the retraining DAG through the scheduler: the run the terminal follows is the
run the Airflow UI shows. Then it starts the serving container on the promoted @champion, submits
the DEMO_HOLD_BACK images it kept out of raw/ as one batch (`hemaflow_score_<dataset>` scores it,
followed the same way) and prints the URLs, the Airflow login, the champion's test figures as served and
where the batch report and review page are.
Idempotent: a second `up` reuses what runs and uploads nothing already there; with nothing
new it starts no run (a manual run only when no @champion exists yet). `python -m scripts.demo
down` stops all of it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

from contracts.settings import PROJECT_ROOT, Settings, get_settings, secrets_file_path
from contracts.tta import DEFAULT_PARAM as TTA_DEFAULT_PARAM
from contracts.tta import VIEWS, uses_tta
from scripts.demo_airflow import (DemoError, airflow_site, api_settings, follow_run, start_airflow,
                                  stop_legacy_airflow, wait_for_dag)
from scripts.demo_data import hold_back, no_data_help, resolve_data_dir

SERVING_PROCESS = "serving"
SERVING_START_TIMEOUT_S = 180.0
DEMO_BATCH_ID = "demo-holdout"  # fixed: a second `make demo` finds the batch (and its result) again
HEADLINE_METRICS = ("test_balanced_accuracy", "test_sensitivity", "test_specificity", "test_accuracy",
                    "test_roc_auc", "test_macro_f1", "test_n")


def served_headline(metrics: dict[str, float], tta: bool) -> tuple[str, dict[str, float]]:
    """The champion's test figures as the served model answers, and what they are: with INFERENCE_TTA
    on, its view-averaged `tta_test_*` figures (at the TTA threshold); a champion trained before
    those were logged has only its un-augmented figures, and the label says so."""
    shown = [k for k in HEADLINE_METRICS if k in metrics] or sorted(k for k in metrics if k.startswith("test"))
    if tta and any(f"tta_{k}" in metrics for k in shown):
        return f"as served, {VIEWS}-view TTA", {k: metrics.get(f"tta_{k}", metrics[k]) for k in shown}
    return "as served, no TTA" if not tta else "without TTA (none logged)", {k: metrics[k] for k in shown}


def format_metrics(metrics: dict[str, float]) -> str:
    """Rates with 4 decimals, counts (test_n) as integers."""
    return ", ".join(f"{k}={v:.0f}" if k == "test_n" else f"{k}={v:.4f}" for k, v in metrics.items())


# --- serving ------------------------------------------------------------------------------------


def serving_env(settings: Settings, admin_key: str) -> dict[str, str]:
    """What the serving process gets on top of this environment. Like compose's serving it holds only
    its own identities (SERVING_*): the pipeline's secrets are blanked (empty = unset, and .env does
    not override a variable that is set) and the secrets file is not read again."""
    from contracts.credentials import GENERATED_NAMES

    not_serving = {name: "" for name in GENERATED_NAMES
                   if not name.startswith("SERVING_") and name != "BUNDLE_TRUSTED_PUBLIC_KEYS"}
    return {
        **not_serving,
        "HEMAFLOW_SECRETS_FILE": "",
        "SERVING_HOST": "127.0.0.1",
        "SERVING_PORT": str(settings.serving_port),
        "SERVING_ADMIN_API_KEYS": admin_key,
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "DATASET": settings.dataset,
    }


def start_serving(settings: Settings, admin_key: str) -> bool:
    from ops import supervisor

    base = f"http://127.0.0.1:{settings.serving_port}"
    if supervisor.read_pid(settings, SERVING_PROCESS) is not None and supervisor.http_ok(base + "/healthz"):
        return False
    supervisor.stop_process(settings, SERVING_PROCESS)
    supervisor.start_process(settings, SERVING_PROCESS, [sys.executable, "-m", "serving"],
                        env=serving_env(settings, admin_key), cwd=PROJECT_ROOT)
    _, log, _ = supervisor.process_paths(settings, SERVING_PROCESS)
    supervisor.wait_until(lambda: supervisor.http_ok(base + "/readyz"), "serving (model loaded)", log,
                     lambda: supervisor.read_pid(settings, SERVING_PROCESS), timeout_s=SERVING_START_TIMEOUT_S)
    return True


def demo_admin_key(settings: Settings) -> str:
    """The configured serving admin key, or one generated once for this demo (kept owner-only)."""
    from contracts.common import write_private_file

    keys = settings.key_list(settings.serving_admin_api_keys)
    if keys:
        return keys[0]
    path = settings.hemaflow_home / "demo" / "serving-admin-key"
    if not path.is_file():
        write_private_file(path, secrets.token_urlsafe(24))
    return path.read_text().strip()


# --- results ------------------------------------------------------------------------------------


def champion_report(settings: Settings, dataset: str) -> tuple[str | None, tuple[str, dict[str, float]]]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    try:
        version = client.get_model_version_by_alias(settings.model_name(dataset), "champion")
    except MlflowException:
        return None, ("", {})
    run = client.get_run(version.run_id).data
    tta = uses_tta(settings.inference_tta, run.params.get(TTA_DEFAULT_PARAM, "True") == "True")
    return str(version.version), served_headline(run.metrics, tta)


def score_holdout(settings: Settings, site, dataset: str, batch_dir: Path) -> dict | None:
    """Submit the held-back batch; its inbox Asset event starts hemaflow_score_<dataset>, followed to
    its end (a manual run when nothing new went up but the champion has no result yet). Returns the
    batch's summary.json."""
    from pipeline.airflow_api import api_client, dag_runs, trigger_dag
    from pipeline.storage import get_json_or_none, s3_client
    from screening.batches import submit_folder, summary_key

    dag_id = f"hemaflow_score_{dataset}"
    version = champion_report(settings, dataset)[0]
    with_api = api_settings(settings, site)
    with api_client(with_api) as client:
        wait_for_dag(client, dag_id)
        before = {r["dag_run_id"] for r in dag_runs(client, dag_id)}
        print(f"submitting {len(list(batch_dir.iterdir()))} held-back images as batch {DEMO_BATCH_ID}", flush=True)
        submitted = submit_folder(batch_dir, dataset, DEMO_BATCH_ID, settings=with_api)
        print(f"  {submitted['uploaded']} uploaded, {submitted['skipped']} already there; "
              f"{submitted['asset_event']['message']}", flush=True)
        s3 = s3_client(settings)
        started = submitted["asset_event"]["emitted"]
        if not started and get_json_or_none(s3, settings.s3_bucket, summary_key(dataset, DEMO_BATCH_ID, version)):
            print(f"batch {DEMO_BATCH_ID} already scored by version {version}: result kept", flush=True)
        elif not started:  # nothing new went up (or the event failed) and the champion has no result yet
            trigger_dag(client, dag_id, conf={"batch_id": DEMO_BATCH_ID})
            started = True
        if started:
            follow_run(client, site, dag_id, lambda runs: next(
                (r for r in reversed(runs) if r["dag_run_id"] not in before), None))
    return get_json_or_none(s3, settings.s3_bucket, summary_key(dataset, DEMO_BATCH_ID, version))


# --- commands -----------------------------------------------------------------------------------


def retrain(settings: Settings, site, dataset: str, data_dir: Path) -> dict | None:
    """Upload; the upload's Asset event starts the retraining run, which is followed to its end.

    With nothing new uploaded no event is emitted: a manual run is triggered only when there is
    no @champion yet (or when images went up but the event could not be emitted). Returns the run
    followed, or None when none was needed."""
    from pipeline.airflow_api import api_client, dag_runs, trigger_dag
    from pipeline.upload import upload_tree

    dag_id = f"hemaflow_retrain_{dataset}"
    with_api = api_settings(settings, site)
    with api_client(with_api) as client:
        wait_for_dag(client, dag_id)
        before = {r["dag_run_id"] for r in dag_runs(client, dag_id)}
        print(f"uploading {data_dir} as dataset '{dataset}'", flush=True)
        uploaded = upload_tree(data_dir, dataset, settings=with_api, show_progress=True)
        print(f"  {uploaded['uploaded']} uploaded, {uploaded['skipped']} already there; "
              f"{uploaded['asset_event']['message']}", flush=True)
        if not uploaded["asset_event"]["emitted"]:
            if not uploaded["uploaded"] and champion_report(settings, dataset)[0] is not None:
                print("nothing new to train on: the current @champion stays in service", flush=True)
                return None
            trigger_dag(client, dag_id)  # no champion yet, or the event failed: run it by hand
        return follow_run(client, site, dag_id, lambda runs: next(
            (r for r in reversed(runs) if r["dag_run_id"] not in before), None))


def up() -> int:
    from ops import stack
    from contracts.credentials import init_secrets

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
    admin_key = demo_admin_key(settings)
    site = airflow_site(settings, admin_key)
    print("starting Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor)", flush=True)
    start_airflow(settings, site)
    train_dir, batch_dir = hold_back(settings, data_dir, dataset)
    run = retrain(settings, site, dataset, train_dir)

    version, (figures_are, figures) = champion_report(settings, dataset)
    if version is None:
        raise DemoError(f"no @champion for {settings.model_name(dataset)}: the gate rejected every candidate "
                        "(see the run's report task and the MLflow 'pipeline-runs' experiment)")
    print("starting the serving container on @champion", flush=True)
    start_serving(settings, admin_key)
    scored = score_holdout(settings, site, dataset, batch_dir)

    from ops.airflow_local import ADMIN_USER, admin_password

    print()
    print(f"HemaFlow demo ready in {time.monotonic() - started:.0f}s")
    print(f"  Airflow UI   {site.api_url}   login {ADMIN_USER} / {admin_password(site)}")
    if run is not None:
        print(f"               run {run['dag_run_id']} of hemaflow_retrain_{dataset}: {run['state']}")
    print(f"  MLflow UI    {settings.mlflow_tracking_uri}   model {settings.model_name(dataset)}")
    if settings.serving_mlflow_username:
        print(f"               login {settings.serving_mlflow_username} (read-only) / SERVING_MLFLOW_PASSWORD "
              f"in {secrets_file_path()}")
    print(f"  Serving      http://127.0.0.1:{settings.serving_port}/   (API docs: /docs)")
    print(f"  Champion     version {version}, test split {figures_are}: {format_metrics(figures)}")
    print(f"  New images   AIRFLOW_API_URL={site.api_url} AIRFLOW_API_PASSWORD=<the password above> "
          f".venv/bin/python -m pipeline upload DIR --dataset {dataset}")
    print(f"               retrains at once (Airflow asset event); without AIRFLOW_API_URL the watcher DAG finds "
          f"them within {settings.raw_watch_schedule}")
    if scored:
        print(f"  Batch        {scored['batch_id']} ({scored['n_images']} held-back images) scored by version "
              f"{scored['model_version']}: {scored['counts']}, {scored['n_bad']} unreadable")
        print(f"               report s3://{settings.s3_bucket}/{scored['prefix']}report.html")
        print(f"               review page {scored['review_url'] or '(SERVING_URL not set)'}")
    print(f"  New batch    AIRFLOW_API_URL={site.api_url} AIRFLOW_API_PASSWORD=<the password above> "
          f".venv/bin/python -m pipeline submit DIR --dataset {dataset}")
    print("  Stop all of it with: make demo-down")
    return 0


def down() -> int:
    from ops import airflow_local, stack

    settings = get_settings()
    stopped = airflow_local.stop(settings) + (["airflow"] if stop_legacy_airflow(settings) else [])
    stopped += stack.down(settings)
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

"""Retraining as Airflow runs it in production, with the LocalExecutor.

api-server, scheduler, dag-processor and triggerer run as separate processes against the real
SeaweedFS and MLflow of the test stack; tasks go through the scheduler, the executor and the
task runner (never `dag.test()`). The user's path, in order:
1. a new spec is added by copying `_template.toml` (`wbc4`): its DAG appears, active;
2. its first scheduled (timetable) run finds an empty prefix and ends green, "nothing to do";
3. a running serving instance has no model yet; `python -m pipeline upload` sends images that
   need resizing and emits the Asset event; the asset-triggered run trains, promotes and
   serving picks up @champion;
4. `python -m pipeline submit` sends a batch (with a corrupt file) to the inbox and emits its Asset
   event; the asset-triggered `hemaflow_score_<spec>` run scores it in mapped chunks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import datetime, timezone

import httpx
import pytest

from contracts.settings import PROJECT_ROOT
from tests.airflow.site import (NEW_SPEC, TEMPLATE_SPEC, cron_at, image_tree, next_minute_after,
                                run_wall_s, serving_model_version, task_table, upload_cli, wait_for)
from tests.helpers import SHARED_DATA

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DAG_ID = f"hemaflow_retrain_{NEW_SPEC}"
SCHEDULE_LEAD_S = 150  # the spec is added and parsed well before the scheduled run is due
RUN_TIMEOUT_S = 900
ADMIN_KEY = "airflow-test-admin-key"
SCORE_CHUNK = 64  # 281 images -> 5 mapped tasks (each task costs seconds of scheduling and start-up)


@pytest.fixture(scope="module")
def site(local_stack, hemaflow_env, airflow_stop, tmp_path_factory):
    """A LocalExecutor Airflow on free ports; yields (site, env for CLIs, serving URL, due time)."""
    from ops import airflow_local
    from ops.supervisor import free_port

    due = next_minute_after(SCHEDULE_LEAD_S)
    serving_port = free_port()
    hemaflow = {k: v for k, v in hemaflow_env.items() if not k.startswith("AIRFLOW")}
    hemaflow.update(RETRAIN_SCHEDULE=cron_at(due), SERVING_URL=f"http://127.0.0.1:{serving_port}",
                    SERVING_ADMIN_API_KEYS=ADMIN_KEY, SERVING_PORT=str(serving_port), SERVING_POLL_INTERVAL_S="3",
                    SCORE_CHUNK_SIZE=str(SCORE_CHUNK))
    deployment = airflow_local.AirflowSite(home=tmp_path_factory.mktemp("airflow-local"), port=free_port(),
                                           parse_interval_s=5, extra_env=hemaflow)
    airflow_local.prepare(deployment)
    airflow_local.start(local_stack, deployment)
    cli_env = {**hemaflow, "AIRFLOW_API_URL": deployment.api_url, "AIRFLOW_API_USERNAME": airflow_local.ADMIN_USER,
               "AIRFLOW_API_PASSWORD": airflow_local.admin_password(deployment)}
    return deployment, cli_env, f"http://127.0.0.1:{serving_port}", due


@pytest.fixture(scope="module")
def api(site, local_stack):
    from pipeline.airflow_api import api_client
    from contracts.settings import get_settings

    _, cli_env, _, _ = site
    settings = get_settings(airflow_api_url=cli_env["AIRFLOW_API_URL"], airflow_api_username="admin",
                            airflow_api_password=cli_env["AIRFLOW_API_PASSWORD"])
    with api_client(settings) as client:
        yield client


def _summary(local_stack, run_id: str) -> dict:
    """The run summary the report task recorded in MLflow."""
    from mlflow.artifacts import load_dict
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=local_stack.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(f"{local_stack.model_name_prefix}-pipeline-runs")
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`hemaflow.dag_run_id` = '{run_id}'")
    assert found, f"no pipeline-runs summary for {run_id}"
    return load_dict(f"runs:/{found[0].info.run_id}/run_summary.json")


def test_a_new_spec_gets_an_active_dag(site, api):
    from pipeline.airflow_api import get_dag

    _, cli_env, _, _ = site
    shutil.copyfile(TEMPLATE_SPEC, PROJECT_ROOT.joinpath(cli_env["DATASET_SPECS_DIR"], f"{NEW_SPEC}.toml"))
    dag = wait_for(lambda: get_dag(api, DAG_ID), f"{DAG_ID} to be parsed", timeout_s=120)
    assert dag["is_paused"] is False
    for polling in ("hemaflow_watch_raw", "hemaflow_feedback"):  # reviews -> raw/ -> retraining, unattended
        assert wait_for(lambda: get_dag(api, polling), f"{polling} to be parsed", timeout_s=120)["is_paused"] is False


def test_first_scheduled_run_on_an_empty_prefix_ends_green_with_nothing_to_do(site, api, local_stack):
    from pipeline.airflow_api import task_instances, wait_for_run

    _, _, _, due = site
    wait_s = max(0.0, (due - datetime.now(timezone.utc)).total_seconds())
    run = wait_for_run(api, DAG_ID, lambda runs: next((r for r in runs if r["run_type"] == "scheduled"), None),
                       timeout_s=wait_s + RUN_TIMEOUT_S)
    tis = task_instances(api, DAG_ID, run["dag_run_id"])
    print(f"\nscheduled run {run['dag_run_id']}: {run['state']} in {run_wall_s(run):.0f}s\n{task_table(tis)}")
    assert run["state"] == "success"
    states = {t["task_id"]: t["state"] for t in tis}
    assert states["ingest"] == "success" and states["validate"] == "skipped" and states["report"] == "success"
    assert _summary(local_stack, run["dag_run_id"])["outcome"].startswith("nothing to do: no images")


def test_upload_event_retrains_through_the_scheduler_and_serving_follows(site, api, local_stack, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.airflow_api import task_instances, wait_for_run

    _, cli_env, serving_url, _ = site
    serving = subprocess.Popen([sys.executable, "-m", "serving"], env={**cli_env, "DATASET": NEW_SPEC}, cwd=PROJECT_ROOT,
                               stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serving.log", "wb"))
    try:
        wait_for(lambda: _answers(serving_url), "serving to start", timeout_s=120)
        assert httpx.get(f"{serving_url}/readyz").status_code == 503  # no champion yet: not ready, not crashed

        tree, kind = image_tree(tmp_path / "upload", SHARED_DATA / "pbc8")
        before = {r["dag_run_id"] for r in _runs(api)}
        output = upload_cli(tree, NEW_SPEC, cli_env)
        assert "asset event" in output and "emitted" in output, output[-1000:]
        run = wait_for_run(api, DAG_ID, lambda runs: next((r for r in reversed(runs) if r["run_type"] ==
                                                           "asset_triggered" and r["dag_run_id"] not in before),
                                                          None), timeout_s=RUN_TIMEOUT_S)
        tis = task_instances(api, DAG_ID, run["dag_run_id"])
        print(f"\nasset-triggered run on {kind}: {run['state']} in {run_wall_s(run):.0f}s\n{task_table(tis)}")
        assert run["state"] == "success", (tmp_path / "serving.log").read_text()[-2000:]
        states = {t["task_id"]: t["state"] for t in tis}
        assert all(states[t] == "success" for t in ("ingest", "validate", "preprocess", "train", "evaluate",
                                                    "gate", "promote", "notify_serving", "report")), states
        assert states["keep_champion"] == "skipped"

        champion = MlflowClient(tracking_uri=local_stack.mlflow_tracking_uri).get_model_version_by_alias(
            local_stack.model_name(NEW_SPEC), "champion")
        served = wait_for(lambda: serving_model_version(serving_url), "serving to load @champion", timeout_s=60)
        assert served == str(champion.version)
    finally:
        serving.terminate()
        serving.wait(timeout=30)


def test_submitted_batch_is_scored_through_the_scheduler_in_mapped_chunks(site, api, local_stack, s3, tmp_path):
    import json
    import math

    from pipeline.airflow_api import task_instances, wait_for_run
    from pipeline.storage import get_json_or_none

    _, cli_env, _, _ = site
    dag_id, batch = f"hemaflow_score_{NEW_SPEC}", "sched-batch-1"
    tree, _ = image_tree(tmp_path / "batch", SHARED_DATA / "pbc8")  # nested class folders: fine for a batch
    (tree / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated " * 8)
    n_images = sum(1 for p in tree.rglob("*") if p.is_file())
    champion = _champion_version(local_stack)
    before = {r["dag_run_id"] for r in _runs_of(api, dag_id)}
    done = subprocess.run([sys.executable, "-m", "pipeline", "submit", str(tree), "--dataset", NEW_SPEC, "--batch",
                           batch], env=cli_env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"{dag_id} is queued" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    run = wait_for_run(api, dag_id, lambda runs: next((r for r in reversed(runs) if r["run_type"] == "asset_triggered"
                                                       and r["dag_run_id"] not in before), None),
                       timeout_s=RUN_TIMEOUT_S)
    tis = task_instances(api, dag_id, run["dag_run_id"])
    print(f"\nscoring run of {n_images} images: {run['state']} in {run_wall_s(run):.0f}s\n{task_table(tis)}")
    assert run["state"] == "success"
    summary = get_json_or_none(s3, local_stack.s3_bucket, f"results/{NEW_SPEC}/{batch}/{champion}/summary.json")
    assert summary is not None, json.dumps(tis)[:2000]
    assert (summary["n_images"], summary["n_bad"], summary["model_version"]) == (n_images, 1, champion)
    if any(t["task_id"] == "plan" and t["state"] == "success" for t in tis):  # not done before by a cron run
        chunks = [t for t in tis if t["task_id"] == "score_chunk"]
        assert len(chunks) == math.ceil(n_images / SCORE_CHUNK) and all(t["state"] == "success" for t in chunks)


def _champion_version(local_stack) -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient(tracking_uri=local_stack.mlflow_tracking_uri).get_model_version_by_alias(
        local_stack.model_name(NEW_SPEC), "champion").version)


def _runs_of(api, dag_id: str) -> list[dict]:
    from pipeline.airflow_api import dag_runs

    return dag_runs(api, dag_id)


def _runs(api) -> list[dict]:
    return _runs_of(api, DAG_ID)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False

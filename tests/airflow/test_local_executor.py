"""Retraining as Airflow runs it in production, with the LocalExecutor.

api-server, scheduler, dag-processor and triggerer run as separate processes against the real
SeaweedFS and MLflow of the test stack; tasks go through the scheduler, the executor and the
task runner (never `dag.test()`). The user's path, in order:
1. a new spec is added by copying `_template.toml` (`wbc4`): its DAG appears, active;
2. its first scheduled (timetable) run finds an empty prefix and ends green, "nothing to do";
3. a running serving instance has no model yet; `python -m pipeline upload` sends images that
   need resizing, in every mode, format and size validation accepts, and files it must quarantine,
   and emits the Asset event; the asset-triggered run quarantines exactly the bad files, trains on
   every other one, promotes, and serving picks up @champion;
4. `python -m pipeline submit` sends a batch (every accepted shape again, and a corrupt file) to the
   inbox and emits its Asset event; the asset-triggered `hemaflow_score_<spec>` run scores it in
   mapped chunks;
5. a reviewer confirms or corrects labels of that batch through serving's review API;
   `hemaflow_feedback` (unpaused and triggered through the REST API) copies the reviewed images
   into raw/<spec>/<class>/ with their provenance; its Asset event starts a retraining run whose
   report counts the reviewed images that joined, and whose gate scored both models on them.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from contracts.settings import PROJECT_ROOT
from tests.airflow.site import (FAST_TRAINING_ENV, NEW_SPEC, TEMPLATE_SPEC, add_bad_files, cron_at,
                                every_accepted_shape, image_tree, next_minute_after, run_wall_s,
                                serving_model_version, task_table, upload_cli, wait_for)
from tests.helpers import SHARED_DATA

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DAG_ID = f"hemaflow_retrain_{NEW_SPEC}"
SCHEDULE_LEAD_S = 150  # the spec is added and parsed well before the scheduled run is due
RUN_TIMEOUT_S = 900
ADMIN_KEY = "airflow-test-admin-key"
SCORE_CHUNK = 64  # 281 + 45 images -> 6 mapped tasks (each task costs seconds of scheduling and start-up)
SCORED_BATCH = "sched-batch-1"
FEEDBACK_DAG_ID = "hemaflow_feedback"
REVIEWER = "alice"
REVIEWER_KEY = secrets.token_urlsafe(24)
N_REVIEWED = 8  # the first images of the review queue: the most doubtful


@pytest.fixture(scope="module")
def site(local_stack, hemaflow_env, airflow_stop, tmp_path_factory):
    """A LocalExecutor Airflow on free ports; yields (site, env for CLIs, serving URL, due time)."""
    from ops import airflow_local
    from ops.supervisor import free_port

    due = next_minute_after(SCHEDULE_LEAD_S)
    serving_port = free_port()
    hemaflow = {k: v for k, v in hemaflow_env.items() if not k.startswith("AIRFLOW")}
    # The polling DAGs' daily cron is 12 h away: no scheduled poll during the module (but unpausing
    # hemaflow_feedback still starts one run for the latest past cron time, see the feedback test).
    polled = cron_at(datetime.now(timezone.utc) + timedelta(hours=12))
    hemaflow.update(RETRAIN_SCHEDULE=cron_at(due), SERVING_URL=f"http://127.0.0.1:{serving_port}",
                    SERVING_ADMIN_API_KEYS=ADMIN_KEY, SERVING_PORT=str(serving_port), SERVING_POLL_INTERVAL_S="3",
                    SERVING_REVIEWER_API_KEYS=f"{REVIEWER}:{REVIEWER_KEY}", RAW_WATCH_SCHEDULE=polled,
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


@pytest.fixture(scope="module")
def serving(site, tmp_path_factory):
    """`python -m serving` for the spec, as deployed next to Airflow (started by the first test that
    needs it, before any model exists; it follows @champion); yields its URL."""
    _, cli_env, serving_url, _ = site
    log = tmp_path_factory.mktemp("serving") / "serving.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "serving"], env={**cli_env, "DATASET": NEW_SPEC},
                                   cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: process.poll() is not None or _answers(serving_url), "serving to start", timeout_s=120)
        assert process.poll() is None, log.read_text()[-2000:]
        yield serving_url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _summary_run(local_stack, run_id: str) -> str:
    """The MLflow run in which the report task recorded the summary of DAG run `run_id`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=local_stack.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(f"{local_stack.model_name_prefix}-pipeline-runs")
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`hemaflow.dag_run_id` = '{run_id}'")
    assert found, f"no pipeline-runs summary for {run_id}"
    return found[0].info.run_id


def _summary(local_stack, run_id: str) -> dict:
    """The run summary the report task recorded in MLflow."""
    from mlflow.artifacts import load_dict

    return load_dict(f"runs:/{_summary_run(local_stack, run_id)}/run_summary.json")


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


def test_upload_event_retrains_through_the_scheduler_and_serving_follows(site, api, serving, local_stack, s3,
                                                                       tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.airflow_api import task_instances, wait_for_run

    _, cli_env, _, _ = site
    assert httpx.get(f"{serving}/readyz").status_code == 503  # no champion yet: not ready, not crashed

    tree, kind = image_tree(tmp_path / "upload", SHARED_DATA / "pbc8")
    shapes = every_accepted_shape(tree)
    bad = {f"eosinophil/{name}": reason for name, reason in add_bad_files(tree / "eosinophil").items()}
    before = {r["dag_run_id"] for r in _runs(api)}
    output = upload_cli(tree, NEW_SPEC, cli_env)
    assert "asset event" in output and "emitted" in output, output[-1000:]
    run = wait_for_run(api, DAG_ID, lambda runs: next((r for r in reversed(runs) if r["run_type"] ==
                                                       "asset_triggered" and r["dag_run_id"] not in before),
                                                      None), timeout_s=RUN_TIMEOUT_S)
    tis = task_instances(api, DAG_ID, run["dag_run_id"])
    print(f"\nasset-triggered run on {kind}, {len(shapes)} in other accepted shapes and {len(bad)} bad files: "
          f"{run['state']} in {run_wall_s(run):.0f}s\n{task_table(tis)}")
    assert run["state"] == "success"
    states = {t["task_id"]: t["state"] for t in tis}
    assert all(states[t] == "success" for t in ("ingest", "validate", "preprocess", "train", "evaluate",
                                                "gate", "promote", "notify_serving", "report")), states
    assert states["keep_champion"] == "skipped"
    _assert_every_shape_trained_and_only_bad_files_quarantined(local_stack, s3, _summary(local_stack, run["dag_run_id"]),
                                                               tree, shapes, bad, Path(cli_env["DATASET_SPECS_DIR"]))

    champion = MlflowClient(tracking_uri=local_stack.mlflow_tracking_uri).get_model_version_by_alias(
        local_stack.model_name(NEW_SPEC), "champion")
    served = wait_for(lambda: serving_model_version(serving), "serving to load @champion", timeout_s=60)
    assert served == str(champion.version)


def test_submitted_batch_is_scored_through_the_scheduler_in_mapped_chunks(site, api, local_stack, s3, tmp_path):
    import json
    import math

    from pipeline.airflow_api import task_instances, wait_for_run
    from pipeline.storage import get_json_or_none

    _, cli_env, _, _ = site
    dag_id, batch = f"hemaflow_score_{NEW_SPEC}", SCORED_BATCH
    # Nested class folders (fine for a batch) of images the model was not trained on.
    tree, _ = image_tree(tmp_path / "batch", SHARED_DATA / "pbc8", part=1)
    every_accepted_shape(tree)
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
    # .env.example leaves INFERENCE_TTA empty: the template spec's default (on), recorded in the
    # champion's bundle at training, decided the plan and reached the workers.
    assert summary["tta"] is True
    if any(t["task_id"] == "plan" and t["state"] == "success" for t in tis):  # not done before by a cron run
        chunks = [t for t in tis if t["task_id"] == "score_chunk"]
        assert len(chunks) == math.ceil(n_images / SCORE_CHUNK) and all(t["state"] == "success" for t in chunks)


def test_reviewed_images_join_raw_and_retrain_through_the_scheduler(site, api, serving, local_stack, s3):
    """The feedback loop as deployed: reviews through serving's API -> hemaflow_feedback (REST trigger)
    -> raw/<spec>/<class>/ with provenance -> its Asset event -> a retraining run that counts them."""
    from contracts.dataset_spec import load_spec
    from contracts.screening import ReviewDecision
    from pipeline.airflow_api import task_instances, trigger_dag, wait_for_run
    from screening.feedback import (META_BATCH, META_MODEL_VERSION, META_REVIEW_ID, META_REVIEWER,
                                    class_folder_for, reviewed_name)

    _, cli_env, _, _ = site
    champion = _champion_version(local_stack)
    wait_for(lambda: serving_model_version(serving) == champion, "serving to load @champion", timeout_s=60)
    queue = _reviewer_get(serving, f"/v1/batches/{SCORED_BATCH}")
    assert queue["model_version"] == champion and len(queue["items"]) >= N_REVIEWED, queue.get("summary")
    decisions = []
    for row in queue["items"][:N_REVIEWED]:  # the reviewer gives each image its true class (its folder)
        truth = row["key"].split(f"/{SCORED_BATCH}/", 1)[1].split("/", 1)[0]
        answer = httpx.post(f"{serving}/v1/batches/{SCORED_BATCH}/reviews", headers={"X-API-Key": REVIEWER_KEY},
                            json={"sha256": row["sha256"], "reviewed_label": truth}, timeout=30)
        assert answer.status_code == 201, answer.text
        decisions.append(ReviewDecision.from_dict(answer.json()))
    corrected = sum(d.reviewed_label != d.predicted_label for d in decisions)
    assert {(d.reviewer, d.model_version, d.batch_id) for d in decisions} == {(REVIEWER, champion, SCORED_BATCH)}

    before = {r["dag_run_id"] for r in _runs(api)}
    known_feedback = {r["dag_run_id"] for r in _runs_of(api, FEEDBACK_DAG_ID)}
    # Unpausing also starts a run for the latest past cron time (catchup=False still runs that one, unless
    # the DAG was active before); one run at a time: whichever runs first copies, the other is skipped.
    manual = _trigger_unpaused(api, FEEDBACK_DAG_ID, trigger_dag)
    wait_for_run(api, FEEDBACK_DAG_ID, lambda runs: next((r for r in runs if r["dag_run_id"] == manual["dag_run_id"]),
                                                         None), timeout_s=RUN_TIMEOUT_S)
    runs = wait_for(lambda: _all_finished([r for r in _runs_of(api, FEEDBACK_DAG_ID)
                                           if r["dag_run_id"] not in known_feedback]),
                    "the feedback runs to finish", timeout_s=RUN_TIMEOUT_S)
    outcomes = sorted((r["state"], *(t["state"] for t in task_instances(api, FEEDBACK_DAG_ID, r["dag_run_id"])
                                     if t["task_id"] == f"feedback_{NEW_SPEC}")) for r in runs)
    assert outcomes == [("success", "skipped")] * (len(runs) - 1) + [("success", "success")], outcomes

    spec = load_spec(NEW_SPEC, Path(cli_env["DATASET_SPECS_DIR"]))
    for decision in decisions:  # each image in its reviewed class folder, carrying its provenance
        key = spec.key_for(class_folder_for(spec, decision.reviewed_label), reviewed_name(decision))
        meta = s3.head_object(Bucket=local_stack.s3_bucket, Key=key)["Metadata"]
        assert (meta[META_REVIEW_ID], meta[META_REVIEWER], meta[META_MODEL_VERSION], meta[META_BATCH]) == (
            decision.review_id, REVIEWER, champion, SCORED_BATCH), key

    run = wait_for_run(api, DAG_ID, lambda runs: next((r for r in reversed(runs) if r["run_type"] == "asset_triggered"
                                                       and r["dag_run_id"] not in before), None),
                       timeout_s=RUN_TIMEOUT_S)
    tis = task_instances(api, DAG_ID, run["dag_run_id"])
    print(f"\nretraining on {N_REVIEWED} reviewed images ({corrected} corrected): {run['state']} in "
          f"{run_wall_s(run):.0f}s\n{task_table(tis)}")
    assert run["state"] == "success"
    events = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/upstreamAssetEvents").json()
    assert FEEDBACK_DAG_ID in {e["source_dag_id"] for e in events["asset_events"]}, events
    summary = _summary(local_stack, run["dag_run_id"])
    assert (summary["ingested"]["new"], summary["ingested"]["reviewed"]) == (N_REVIEWED, N_REVIEWED), summary
    gate = summary["gate_reviewed"]
    assert gate["n"] == N_REVIEWED and gate["candidate"] and gate["champion"], gate
    report = _summary_text(local_stack, run["dag_run_id"])
    assert f"reviewed images joined: {N_REVIEWED}" in report and f"Reviewed images at the gate ({N_REVIEWED}" in report


def _assert_every_shape_trained_and_only_bad_files_quarantined(local_stack, s3, summary: dict, tree: Path,
                                                               shapes: list[str], bad: dict[str, str],
                                                               specs_dir: Path) -> None:
    """Validation quarantined exactly the bad files, for the expected reasons, and the dataset version
    trained on holds every other uploaded file (less same-label duplicates), each accepted shape
    among them, at IMAGE_SIZE."""
    from contracts.dataset_spec import load_spec
    from contracts.processed import MANIFEST_FILE
    from pipeline.storage import get_json_or_none, get_jsonl, load_meta

    spec, bucket = load_spec(NEW_SPEC, specs_dir), local_stack.s3_bucket

    def key(rel: str) -> str:
        return spec.key_for(*rel.split("/", 1))

    uploaded = {key(p.relative_to(tree).as_posix()) for p in tree.rglob("*") if p.is_file()}
    validation = get_json_or_none(s3, bucket, summary["validation_summary_key"])
    assert {i["key"]: i["reason"] for i in validation["quarantined_items"]} == {key(r): why for r, why in bad.items()}
    meta = load_meta(NEW_SPEC, summary["dataset_version"], local_stack, client=s3)
    trained = {row["key"] for row in get_jsonl(s3, bucket, meta.object_key(MANIFEST_FILE))}
    assert len(trained) == validation["kept"] == len(uploaded) - len(bad) - validation["duplicates_dropped"]
    assert trained <= uploaded - {key(r) for r in bad} and {key(r) for r in shapes} <= trained
    assert meta.image_size == int(FAST_TRAINING_ENV["IMAGE_SIZE"])
    assert sum(sum(per_label.values()) for per_label in meta.counts.values()) == len(trained)


def _all_finished(runs: list[dict]) -> list[dict] | None:
    from pipeline.airflow_api import FINISHED_RUN_STATES

    return runs if runs and all(r["state"] in FINISHED_RUN_STATES for r in runs) else None


def _reviewer_get(serving_url: str, path: str) -> dict:
    answer = httpx.get(f"{serving_url}{path}", headers={"X-API-Key": REVIEWER_KEY}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _trigger_unpaused(api, dag_id: str, trigger_dag) -> dict:
    """Unpause `dag_id` (deployments may create it paused) and trigger a manual run of it."""
    answer = api.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False})
    assert answer.status_code == 200 and answer.json()["is_paused"] is False, answer.text
    return trigger_dag(api, dag_id)


def _summary_text(local_stack, run_id: str) -> str:
    from mlflow.artifacts import load_text

    return load_text(f"runs:/{_summary_run(local_stack, run_id)}/run_summary.md")


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

"""Drift through the real scoring path: `hemaflow_score_<dataset>` with `dag.test()` (plan, mapped
score_chunk, finish) on real SeaweedFS and MLflow, against the tiny champion's training profile
(its bundle's data_profile.json, written by `train_candidate`).

An unchanged held-out batch (new images from the training generator) is not flagged; the same
images re-stained (`restain`) are flagged as a strong drift, marked at the top of report.html,
recorded in summary.json, and the CLI prints the verdict.
"""

from __future__ import annotations

import json

import pytest

from tests.dags.scoring_helpers import run_dag, s3_bytes, scoring_dag, write_batch_folder
from tests.fixtures.training import TINY_SIZE
from tests.helpers import restain

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHUNK = 10
N_IMAGES = 24  # >= DRIFT_MIN_IMAGES (20): every test runs
HELD_OUT = "drift-held-out"
RESTAINED = "drift-restained"


@pytest.fixture(scope="module")
def scored(tiny_registered_model, airflow_db, tmp_path_factory):
    """Both batches submitted and scored by the DAG: the scoring env plus {prefixes: {batch_id: prefix}}."""
    from contracts.screening import results_prefix
    from screening.batches import submit_folder
    from training.synthetic import synthetic_images

    labels = [i % 2 for i in range(N_IMAGES)]
    images = synthetic_images(labels, TINY_SIZE, seed=21)  # the training data's generator, other draws
    with scoring_dag(tiny_registered_model, tmp_path_factory.mktemp("drift-specs"), CHUNK) as env:
        s, dataset, out = env["settings"], env["dataset"], {}
        for batch_id, batch in ((HELD_OUT, images), (RESTAINED, restain(images, 60, 1.6))):
            folder = write_batch_folder(tmp_path_factory.mktemp(batch_id), batch, labels)
            assert submit_folder(folder, dataset, batch_id, s, emit_asset_event=False)["uploaded"] == N_IMAGES
            dag_run, states = run_dag(env["dag"], {"batch_id": batch_id})
            assert str(dag_run.state) == "success", states
            assert sum(1 for task_id, _ in states if task_id == "score_chunk") == 3  # 24 images, chunks of 10
            out[batch_id] = results_prefix(dataset, batch_id, tiny_registered_model["model_version"])
        yield {**env, "prefixes": out}


def _results(scored, s3, batch_id: str) -> tuple[dict, str]:
    bucket, prefix = scored["settings"].s3_bucket, scored["prefixes"][batch_id]
    return (json.loads(s3_bytes(s3, bucket, prefix + "summary.json")),
            s3_bytes(s3, bucket, prefix + "report.html").decode())


def test_chunk_files_keep_what_drift_needs_per_image(scored, s3):
    from pipeline.storage import get_jsonl
    from screening.score import chunk_key

    s, model = scored["settings"], scored["model"]
    rows = get_jsonl(s3, s.s3_bucket, chunk_key(scored["dataset"], HELD_OUT, model["model_version"], 0))
    assert len(rows) == CHUNK
    assert all(len(r["colour_stats"]) == 13 and len(r["features"]) > 0 for r in rows)


def test_unchanged_held_out_batch_is_not_flagged(scored, s3):
    summary, report = _results(scored, s3, HELD_OUT)
    drift = summary["drift"]
    assert drift["tested"] is True and drift["n_images"] == N_IMAGES
    assert {c["name"]: c["tested"] for c in drift["checks"]} == {"colour": True, "features": True, "label_mix": True}
    assert drift["level"] == "none", [c["detail"] for c in drift["checks"]]
    assert drift["reference"] == scored["model"]["dataset_version"]  # the champion's training data
    assert 'data-drift-level="none"' in report and "STRONG DRIFT" not in report


def test_restained_batch_is_flagged_strong_and_marked_at_the_top_of_the_report(scored, s3, capsys):
    from screening.__main__ import main as screening_main

    summary, report = _results(scored, s3, RESTAINED)
    drift = summary["drift"]
    checks = {c["name"]: c for c in drift["checks"]}
    assert drift["level"] == "strong", [c["detail"] for c in drift["checks"]]
    assert checks["colour"]["drifted"] and checks["colour"]["effect"] >= 1.5, checks["colour"]["detail"]
    assert 'data-drift-level="strong"' in report
    assert report.index("data-drift-banner=strong") < report.index("screening aid, not a diagnosis")
    # the CLI finds the result complete and prints the recorded verdict on one line
    assert screening_main(["score", "--dataset", scored["dataset"], "--batch", RESTAINED]) == 0
    out = capsys.readouterr().out
    assert "already scored (result kept)" in out
    assert "drift STRONG vs training data" in out and "colour DRIFTED" in out


def _batch_runs(scored, batch_id: str) -> list:
    from mlflow import MlflowClient

    from screening.tracking import screening_experiment

    s = scored["settings"]
    client = MlflowClient(s.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(screening_experiment(s, scored["dataset"]))
    assert exp is not None, "no screening experiment in MLflow"
    return client.search_runs([exp.experiment_id], filter_string=f"tags.batch_id = '{batch_id}'")


def test_each_batch_drift_is_one_mlflow_run_in_the_screening_experiment(scored, s3):
    version = scored["model"]["model_version"]
    for batch_id, level in ((HELD_OUT, 0.0), (RESTAINED, 2.0)):
        summary, _ = _results(scored, s3, batch_id)
        runs = _batch_runs(scored, batch_id)
        assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
        run = runs[0]
        assert run.info.status == "FINISHED" and run.data.tags["model_version"] == version
        assert run.data.metrics["drift_level"] == level
        assert run.data.tags["drift_level"] == summary["drift"]["level"]
        assert run.data.metrics["n_scored"] == N_IMAGES and run.data.metrics["n_bad"] == 0
        assert run.data.metrics["drift_colour_drifted"] == float(level == 2.0)  # re-stain moves colour


def test_a_finish_that_runs_again_does_not_log_a_second_run(scored, s3):
    """summary.json lost after the run was logged (the finish stopped before its marker): the DAG
    finishes the batch again (chunk files reused) and finds the batch's run by its tags."""
    s = scored["settings"]
    summary, _ = _results(scored, s3, HELD_OUT)
    s3.delete_object(Bucket=s.s3_bucket, Key=scored["prefixes"][HELD_OUT] + "summary.json")
    dag_run, states = run_dag(scored["dag"], {"batch_id": HELD_OUT})
    assert str(dag_run.state) == "success", states
    again, _ = _results(scored, s3, HELD_OUT)
    assert again["scored_at"] != summary["scored_at"]  # finished again, not reused
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert len(_batch_runs(scored, HELD_OUT)) == 1

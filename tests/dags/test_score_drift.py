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

from tests.dags.scoring_helpers import run_dag, s3_bytes, scoring_dag
from tests.fixtures.training import TINY_LABELS, TINY_SIZE
from tests.helpers import restain

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHUNK = 10
N_IMAGES = 24  # >= DRIFT_MIN_IMAGES (20): every test runs
HELD_OUT = "drift-held-out"
RESTAINED = "drift-restained"


def _write_batch(folder, images, labels) -> None:
    from PIL import Image

    for i, (image, k) in enumerate(zip(images, labels)):
        (folder / TINY_LABELS[k]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / TINY_LABELS[k] / f"{i:03d}.png")  # lossless: pixels as generated


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
            folder = tmp_path_factory.mktemp(batch_id)
            _write_batch(folder, batch, labels)
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

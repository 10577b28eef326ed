"""The batch-scoring DAG with `dag.test()`: real Airflow, real SeaweedFS, real MLflow, a real bundle.

A tiny model is trained and promoted on the test stack (`tiny_registered_model`); its dataset gets
a spec in a private specs folder, so `hemaflow_score_<dataset>` exists. In order (each test builds
on the previous one's state):
1. a submitted batch, scored in mapped chunks of 3: images from the tiny model's training
   generator (most pass its out-of-scope detector and are ranked), one flat grey image (refused,
   listed apart) and a corrupt file (listed with its reason); previews and report written;
2. the same run again rewrites nothing (summary.json is the completion marker);
3. a new @champion version re-scores the batch into a new version folder, the old one untouched;
4. the CLIs: `pipeline submit` then `screening score` on a second batch.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest

from tests.dags.scoring_helpers import run_dag as _run
from tests.dags.scoring_helpers import s3_bytes as _get
from tests.dags.scoring_helpers import scoring_dag, write_batch_folder
from tests.fixtures.data import make_image_tree
from tests.fixtures.training import TINY_SIZE

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHUNK = 3
BATCH = "b-2026-12-02"
IMAGES_PER_CLASS = 4
CORRUPT_KEY_SUFFIX = "nested/broken.jpg"
GREY_KEY_SUFFIX = "nested/flat-grey.png"  # nothing like a smear: the detector refuses it
STATE: dict = {}


@pytest.fixture(scope="module")
def scoring(tiny_registered_model, airflow_db, tmp_path_factory):
    """{dataset, settings, dag, model, tree}: the tiny champion's scoring DAG and a batch folder."""
    from PIL import Image

    from training.synthetic import synthetic_images

    labels = [i % 2 for i in range(2 * IMAGES_PER_CLASS)]
    # other draws of the generator the tiny champion was trained on (tiny_registered_model)
    tree = write_batch_folder(tmp_path_factory.mktemp("batch"), synthetic_images(labels, TINY_SIZE, seed=31), labels)
    (tree / "nested").mkdir()
    Image.new("RGB", (TINY_SIZE, TINY_SIZE), (128, 128, 128)).save(tree / GREY_KEY_SUFFIX)
    (tree / CORRUPT_KEY_SUFFIX).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG " * 10)
    with scoring_dag(tiny_registered_model, tmp_path_factory.mktemp("score-specs"), CHUNK) as scoring_env:
        yield {**scoring_env, "tree": tree}


def _results(dataset: str, version: str) -> str:
    from contracts.screening import results_prefix

    return results_prefix(dataset, BATCH, version)


def test_batch_is_scored_in_mapped_chunks_and_a_bad_image_is_listed(scoring, s3):
    from screening.batches import submit_folder

    s, dataset = scoring["settings"], scoring["dataset"]
    submitted = submit_folder(scoring["tree"], dataset, BATCH, s, emit_asset_event=False)
    n_images = 2 * IMAGES_PER_CLASS + 2  # + the grey image + the corrupt file
    assert submitted["uploaded"] == n_images and submitted["prefix"] == f"inbox/{dataset}/{BATCH}/"

    dag_run, states = _run(scoring["dag"], {"batch_id": BATCH})
    assert str(dag_run.state) == "success", states
    chunks = sorted(i for (task_id, i) in states if task_id == "score_chunk")
    assert chunks == list(range(math.ceil(n_images / CHUNK))), states

    version = scoring["model"]["model_version"]
    prefix = _results(dataset, version)
    rows = list(csv.DictReader(io.StringIO(_get(s3, s.s3_bucket, prefix + "predictions.csv").decode())))
    assert len(rows) == n_images
    assert list(rows[0])[:7] == ["key", "sha256", "label", "confidence", "in_scope", "rank", "error"]
    bad = [r for r in rows if r["error"]]
    assert [r["key"] for r in bad] == [f"inbox/{dataset}/{BATCH}/{CORRUPT_KEY_SUFFIX}"]
    assert bad[0]["rank"] == "" and bad[0]["label"] == ""
    scored = [r for r in rows if not r["error"]]
    # The bundle carries an out-of-scope detector: every scored image has its verdict (serving's rule).
    assert {r["in_scope"].lower() for r in scored} <= {"true", "false"} and bad[0]["in_scope"] == ""
    refused = [r for r in scored if r["in_scope"].lower() == "false"]
    grey_key = f"inbox/{dataset}/{BATCH}/{GREY_KEY_SUFFIX}"
    assert grey_key in [r["key"] for r in refused], refused
    grey = next(r for r in rows if r["key"] == grey_key)
    assert grey["rank"] == "" and grey["label"]  # scored (its label kept) but not ranked
    ranked = [r for r in rows if r["rank"]]
    # in-distribution images pass the detector: most of the generated images are ranked
    assert len(ranked) >= 3 * IMAGES_PER_CLASS // 2, [(r["key"], r["in_scope"]) for r in scored]
    assert grey_key not in [r["key"] for r in ranked]
    assert [int(r["rank"]) for r in ranked] == list(range(1, n_images - len(refused)))  # refused listed apart
    p_positive = [float(r["p_abnormal"]) for r in ranked]
    assert len(set(p_positive)) > 1  # a ranking of distinct scores, not one value repeated
    assert p_positive == sorted(p_positive, reverse=True)  # most suspicious first
    for r in scored:
        for folder in ("thumbnails", "heatmaps"):
            assert _get(s3, s.s3_bucket, f"{prefix}{folder}/{r['sha256']}.jpg")[:3] == b"\xff\xd8\xff"

    import json

    summary = json.loads(_get(s3, s.s3_bucket, prefix + "summary.json"))
    assert summary["model_version"] == version and summary["n_bad"] == 1 and summary["n_scored"] == n_images - 1
    assert sum(summary["counts"].values()) == n_images - 1 - len(refused)  # counts are of in-scope images
    assert summary["has_detector"] is True and summary["n_out_of_scope"] == len(refused)
    assert summary["review_url"] == f"http://serving.test:8000/batches/{BATCH}"
    report = _get(s3, s.s3_bucket, prefix + "report.html").decode()
    assert "screening aid, not a diagnosis" in report and CORRUPT_KEY_SUFFIX in report
    assert "http://serving.test:8000/v1/model/card" in report
    assert summary["drift"]["tested"] is False  # 9 readable images: too few to test, and the report says so
    assert 'data-drift-level="untested"' in report and "Drift not tested: 9 images &lt; DRIFT_MIN_IMAGES" in report
    # the batch's MLflow run says "untested", with its counts and no drift figures (not a "level 0")
    from mlflow import MlflowClient

    run = MlflowClient(s.mlflow_tracking_uri).get_run(summary["mlflow_run_id"])
    assert run.data.tags["drift_level"] == "untested" and run.data.tags["batch_id"] == BATCH
    assert run.data.metrics["n_scored"] == n_images - 1 and run.data.metrics["n_bad"] == 1
    assert not [m for m in run.data.metrics if m.startswith("drift_")]
    assert grey_key in summary["out_of_scope"]
    out_of_scope = report[report.index(f"Out of scope ({len(refused)})"):report.index("Unreadable images")]
    assert GREY_KEY_SUFFIX.rsplit("/", 1)[-1] in out_of_scope  # listed apart, by file name
    STATE["summary_etag"] = s3.head_object(Bucket=s.s3_bucket, Key=prefix + "summary.json")["ETag"]
    STATE["report_modified"] = s3.head_object(Bucket=s.s3_bucket, Key=prefix + "report.html")["LastModified"]


def test_rerun_for_the_same_model_rewrites_nothing(scoring, s3):
    assert STATE, "depends on the first test"
    s, dataset = scoring["settings"], scoring["dataset"]
    prefix = _results(dataset, scoring["model"]["model_version"])
    dag_run, states = _run(scoring["dag"], {"batch_id": BATCH})
    assert str(dag_run.state) == "success", states
    assert states[("plan", -1)] == "skipped"  # complete: nothing to plan
    assert s3.head_object(Bucket=s.s3_bucket, Key=prefix + "summary.json")["ETag"] == STATE["summary_etag"]
    assert s3.head_object(Bucket=s.s3_bucket, Key=prefix + "report.html")["LastModified"] == STATE["report_modified"]


def test_new_champion_version_rescores_into_a_new_version_folder(scoring, s3):
    """No batch id: every batch without a result for the (new) champion is scored."""
    assert STATE, "depends on the first test"
    import mlflow

    from training.tracking import mlflow_client

    s, dataset, model = scoring["settings"], scoring["dataset"], scoring["model"]
    client = mlflow_client(s)
    old = client.get_model_version(model["model_name"], model["model_version"])
    new = mlflow.register_model(old.source, model["model_name"])  # the same run's model, a new version
    client.set_registered_model_alias(model["model_name"], "champion", new.version)
    try:
        dag_run, states = _run(scoring["dag"])
        assert str(dag_run.state) == "success", states
        new_prefix = _results(dataset, str(new.version))
        import json

        summary = json.loads(_get(s3, s.s3_bucket, new_prefix + "summary.json"))
        assert summary["model_version"] == str(new.version) and summary["n_bad"] == 1
        old_prefix = _results(dataset, model["model_version"])
        assert s3.head_object(Bucket=s.s3_bucket, Key=old_prefix + "summary.json")["ETag"] == STATE["summary_etag"]
    finally:
        client.set_registered_model_alias(model["model_name"], "champion", model["model_version"])


def test_submit_and_score_clis(scoring, s3, capsys, tmp_path):
    from pipeline.__main__ import main as pipeline_main
    from screening.__main__ import main as screening_main

    s, dataset = scoring["settings"], scoring["dataset"]
    folder = make_image_tree(tmp_path / "cli", {"x": 2}, seed=5)
    assert pipeline_main(["submit", str(folder), "--dataset", dataset, "--batch", "cli-batch"]) == 0
    out = capsys.readouterr().out
    assert "batch cli-batch: 2 uploaded" in out and "AIRFLOW_API_URL is not set" in out
    assert screening_main(["score", "--dataset", dataset, "--batch", "cli-batch"]) == 0
    out = capsys.readouterr().out
    assert "batch cli-batch: scored" in out and "2 scored, 0 unreadable" in out
    assert screening_main(["score", "--dataset", dataset, "--batch", "cli-batch"]) == 0
    assert "already scored (result kept)" in capsys.readouterr().out
    assert screening_main(["score", "--dataset", dataset, "--batch", "../etc"]) == 1  # clear error, no traceback


def test_score_cli_with_tta_scores_like_the_api_and_records_it(scoring, s3, capsys, tmp_path, monkeypatch):
    """INFERENCE_TTA=true: the plan pins it, every row says so, and summary.json records it with the
    champion bundle's TTA threshold (the one serving answers with when it is on)."""
    import json

    from contracts.tta import decision_threshold
    from pipeline.__main__ import main as pipeline_main
    from screening.batches import summary_key
    from screening.champion import champion_bundle, resolve_champion
    from screening.__main__ import main as screening_main

    s, dataset = scoring["settings"], scoring["dataset"]
    folder = make_image_tree(tmp_path / "tta", {"x": 2}, seed=6)
    assert pipeline_main(["submit", str(folder), "--dataset", dataset, "--batch", "tta-batch"]) == 0
    monkeypatch.setenv("INFERENCE_TTA", "true")
    assert screening_main(["score", "--dataset", dataset, "--batch", "tta-batch"]) == 0
    assert "2 scored, 0 unreadable" in capsys.readouterr().out
    ref = resolve_champion(dataset, s)
    summary = json.loads(_get(s3, s.s3_bucket, summary_key(dataset, "tta-batch", ref.version)))
    meta = champion_bundle(ref.run_id, s).meta
    assert meta["tta"]["threshold"] is not None
    assert summary["tta"] is True and summary["threshold"] == decision_threshold(meta, tta=True)

"""Feedback on a real SeaweedFS: reviewed images land in raw/<dataset>/<class>/ with provenance, once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from screening.feedback import META_BATCH, META_MODEL_VERSION, META_REVIEW_ID, META_REVIEWER, apply_feedback
from contracts.reviews import append_decisions, new_decision
from tests.fixtures.screening import write_scored_batch
from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

LEUKEMIA_LIKE = {"Benign": "normal", "Early": "abnormal", "Pro": "abnormal"}


def _review(dataset, batch, image, label, reviewer="alice"):
    return new_decision(dataset=dataset, batch_id=batch, image_key=image.key, sha256=image.sha256, model_version=4,
                        predicted_label=image.label, reviewed_label=label, reviewer=reviewer)


@pytest.fixture
def reviewed(tiny_dataset_factory, s3):
    settings, dataset, _ = tiny_dataset_factory({"Benign": 1, "Early": 1, "Pro": 1}, LEUKEMIA_LIKE)
    images = write_scored_batch(s3, settings.s3_bucket, dataset, "b7", 4, 4)
    return settings, dataset, images


def _raw(s3, settings, dataset):
    from pipeline.storage import iter_objects

    return sorted(o["Key"] for o in iter_objects(s3, settings.s3_bucket, f"raw/{dataset}/"))


def test_feedback_copies_with_provenance_and_is_idempotent(reviewed, s3):
    settings, dataset, images = reviewed
    decisions = [_review(dataset, "b7", images[0], "abnormal"), _review(dataset, "b7", images[1], "normal", "Zoë"),
                 _review(dataset, "b7", images[2], "blast")]  # a label the spec does not know: skipped
    append_decisions(s3, settings.s3_bucket, decisions)
    first = apply_feedback(dataset, settings=settings, client=s3)
    assert first.batches == ["b7"] and len(first.copied) == 2 and first.unchanged == 0
    assert [s["review_id"] for s in first.skipped] == [decisions[2].review_id]
    keys = _raw(s3, settings, dataset)
    assert keys == sorted(first.copied)
    assert [k.split("/")[2] for k in sorted(first.copied, key=lambda k: "Benign" in k)] == ["Early", "Benign"]
    early = next(k for k in keys if "/Early/" in k)
    obj = s3.get_object(Bucket=settings.s3_bucket, Key=early)
    assert obj["Body"].read() == images[0].data
    assert obj["Metadata"][META_REVIEW_ID] == decisions[0].review_id
    assert (obj["Metadata"][META_REVIEWER], obj["Metadata"][META_MODEL_VERSION], obj["Metadata"][META_BATCH]) == (
        "alice", "4", "b7")
    benign = next(k for k in keys if "/Benign/" in k)
    assert s3.head_object(Bucket=settings.s3_bucket, Key=benign)["Metadata"][META_REVIEWER] == "Zo%C3%AB"

    again = apply_feedback(dataset, "b7", settings=settings, client=s3)
    assert again.copied == [] and again.unchanged == 2 and _raw(s3, settings, dataset) == keys

    # a reviewer changes their mind: the image moves from Early/ to Benign/, nothing is duplicated
    append_decisions(s3, settings.s3_bucket, [_review(dataset, "b7", images[0], "normal", "carol")])
    moved = apply_feedback(dataset, settings=settings, client=s3)
    assert moved.removed == [early] and len(moved.copied) == 1 and moved.unchanged == 1
    assert sum("/Benign/" in k for k in _raw(s3, settings, dataset)) == 2 and len(_raw(s3, settings, dataset)) == 2


def test_feedback_cli(reviewed, s3):
    settings, dataset, images = reviewed
    append_decisions(s3, settings.s3_bucket, [_review(dataset, "b7", images[3], "normal")])
    env = {**os.environ, "DATASET_SPECS_DIR": str(settings.dataset_specs_dir), "PYTHONPATH": str(REPO_ROOT)}
    run = [sys.executable, "-m", "screening", "feedback", "--dataset", dataset, "--batch", "b7"]
    out = subprocess.run(run, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["copied"]) == 1
    again = subprocess.run(run, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert json.loads(again.stdout)["unchanged"] == 1
    bad = subprocess.run(run[:-1] + ["../x"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "batch id" in bad.stdout

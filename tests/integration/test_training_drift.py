"""A new dataset version is compared with the champion's training profile when a candidate trains:
a re-stained version is flagged in the run (metrics, tag, html) and in the result the run report
reads; an unchanged one is not. Real MLflow, S3 and training."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import restain

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_new_dataset_version_drift_against_the_champion(tiny_registered_model, tmp_path):
    from mlflow import MlflowClient

    from tests.fixtures.training import TINY_CLASSES, TINY_COUNTS, write_processed_version
    from training.train import train_candidate

    reg = tiny_registered_model
    s, dataset = reg["settings"], reg["dataset"]
    client = MlflowClient(s.mlflow_tracking_uri)

    same = write_processed_version(s, dataset, TINY_CLASSES, TINY_COUNTS, positive_label="abnormal", seed=5)
    unchanged = train_candidate(dataset, same, s)
    assert unchanged["dataset_drift"]["level"] == "none", unchanged["dataset_drift"]
    assert f"champion v{reg['model_version']}" in unchanged["dataset_drift"]["reference"]

    stained = write_processed_version(s, dataset, TINY_CLASSES, TINY_COUNTS, positive_label="abnormal", seed=6,
                                      transform=lambda image: restain(image[None], 60, 1.6)[0])
    moved = train_candidate(dataset, stained, s)
    assert moved["dataset_drift"]["level"] == "strong", moved["dataset_drift"]
    run = client.get_run(moved["run_id"])
    assert run.data.tags["dataset_drift_level"] == "strong" and run.data.metrics["dataset_drift_level"] == 2.0
    html = (client.download_artifacts(moved["run_id"], "drift/dataset_drift.html", str(tmp_path)))
    assert "STRONG DRIFT" in open(html, encoding="utf-8").read()
    assert np.isclose(client.get_run(unchanged["run_id"]).data.metrics["dataset_drift_level"], 0.0)

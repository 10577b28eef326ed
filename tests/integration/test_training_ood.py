"""A real training run (train_candidate on the test stack's SeaweedFS + MLflow) fits the
out-of-scope detector: its validation figures are MLflow metrics, the signed bundle carries it,
and the gate records the figures on the version it decided on."""

from __future__ import annotations

import json


def test_training_fits_logs_and_ships_the_detector_and_the_gate_records_it(tiny_registered_model):
    from contracts.ood import OOD_FILE, OodDetector
    from training.gate import download_bundle
    from training.ood import ALPHA
    from training.registry import TAG_GATE_OOD
    from training.tracking import mlflow_client

    info = tiny_registered_model
    client = mlflow_client(info["settings"])
    metrics = client.get_run(info["run_id"]).data.metrics
    assert metrics["ood_val_pass_rate"] >= 0.99 and 0.0 <= metrics["ood_synthetic_refused"] <= 1.0
    bundle = download_bundle(client, info["run_id"], info["settings"])
    assert OOD_FILE in bundle.files["SHA256SUMS"].decode()
    ood = bundle.meta["ood"]
    assert ood["validation"]["val_pass_rate"] == metrics["ood_val_pass_rate"]
    # The threshold rule is recorded with the figures (split-conformal, training.ood.ALPHA).
    assert ood["validation"]["alpha"] == metrics["ood_alpha"] == ALPHA
    assert ood["validation"]["conformal_rank"] == metrics["ood_conformal_rank"] >= 1
    detector = OodDetector.load(ood, bundle.files[OOD_FILE])
    assert detector.features.means.shape == (2, ood["feature_dim"])
    version = client.get_model_version(info["model_name"], info["model_version"])
    assert json.loads(version.tags[TAG_GATE_OOD]) == ood["validation"]

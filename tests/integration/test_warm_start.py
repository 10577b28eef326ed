"""Warm start from the champion's weights (issue 14 item 3) against the real MLflow of the test stack."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.training import TINY_CLASSES, TINY_COUNTS, write_processed_version

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _kernels(settings, name: str, version: str) -> list[np.ndarray]:
    import mlflow

    model = mlflow.tensorflow.load_model(f"models:/{name}/{version}")
    return [w for layer in model.layers if "conv" in layer.name for w in layer.get_weights()]


def _run(client, run_id: str):
    run = client.get_run(run_id)
    return run.data.params, run.data.tags


def test_candidate_starts_from_the_champion_only_when_labels_and_architecture_match(tiny_registered_model):
    from training.tracking import mlflow_client
    from training.train import train_candidate

    info = tiny_registered_model
    s, dataset, name = info["settings"], info["dataset"], info["model_name"]
    client = mlflow_client(s)
    champion = _kernels(s, name, info["model_version"])
    newer = write_processed_version(s, dataset, TINY_CLASSES, TINY_COUNTS, positive_label="abnormal", seed=11)
    # A tiny learning rate for one epoch: the trained kernels stay where they started.
    still = {"epochs": 1, "learning_rate": 1e-7}

    warm = train_candidate(dataset, newer, s, warm_start=True, **still)
    params, tags = _run(client, warm["run_id"])
    assert params["warm_started_from"] == info["model_version"] == warm["warm_started_from"]
    assert tags["warm_start"].startswith(f"initialised from {name} v{info['model_version']}")
    warm_kernels = _kernels(s, name, warm["model_version"])
    assert max(float(np.abs(a - b).max()) for a, b in zip(champion, warm_kernels)) < 1e-3

    cold = train_candidate(dataset, newer, s, warm_start=False, **still)
    params, tags = _run(client, cold["run_id"])
    assert params["warm_started_from"] == "none" and tags["warm_start"] == "warm start off"
    cold_kernels = _kernels(s, name, cold["model_version"])
    assert max(float(np.abs(a - b).max()) for a, b in zip(champion, cold_kernels)) > 0.05

    wider = train_candidate(dataset, newer, s, warm_start=True, model_width=12, **still)
    params, tags = _run(client, wider["run_id"])
    assert params["warm_started_from"] == "none"
    assert tags["warm_start"].startswith("architecture differs (model_width: champion 8, candidate 12)")


def test_other_labels_never_warm_start(tiny_registered_model):
    from contracts.processed import DatasetMeta
    from training.warm_start import mismatch

    s = tiny_registered_model["settings"]
    meta = DatasetMeta(dataset="d", dataset_version="v", image_size=32, labels=["normal", "abnormal"], classes={},
                       positive_label=None, counts={}, shards={}, preprocessing={})
    params = {"labels": "abnormal,normal", "model_width": str(s.model_width), "model_depth": str(s.model_depth),
              "model_stain_normalisation": s.model_stain_normalisation, "split_params": "{}"}
    assert mismatch(params, s, meta).startswith("labels differ")
    meta.labels = ["abnormal", "normal"]
    assert mismatch(params, s, meta) is None
    # Other splits (salt, fractions, splits version): the champion may have trained on the candidate's test images.
    meta.preprocessing = {"splits": {"salt": "hemaflow-v1", "splits_version": 2}}
    assert mismatch(params, s, meta).startswith("split parameters differ (champion {}, candidate {")
    older = {k: v for k, v in params.items() if k != "split_params"}
    assert mismatch(older, s, meta).startswith("split parameters differ (champion not recorded")
    params["split_params"] = '{"salt": "hemaflow-v1", "splits_version": 2}'
    assert mismatch(params, s, meta) is None
    assert mismatch({**params, "model_depth": "9"}, s, meta).startswith("architecture differs (model_depth")
    other_stain = "per_image" if s.model_stain_normalisation == "none" else "none"
    assert mismatch({**params, "model_stain_normalisation": other_stain}, s, meta).startswith(
        "architecture differs (model_stain_normalisation")

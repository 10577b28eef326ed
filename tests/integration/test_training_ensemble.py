"""MODEL_ENSEMBLE_SIZE through a real training run (train_candidate on the test stack's SeaweedFS +
MLflow): the members train from their own seeds, one after another, and ship as ONE model whose
exported graph serves the mean of their logits, with Grad-CAM maps and pooled features as before."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.training import TINY_CLASSES, TINY_COUNTS, write_processed_version

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_an_ensemble_run_ships_one_model_of_its_members(tiny_registered_model):
    import mlflow

    from contracts.bundle import OUTPUT_CLASS_MAPS, OUTPUT_FEATURES, OUTPUT_PROBABILITIES, TFLiteRunner
    from pipeline.storage import fetch_processed, load_meta
    from training.data import load_split_arrays
    from training.gate import download_bundle
    from training.model import FEATURES_LAYER, block_filters, member_prefix
    from training.tracking import mlflow_client
    from training.train import train_candidate

    info, s = tiny_registered_model, tiny_registered_model["settings"]
    dataset = info["dataset"]  # it has a champion: a warm start is asked for and must be refused
    version = write_processed_version(s, dataset, TINY_CLASSES, TINY_COUNTS, positive_label="abnormal", seed=13)
    trained = train_candidate(dataset, version, s, warm_start=True, model_ensemble_size=2, epochs=2)

    client = mlflow_client(s)
    run = client.get_run(trained["run_id"])
    assert run.data.params["model_ensemble_size"] == "2"
    assert run.data.params["warm_started_from"] == "none"
    assert run.data.tags["warm_start"].startswith("MODEL_ENSEMBLE_SIZE=2: an ensemble's members train from scratch")
    assert run.data.metrics["epochs_run"] == 4 and run.data.tags["stop_reason"] == "epochs"  # 2 members x 2
    assert run.data.metrics["ensemble_members"] == 2

    model = mlflow.tensorflow.load_model(f"models:/{info['model_name']}/{trained['model_version']}")
    first, second = (model.get_layer(member_prefix(i) + "b0_conv0").get_weights()[0] for i in range(2))
    assert np.abs(first - second).max() > 0.01  # two seeds, two different networks

    meta = load_meta(dataset, version, s)
    test_x, _ = load_split_arrays(fetch_processed(dataset, version, s), meta, "test")
    bundle = download_bundle(client, trained["run_id"], s)
    assert bundle.meta["ensemble_members"] == 2
    served = TFLiteRunner(bundle.files["model.tflite"])(test_x.astype(np.float32))
    features = 2 * block_filters(s.model_width, s.model_depth)[-1]
    assert served[OUTPUT_FEATURES].shape == (len(test_x), features)
    assert served[OUTPUT_CLASS_MAPS].shape[0] == len(test_x) and served[OUTPUT_CLASS_MAPS].shape[-1] == 2
    assert model.get_layer(FEATURES_LAYER).output.shape[-1] == features
    keras_p = model.predict(test_x.astype(np.float32), verbose=0)
    assert np.abs(served[OUTPUT_PROBABILITIES] - keras_p).max() < 0.05  # int8 or float32, the same model


def test_the_budget_leaves_out_members_it_cannot_finish_and_the_run_says_so(tiny_registered_model):
    """A 1 s TRAIN_TIME_BUDGET_S for 3 members: the first is cut after one epoch by the safety stop,
    the others are not started, and the run ships that one network with stop_reason time_budget and
    says so beside the 3 it asked for (metric ensemble_members)."""
    import mlflow

    from training.model import member_prefix
    from training.tracking import mlflow_client
    from training.train import train_candidate

    info, s = tiny_registered_model, tiny_registered_model["settings"]
    version = write_processed_version(s, info["dataset"], TINY_CLASSES, TINY_COUNTS, positive_label="abnormal",
                                      seed=17)
    trained = train_candidate(info["dataset"], version, s, model_ensemble_size=3, epochs=3, train_time_budget_s=1)
    client = mlflow_client(s)
    run = client.get_run(trained["run_id"])
    assert run.data.tags["stop_reason"] == "time_budget" and run.data.metrics["epochs_run"] == 1
    assert len(client.get_metric_history(trained["run_id"], "loss")) == 1  # members 2 and 3 never started
    assert run.data.params["model_ensemble_size"] == "3" and run.data.metrics["ensemble_members"] == 1
    model = mlflow.tensorflow.load_model(f"models:/{info['model_name']}/{trained['model_version']}")
    names = {layer.name for layer in model.layers}
    assert "b0_conv0" in names and not any(name.startswith(member_prefix(0)) for name in names)  # one network

"""MODEL_ENSEMBLE_SIZE: several trained networks served as one model whose logits are their mean,
keeping the single network's interface (pooled features, GAP -> Dense Grad-CAM, one graph)."""

from __future__ import annotations

import numpy as np
import pytest

IMAGE, INPUT, WIDTH, DEPTH = 40, 24, 4, 3


def _trained_like(seed: int):
    """A network at the training input size whose BatchNorm statistics are far from the identity,
    so a tower wired to the wrong member's statistics would show."""
    import keras

    from training.model import build_model

    net = build_model(2, INPUT, INPUT, WIDTH, DEPTH, seed=seed, stain_normalisation="per_image")
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma * rng.uniform(0.5, 2.0, gamma.shape), beta + rng.normal(0, 0.3, beta.shape),
                               mean + rng.normal(0, 0.3, mean.shape), var * rng.uniform(0.5, 2.0, var.shape)])
    kernel, bias = net.get_layer("logits").get_weights()
    net.get_layer("logits").set_weights([kernel, bias + rng.normal(0, 0.5, bias.shape)])
    return net


@pytest.fixture(scope="module")
def members():
    return [_trained_like(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (5, IMAGE, IMAGE, 3)).astype("float32")


def _served(members):
    from training.model import served_twin

    return [served_twin(m, 2, IMAGE, INPUT, WIDTH, DEPTH) for m in members]


@pytest.mark.parametrize("count", [2, 3])
def test_the_assembled_model_answers_the_mean_of_its_members_logits(members, images, count):
    from training.model import assemble_ensemble, logits_model, pooled_feature_model

    ensemble = assemble_ensemble(members[:count], 2, IMAGE, INPUT, WIDTH, DEPTH)
    want = np.mean([logits_model(m).predict(images, verbose=0) for m in _served(members[:count])], axis=0)
    np.testing.assert_allclose(logits_model(ensemble).predict(images, verbose=0), want, atol=1e-4)
    single = pooled_feature_model(_served(members[:1])[0]).output.shape[-1]
    assert pooled_feature_model(ensemble).output.shape[-1] == count * single  # the detector sees every member


def test_its_class_maps_are_the_mean_of_its_members_grad_cam(members, images):
    """The exported graph's class maps (GAP -> Dense Grad-CAM) of the ensemble = the members' mean."""
    from contracts.bundle import OUTPUT_CLASS_MAPS, OUTPUT_PROBABILITIES
    from training.model import assemble_ensemble, serving_function

    ensemble = assemble_ensemble(members[:2], 2, IMAGE, INPUT, WIDTH, DEPTH)
    serve, _ = serving_function(ensemble, IMAGE)
    got = serve(images)
    maps = [serving_function(m, IMAGE)[0](images)[OUTPUT_CLASS_MAPS].numpy() for m in _served(members[:2])]
    np.testing.assert_allclose(got[OUTPUT_CLASS_MAPS].numpy(), np.mean(maps, axis=0), atol=1e-4)
    np.testing.assert_allclose(got[OUTPUT_PROBABILITIES].numpy(), ensemble.predict(images, verbose=0), atol=1e-5)


def test_one_member_is_the_single_network(members, images):
    from training.model import assemble_ensemble

    one = assemble_ensemble(members[:1], 2, IMAGE, INPUT, WIDTH, DEPTH)
    assert one.name == "hemaflow_cnn"
    for a, b in zip(one.get_weights(), _served(members[:1])[0].get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("reasons", "wanted", "expected"), [
    (["epochs", "epochs"], 2, "epochs"),
    (["epochs", "early_stopping"], 2, "early_stopping"),
    (["epochs", "time_budget"], 2, "time_budget"),  # a later member the clock cut (left out of the model)
    (["epochs"], 2, "time_budget"),  # the budget left no time for the second member
    (["time_budget"], 1, "time_budget"),
    (["early_stopping"], 1, "early_stopping"),
])
def test_the_run_says_when_the_clock_shaped_the_ensemble(reasons, wanted, expected):
    from training.fitting import ensemble_stop_reason

    assert ensemble_stop_reason(reasons, wanted) == expected


def test_a_champion_from_before_ensembles_counts_as_one_network():
    from contracts.processed import DatasetMeta
    from contracts.settings import Settings
    from training.warm_start import mismatch

    s = Settings(_env_file=None, model_width=16, model_depth=5, model_stain_normalisation="per_image")
    meta = DatasetMeta(dataset="d", dataset_version="v", image_size=IMAGE, labels=["a", "b"],
                       classes={"a": "a", "b": "b"}, positive_label="b", counts={}, shards={}, preprocessing={})
    older = {"labels": "a,b", "model_width": "16", "model_depth": "5", "model_stain_normalisation": "per_image",
             "split_params": "{}"}
    assert mismatch(older, s, meta) is None
    why = mismatch(older, s.model_copy(update={"model_ensemble_size": 2}), meta)
    assert why == "architecture differs (model_ensemble_size: champion 1, candidate 2)"


def test_the_benchmarks_ensemble_tta_read_out_is_what_the_assembled_model_serves(members, images, tmp_path):
    """benchmarks/ensembles.py reads an ensemble's 8-view TTA out of its members' saved per-view logits:
    it must equal the TTA of the one assembled graph (logits averaged per view, then probabilities)."""
    from benchmarks.stain_shift import tta_logits, view_logits
    from benchmarks.threshold_rules import SERVED, member_logits
    from training.model import assemble_ensemble

    ensemble = assemble_ensemble(members[:2], 2, IMAGE, INPUT, WIDTH, DEPTH)
    idx = np.arange(len(images))
    paths = []
    for i, net in enumerate(_served(members[:2])):
        views = view_logits(net, images)
        paths.append([tmp_path / f"member{i}.npz"])
        np.savez(paths[-1][0], val_idx=idx, test_idx=idx, val_logits=views[:, 0], test_logits=views[:, 0],
                 tta_views_val_logits=views, tta_views_test_logits=views,
                 tta_val_logits=tta_logits(views), tta_test_logits=tta_logits(views))
    *_, test, exact = member_logits(paths, 0, SERVED)
    assert exact
    np.testing.assert_allclose(test, tta_logits(view_logits(ensemble, images)), atol=1e-4)

    for member in paths:  # saved before per-view logits were kept: the stand-in, and it says so
        z = dict(np.load(member[0]))
        np.savez(member[0], **{k: v for k, v in z.items() if not k.startswith("tta_views_")})
    *_, stand_in, exact = member_logits(paths, 0, SERVED)
    assert not exact
    assert not np.allclose(stand_in, test, atol=1e-4)

"""Stain handling: the in-model per-image normalisation (training.model), the Macenko lever
(training.stain) and the re-staining
read-outs that benchmarks/accuracy.py --folds uses as an other-lab proxy (benchmarks.stain_shift)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.stain_shift import (
    OTHER_CLASS,
    class_stain_targets,
    from_stains,
    restain,
    scale_stains,
    shifted,
    stain_statistics,
    to_stains,
)


def _smears(n: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    """Pale background with darker purple blobs: something with real stain structure."""
    rng = np.random.default_rng(seed)
    images = np.full((n, size, size, 3), (235, 225, 240), np.float64)
    yy, xx = np.mgrid[:size, :size]
    for image in images:
        for _ in range(3):
            cy, cx, r = rng.integers(4, size - 4, 2).tolist() + [int(rng.integers(3, 7))]
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform((90, 40, 140), (140, 80, 200))
    return np.clip(images + rng.normal(0, 4, images.shape), 0, 255).astype(np.uint8)


def test_stain_space_round_trips_exactly():
    images = _smears()
    assert np.array_equal(from_stains(to_stains(images)), images)
    assert np.array_equal(scale_stains(images, 1.0, 1.0), images)


def test_scaling_haematoxylin_darkens_the_nuclei_not_the_background():
    images = _smears()
    darker = scale_stains(images, 1.3, 1.0)
    background = (images.mean(axis=-1) > 200)
    assert darker[~background].mean() < images[~background].mean() - 5
    assert abs(float(darker[background].mean()) - float(images[background].mean())) < 5


def test_restain_moves_each_image_to_the_target_statistics():
    images = _smears()
    target_mean, target_std = np.array([0.3, 0.05, -0.02]), np.array([0.2, 0.06, 0.03])
    mean, std = stain_statistics(restain(images, target_mean, target_std))
    assert np.allclose(mean, target_mean, atol=0.02)
    assert np.allclose(std, target_std, atol=0.02)


def test_other_class_stain_uses_the_next_class_statistics():
    pale, dark = _smears(6, seed=1), scale_stains(_smears(6, seed=2), 1.6, 1.6)
    images, y = np.concatenate([pale, dark]), np.array([0] * 6 + [1] * 6)
    targets = class_stain_targets(images, y, 2)
    out_mean, _ = stain_statistics(shifted(OTHER_CLASS, images, y, targets))
    for c in (0, 1):  # each class now carries the other class's average stain, not its own
        assert np.allclose(out_mean[y == c], targets[1 - c][0], atol=0.02)
        assert not np.allclose(out_mean[y == c], targets[c][0], atol=0.02)


def test_per_image_stain_normalisation_ignores_a_global_stain_change():
    import keras

    from training.model import STAIN_LAYER, build_model

    images = _smears(3, size=48).astype(np.float32)
    relit = np.clip(images * np.array([0.8, 0.9, 0.7], np.float32) + 10, 0, 255)
    plain = build_model(2, 48, 24, width=4, depth=2, seed=3)
    normalised = build_model(2, 48, 24, width=4, depth=2, seed=3, stain_normalisation="per_image")
    assert len(plain.get_weights()) == len(normalised.get_weights())  # no weights: twins stay twins
    seen = keras.Model(normalised.inputs, normalised.get_layer(STAIN_LAYER).output)
    a, b = seen.predict(images, verbose=0), seen.predict(relit, verbose=0)
    assert np.allclose(a.mean(axis=(1, 2)), 0, atol=1e-4) and np.allclose(a.std(axis=(1, 2)), 1, atol=0.05)
    # What the first convolution sees barely moves (epsilon only); the raw pixels moved a lot.
    assert np.abs(a - b).mean() < 0.02 < np.abs(images - relit).mean() / 255


@pytest.mark.parametrize("stain, layer", [("per_image", "stain_norm"), ("macenko", "stain_macenko")])
def test_served_twin_keeps_the_stain_normalisation(stain, layer):
    from training.model import STAIN_LAYER, build_model, served_twin

    net = build_model(2, 24, 24, width=4, depth=2, seed=3, stain_normalisation=stain)
    served = served_twin(net, 2, 48, 24, width=4, depth=2)  # read from the trained network, not passed
    assert served.get_layer(layer) is not None
    plain = served_twin(build_model(2, 24, 24, width=4, depth=2, seed=3), 2, 48, 24, width=4, depth=2)
    assert STAIN_LAYER not in [layer.name for layer in plain.layers]


def _two_stain_smears(n: int = 4, size: int = 64, seed: int = 0) -> np.ndarray:
    """Built in stain space: eosin discs (red cells) and haematoxylin discs (nuclei) on a blank field."""
    rng = np.random.default_rng(seed)
    stains = np.zeros((n, size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    for image in stains:
        for channel, count, radius, density in ((1, 6, (4, 9), (0.25, 0.45)), (0, 2, (5, 9), (0.5, 0.9))):
            for _ in range(count):
                cy, cx = rng.integers(8, size - 8, 2)
                image[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(*radius) ** 2, channel] = rng.uniform(*density)
    return from_stains(stains + rng.normal(0, 0.01, stains.shape))


@pytest.mark.parametrize("h, e", [(1.3, 0.75), (0.75, 1.3)])
def test_macenko_maps_a_two_stain_shift_mostly_back(h, e):
    from training.stain import macenko

    images = _two_stain_smears()
    moved = scale_stains(images, h, e)
    normalised = macenko(images.astype(np.float32) / 255).numpy()
    assert np.isfinite(normalised).all() and normalised.min() >= 0 and normalised.max() <= 1
    before = np.abs(images / 255 - moved / 255).mean()
    after = np.abs(normalised - macenko(moved.astype(np.float32) / 255).numpy()).mean()
    assert after < before / 2  # per-channel standardisation cannot separate the two stains


def test_macenko_leaves_a_blank_field_unchanged():
    from training.stain import macenko

    blank = np.full((2, 32, 32, 3), 0.9, np.float32)  # no stained pixel: nothing to estimate stains from
    assert np.array_equal(macenko(blank).numpy(), blank)


def test_unknown_stain_normalisation_is_a_clear_error():
    from training.model import build_model

    with pytest.raises(ValueError, match="stain_normalisation"):
        build_model(2, 24, 24, width=4, depth=2, stain_normalisation="vahadane")


def test_settings_and_specs_accept_exactly_the_stain_normalisations_the_model_knows():
    from typing import get_args

    from contracts.dataset_spec import SpecTraining
    from contracts.settings import Settings
    from training.model import STAIN_NORMALISATIONS

    field = Settings.model_fields["model_stain_normalisation"]
    assert set(get_args(field.annotation)) == set(STAIN_NORMALISATIONS)
    in_spec = SpecTraining.model_fields["model_stain_normalisation"].annotation  # Literal[...] | None
    assert {a for arg in get_args(in_spec) for a in get_args(arg)} == set(STAIN_NORMALISATIONS)


def test_stain_invariance_benchmark_reads_a_folder_and_measures_each_normalisation(tmp_path, capsys):
    from PIL import Image

    from benchmarks.stain_invariance import main

    folder = tmp_path / "generated" / "cells"
    folder.mkdir(parents=True)
    for i, image in enumerate(_two_stain_smears(4)):
        Image.fromarray(image).save(folder / f"{i}.png")
    assert main(["--dataset", "generated", "--data", str(tmp_path), "--images", "4", "--size", "64"]) == 0
    table = capsys.readouterr().out.splitlines()[2:]
    movement = {row.split(" | ")[0]: [float(v) for v in row.split(" | ")[1:]] for row in table}
    assert set(movement) == {"none", "per_image", "macenko"}
    for shift in range(2):  # on true two-stain images Macenko hides most of a shift of one stain
        assert movement["macenko"][shift] < movement["none"][shift] / 4  # against the other: per_image cannot

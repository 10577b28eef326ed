"""The `subtypes` lever: a network trained on class folders answers as a label model (summed)."""

from __future__ import annotations

import numpy as np
import pytest

from training.experiment import FolderData, Lever, fit, folder_indices, lever_key, subtype_labels


def _data(n: int = 96) -> FolderData:
    rng = np.random.default_rng(0)
    folders = np.arange(n) % 4  # Benign, Early, Pre, Pro
    y = np.where(folders == 0, 1, 0)  # labels [abnormal, normal]: Benign is normal
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    images[folders == 0, :, :, 0] = 255  # something to learn
    return FolderData(images, y, [f"{i:064x}" for i in range(n)], ["abnormal", "normal"], "abnormal", None, folders)


@pytest.mark.slow
def test_a_folder_model_answers_with_the_labels_summed_probabilities():
    import keras

    from training.calibration import logits_of

    data = _data()
    idx = {"train": np.arange(0, 64), "val": np.arange(64, 80), "test": np.arange(80, 96)}
    lever = Lever(input_size=16, width=4, depth=2, epochs=1, batch_size=16, patience=1, start_epoch=0, subtypes=True)
    model, history, _ = fit(data, idx, lever)
    label_logits = logits_of(model, data.images[idx["test"]])
    assert label_logits.shape == (16, 2) and len(history["loss"]) == 1
    inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    folder_p = keras.ops.convert_to_numpy(keras.ops.softmax(inner.predict(data.images[idx["test"]].astype("float32"),
                                                                          verbose=0)))
    assert folder_p.shape == (16, 4)
    summed = np.stack([folder_p[:, 1:].sum(axis=1), folder_p[:, 0]], axis=1)  # abnormal = Early+Pre+Pro
    assert np.allclose(np.exp(label_logits), summed, atol=1e-5)


def test_folder_labels_and_keys():
    data = _data(8)
    assert subtype_labels(data) == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="class folder"):
        subtype_labels(FolderData(data.images, data.y, data.sha256, data.labels, "abnormal"))
    # Runs saved before the field keep their keys; the lever gets its own.
    assert lever_key("x", "c", Lever()) != lever_key("x", "c", Lever(subtypes=True))


def test_folder_indices_are_found_by_content(tmp_path):
    import hashlib

    from contracts.dataset_spec import parse_spec

    spec = parse_spec('name = "x"\n[classes]\nBenign = "normal"\nEarly = "abnormal"\n')
    for folder, body in (("Benign", b"n"), ("Early", b"e"), ("Early", b"n")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f"{body.decode()}.jpg").write_bytes(body)
    sha = {b: hashlib.sha256(b).hexdigest() for b in (b"n", b"e")}
    assert folder_indices(tmp_path, spec, [sha[b"e"], sha[b"n"]]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="no longer under"):
        folder_indices(tmp_path, spec, ["0" * 64])

"""The out-of-scope detector on real images (skipped when ../shared/data is absent): a small
leukemia model, trained here in-process on real smears, refuses single-cell pbc8 crops (another
modality) and passes held-out leukemia images it was never fitted on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import shared_dataset

pytestmark = pytest.mark.slow

SIZE = 64
LEUKEMIA_ABNORMAL = {"Early", "Pre", "Pro"}


def _prepared(files: list[Path]) -> np.ndarray:
    from contracts.imaging import prepare_image

    return np.stack([prepare_image(p.read_bytes(), SIZE) for p in files])


def _sample(root: Path, count: int, seed: int) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    chosen = np.random.default_rng(seed).choice(len(files), size=min(count, len(files)), replace=False)
    return [files[i] for i in sorted(chosen)]


def test_a_leukemia_model_refuses_pbc8_and_passes_leukemia():
    import keras

    from training.model import build_model
    from training.ood import fit_detector, non_smear_images, pooled_features

    leukemia, pbc8 = shared_dataset("leukemia"), shared_dataset("pbc8")
    files = _sample(leukemia, 1200, seed=1)
    np.random.default_rng(2).shuffle(files)
    x = _prepared(files)
    y = np.array([1 if p.parent.name in LEUKEMIA_ABNORMAL else 0 for p in files])
    (tx, ty), (vx, _), (hx, _) = (x[:800], y[:800]), (x[800:1000], y[800:1000]), (x[1000:], y[1000:])
    model = build_model(2, SIZE, SIZE, width=8, depth=4, seed=3)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(tx.astype(np.float32), ty, epochs=6, batch_size=32, verbose=0)

    detector, figures = fit_detector(model, tx, ty, vx)
    assert figures["val_pass_rate"] >= 0.99

    def refused(images: np.ndarray) -> float:
        return float(np.mean([not v.in_scope for v in detector.check(pooled_features(model, images), images)]))

    assert refused(hx) <= 0.02  # 200 held-out leukemia images: at most 4 refused
    assert refused(_prepared(_sample(pbc8, 300, seed=4))) >= 0.95
    from contracts.imaging import prepare_image
    synthetic = np.stack([prepare_image(p, SIZE) for pics in non_smear_images(10, seed=9).values() for p in pics])
    assert refused(synthetic) >= 0.95

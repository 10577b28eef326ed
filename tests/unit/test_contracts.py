"""The shared kernel stays light: importing every `contracts` module pulls in no heavy library and
no other HemaFlow package (the serving image and DAG parsing rely on it)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import contracts

HEAVY = ("tensorflow", "keras", "mlflow", "boto3", "botocore", "airflow", "great_expectations", "ai_edge_litert")
OTHER_PACKAGES = ("pipeline", "training", "serving", "dags", "ops")


def test_every_contracts_module_imports_without_heavy_libraries_or_other_packages():
    modules = sorted(f"contracts.{m.name}" for m in pkgutil.iter_modules(contracts.__path__))
    assert "contracts.settings" in modules and "contracts.imaging" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert not loaded & set(OTHER_PACKAGES), sorted(loaded & set(OTHER_PACKAGES))


def test_tta_views_average_and_the_threshold_a_bundle_answers_with():
    """contracts.tta: 8 distinct views, view 0 the original; the mean per image; the TTA threshold
    only with TTA and only when the bundle has one (older bundles keep theirs; multiclass: None)."""
    import numpy as np

    from contracts.tta import VIEWS, average, decision_threshold, views

    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    out = views(images)
    assert out.shape == (2 * VIEWS, 4, 4, 3) and np.array_equal(out[0], images[0]) and np.array_equal(out[VIEWS], images[1])
    assert len({v.tobytes() for v in out[:VIEWS]}) == VIEWS
    probs = np.repeat(np.array([[0.2, 0.8], [0.6, 0.4]]), VIEWS, axis=0)
    probs[0], probs[1] = [0.0, 1.0], [0.4, 0.6]
    assert np.allclose(average(probs), [[0.2, 0.8], [0.6, 0.4]])
    meta = {"threshold": 0.7, "tta": {"threshold": 0.6}}
    assert decision_threshold(meta, tta=False) == 0.7 and decision_threshold(meta, tta=True) == 0.6
    assert decision_threshold({"threshold": 0.7}, tta=True) == 0.7
    assert decision_threshold({"threshold": 0.7, "tta": "broken"}, tta=True) == 0.7
    assert decision_threshold({"threshold": None, "tta": {"threshold": None}}, tta=True) is None


def test_a_set_inference_tta_wins_else_the_bundles_own_default():
    from contracts.tta import on_by_default, uses_tta

    assert on_by_default({"tta": {"on_by_default": False}}) is False
    assert on_by_default({"tta": {"threshold": 0.6}}) is True and on_by_default({}) is True  # bundles before it
    assert on_by_default({"tta": "broken"}) is True
    assert [uses_tta(setting, default) for setting in (None, True, False) for default in (True, False)] == [
        True, False, True, True, False, False]

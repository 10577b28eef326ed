"""Ranking, predictions.csv, summary and report of a scored batch (pure functions, no stack)."""

from __future__ import annotations

import csv
import io

from screening.report import predictions_csv, rank_rows, render_report, summarise

BINARY = {"labels": ["abnormal", "normal"], "task": "binary", "positive_label": "abnormal", "threshold": 0.3,
          "model_name": "hemaflow-x", "dataset_version": "dv1"}
MULTI = {"labels": ["a", "b", "c"], "task": "multiclass", "model_name": "hemaflow-y", "dataset_version": "dv2"}


def _row(key: str, label: str | None, conf: float | None, probs: dict | None = None, error: str | None = None,
         in_scope: bool | None = None) -> dict:
    row = {"key": key, "sha256": f"sha-{key}", "label": label, "confidence": conf, "in_scope": in_scope,
           "error": error, "detail": "why" if error else None}
    row.update({f"p_{k}": v for k, v in (probs or {}).items()})
    return row


def test_binary_batches_rank_by_probability_of_the_positive_label_and_list_bad_images_last():
    rows = [_row("k1", "normal", 0.9, {"abnormal": 0.1, "normal": 0.9}),
            _row("bad", None, None, error="truncated"),
            _row("k2", "abnormal", 0.8, {"abnormal": 0.8, "normal": 0.2}),
            _row("k3", "abnormal", 0.35, {"abnormal": 0.35, "normal": 0.65})]
    ranked = rank_rows(rows, BINARY)
    assert [(r["key"], r["rank"]) for r in ranked] == [("k2", 1), ("k3", 2), ("k1", 3), ("bad", None)]


def test_multiclass_batches_rank_lowest_confidence_first():
    rows = [_row("k1", "a", 0.9, {"a": 0.9, "b": 0.05, "c": 0.05}),
            _row("k2", "b", 0.4, {"a": 0.3, "b": 0.4, "c": 0.3}),
            _row("k3", "c", 0.6, {"a": 0.2, "b": 0.2, "c": 0.6})]
    assert [r["key"] for r in rank_rows(rows, MULTI)] == ["k2", "k3", "k1"]


def test_out_of_scope_images_are_listed_apart_and_unranked():
    meta = {**BINARY, "ood": {"threshold": 1.0}}
    rows = [_row("in", "abnormal", 0.7, {"abnormal": 0.7, "normal": 0.3}, in_scope=True),
            _row("out", "abnormal", 0.99, {"abnormal": 0.99, "normal": 0.01}, in_scope=False)]
    ranked = rank_rows(rows, meta)
    assert [(r["key"], r["rank"]) for r in ranked] == [("in", 1), ("out", None)]
    summary = summarise(ranked, meta, dataset="d", batch_id="b", model_version="3", run_id="r", prefix="p/",
                        serving_url="")
    assert summary["n_out_of_scope"] == 1 and summary["out_of_scope"] == ["out"]
    assert summary["counts"] == {"abnormal": 1, "normal": 0}
    assert summary["model_card_url"] is None and summary["review_url"] is None
    assert "Out of scope (1)" in render_report(ranked, summary)


def test_predictions_csv_has_the_contract_columns_then_probabilities_and_empty_cells_for_none():
    rows = rank_rows([_row("k1", "normal", 0.9, {"abnormal": 0.1, "normal": 0.9}),
                      _row("bad", None, None, error="not_an_image")], BINARY)
    parsed = list(csv.DictReader(io.StringIO(predictions_csv(rows, BINARY["labels"]).decode())))
    assert list(parsed[0]) == ["key", "sha256", "label", "confidence", "in_scope", "rank", "error",
                               "p_abnormal", "p_normal"]
    assert parsed[0]["rank"] == "1" and parsed[0]["in_scope"] == "" and parsed[0]["p_normal"] == "0.9"
    assert parsed[1]["error"] == "not_an_image" and parsed[1]["label"] == "" and parsed[1]["rank"] == ""


def test_report_escapes_keys_and_states_what_it_is():
    rows = rank_rows([_row("<script>x</script>", "normal", 0.9, {"abnormal": 0.1, "normal": 0.9}),
                      _row("b&d", None, None, error="truncated")], BINARY)
    summary = summarise(rows, BINARY, dataset="d", batch_id="b1", model_version="2", run_id="r", prefix="p/",
                        serving_url="http://serve:8000/")
    page = render_report(rows, summary)
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page and "b&amp;d" in page
    assert "screening aid, not a diagnosis" in page
    assert "http://serve:8000/v1/model/card" in page and "http://serve:8000/batches/b1" in page
    assert summary["bad_reasons"] == {"truncated": 1} and summary["n_out_of_scope"] is None


def _drift_summary(drift) -> tuple[list[dict], dict]:
    rows = rank_rows([_row("k1", "normal", 0.9, {"abnormal": 0.1, "normal": 0.9})], BINARY)
    summary = summarise(rows, BINARY, dataset="d", batch_id="b1", model_version="2", run_id="r", prefix="p/",
                        serving_url="")
    return rows, {**summary, "drift": drift.to_dict()}


def test_a_bundle_without_profile_makes_the_report_say_drift_was_not_tested_and_why():
    import numpy as np

    from contracts.settings import Settings
    from screening.batch_drift import batch_drift, drift_inputs
    from screening.report import drift_verdict

    class NoProfileBundle:  # a bundle trained before profiles: no data_profile.json among its files
        files = {"bundle.json": b"{}"}

    image = np.full((32, 32, 3), 200, np.uint8)
    rows = [{"key": f"k{i}", "label": "normal", "error": None, **drift_inputs(image, np.ones(4))} for i in range(30)]
    drift = batch_drift(NoProfileBundle(), rows, "batch b1", Settings())
    rows, summary = _drift_summary(drift)
    page = render_report(rows, summary, drift.html_section())
    assert "Drift not tested: the model&#x27;s bundle has no training-data profile" in page
    assert "STRONG DRIFT" not in page and "No drift detected" not in page
    assert drift_verdict(summary["drift"]).startswith("drift NOT TESTED: the model's bundle has no training-data")
    assert drift_verdict(None) == "drift not recorded (scored before drift checks)"


def test_a_strong_drift_is_marked_at_the_top_of_the_report():
    from contracts.drift_checks import DriftCheck, DriftResult
    from screening.report import drift_verdict

    drift = DriftResult("batch b1", 40, "v-train", [
        DriftCheck("colour", True, True, statistic=3.0, p_value=1e-9, effect=3.0, detail="drifted: hue_cos"),
        DriftCheck("features", True, False, p_value=0.4), DriftCheck("label_mix", True, False, p_value=0.5)], 1.5)
    rows, summary = _drift_summary(drift)
    page = render_report(rows, summary, drift.html_section())
    assert page.index("data-drift-banner=strong") < page.index("screening aid, not a diagnosis")
    assert 'data-drift-level="strong"' in page
    assert drift_verdict(summary["drift"]) == ("drift STRONG vs training data v-train "
                                               "(colour DRIFTED p=1e-09, features ok p=0.4, label_mix ok p=0.5)")


def test_the_scoring_code_path_imports_no_tensorflow():
    """The scoring tasks run LiteRT only: every module they import stays free of TensorFlow/Keras."""
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    code = ("import sys, screening.score, screening.champion, screening.batches, screening.report, "
            "screening.batch_drift, contracts.drift, "
            "training.registry, training.evaluate, contracts.gradcam, contracts.bundle, contracts.imaging;"
            "print('HEAVY', [m for m in ('tensorflow', 'keras') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout

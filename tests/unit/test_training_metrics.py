"""Evaluation metrics, the validation threshold and the pure gate decision."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.settings import get_settings
from training.evaluate import (
    choose_threshold,
    classification_report,
    compute_metrics,
    conformal_guarantee_holds,
    expected_calibration_error,
)
from training.gate import decide_gate

LABELS = ["abnormal", "normal"]


def _binary_probs(p_abnormal):
    p = np.asarray(p_abnormal, dtype=float)
    return np.stack([p, 1 - p], axis=1)


def test_threshold_reaches_target_sensitivity_on_the_data_it_was_chosen_on():
    rng = np.random.default_rng(0)
    is_pos = np.r_[np.ones(200, bool), np.zeros(100, bool)]
    scores = np.r_[rng.uniform(0.2, 1.0, 200), rng.uniform(0.0, 0.6, 100)]
    for target in (0.9, 0.98, 1.0):
        t = choose_threshold(is_pos, scores, target)
        sens = np.mean(scores[is_pos] >= t)
        assert sens >= target
        # It is the highest such threshold: any higher one misses the target.
        assert np.mean(scores[is_pos] >= t + 1e-9) < target


def test_conformal_threshold_keeps_the_target_on_unseen_positives_where_the_validation_rule_falls_short():
    # 250 positive validation scores and one unseen positive from the same distribution, 100 000 times:
    # the validation rule lets 2 of 250 fall below it, so an unseen one falls below with probability
    # 3/251 = 0.0120 > 0.01; the conformal rule picks the 2nd lowest, 2/251 = 0.0080 <= 0.01.
    rng = np.random.default_rng(0)
    trials, n, target = 100_000, 250, 0.99
    val = np.sort(rng.random((trials, n)), axis=1)
    unseen = rng.random(trials)
    is_pos = np.ones(n, bool)
    assert choose_threshold(is_pos, val[0], target) == val[0, 2]
    assert choose_threshold(is_pos, val[0], target, "conformal") == val[0, 1]
    missed_validation = np.mean(unseen < val[:, 2])
    missed_conformal = np.mean(unseen < val[:, 1])
    assert 0.0110 < missed_validation < 0.0130  # 3/251, +- 3 standard errors
    assert 0.0070 < missed_conformal < 0.0090 < 1 - target


def test_quantile_threshold_aims_at_the_target_between_the_validation_and_conformal_rules():
    """250 validation positives and one unseen positive, 20 000 times: `quantile` (rank 2.51 of 250,
    interpolated between the 2nd and 3rd lowest in logit space) lets an unseen one fall below with
    probability ~0.0100, between conformal's 2/251 and the validation rule's 3/251."""
    rng = np.random.default_rng(0)
    trials, n, target = 20_000, 250, 0.99
    logits = np.sort(rng.logistic(size=(trials, n)), axis=1)  # logistic logits: the interpolation is exact on them
    val = 1 / (1 + np.exp(-logits))
    unseen = 1 / (1 + np.exp(-rng.logistic(size=trials)))
    is_pos = np.ones(n, bool)
    first = choose_threshold(is_pos, val[0], target, "quantile")
    assert val[0, 1] < first < val[0, 2]
    assert first == pytest.approx(1 / (1 + np.exp(-(logits[0, 1] + 0.51 * (logits[0, 2] - logits[0, 1])))), rel=1e-9)
    thresholds = np.array([choose_threshold(is_pos, v, target, "quantile") for v in val])
    assert 0.0085 < np.mean(unseen < thresholds) < 0.0115  # ~0.0100, +- 2 standard errors; 0.0080 and 0.0120 fail
    few = np.linspace(0.3, 1.0, 50)  # (1 - 0.99) * 51 < 1: the lowest, as conformal
    assert choose_threshold(np.ones(50, bool), few, 0.99, "quantile") == pytest.approx(0.3)
    assert choose_threshold(np.r_[np.zeros(3, bool)], few[:3], 0.99, "quantile") == 0.5  # no positives


def test_conformal_threshold_on_too_few_positives_is_the_lowest_positive_and_rules_are_checked():
    is_pos = np.r_[np.ones(50, bool), np.zeros(10, bool)]
    scores = np.r_[np.linspace(0.3, 1.0, 50), np.linspace(0.0, 0.5, 10)]
    assert choose_threshold(is_pos, scores, 0.99, "conformal") == pytest.approx(0.3)  # floor(0.01 * 51) = 0
    assert choose_threshold(is_pos, scores, 0.9, "conformal") == pytest.approx(scores[4])  # floor(0.1 * 51) = 5
    assert choose_threshold(is_pos, scores, 0.9) == pytest.approx(scores[5])  # 45 of 50 at or above
    with pytest.raises(ValueError, match="threshold rule must be one of"):
        choose_threshold(is_pos, scores, 0.9, "median")
    assert not conformal_guarantee_holds(50, 0.99) and not conformal_guarantee_holds(98, 0.99)
    assert conformal_guarantee_holds(99, 0.99) and conformal_guarantee_holds(9, 0.9)


def test_binary_metrics_on_a_hand_checked_example():
    # 4 abnormal (label 0), 4 normal (label 1); threshold 0.5 on P(abnormal).
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = [0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.7, 0.1]
    m = compute_metrics(y, _binary_probs(p), LABELS, "abnormal", 0.5)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["sensitivity"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.75) and m["balanced_accuracy"] == pytest.approx(0.75)
    # ROC AUC: pairs (pos, neg) ranked correctly = 14 of 16.
    assert m["roc_auc"] == pytest.approx(14 / 16)
    assert m["per_class"]["abnormal"]["precision"] == pytest.approx(0.75)
    assert m["threshold"] == 0.5
    # A lower threshold trades specificity for sensitivity.
    low = compute_metrics(y, _binary_probs(p), LABELS, "abnormal", 0.35)
    assert low["sensitivity"] == 1.0 and low["specificity"] == pytest.approx(0.75)
    assert "abnormal" in classification_report(m, LABELS)


def test_multiclass_metrics_and_calibration():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    # F1: a = 2*0.5*1/1.5, b = 1, c = 2*1*0.5/1.5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert "sensitivity" not in m and 0 <= m["roc_auc"] <= 1
    expected_brier = np.mean(np.sum((probs - np.eye(3)[y]) ** 2, axis=1))
    assert m["brier"] == pytest.approx(expected_brier)
    # Confident and always right: ECE is 0; confident and always wrong: ECE is the confidence.
    assert expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]])) == 0.0
    assert expected_calibration_error(np.array([1, 0]), np.array([[0.9, 0.1], [0.1, 0.9]])) == pytest.approx(0.9)


def _comparison(cand: dict, champ: dict | None = None, **champ_extra) -> dict:
    out = {"task": "binary", "primary_metric": "balanced_accuracy", "candidate": {"version": "2", "metrics": cand},
           "champion": None}
    if champ is not None or champ_extra:
        out["champion"] = {"version": "1", "metrics": champ, **champ_extra}
    return out


GOOD = {"balanced_accuracy": 0.95, "sensitivity": 0.98, "accuracy": 0.96}


def test_gate_floors_margin_and_ties():
    s = get_settings(gate_margin=0.01)
    assert decide_gate(_comparison(GOOD), s)["passed"] is True
    low_sens = {**GOOD, "sensitivity": 0.5}
    decision = decide_gate(_comparison(low_sens), s)
    assert decision["passed"] is False and "sensitivity" in decision["reason"]
    assert decide_gate(_comparison(GOOD, {**GOOD, "balanced_accuracy": 0.93}), s)["passed"] is True
    # Better, but not by the margin; and an exact tie never promotes.
    assert decide_gate(_comparison(GOOD, {**GOOD, "balanced_accuracy": 0.945}), s)["passed"] is False
    tie = decide_gate(_comparison(GOOD, dict(GOOD)), get_settings(gate_margin=0.0))
    assert tie["passed"] is False and "does not beat" in tie["reason"]
    assert decide_gate(_comparison(GOOD, GOOD, same_as_candidate=True), s)["passed"] is False


def test_gate_fails_closed_on_an_incomparable_champion():
    s = get_settings(gate_margin=0.01)
    decision = decide_gate(_comparison(GOOD, None, incomparable="labels differ"), s)
    assert decision["passed"] is False and decision["needs_review"] is True
    assert "needs a person" in decision["reason"] and "--reason" in decision["reason"]
    # Below the floors it is a plain rejection: nothing for a person to decide.
    low = decide_gate(_comparison({**GOOD, "sensitivity": 0.5}, None, incomparable="labels differ"), s)
    assert low["passed"] is False and low["needs_review"] is False and "below floor" in low["reason"]


def test_decision_records_the_champion_it_was_made_against():
    s = get_settings(gate_margin=0.0)
    assert decide_gate(_comparison(GOOD), s)["compared_champion"] is None
    assert decide_gate(_comparison(GOOD, {**GOOD, "balanced_accuracy": 0.9}), s)["compared_champion"] == "1"
    # Also when the floors already reject the candidate.
    assert decide_gate(_comparison({**GOOD, "sensitivity": 0.1}, GOOD), s)["compared_champion"] == "1"


def test_run_overrides_can_raise_but_never_lower_the_gate():
    from training.gate import run_settings

    configured = get_settings(gate_min_balanced_accuracy=0.8, gate_min_sensitivity=0.9, gate_margin=0.01,
                              aws_secret_access_key="configured-secret")
    lowered = {"gate_min_balanced_accuracy": 0.0, "gate_min_sensitivity": 0.0, "gate_margin": 0.0, "epochs": 3}
    run = run_settings(configured, lowered)
    assert (run.gate_min_balanced_accuracy, run.gate_min_sensitivity, run.gate_margin) == (0.8, 0.9, 0.01)
    assert run.epochs == 3 and run.aws_secret_access_key.get_secret_value() == "configured-secret"
    raised = run_settings(configured, {"gate_min_sensitivity": 0.99, "gate_margin": 0.05})
    assert (raised.gate_min_sensitivity, raised.gate_margin) == (0.99, 0.05)
    with pytest.raises(ValueError, match="epochs"):
        run_settings(configured, {"epochs": 0})  # still validated
    weak = {"balanced_accuracy": 0.6, "sensitivity": 0.6, "accuracy": 0.6}
    decision = decide_gate(_comparison(weak), configured, overrides=lowered)
    assert decision["passed"] is False and "below floor" in decision["reason"]
    assert decision["floors"] == {"balanced_accuracy": 0.8, "sensitivity": 0.9}
    beats_by_little = decide_gate(_comparison(GOOD, {**GOOD, "balanced_accuracy": 0.93}), configured,
                                  overrides={"gate_margin": 0.05})
    assert beats_by_little["passed"] is False and beats_by_little["margin"] == 0.05


def test_multiclass_gate_uses_macro_f1_and_accuracy_floor():
    s = get_settings(gate_margin=0.0, gate_min_accuracy=0.9)
    cand = {"macro_f1": 0.91, "balanced_accuracy": 0.9, "accuracy": 0.92}
    comp = {"task": "multiclass", "primary_metric": "macro_f1", "candidate": {"version": "2", "metrics": cand},
            "champion": {"version": "1", "metrics": {**cand, "macro_f1": 0.90, "accuracy": 0.99}}}
    assert decide_gate(comp, s)["passed"] is True
    low = {**cand, "accuracy": 0.85}
    assert decide_gate({**comp, "candidate": {"version": "2", "metrics": low}}, s)["passed"] is False


def test_every_threshold_rule_can_be_set_and_nothing_else():
    """THRESHOLD_RULE and a spec's threshold_rule accept exactly the rules choose_threshold knows; the
    README's configuration for a lab that needs the k-fold target (two networks, quantile) parses."""
    from typing import get_args

    from contracts.dataset_spec import parse_spec
    from contracts.settings import Settings, ThresholdRule
    from training.evaluate import THRESHOLD_RULES

    assert set(get_args(ThresholdRule)) == set(THRESHOLD_RULES)
    assert Settings(_env_file=None, threshold_rule="quantile").threshold_rule == "quantile"
    spec = parse_spec('name = "lab"\npositive_label = "abnormal"\n[training]\nmodel_ensemble_size = 2\n'
                      'threshold_rule = "quantile"\n[classes]\nBlast = "abnormal"\nBenign = "normal"\n')
    assert spec.training == {"model_ensemble_size": 2, "threshold_rule": "quantile"}

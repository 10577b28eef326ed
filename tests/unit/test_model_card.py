"""The model card's HTML from its data (real bootstrap intervals on generated test predictions)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from training.evaluate import compute_metrics
from training.model_card import card_data, render_card


def _fitted(n: int = 80):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    p_abnormal = np.clip(np.where(y == 0, 0.75, 0.25) + rng.normal(0, 0.2, n), 0.01, 0.99)
    probs = np.column_stack([p_abnormal, 1 - p_abnormal])
    labels = ["abnormal", "normal"]
    return SimpleNamespace(test_y=y, test_p=probs, labels=labels, positive_label="abnormal", threshold=0.5,
                           threshold_rule="conformal", target_sensitivity=0.99,
                           test_metrics=compute_metrics(y, probs, labels, "abnormal", 0.5))


def _card(**changes):
    meta = SimpleNamespace(dataset="leukemia", dataset_version="v1", classes={"Benign": "normal", "Pro": "abnormal"},
                           image_size=224, counts={"train": {"abnormal": 50, "normal": 30}, "test": {"abnormal": 40}})
    data = card_data(meta=meta, fitted=_fitted(), model_name="hemaflow-leukemia", run_id="r" * 32, git_commit="abc",
                     credits='Aria M. et al. <script>alert(1)</script>', calibration_png=b"\x89PNG")
    return {**data, **changes}


def test_card_shows_metrics_with_intervals_splits_and_escapes_text():
    data = _card()
    ci = data["intervals"]["sensitivity"]
    assert ci["low"] <= data["metrics"]["sensitivity"] <= ci["high"] and ci["low"] < ci["high"]
    page = render_card(data)
    assert f"{data['metrics']['sensitivity']:.4f}" in page and f"[{ci['low']:.4f}, {ci['high']:.4f}]" in page
    assert "<td>train</td><td>80</td>" in page and "Screening aid, not a diagnosis" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "(run rrrrrrrrrrrr)" in page and "Decided after this card was written" in page


def test_card_after_the_gate_names_version_and_decision():
    page = render_card(_card(version="7", gate={"decision": "failed", "reason": "below floor", "at": "t"}))
    assert "hemaflow-leukemia version 7" in page and "<b>failed</b>" in page and "below floor" in page


def test_card_states_the_out_of_scope_rule():
    figures = {"alpha": 0.005, "conformal_rank": 402, "conformal_valid": 1.0, "pass_bound": 0.99504,
               "val_images": 402, "val_pass_rate": 1.0, "synthetic_refused": 1.0}
    page = render_card(_card(ood=figures))
    assert "rank 402 of 402 validation scores" in page and "at most 0.50%" in page and "99.50%" in page
    assert "too few validation images" in render_card(_card(ood={**figures, "conformal_valid": 0.0}))
    assert "no out-of-scope detector" in render_card(_card())


def test_card_says_how_the_served_model_is_quantized():
    agreement = {"images": 402, "decision_agreement": 1.0, "max_abs_prob_diff": 0.024, "max_feature_diff": 0.014}
    page = render_card(_card(quantization={"method": "dynamic_int8", "validation": agreement}))
    assert "int8 weights" in page and "402 validation images" in page and "100.00%" in page and "0.024" in page
    fallback = render_card(_card(quantization={"method": "none", "requested": "dynamic_int8",
                                               "fallback_reason": "probabilities differ from Keras by 0.2 (> 0.05)",
                                               "validation": {**agreement, "max_abs_prob_diff": 0.2}}))
    assert "float32 weights (int8 was refused: probabilities differ from Keras by 0.2 (&gt; 0.05))" in fallback
    assert "Served model" not in render_card(_card())  # cards from before quantization


def test_card_states_the_tta_figures_and_threshold():
    tta = {"views": 8, "threshold": 0.8123, "validation": {"sensitivity": 0.98},
           "test": {"sensitivity": 0.9756, "specificity": 0.9927, "balanced_accuracy": 0.9841}}
    page = render_card(_card(tta=tta))
    assert "mean over 8 flips" in page and "sensitivity 0.9756" in page and "specificity 0.9927" in page
    assert "compared with 0.8123" in page
    multiclass = render_card(_card(tta={**tta, "threshold": None, "test": {"macro_f1": 0.9723}}))
    assert "macro F1 0.9723" in multiclass and "compared with" not in multiclass
    assert "test-time augmentation" not in render_card(_card())


def test_card_says_how_the_threshold_was_chosen():
    assert "by the split-conformal rule: an unseen abnormal image falls below it with probability at most 0.010" \
        in render_card(_card())
    page = render_card(_card(threshold_rule="validation"))
    assert "0.990 on the validation images themselves" in page and "conformal" in page
    assert "0.990 on unseen images on average (the validation abnormal images' 0.010 quantile)" \
        in render_card(_card(threshold_rule="quantile"))

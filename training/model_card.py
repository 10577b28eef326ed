"""The model card of a registered version: one self-contained HTML page (issue 13 item 5).

`card_data` gathers what the card says into a JSON-able dict at training time (data and dataset
version, split sizes, test metrics with 95 % bootstrap intervals from `training.intervals`, the
calibration plot, the confusion matrix, intended use, limitations, the data's credits from its
spec); `render_card` turns it into HTML. The card rendered at training goes into the signed
serving bundle (MODEL_CARD_FILE, served at /v1/model/card) and into the run's artifacts
(CARD_DIR); `publish_card` re-renders the run's copy with the registered version and, once the
gate has decided, its decision (the bundle's copy is signed before either exists).
"""

from __future__ import annotations

import base64
import html
import json
import logging
from typing import Any

from contracts.bundle import QUANTIZATION_DYNAMIC_INT8

CARD_DIR = "model_card"  # run artifact folder: card.json (the data) and MODEL_CARD_FILE
CARD_JSON = "card.json"
CARD_TAG = "model_card"  # model-version tag: the card's artifact URI
INTENDED_USE = (
    "Screening aid for laboratory staff: ranks blood-smear images so that a qualified person looks at "
    "the suspicious ones first. It is not a diagnosis and must not be used without review of every result."
)
LIMITATIONS = (
    "Trained and tested only on the images of this dataset version (one source, one staining and "
    "acquisition setup); performance on other labs, stains, scanners or magnifications is unknown and "
    "drift against the training data is reported per batch.",
    "The test split is small: the 95 % intervals show how much each figure could move on another sample.",
    "Labels are image-level; the model may use colour or background cues that correlate with the label "
    "in this dataset rather than cell morphology (Grad-CAM heatmaps help a reviewer check).",
    "A CPU-sized network trained from scratch, without pretrained weights.",
)
HEADLINE = ("balanced_accuracy", "sensitivity", "specificity", "accuracy", "roc_auc", "macro_f1")
OTHER = ("pr_auc", "ece", "brier")

log = logging.getLogger("training")


def _rule_text(d: dict[str, Any]) -> str:
    """How the threshold was read off validation, for the card (older cards lack the fields)."""
    if d.get("threshold_rule") is None or d.get("target_sensitivity") is None:
        return ""
    from training.evaluate import THRESHOLD_CONFORMAL, THRESHOLD_QUANTILE

    target, positive = d["target_sensitivity"], html.escape(str(d.get("positive_label")))
    if d["threshold_rule"] == THRESHOLD_CONFORMAL:
        return (f" {target:.3f} by the split-conformal rule: an unseen {positive} image falls below it with "
                f"probability at most {1 - target:.3f}")
    if d["threshold_rule"] == THRESHOLD_QUANTILE:
        return (f" {target:.3f} on unseen images on average (the validation {positive} images' "
                f"{1 - target:.3f} quantile)")
    return (f" {target:.3f} on the validation images themselves (unseen images average a little below it; "
            "THRESHOLD_RULE=conformal guarantees it)")


def card_data(*, meta: Any, fitted: Any, model_name: str, run_id: str, git_commit: str,
              description: str = "", credits: str = "", calibration_png: bytes = b"",
              intervals: dict[str, Any] | None = None, ood: dict[str, Any] | None = None,
              quantization: dict[str, Any] | None = None, tta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the card shows, as JSON-able values (`fitted` is a training.fitting.FitResult;
    `ood` the out-of-scope detector's validation figures, training.ood.fit_detector; `quantization`
    the served model's bundle.json `quantization`, training.bundle.shipped_model; `tta` its
    test-time-augmentation record, training.tta.tta_record)."""
    from training.intervals import bootstrap_intervals

    if intervals is None:
        intervals = bootstrap_intervals(fitted.test_y, fitted.test_p, fitted.labels, fitted.positive_label,
                                        fitted.threshold)
    test = fitted.test_metrics
    return {
        "model_name": model_name, "version": None, "run_id": run_id, "git_commit": git_commit,
        "dataset": meta.dataset, "dataset_version": meta.dataset_version, "description": description,
        "credits": credits, "labels": list(fitted.labels), "classes": dict(meta.classes),
        "positive_label": fitted.positive_label, "threshold": fitted.threshold,
        "threshold_rule": fitted.threshold_rule, "target_sensitivity": fitted.target_sensitivity,
        "image_size": meta.image_size,
        "split_sizes": {split: dict(counts) for split, counts in meta.counts.items()},
        "metrics": {k: test[k] for k in HEADLINE + OTHER if isinstance(test.get(k), (int, float))},
        "intervals": intervals, "test_n": int(test.get("n", len(fitted.test_y))),
        "confusion_matrix": test.get("confusion_matrix"),
        "calibration_png": base64.b64encode(calibration_png).decode() if calibration_png else "",
        "gate": None, "ood": ood, "quantization": quantization, "tta": tta,
    }


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{cells}</table>"


def _metrics_html(d: dict[str, Any]) -> str:
    rows = []
    for name, value in d["metrics"].items():
        ci = d["intervals"].get(name) if d.get("intervals") else None
        interval = f"[{ci['low']:.4f}, {ci['high']:.4f}]" if ci else "—"
        rows.append([html.escape(name), f"{value:.4f}", interval])
    return _table(["figure (test split)", "value", "95 % interval (bootstrap)"], rows)


def _confusion_html(d: dict[str, Any]) -> str:
    cm, labels = d.get("confusion_matrix"), d["labels"]
    if not cm:
        return "<p>not available</p>"
    rows = [[f"<b>{html.escape(labels[i])}</b>", *[str(v) for v in row]] for i, row in enumerate(cm)]
    return _table(["true \\ predicted", *[html.escape(label) for label in labels]], rows)


def _gate_html(gate: dict[str, Any] | None) -> str:
    if not gate:
        return ("<p>Decided after this card was written: the gate compares the version with the champion "
                "on the same test split; its decision and reason are on the version in the MLflow registry "
                "(and in the card re-rendered there). A served model passed it or was promoted by a person.</p>")
    e = html.escape
    return (f'<p class="gate gate-{e(gate.get("decision", ""))}"><b>{e(gate.get("decision", ""))}</b> '
            f'at {e(gate.get("at") or "")}: {e(gate.get("reason") or "")}</p>')


def _ood_html(ood: dict[str, Any] | None) -> str:
    if not ood:
        return "<p>This model carries no out-of-scope detector.</p>"
    rule = (f"split-conformal: thresholds at rank {ood['conformal_rank']} of {ood['val_images']} validation "
            f"scores, so an in-scope image is refused with probability at most {ood['alpha']:.2%} "
            f"(expected pass rate at least {ood['pass_bound']:.2%})" if ood.get("conformal_valid")
            else "the largest validation score (too few validation images for the conformal rank)")
    return (f"<p>Images unlike the training data are refused, not labelled. Thresholds from the validation "
            f"split, {html.escape(rule)}. Validation images passing: {ood.get('val_pass_rate', 0):.2%}; "
            f"generated non-smears refused: {ood.get('synthetic_refused', 0):.2%}.</p>")


def _served_html(q: dict[str, Any] | None) -> str:
    """One sentence on the served model's weights (cards from before quantization say nothing)."""
    if not q:
        return ""
    agreement = q.get("validation")
    figures = (f" On the {agreement['images']} validation images it took the same decision as the float model "
               f"on {agreement['decision_agreement']:.2%} (largest probability difference "
               f"{agreement['max_abs_prob_diff']:.3f}). The test figures below are the float model's; the "
               "promotion gate evaluates the served model itself."
               if agreement else "")
    if q.get("method") == QUANTIZATION_DYNAMIC_INT8:
        return f"<p>Served model: int8 weights (dynamic-range quantization).{html.escape(figures)}</p>"
    reason = f" (int8 was refused: {q['fallback_reason']})" if q.get("fallback_reason") else ""
    return f"<p>Served model: float32 weights{html.escape(reason)}.</p>"


def _tta_html(tta: dict[str, Any] | None) -> str:
    """The served model's figures with test-time augmentation (INFERENCE_TTA) and whether its spec has
    it answer so by default; cards before it: nothing."""
    from contracts.tta import DEFAULT_KEY

    if not tta:
        return ""
    names = {"sensitivity": "sensitivity", "specificity": "specificity", "macro_f1": "macro F1",
             "balanced_accuracy": "balanced accuracy"}
    shown = ", ".join(f"{label} {tta['test'][k]:.4f}" for k, label in names.items() if k in tta.get("test", {}))
    rule = ("" if tta.get("threshold") is None else
            f" With it, P(positive) is compared with {tta['threshold']:.4f}, chosen the same way on the "
            "view-averaged validation probabilities.")
    default = ("" if DEFAULT_KEY not in tta else
               " Its dataset spec has it answer this way by default" if tta[DEFAULT_KEY] else
               " Its dataset spec has it answer from one view by default (the figures above)")
    default += ", unless INFERENCE_TTA is set." if default else ""
    return (f"<p>With test-time augmentation (INFERENCE_TTA: the mean over {tta['views']} flips and "
            f"rotations), on the test split: {html.escape(shown)}.{html.escape(rule)}{html.escape(default)}</p>")


def render_card(d: dict[str, Any]) -> str:
    """The card as one HTML page (inline CSS, the calibration plot inline as a data URI)."""
    e = html.escape
    version = f"version {e(str(d['version']))}" if d.get("version") else f"(run {e(d['run_id'][:12])})"
    splits = d["split_sizes"]
    split_rows = [[e(s), str(sum(c.values())), e(", ".join(f"{k} {v}" for k, v in sorted(c.items())))]
                  for s, c in splits.items()]
    threshold = "" if d.get("threshold") is None else (
        f"<p>Decision threshold on P({e(str(d['positive_label']))}): {d['threshold']:.4f}, chosen on the "
        f"validation split for the target sensitivity{_rule_text(d)}.</p>")
    plot = (f'<img alt="calibration plot" src="data:image/png;base64,{d["calibration_png"]}">'
            if d.get("calibration_png") else "<p>not available</p>")
    classes = ", ".join(f"{e(k)} → {e(v)}" for k, v in sorted(d["classes"].items()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Model card: {e(d['model_name'])} {version}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:1em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}
.warn{{background:#fff3cd;padding:.5em;border-left:4px solid #b36b00}}img{{max-width:24em}}</style></head>
<body><h1>Model card: {e(d['model_name'])} {version}</h1>
<p class="warn"><b>Screening aid, not a diagnosis.</b> Every result must be reviewed by a qualified person.</p>
<h2>Model</h2><p>Run {e(d['run_id'])}, code {e(d.get('git_commit') or '')}. Labels: {e(', '.join(d['labels']))}
(classes: {classes}). Input: {d['image_size']}×{d['image_size']} RGB.</p>{threshold}{_served_html(d.get('quantization'))}
<h2>Data</h2><p>Dataset <b>{e(d['dataset'])}</b> ({e(d.get('description') or '')}), version
<code>{e(d['dataset_version'])}</code>.</p>{_table(['split', 'images', 'per label'], split_rows)}
<h2>Performance</h2><p>On the held-out test split ({d['test_n']} images), intervals by percentile bootstrap
over images.</p>{_metrics_html(d)}{_tta_html(d.get('tta'))}
<h3>Confusion matrix (test)</h3>{_confusion_html(d)}
<h3>Calibration (test)</h3>{plot}
<h2>Out-of-scope images</h2>{_ood_html(d.get('ood'))}
<h2>Gate decision</h2>{_gate_html(d.get('gate'))}
<h2>Intended use</h2><p>{e(INTENDED_USE)}</p>
<h2>Limitations</h2><ul>{''.join(f'<li>{e(x)}</li>' for x in LIMITATIONS)}</ul>
<h2>Data credits</h2><p>{e(d.get('credits') or 'not given in the dataset spec')}</p>
</body></html>
"""


def training_card(s: Any, meta: Any, fitted: Any, run_id: str, model_name: str, commit: str,
                  ood: dict[str, Any] | None = None, quantization: dict[str, Any] | None = None,
                  tta: dict[str, Any] | None = None) -> dict[str, Any]:
    """card_data for a just-fitted model: spec description and credits, the calibration plot, the
    detector, the served model's quantization and TTA figures."""
    import tempfile
    from pathlib import Path

    from contracts.dataset_spec import SpecError, load_spec
    from training import evaluate as ev

    try:
        spec = load_spec(meta.dataset, s.dataset_specs_dir)
        description, credits = spec.description, spec.credits
    except SpecError:
        description, credits = "", ""
    with tempfile.TemporaryDirectory(prefix="hemaflow-card-") as tmp:
        png = ev.plot_calibration(fitted.test_y, fitted.test_p, Path(tmp) / "calibration.png").read_bytes()
    return card_data(meta=meta, fitted=fitted, model_name=model_name, run_id=run_id, git_commit=commit,
                     description=description, credits=credits, calibration_png=png, ood=ood,
                     quantization=quantization, tta=tta)


def log_card(client: Any, run_id: str, data: dict[str, Any]) -> str:
    """card.json and the rendered card under the run's CARD_DIR; returns the card's artifact path."""
    from contracts.bundle import MODEL_CARD_FILE

    client.log_text(run_id, json.dumps(data, indent=1, sort_keys=True), f"{CARD_DIR}/{CARD_JSON}")
    client.log_text(run_id, render_card(data), f"{CARD_DIR}/{MODEL_CARD_FILE}")
    return f"{CARD_DIR}/{MODEL_CARD_FILE}"


def publish_card(client: Any, model_name: str, version: str) -> str:
    """Re-render the run's card with the version number and its gate decision (if any); tag the version."""
    mv = client.get_model_version(model_name, str(version))
    data = json.loads(_read_artifact(client, mv.run_id, f"{CARD_DIR}/{CARD_JSON}"))
    data["version"] = str(mv.version)
    from training.registry import TAG_GATE_DECISION

    tags = mv.tags or {}
    if tags.get(TAG_GATE_DECISION):
        data["gate"] = {"decision": tags[TAG_GATE_DECISION], "reason": tags.get("gate_reason", ""),
                        "at": tags.get("gate_at", "")}
    path = log_card(client, mv.run_id, data)
    client.set_model_version_tag(model_name, str(mv.version), CARD_TAG, f"runs:/{mv.run_id}/{path}")
    return path


def _read_artifact(client: Any, run_id: str, path: str) -> str:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="hemaflow-card-") as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_text(encoding="utf-8")


def publish_card_quietly(client: Any, model_name: str, version: str) -> str | None:
    """publish_card for the gate: a card that cannot be re-rendered is logged, never blocks a decision."""
    try:
        return publish_card(client, model_name, version)
    except Exception as exc:  # noqa: BLE001 - e.g. a version trained before cards existed
        log.warning("model card of %s version %s not re-rendered: %s", model_name, version, exc)
        return None

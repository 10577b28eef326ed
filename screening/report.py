"""The batch's outputs from its scored rows: ranking, predictions.csv, summary.json, report.html.

Ranking puts what a reviewer should see first on top: P(positive) high to low for a binary
task, confidence low to high for a multi-class task. Images the out-of-scope detector refused
(only once bundles carry one) and images that could not be read are listed apart, unranked.
Pure functions of rows and bundle.json: no I/O here.
"""

from __future__ import annotations

import csv
import html
import io
from collections import Counter
from typing import Any

from contracts.screening import (
    HEATMAPS_DIR,
    PREDICTION_COLUMNS,
    PREDICTIONS_FILE,
    REPORT_FILE,
    THUMBNAILS_DIR,
    heatmap_key,
    thumbnail_key,
)

DISCLAIMER = "HemaFlow is a screening aid, not a diagnosis. Every result must be reviewed by a qualified person."
MODEL_CARD_PATH = "/v1/model/card"
REVIEW_PATH = "/batches/"


def _ranking(meta: dict) -> tuple[str, Any]:
    """(description, sort key) of the review order for this bundle's task."""
    positive = meta.get("positive_label")
    if meta.get("task") == "binary" and positive in meta["labels"]:
        return f"P({positive}) high to low", lambda r: (-float(r[f"p_{positive}"]), r["key"])
    return "confidence low to high", lambda r: (float(r["confidence"]), r["key"])


def rank_rows(rows: list[dict], meta: dict) -> list[dict]:
    """Ranked in-scope rows (rank 1..n), then refused (in_scope False), then unreadable; new dicts."""
    _, order = _ranking(meta)
    scored = [r for r in rows if not r.get("error")]
    ranked = sorted((r for r in scored if r.get("in_scope") is not False), key=order)
    refused = sorted((r for r in scored if r.get("in_scope") is False), key=order)
    bad = sorted((r for r in rows if r.get("error")), key=lambda r: r["key"])
    return ([{**r, "rank": i} for i, r in enumerate(ranked, start=1)]
            + [{**r, "rank": None} for r in refused + bad])


def predictions_csv(rows: list[dict], labels: list[str]) -> bytes:
    """The contract columns, then `p_<label>` per label; empty cells for None."""
    columns = list(PREDICTION_COLUMNS) + [f"p_{label}" for label in labels]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return buf.getvalue().encode("utf-8")


def summarise(rows: list[dict], meta: dict, *, dataset: str, batch_id: str, model_version: str, run_id: str,
              prefix: str, serving_url: str, tta: bool = False) -> dict:
    """summary.json: what was scored by which model (and whether with TTA, whose threshold then
    applies), counts per label, the lists apart, the links."""
    from contracts.common import utc_now
    from contracts.tta import decision_threshold

    ranked = [r for r in rows if r["rank"] is not None]
    refused = [r for r in rows if r["rank"] is None and not r.get("error")]
    bad = [r for r in rows if r.get("error")]
    base = serving_url.rstrip("/")
    return {
        "dataset": dataset,
        "batch_id": batch_id,
        "model_name": meta.get("model_name"),
        "model_version": str(model_version),
        "run_id": run_id,
        "dataset_version": meta.get("dataset_version"),
        "task": meta.get("task"),
        "labels": list(meta["labels"]),
        "positive_label": meta.get("positive_label"),
        "threshold": decision_threshold(meta, tta),
        "tta": tta,
        "ranking": _ranking(meta)[0],
        "has_detector": bool(meta.get("ood")),
        "n_images": len(rows),
        "n_scored": len(ranked) + len(refused),
        "n_bad": len(bad),
        "n_out_of_scope": len(refused) if meta.get("ood") else None,
        "counts": {label: sum(1 for r in ranked if r["label"] == label) for label in meta["labels"]},
        "bad_reasons": dict(Counter(r["error"] for r in bad)),
        "bad": [{"key": r["key"], "error": r["error"], "detail": r.get("detail")} for r in bad],
        "out_of_scope": [r["key"] for r in refused],
        "prefix": prefix,
        "files": {"predictions": PREDICTIONS_FILE, "report": REPORT_FILE, "thumbnails": f"{THUMBNAILS_DIR}/",
                  "heatmaps": f"{HEATMAPS_DIR}/"},
        "model_card_url": f"{base}{MODEL_CARD_PATH}" if base else None,
        "review_url": f"{base}{REVIEW_PATH}{batch_id}" if base else None,
        "disclaimer": DISCLAIMER,
        "scored_at": utc_now(),
    }


_STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.6em 1em;border-radius:4px}
.strong-drift{background:#b00020;color:#fff;padding:.8em 1em;border-radius:4px;font-size:1.1em}
.strong-drift a{color:#fff}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}
img{width:96px;height:96px;image-rendering:auto}.num{text-align:right;font-variant-numeric:tabular-nums}"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _image_rows(rows: list[dict], labels: list[str]) -> str:
    out = []
    for r in rows:
        probs = " ".join(f"{_e(label)} {float(r[f'p_{label}']):.3f}" for label in labels)
        out.append(
            f"<tr><td class=num>{_e(r['rank'])}</td>"
            f"<td><img loading=lazy alt=image src='{_e(thumbnail_key('', r['sha256']))}'></td>"
            f"<td><img loading=lazy alt=Grad-CAM src='{_e(heatmap_key('', r['sha256']))}'></td>"
            f"<td><b>{_e(r['label'])}</b></td><td class=num>{float(r['confidence']):.3f}</td>"
            f"<td>{probs}</td><td>{_e(r['key'].rsplit('/', 1)[-1])}</td></tr>")
    return "".join(out)


def drift_verdict(drift: dict | None) -> str:
    """One line for the task log and the CLI from summary.json's `drift` (DriftResult.to_dict())."""
    if not drift:
        return "drift not recorded (scored before drift checks)"
    checks = drift.get("checks") or []
    if not drift.get("tested"):
        reasons = "; ".join(dict.fromkeys(c["detail"] for c in checks)) or "no test ran"
        return f"drift NOT TESTED: {reasons}"
    parts = ", ".join(f"{c['name']} {'DRIFTED' if c['drifted'] else 'ok'}" + (f" p={c['p_value']:.3g}"
                                                                               if c.get("p_value") is not None else "")
                      for c in checks if c["tested"])
    return f"drift {drift['level'].upper()} vs training data {drift.get('reference') or '?'} ({parts})"


def _drift_banner(drift: dict | None) -> str:
    """The mark at the top of the report: loud for a strong drift, a line otherwise."""
    if not drift:
        return ""
    if drift.get("tested") and drift["level"] == "strong":
        return ("<p class=strong-drift data-drift-banner=strong><b>STRONG DRIFT: these images differ markedly "
                "from the model's training data; treat every result below with extra caution.</b> "
                "<a href='#drift'>Details</a></p>")
    return f"<p data-drift-banner>{_e(drift_verdict(drift))} <a href='#drift'>Details</a></p>"


def render_report(rows: list[dict], summary: dict, drift_html: str = "") -> str:
    """A self-contained page (previews by relative path, next to it under the results prefix);
    `drift_html` is the batch's DriftResult.html_section()."""
    labels = summary["labels"]
    ranked = [r for r in rows if r["rank"] is not None]
    refused = [r for r in rows if r["rank"] is None and not r.get("error")]
    head = "<tr><th>#</th><th>image</th><th>Grad-CAM</th><th>label</th><th>confidence</th><th>probabilities</th><th>file</th></tr>"
    counts = "".join(f"<tr><td>{_e(k)}</td><td class=num>{v}</td></tr>" for k, v in summary["counts"].items())
    bad = "".join(f"<tr><td>{_e(b['key'])}</td><td>{_e(b['error'])}</td><td>{_e(b['detail'])}</td></tr>"
                  for b in summary["bad"])
    links = []
    if summary.get("model_card_url"):
        links.append(f"<a href='{_e(summary['model_card_url'])}'>model card</a>")
    if summary.get("review_url"):
        links.append(f"<a href='{_e(summary['review_url'])}'>review this batch</a>")
    if summary["has_detector"]:
        scope = (f"<h2>Out of scope ({len(refused)})</h2><p>Refused by the bundle's out-of-scope detector; "
                 f"not ranked.</p><table>{head}{_image_rows(refused, labels)}</table>")
    else:
        scope = "<p>This model has no out-of-scope detector: every readable image is ranked.</p>"
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8>
<title>HemaFlow batch {_e(summary['batch_id'])} ({_e(summary['dataset'])})</title><style>{_STYLE}</style></head><body>
<h1>Batch {_e(summary['batch_id'])} <small>({_e(summary['dataset'])})</small></h1>
{_drift_banner(summary.get('drift'))}
<p class=warn><b>{_e(DISCLAIMER)}</b></p>
<p>Model {_e(summary['model_name'])} version <b>{_e(summary['model_version'])}</b> (dataset version
{_e(summary['dataset_version'])}, run {_e(summary['run_id'])}); scored {_e(summary['scored_at'])}.
{' · '.join(links)}</p>
<p>{summary['n_images']} images: {summary['n_scored']} scored, {summary['n_bad']} unreadable.
Ranked by {_e(summary['ranking'])}.</p>
<h2>Counts per predicted label</h2><table>{counts}</table>
<div id=drift>{drift_html}</div>
<h2>Ranked images ({len(ranked)})</h2><table>{head}{_image_rows(ranked, labels)}</table>
{scope}
<h2>Unreadable images ({summary['n_bad']})</h2><table><tr><th>key</th><th>reason</th><th>detail</th></tr>{bad}</table>
</body></html>
"""

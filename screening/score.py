"""Batch scoring: plan a batch into chunks, score each chunk, then write the batch's results.

    plan_batches  -> chunks   which batches need a result for the current @champion, in chunks
                              of SCORE_CHUNK_SIZE keys (the DAG maps one task per chunk)
    score_chunk   -> rows     every image of a chunk: same `prepare_image` as serving, LiteRT,
                              thumbnail + Grad-CAM heatmap; rows saved as `_chunks/<first>.jsonl`,
                              each with what drift needs (colour statistics, pooled features)
    finish_batch  -> summary  drift against the champion's training profile, predictions.csv,
                              report.html, the batch's MLflow run (screening.tracking), then
                              summary.json (the completion marker)

Idempotent per (batch, model version): a batch whose summary.json exists is not scored again,
and a chunk file that exists (an Airflow retry) is reused (one written before drift inputs were
kept is scored again). A bad image is a row with its reason, never a failed batch. Tasks pass
S3 keys and versions, never pixels; drift's per-image inputs travel in the chunk files.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from contracts.screening import results_prefix
from contracts.settings import Settings, get_settings
from screening.champion import ChampionRef, ScoringModel

log = logging.getLogger(__name__)

CHUNKS_DIR = "_chunks"
PREVIEW_SIDE = 128  # thumbnails and heatmaps: small enough for a page of hundreds
PREVIEW_QUALITY = 85
PROGRESS_EVERY = 25  # images between progress lines in the task log


@dataclass(frozen=True)
class PreparedScore:
    """What the model says about one prepared image."""

    probabilities: Any  # (C,) float
    label: str
    confidence: float  # probability of `label`
    in_scope: bool | None  # None: the bundle has no out-of-scope detector
    class_map: Any  # (h, w) Grad-CAM map of `label`
    features: Any = None  # (K,) pooled features; None: the bundle's model has no features output


def score_prepared(model: ScoringModel, image) -> PreparedScore:
    """Score one prepared (S,S,3) image: the one place a batch image meets the model.

    The label follows serving's rule (binary: P(positive) >= the bundle's threshold; else argmax).
    With `model.tta` the probabilities are the mean over the 8 views (`contracts.tta`, one call), the
    Grad-CAM map and features the original's, as in serving. `in_scope` is the bundle's
    out-of-scope detector's verdict on the same outputs (serving's rule); None when the bundle has
    no detector (no `ood` in bundle.json)."""
    from contracts.bundle import OUTPUT_CLASS_MAPS, OUTPUT_FEATURES, OUTPUT_PROBABILITIES
    from contracts.tta import average, views
    from training.evaluate import predict_labels

    outputs = model.runner(views(image[None]) if model.tta else image[None])  # every named output
    probs, class_maps = outputs[OUTPUT_PROBABILITIES], outputs[OUTPUT_CLASS_MAPS]
    if model.tta:
        probs = average(probs)
    idx = int(predict_labels(probs, model.labels, model.positive_label, model.threshold)[0])
    features = outputs.get(OUTPUT_FEATURES)
    in_scope = None
    if model.detector is not None and features is not None:
        in_scope = bool(model.detector.check(features[:1], image[None])[0].in_scope)
    return PreparedScore(probs[0], model.labels[idx], float(probs[0][idx]), in_scope, class_maps[0][..., idx],
                         None if features is None else features[0])


def _jpeg(rgb) -> bytes:
    from PIL import Image

    img = Image.fromarray(rgb)
    if img.width > PREVIEW_SIDE:
        img = img.resize((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=PREVIEW_QUALITY)
    return buf.getvalue()


def _read_image(client, key: str, s: Settings) -> bytes:
    """The object's bytes, refusing (ImageRejected) more than MAX_FILE_BYTES without reading them."""
    from contracts.imaging import ImageRejected

    obj = client.get_object(Bucket=s.s3_bucket, Key=key)
    size = int(obj.get("ContentLength") or 0)
    if size > s.max_file_bytes:
        obj["Body"].close()
        raise ImageRejected("file_too_large", f"{size} bytes exceeds MAX_FILE_BYTES ({s.max_file_bytes})")
    return obj["Body"].read()


def score_key(client, key: str, model: ScoringModel, results: str, s: Settings) -> dict:
    """One image of the batch -> its row; previews go under `results`. Never raises for bad input."""
    from contracts import gradcam
    from contracts.common import sha256_hex
    from contracts.imaging import ImageRejected, prepare_image
    from contracts.screening import heatmap_key, thumbnail_key
    from pipeline.storage import put_bytes
    from screening.batch_drift import drift_inputs

    row: dict[str, Any] = {"key": key, "sha256": None, "label": None, "confidence": None, "in_scope": None,
                           "error": None, "detail": None, "tta": model.tta}
    try:
        data = _read_image(client, key, s)
        row["sha256"] = sha256_hex(data)
        image = prepare_image(data, model.image_size, max_pixels=s.max_image_pixels, crop=model.crop)
    except ImageRejected as exc:
        return {**row, "error": exc.reason, "detail": exc.detail[:300]}
    scored = score_prepared(model, image)
    row.update(label=scored.label, confidence=round(scored.confidence, 6), in_scope=scored.in_scope)
    row.update({f"p_{label}": round(float(p), 6) for label, p in zip(model.labels, scored.probabilities)})
    row.update(drift_inputs(image, scored.features))
    put_bytes(client, s.s3_bucket, thumbnail_key(results, row["sha256"]), _jpeg(image), "image/jpeg")
    put_bytes(client, s.s3_bucket, heatmap_key(results, row["sha256"]),
              _jpeg(gradcam.overlay(image, scored.class_map)), "image/jpeg")
    return row


def chunk_key(dataset: str, batch_id: str, model_version: str, first: int) -> str:
    return f"{results_prefix(dataset, batch_id, model_version)}{CHUNKS_DIR}/{first:07d}.jsonl"


def plan_batches(dataset: str, batch_ids: list[str] | None = None, settings: Settings | None = None) -> dict:
    """Which batches to score with the current @champion, cut into chunks of SCORE_CHUNK_SIZE keys.

    `batch_ids` None: every inbox batch without a complete result for the champion.
    Returns {model_version, run_id, tta, chunks: [{dataset, batch_id, model_version, run_id, tta, first,
    keys}], complete: [ids already scored], empty: [ids with no object]}. `tta` (INFERENCE_TTA, or
    when unset the champion bundle's own default) is pinned here like the version, so every chunk of
    a run scores the same way.
    """
    from pipeline.storage import object_exists, s3_client
    from screening.batches import batch_keys, list_batches, summary_key
    from screening.champion import champion_uses_tta, resolve_champion

    s = settings or get_settings()
    client = s3_client(s)
    ref = resolve_champion(dataset, s)
    wanted = list_batches(client, dataset, s) if batch_ids is None else sorted(set(batch_ids))
    plan: dict[str, Any] = {"model_version": ref.version, "run_id": ref.run_id, "tta": champion_uses_tta(ref, s),
                            "chunks": [], "complete": [], "empty": []}
    for batch_id in wanted:
        if object_exists(client, s.s3_bucket, summary_key(dataset, batch_id, ref.version)):
            plan["complete"].append(batch_id)
            continue
        keys = batch_keys(client, dataset, batch_id, s)
        if not keys:
            plan["empty"].append(batch_id)
            continue
        size = s.score_chunk_size
        plan["chunks"] += [{"dataset": dataset, "batch_id": batch_id, "model_version": ref.version,
                            "run_id": ref.run_id, "tta": plan["tta"], "first": i, "keys": keys[i:i + size]}
                           for i in range(0, len(keys), size)]
        log.info("batch %s: %d images in %d chunks of <= %d for %s v%s", batch_id, len(keys),
                 math.ceil(len(keys) / size), size, ref.model_name, ref.version)
    for batch_id in plan["complete"]:
        log.info("batch %s: already scored by v%s (summary.json exists): nothing to do", batch_id, ref.version)
    for batch_id in plan["empty"]:
        log.warning("batch %s: no object under its inbox prefix: nothing to score", batch_id)
    return plan


def score_chunk(chunk: dict, settings: Settings | None = None, model: ScoringModel | None = None) -> dict:
    """Score one planned chunk; its rows go to `_chunks/<first>.jsonl` (reused when it exists for
    the same keys and TTA mode: an Airflow retry, or a run after one that stopped half-way).

    Returns {dataset, batch_id, model_version, run_id, tta, chunk_key, scored, bad}."""
    from pipeline.storage import get_jsonl, object_exists, put_jsonl, s3_client
    from screening.batch_drift import has_drift_inputs
    from screening.champion import load_scoring_model

    s = settings or get_settings()
    client = s3_client(s)
    key = chunk_key(chunk["dataset"], chunk["batch_id"], chunk["model_version"], chunk["first"])
    tta = bool(chunk.get("tta", False))  # chunks planned before TTA existed scored without it
    rows = get_jsonl(client, s.s3_bucket, key) if object_exists(client, s.s3_bucket, key) else None
    if (rows is not None and [r["key"] for r in rows] == list(chunk["keys"]) and has_drift_inputs(rows)
            and all(bool(r.get("tta", False)) == tta for r in rows)):
        log.info("chunk %s already scored (%d rows): reused", key, len(rows))
    else:
        ref = ChampionRef(s.model_name(chunk["dataset"]), str(chunk["model_version"]), chunk["run_id"])
        if model is None or model.tta != tta:
            model = load_scoring_model(ref, s, tta)
        rows = _score_keys(client, chunk, model, s)
        put_jsonl(client, s.s3_bucket, key, rows)
    bad = sum(1 for r in rows if r["error"])
    return {k: chunk[k] for k in ("dataset", "batch_id", "model_version", "run_id")} | {
        "tta": tta, "chunk_key": key, "scored": len(rows) - bad, "bad": bad}


def _score_keys(client, chunk: dict, model: ScoringModel, s: Settings) -> list[dict]:
    """The chunk's rows, with a progress line in the log every PROGRESS_EVERY images."""
    results = results_prefix(chunk["dataset"], chunk["batch_id"], chunk["model_version"])
    keys, rows, started = chunk["keys"], [], time.monotonic()
    for i, image_key in enumerate(keys, start=1):
        rows.append(score_key(client, image_key, model, results, s))
        if i % PROGRESS_EVERY == 0 or i == len(keys):
            log.info("batch %s images %d-%d: %d/%d scored (%.1f img/s)", chunk["batch_id"], chunk["first"] + 1,
                     chunk["first"] + len(keys), i, len(keys), i / max(time.monotonic() - started, 1e-6))
    return rows


def finish_batches(chunk_results: list[dict], settings: Settings | None = None) -> list[dict]:
    """The reduce step: one `finish_batch` per (batch, model version) among the chunk results."""
    groups: dict[tuple, list[dict]] = {}
    for done in chunk_results:
        groups.setdefault((done["dataset"], done["batch_id"], str(done["model_version"]), done["run_id"]), []).append(done)
    return [finish_batch(*group, sorted(c["chunk_key"] for c in chunks), settings=settings,
                         tta=any(c.get("tta", False) for c in chunks))
            for group, chunks in sorted(groups.items())]


def finish_batch(dataset: str, batch_id: str, model_version: str, run_id: str, chunk_keys: list[str],
                 settings: Settings | None = None, tta: bool = False) -> dict:
    """Drift, predictions.csv, report.html, then summary.json last (the completion marker); an
    existing summary wins. `tta`: the chunks were scored with test-time augmentation."""
    from contracts.screening import PREDICTIONS_FILE, REPORT_FILE
    from pipeline.storage import get_json_or_none, get_jsonl, put_bytes, put_json, s3_client
    from screening.batch_drift import batch_drift
    from screening.batches import summary_key
    from screening.report import drift_verdict, predictions_csv, rank_rows, render_report, summarise
    from screening.champion import champion_bundle
    from screening.tracking import log_batch_run

    s = settings or get_settings()
    client = s3_client(s)
    marker = summary_key(dataset, batch_id, model_version)
    existing = get_json_or_none(client, s.s3_bucket, marker)
    if existing is not None:
        log.info("batch %s already has %s: not rewritten; %s", batch_id, marker, drift_verdict(existing.get("drift")))
        return {**existing, "reused": True}
    bundle = champion_bundle(run_id, s)
    meta = bundle.meta
    rows = rank_rows([row for key in chunk_keys for row in get_jsonl(client, s.s3_bucket, key)], meta)
    prefix = results_prefix(dataset, batch_id, model_version)
    summary = summarise(rows, meta, dataset=dataset, batch_id=batch_id, model_version=model_version,
                        run_id=run_id, prefix=prefix, serving_url=s.serving_url, tta=tta)
    drift = batch_drift(bundle, rows, f"batch {batch_id}", s)
    summary["drift"] = drift.to_dict()
    log.info("batch %s: %s", batch_id, drift_verdict(summary["drift"]))
    put_bytes(client, s.s3_bucket, prefix + PREDICTIONS_FILE, predictions_csv(rows, meta["labels"]), "text/csv")
    put_bytes(client, s.s3_bucket, prefix + REPORT_FILE, render_report(rows, summary, drift.html_section()).encode("utf-8"),
              "text/html; charset=utf-8")
    summary["mlflow_run_id"] = log_batch_run(summary, drift, s)  # before the marker: a re-run finds it by tags
    put_json(client, s.s3_bucket, marker, summary)
    log.info("batch %s scored by %s v%s: %s; bad %d; report s3://%s/%s", batch_id, summary["model_name"],
             model_version, summary["counts"], summary["n_bad"], s.s3_bucket, prefix + REPORT_FILE)
    return {**summary, "reused": False}


def score_batch(dataset: str, batch_id: str | None = None, settings: Settings | None = None) -> list[dict]:
    """Plan, score and finish in this process (the CLI): one summary per batch scored or found complete."""
    from pipeline.storage import get_json, s3_client
    from screening.batches import summary_key

    s = settings or get_settings()
    plan = plan_batches(dataset, None if batch_id is None else [batch_id], s)
    model = None
    if plan["chunks"]:
        from screening.champion import load_scoring_model

        model = load_scoring_model(ChampionRef(s.model_name(dataset), plan["model_version"], plan["run_id"]), s,
                                   plan["tta"])
    done = finish_batches([score_chunk(chunk, s, model) for chunk in plan["chunks"]], s)
    client = s3_client(s)
    reused = [{**get_json(client, s.s3_bucket, summary_key(dataset, b, plan["model_version"])), "reused": True}
              for b in plan["complete"]]
    return done + reused

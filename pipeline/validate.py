"""Validate: per-image checks, a Great Expectations suite on the manifest, quarantine.

Per-image checks (a failure quarantines that image, with a reason), applied to the facts
ingest recorded when it decoded each new image (older rows are decoded again here):
  decodes completely (zero-byte, non-image, truncated and corrupt files fail), format in
  ALLOWED_FORMATS, convertible to RGB, both sides within [MIN_IMAGE_SIDE, MAX_IMAGE_SIDE],
  file size within [MIN_FILE_BYTES, MAX_FILE_BYTES], declared pixels <= MAX_IMAGE_PIXELS
  (decompression-bomb guard, checked from the header before any pixel is decoded).
Mode policy: CMYK, 16-bit greyscale and palette-with-alpha images are ACCEPTED and
converted by `imaging.to_rgb` (CMYK -> RGB, 16-bit scaled to 8-bit, alpha composited on
white), because stain colours survive these conversions; modes Pillow cannot convert fail.
Duplicates (same sha256): same label -> the first key is kept, the others are reported;
conflicting labels -> every copy is quarantined (`conflicting_labels`): we cannot know which
label is right.

Dataset checks (Great Expectations 1.x, ephemeral context, pandas batch) on the rows that
passed the image checks: labels in the spec, no nulls, sha256 unique (severity warning:
duplicates are reported and resolved as above), every label present, at least
MIN_IMAGES_PER_CLASS per label, largest/smallest label <= MAX_CLASS_IMBALANCE, at least
MIN_DATASET_ROWS rows. The stage raises ValidationFailed when more than MAX_BAD_FRACTION of
the images is quarantined, or when a dataset check of severity "error" fails (training on
such a dataset would be meaningless); everything is saved first, so the reason is inspectable.

Near-duplicates (contracts.near_duplicates): the summary counts groups of distinct files that are
the same image, which preprocess keeps in one split, and warns about groups whose members carry
different labels (probably one field labelled twice; not quarantined, as a fingerprint match is not
proof: a person should look).

Outputs under validation/<dataset>/<run_id>/: gx_result.json, summary.json, summary.md,
validated.jsonl. The run id is a hash of the manifest key, the spec and the check settings,
so validating the same manifest twice reuses the saved result (fast unchanged re-runs).
Great Expectations and pandas are imported inside the suite's function: seconds to import.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from contracts.common import progress, stable_hash, utc_now
from contracts.dataset_spec import load_spec
from contracts.imaging import ImageRejected, open_image, to_rgb
from contracts.settings import Settings, get_settings
from contracts.stages import ValidateResult
from pipeline.cache import ensure_cached
from pipeline.storage import (ensure_bucket, get_json_or_none, get_jsonl, put_bytes, put_json, put_jsonl, s3_call,
                              s3_client)

CHECKS_VERSION = 3  # bump when the checks change: old validation results are then not reused (3: fingerprints)
SUMMARY_FILE = "summary.json"
REPORT_GROUPS = 100  # most mixed-label near-duplicate groups listed in the summary (the count is complete)


class ValidationFailed(RuntimeError):
    """The dataset is not fit for training (too many bad images or a failed dataset check)."""


class NoImages(ValidationFailed):
    """The manifest lists no images (an empty or new prefix): nothing to validate or train."""


def check_facts(nbytes: int, fmt: str | None, width: int | None, height: int | None,
                settings: Settings) -> tuple[str | None, str | None]:
    """The policy rules on a decoded image's facts: file size, format, side and pixel bounds."""
    s = settings
    if nbytes > s.max_file_bytes:
        return "file_too_large", f"{nbytes} bytes > MAX_FILE_BYTES={s.max_file_bytes}"
    if nbytes < s.min_file_bytes:
        return "file_too_small", f"{nbytes} bytes < MIN_FILE_BYTES={s.min_file_bytes}"
    fmt = str(fmt or "UNKNOWN").upper()
    if fmt not in s.allowed_format_set:
        return "format_not_allowed", f"{fmt} is not in ALLOWED_FORMATS={sorted(s.allowed_format_set)}"
    w, h = int(width or 0), int(height or 0)
    if w * h > s.max_image_pixels:
        return "decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds MAX_IMAGE_PIXELS={s.max_image_pixels}"
    if min(w, h) < s.min_image_side or max(w, h) > s.max_image_side:
        return "bad_dimensions", f"{w}x{h} is outside [{s.min_image_side}, {s.max_image_side}] pixels per side"
    return None, None


def check_image(data: bytes, settings: Settings) -> tuple[str | None, str | None]:
    """(reason, detail) of the first failed per-image check, or (None, None) if the image is usable."""
    s = settings
    if len(data) > s.max_file_bytes:  # before decoding: never decode an oversized file
        return check_facts(len(data), None, None, None, s)
    try:
        img = open_image(data, s.max_image_pixels)  # empty / not an image / bomb / truncated first
        to_rgb(img)
    except ImageRejected as exc:
        return exc.reason, exc.detail
    return check_facts(len(data), img.format, img.width, img.height, s)


def check_row(row: dict[str, Any], settings: Settings, read_bytes) -> tuple[str | None, str | None]:
    """Checks for one manifest row: from ingest's decode facts, else by decoding the cached bytes."""
    if row.get("error"):
        return row["error"], row.get("error_detail") or row["error"]
    if row.get("decoded"):
        return check_facts(int(row["bytes"]), row.get("format"), row.get("width"), row.get("height"), settings)
    return check_image(read_bytes(row), settings)


def _run_id(manifest_key: str, spec, s: Settings) -> str:
    params = {
        "manifest_key": manifest_key, "classes": spec.classes, "checks_version": CHECKS_VERSION,
        **{k: getattr(s, k) for k in (
            "allowed_formats", "min_image_side", "max_image_side", "min_file_bytes", "max_file_bytes",
            "max_image_pixels", "max_bad_fraction", "min_images_per_class", "max_class_imbalance",
            "min_dataset_rows")},
    }
    return "v" + stable_hash(params, 16)


def run_gx_suite(rows: list[dict[str, Any]], labels: list[str], settings: Settings) -> dict[str, Any]:
    """Run the dataset expectation suite on `rows`; returns the GX result as a JSON dict."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    s = settings
    columns = ["key", "sha256", "label", "class", "bytes", "width", "height"]
    df = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    counts = df["label"].value_counts()
    df["label_count"] = df["label"].map(counts).fillna(0).astype(int)
    df["imbalance_vs_largest"] = (counts.max() / df["label_count"]) if len(df) else []

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch_definition = (
        context.data_sources.add_pandas("manifest").add_dataframe_asset(name="validated_rows")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    error, warning = {"severity": "error"}, {"severity": "warning"}
    suite = gx.ExpectationSuite(name="hemaflow_manifest")
    for column in ("key", "sha256", "label", "class", "bytes"):
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column, meta=error))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels, meta=error))
    suite.add_expectation(gxe.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=labels, meta=error))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="sha256", meta=warning))
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=s.min_dataset_rows, meta=error))
    suite.add_expectation(gxe.ExpectColumnMinToBeBetween(
        column="label_count", min_value=s.min_images_per_class, meta=error))
    suite.add_expectation(gxe.ExpectColumnMaxToBeBetween(
        column="imbalance_vs_largest", max_value=s.max_class_imbalance, meta=error))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(suite, result_format="SUMMARY")
    return result.to_json_dict()


def failed_expectations(gx_result: dict[str, Any], severity: str) -> list[str]:
    """One readable line per failed expectation of the given severity."""
    lines = []
    for r in gx_result.get("results", []):
        cfg = r.get("expectation_config", {})
        if r.get("success") or (cfg.get("meta") or {}).get("severity", "error") != severity:
            continue
        kwargs = {k: v for k, v in cfg.get("kwargs", {}).items() if k not in ("batch_id",)}
        observed = (r.get("result") or {}).get("observed_value")
        unexpected = (r.get("result") or {}).get("partial_unexpected_list")
        extra = f" observed={observed}" if observed is not None else ""
        extra += f" unexpected={unexpected[:5]}" if unexpected else ""
        lines.append(f"{cfg.get('type')} {kwargs}{extra}")
    return lines


def resolve_duplicates(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict], list[dict]]:
    """(kept, same-label duplicates dropped, conflicting rows) by sha256; first key wins."""
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["key"]):
        by_hash[r["sha256"]].append(r)
    kept, dropped, conflicting = [], [], []
    for group in by_hash.values():
        if len({r["label"] for r in group}) > 1:
            conflicting.extend(group)
        else:
            kept.append(group[0])
            dropped.extend({**r, "duplicate_of": group[0]["key"]} for r in group[1:])
    return sorted(kept, key=lambda r: r["key"]), dropped, conflicting


def near_duplicate_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Groups of distinct files that are near-copies (kept rows), and those that mix labels."""
    from contracts.near_duplicates import near_duplicate_groups

    by_sha = {r["sha256"]: r for r in rows}
    members: dict[str, list[str]] = defaultdict(list)
    for sha, group in near_duplicate_groups({sha: r.get("fingerprint") for sha, r in by_sha.items()}).items():
        members[group].append(sha)
    groups = [sorted(m) for m in members.values() if len(m) > 1]
    mixed = [sorted(f"{by_sha[h]['label']}: {by_sha[h]['key']}" for h in g) for g in groups
             if len({by_sha[h]["label"] for h in g}) > 1]
    warnings = [f"{len(mixed)} near-duplicate group(s) carry different labels (the same field labelled twice?): "
                "see near_duplicates_across_labels"] if mixed else []
    return {"groups": len(groups), "images": sum(len(g) for g in groups), "across_labels": sorted(mixed),
            "warnings": warnings}


def _summary_md(summary: dict[str, Any]) -> str:
    lines = [f"# Validation of `{summary['dataset']}` ({summary['run_id']})", "",
             f"- manifest: `{summary['manifest_key']}`",
             f"- status: **{summary['status']}**" + (f" - {summary['failure']}" if summary.get("failure") else ""),
             f"- images: {summary['total']} | kept: {summary['kept']} | quarantined: {summary['quarantined']} "
             f"| same-label duplicates dropped: {summary['duplicates_dropped']}",
             f"- bad fraction: {summary['bad_fraction']:.4f} (limit {summary['max_bad_fraction']})", "",
             "## Kept images per label", "", "| label | images |", "|---|---|"]
    lines += [f"| {label} | {n} |" for label, n in sorted(summary["kept_per_label"].items())]
    lines += ["", "## Quarantine reasons", ""]
    lines += [f"- {reason}: {n}" for reason, n in sorted(summary["reasons"].items())] or ["- none"]
    lines += ["", "## Dataset checks (Great Expectations)", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'} [{sev}] {name}" for name, sev, ok in summary["expectations"]]
    if summary["duplicate_groups"]:
        lines += ["", "## Duplicates (same content)", ""]
        lines += [f"- {', '.join(g)}" for g in summary["duplicate_groups"][:50]]
    lines += ["", "## Near-duplicates (same image, different files; kept in one split)", "",
              f"- {summary['near_duplicate_groups']} group(s), {summary['near_duplicate_images']} images"]
    lines += [f"- different labels: {', '.join(g)}" for g in summary["near_duplicates_across_labels"][:50]]
    return "\n".join(lines) + "\n"


def validate(manifest_key: str, dataset: str, settings: Settings | None = None, show_progress: bool = False) -> ValidateResult:
    """Check every image and the dataset; quarantine failures; save results; raise when unusable."""
    s = settings or get_settings()
    spec = load_spec(dataset, s.dataset_specs_dir)
    client = s3_client(s)
    ensure_bucket(client, s)
    run_id = _run_id(manifest_key, spec, s)
    prefix = f"validation/{dataset}/{run_id}/"
    keys = {name: prefix + name for name in ("gx_result.json", SUMMARY_FILE, "summary.md", "validated.jsonl")}
    result = {"validated_key": keys["validated.jsonl"], "summary_key": keys[SUMMARY_FILE],
              "gx_result_key": keys["gx_result.json"], "run_id": run_id}

    previous = s3_call(s, "read summary", get_json_or_none, client, s.s3_bucket, keys[SUMMARY_FILE])
    if previous is not None:  # same manifest, same checks: the saved verdict stands
        out = ValidateResult(**result, quarantined=previous["quarantined"], bad_fraction=previous["bad_fraction"],
                             kept=previous["kept"], duplicates_dropped=previous["duplicates_dropped"], reused=True,
                             status=previous["status"])
        if previous["status"] != "passed":
            raise ValidationFailed(f"{previous['failure']} (saved result: s3://{s.s3_bucket}/{keys['summary.md']})")
        return out

    rows = s3_call(s, "read manifest", get_jsonl, client, s.s3_bucket, manifest_key)
    if not rows:
        raise NoImages(f"{manifest_key} lists no images: is anything under s3://{s.s3_bucket}/"
                               f"{spec.s3_prefix}<class folder>/ ? (class folders: {spec.class_folders})")

    def _check(row: dict) -> dict:
        if row.get("label") not in spec.labels:
            return {**row, "reason": "unknown_label", "detail": f"label {row.get('label')!r} not in spec"}
        reason, detail = check_row(row, s, lambda r: ensure_cached(r, s, client).read_bytes())
        return {**row, "reason": reason, "detail": detail}

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        checked = list(progress(pool.map(_check, rows), len(rows), f"validate {dataset}", show_progress))
    passed = [r for r in checked if not r["reason"]]
    bad = [r for r in checked if r["reason"]]
    kept, duplicates, conflicting = resolve_duplicates(passed)
    for r in conflicting:
        labels = sorted({c["label"] for c in conflicting if c["sha256"] == r["sha256"]})
        bad.append({**r, "reason": "conflicting_labels",
                    "detail": f"identical bytes are labelled {labels} in different class folders"})

    def _quarantine(r: dict) -> None:
        rel = r["key"][len(spec.s3_prefix):] if r["key"].startswith(spec.s3_prefix) else r["key"]
        target = f"quarantine/{dataset}/{run_id}/{rel}"
        client.copy_object(Bucket=s.s3_bucket, Key=target, CopySource={"Bucket": s.s3_bucket, "Key": r["key"]})
        put_json(client, s.s3_bucket, target + ".reason.json", {
            "key": r["key"], "sha256": r.get("sha256"), "class": r.get("class"), "label": r.get("label"),
            "reason": r["reason"], "detail": r["detail"], "run_id": run_id, "manifest_key": manifest_key,
            "quarantined_at": utc_now()})

    with ThreadPoolExecutor(max_workers=s.transfer_workers) as pool:
        list(pool.map(lambda r: s3_call(s, "quarantine", _quarantine, r), bad))

    gx_result = run_gx_suite(passed, spec.labels, s)
    total = len(rows)
    bad_fraction = len(bad) / total if total else 1.0
    errors = failed_expectations(gx_result, "error")
    failure = None
    if bad_fraction > s.max_bad_fraction:
        failure = (f"{len(bad)} of {total} images ({bad_fraction:.1%}) failed the image checks, more than "
                   f"MAX_BAD_FRACTION={s.max_bad_fraction:.1%}; see quarantine/{dataset}/{run_id}/")
    elif errors:
        failure = "dataset checks failed: " + "; ".join(errors)
    groups = defaultdict(list)
    for r in passed:
        groups[r["sha256"]].append(r["key"])
    near = near_duplicate_report(kept)
    summary = {
        "dataset": dataset, "run_id": run_id, "manifest_key": manifest_key, "created_at": utc_now(),
        "status": "failed" if failure else "passed", "failure": failure,
        "total": total, "kept": len(kept), "quarantined": len(bad), "duplicates_dropped": len(duplicates),
        "bad_fraction": round(bad_fraction, 6), "max_bad_fraction": s.max_bad_fraction,
        "kept_per_label": dict(Counter(r["label"] for r in kept)),
        "reasons": dict(Counter(r["reason"] for r in bad)),
        "quarantined_items": [{"key": r["key"], "reason": r["reason"], "detail": r["detail"]} for r in bad][:500],
        "duplicate_groups": sorted(sorted(g) for g in groups.values() if len(g) > 1),
        "expectations": [(r["expectation_config"]["type"], (r["expectation_config"].get("meta") or {}).get(
            "severity", "error"), bool(r["success"])) for r in gx_result.get("results", [])],
        "near_duplicate_groups": near["groups"], "near_duplicate_images": near["images"],
        "near_duplicates_across_labels": near["across_labels"][:REPORT_GROUPS],
        "warnings": failed_expectations(gx_result, "warning") + near["warnings"],
    }
    fields = ("key", "etag", "sha256", "bytes", "format", "width", "height", "mode", "class", "label",
              "fingerprint")
    put_jsonl(client, s.s3_bucket, keys["validated.jsonl"], [{f: r.get(f) for f in fields} for r in kept])
    put_json(client, s.s3_bucket, keys["gx_result.json"], gx_result)
    put_bytes(client, s.s3_bucket, keys["summary.md"], _summary_md(summary).encode(), "text/markdown")
    put_json(client, s.s3_bucket, keys[SUMMARY_FILE], summary)  # last: its presence means "complete"
    if failure:
        raise ValidationFailed(f"{failure} (summary: s3://{s.s3_bucket}/{keys['summary.md']})")
    return ValidateResult(**result, quarantined=len(bad), bad_fraction=summary["bad_fraction"], kept=len(kept),
                          duplicates_dropped=len(duplicates), reused=False, status="passed")

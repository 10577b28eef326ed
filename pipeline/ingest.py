"""Ingest: list the dataset's S3 prefix, diff against the previous manifest, cache new bytes.

Only objects that are new or whose ETag/size changed are downloaded (in parallel, streamed in
1 MiB chunks, at most MAX_FILE_BYTES per object: larger ones get `error=file_too_large` and are
never read whole) into a local content-addressed cache, `HEMAFLOW_HOME/cache/objects/<sha256[:2]>/<sha256>`.
Each file is written under `cache/objects/.tmp/` and renamed into place, so a crash or a
SIGKILL never leaves a partial file under a content name; temporaries whose writer died
(no lock held on them) are removed on the next run. Unchanged objects reuse their previous manifest row,
so an unchanged re-run downloads nothing and writes no new manifest.

Manifest rows (JSONL at `manifests/<dataset>/<ingest_id>.jsonl`): key, etag, sha256, bytes,
format, width, height, mode, class, label, decoded, error, error_detail, fingerprint (the
near-duplicate fingerprint, contracts.near_duplicates; rows of an older manifest without one get it
on the next run, from the cached bytes, and a new manifest is written). Each new object is
decoded completely once, here, while other downloads are in flight (`decoded` = true), and that
decode also fills the prepared-pixel cache (pipeline/incremental.py), so preprocess does not
decode the image again; unreadable files are kept with `error` set: the validate stage decides
what to do with them.
`manifests/<dataset>/latest.json` points at the newest manifest and records deletions and
objects that are not under a class folder of the spec (reported, never silently dropped).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from contracts.common import progress, utc_now, utc_stamp
from contracts.dataset_spec import load_spec
from contracts.imaging import ImageRejected, open_image, read_header, to_rgb
from contracts.near_duplicates import image_fingerprint
from contracts.screening import is_reviewed_key
from contracts.settings import Settings, get_settings
from contracts.stages import IngestResult
from pipeline.cache import ObjectTooLarge, clean_stale_temporaries, ensure_cached, stream_to_cache
from pipeline.incremental import image_preparer, is_prepared, preprocessing_params, store_prepared
from pipeline.manifests import diff_listing, latest_key, load_previous, manifest_prefix
from pipeline.storage import ensure_bucket, iter_objects, put_json, put_jsonl, s3_call, s3_client

MANIFEST_FIELDS = (
    "key", "etag", "sha256", "bytes", "format", "width", "height", "mode", "class", "label", "decoded", "error",
    "error_detail", "fingerprint",
)
REPORT_LIMIT = 200  # most keys listed in latest.json per category (counts are always complete)


def describe_bytes(data: bytes, max_pixels: int) -> dict[str, Any]:
    """Facts of an image from a complete decode (and RGB conversion), or why that failed.

    Ingest decodes while its downloads wait on the network, so validate can apply its rules
    to these facts without decoding every image a second time. The decompression-bomb guard
    runs on the header, before any pixel is decoded. Validation decides what the facts mean.
    """
    try:
        img = open_image(data, max_pixels)
        facts = {"format": str(img.format or "UNKNOWN"), "width": img.width, "height": img.height,
                 "mode": img.mode}
        to_rgb(img)
    except ImageRejected as exc:
        return _undecoded(exc.reason, exc.detail)
    return {**facts, "decoded": True, "error": None, "error_detail": None}


def describe_and_prepare(data: bytes, max_pixels: int, prepare) -> tuple[dict[str, Any], Any]:
    """`describe_bytes`'s facts from the one decode that also yields the prepared pixels (None if rejected).

    Format, size and mode come from the header (the original's, before a reduced-scale JPEG decode);
    `prepare` decodes every byte (truncation is still caught) and converts to RGB: the checks
    `describe_bytes` makes, so preprocess need not decode the image a second time."""
    try:
        info = read_header(data, max_pixels)
        pixels = prepare(data)
    except ImageRejected as exc:
        return _undecoded(exc.reason, exc.detail), None
    except Exception:  # noqa: BLE001 - a failure of the resize alone: the plain checks decide, preprocess reports
        return describe_bytes(data, max_pixels), None
    return {"format": info.format, "width": info.width, "height": info.height, "mode": info.mode,
            "decoded": True, "error": None, "error_detail": None}, pixels


def fingerprint_of(data: bytes, facts: dict[str, Any], max_pixels: int) -> str | None:
    """The near-duplicate fingerprint of a decodable image (None for one validation will quarantine)."""
    if not facts.get("decoded"):
        return None
    try:
        return image_fingerprint(data, max_pixels)
    except ImageRejected:
        return None


def _backfill_fingerprint(row: dict[str, Any], s: Settings, client) -> dict[str, Any]:
    """A row of an older manifest, with the fingerprint it did not have (from the cached bytes)."""
    data = ensure_cached(row, s, client).read_bytes()
    return {**row, "fingerprint": fingerprint_of(data, row, s.max_image_pixels)}


def _undecoded(error: str, detail: str) -> dict[str, Any]:
    return {"format": None, "width": None, "height": None, "mode": None, "decoded": False,
            "error": error, "error_detail": detail}


def ingest(dataset: str, settings: Settings | None = None, show_progress: bool = False,
           before_download=None) -> IngestResult:
    """Bring the manifest of `dataset` up to date with its S3 prefix.

    `before_download(n)` is called when n > 0 objects are about to be downloaded (run_pipeline
    uses it to start slow imports while the downloads wait on the network).

    Returns {manifest_key, new, changed, deleted, unchanged, total, unassigned, errors,
    downloaded_bytes, reused}; `reused` is True when nothing changed and the previous
    manifest is still current (no new manifest written).
    """
    s = settings or get_settings()
    spec = load_spec(dataset, s.dataset_specs_dir)
    client = s3_client(s)
    ensure_bucket(client, s)  # clear StorageUnavailable when the endpoint is down
    clean_stale_temporaries(s)

    listing, unassigned = [], []
    for obj in s3_call(s, "list", lambda: list(iter_objects(client, s.s3_bucket, spec.s3_prefix))):
        key = obj["Key"]
        if key.endswith("/"):
            continue  # folder marker, not an object
        if spec.class_of_key(key) in spec.classes:
            listing.append(obj)
        else:
            unassigned.append(key)
    pointer, previous = s3_call(s, "read previous manifest", load_previous, client, s, dataset)
    new, changed, unchanged, deleted = diff_listing(previous, listing)
    # The spec may have been edited since (a folder mapped to another label): relabel reused rows.
    relabeled = [r for r in unchanged if r.get("label") != spec.classes[r["class"]]]
    unchanged = [{**r, "label": spec.classes[r["class"]]} for r in unchanged]
    to_fetch = new + changed
    # New images are prepared here, from the decode the checks need anyway, while other downloads wait.
    prep, prepare = preprocessing_params(s, spec.crop), image_preparer(s, spec.crop)

    def _fetch(obj: dict) -> dict[str, Any]:
        key = obj["Key"]
        folder = spec.class_of_key(key)
        row = {"key": key, "etag": str(obj.get("ETag", "")).strip('"'), "class": folder, "label": spec.classes[folder]}
        try:  # never more than MAX_FILE_BYTES of one object: by the listing's size, then while streaming
            if int(obj.get("Size") or 0) > s.max_file_bytes:
                raise ObjectTooLarge(int(obj["Size"]), s.max_file_bytes)
            digest, size, path = stream_to_cache(s, client, key, s.max_file_bytes)
        except ObjectTooLarge as exc:  # validate quarantines it with this reason
            return {**row, "sha256": None, "bytes": exc.size, **_undecoded("file_too_large", str(exc))}
        row.update({"sha256": digest, "bytes": size})
        data = path.read_bytes()
        if is_prepared(s, prep, digest):
            facts = describe_bytes(data, s.max_image_pixels)
        else:
            facts, pixels = describe_and_prepare(data, s.max_image_pixels, prepare)
            if pixels is not None:
                store_prepared(s, prep, digest, pixels.tobytes())
        return {**row, **facts, "fingerprint": fingerprint_of(data, facts, s.max_image_pixels)}

    stale = [r for r in unchanged if "fingerprint" not in r and r.get("decoded") and r.get("sha256")]
    if stale:  # rows of a manifest written before fingerprints: one decode each, once
        with ThreadPoolExecutor(max_workers=s.transfer_workers) as pool:
            backfill = pool.map(lambda r: s3_call(s, "fingerprint", _backfill_fingerprint, r, s, client), stale)
            filled = {r["key"]: r for r in progress(backfill, len(stale), f"fingerprint {dataset}", show_progress)}
        unchanged = [filled.get(r["key"], r) for r in unchanged]
    fetched: list[dict] = []
    if to_fetch:
        if before_download is not None:
            before_download(len(to_fetch))
        with ThreadPoolExecutor(max_workers=s.transfer_workers) as pool:
            fetched = list(progress(pool.map(_fetch, to_fetch), len(to_fetch), f"ingest {dataset}", show_progress))
    rows = sorted(unchanged + fetched, key=lambda r: r["key"])
    counts = {"new": len(new), "changed": len(changed), "deleted": len(deleted), "unchanged": len(unchanged),
              "total": len(rows), "unassigned": len(unassigned), "errors": sum(1 for r in rows if r.get("error")),
              "relabeled": len(relabeled), "fingerprinted": len(stale),
              "reviewed": sum(1 for o in to_fetch if is_reviewed_key(o["Key"]))}
    reused = pointer is not None and not (new or changed or deleted or relabeled or stale) and \
        sorted(pointer.get("unassigned", [])) == sorted(unassigned[:REPORT_LIMIT])
    if reused:
        manifest_key = pointer["manifest_key"]
        ingest_id = pointer["ingest_id"]
    else:
        ingest_id = utc_stamp()
        manifest_key = f"{manifest_prefix(dataset)}{ingest_id}.jsonl"
        s3_call(s, "write manifest", put_jsonl, client, s.s3_bucket, manifest_key,
                [{f: r.get(f) for f in MANIFEST_FIELDS} for r in rows])
        s3_call(s, "write latest.json", put_json, client, s.s3_bucket, latest_key(dataset), {
            "dataset": dataset, "manifest_key": manifest_key, "ingest_id": ingest_id, "created_at": utc_now(),
            "previous_manifest_key": pointer["manifest_key"] if pointer else None, "counts": counts,
            "deleted": deleted[:REPORT_LIMIT], "unassigned": unassigned[:REPORT_LIMIT],
            "changed": [o["Key"] for o in changed][:REPORT_LIMIT],
        })
    return IngestResult(manifest_key=manifest_key, ingest_id=ingest_id, **counts, reused=reused,
                        deleted_keys=deleted[:REPORT_LIMIT], unassigned_keys=unassigned[:REPORT_LIMIT],
                        downloaded_bytes=sum(r["bytes"] for r in fetched if r["sha256"]))

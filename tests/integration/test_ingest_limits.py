"""Ingest reads at most MAX_FILE_BYTES of an object and streams it to the cache (real SeaweedFS)."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_oversized_object_is_never_read_whole_and_is_quarantined(tiny_dataset_factory, s3, tmp_path):
    from pipeline.cache import cache_root
    from pipeline.ingest import ingest
    from pipeline.upload import upload_tree
    from pipeline.validate import validate

    settings, dataset, root = tiny_dataset_factory({"neg": 6, "pos": 6}, max_file_bytes=50_000,
                                                   max_bad_fraction=0.2)
    settings = settings.model_copy(update={"hemaflow_home": tmp_path / "home"})  # an empty cache of its own
    big = root / "pos" / "huge.bmp"
    big.write_bytes(b"BM" + os.urandom(120_000))  # larger than MAX_FILE_BYTES
    upload_tree(root, dataset, settings)
    result = ingest(dataset, settings)
    rows = {r["key"]: r for r in map(json.loads, s3.get_object(
        Bucket=settings.s3_bucket, Key=result.manifest_key)["Body"].read().splitlines())}
    row = next(r for k, r in rows.items() if k.endswith("huge.bmp"))
    assert row["error"] == "file_too_large" and row["sha256"] is None and row["bytes"] == 120_002
    assert "MAX_FILE_BYTES=50000" in row["error_detail"]
    assert result.downloaded_bytes < 12 * 50_000  # the big object was not downloaded
    cached = [p for p in cache_root(settings).rglob("*") if p.is_file()]
    assert len(cached) == 12 and all(p.stat().st_size <= 50_000 for p in cached)  # 12 images, no .part left
    checked = validate(result.manifest_key, dataset, settings)
    assert checked.quarantined == 1
    reason = json.loads(s3.get_object(Bucket=settings.s3_bucket, Key=next(
        o["Key"] for o in s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=f"quarantine/{dataset}/")["Contents"]
        if o["Key"].endswith(".reason.json")))["Body"].read())
    assert reason["reason"] == "file_too_large"


def test_stream_to_cache_stops_at_the_limit_and_leaves_nothing(tiny_dataset_factory, s3, tmp_path):
    from pipeline.cache import ObjectTooLarge, _tmp_dir, cache_root, stream_to_cache

    settings, _, _ = tiny_dataset_factory({"neg": 1, "pos": 1})
    settings = settings.model_copy(update={"hemaflow_home": tmp_path / "home"})
    s3.put_object(Bucket=settings.s3_bucket, Key="limits/blob", Body=os.urandom(3 << 20))
    with pytest.raises(ObjectTooLarge):
        stream_to_cache(settings, s3, "limits/blob", 1 << 20)
    assert not any(p.is_file() for p in cache_root(settings).rglob("*"))
    assert not any(_tmp_dir(settings).glob("*.part"))
    digest, size, path = stream_to_cache(settings, s3, "limits/blob", 4 << 20)
    assert size == 3 << 20 and path.stat().st_size == size and path.name == digest

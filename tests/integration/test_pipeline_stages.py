"""Pipeline stages end to end against the real SeaweedFS of the session stack."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_processed_tiny_is_complete_and_readable(processed_tiny):
    from contracts.processed import META_FILE, read_local_manifest, read_local_meta
    from pipeline.storage import fetch_processed

    settings, dataset, version = processed_tiny
    folder = fetch_processed(dataset, version, settings)
    meta = read_local_meta(folder)
    assert meta.dataset_version == version and meta.labels == ["abnormal", "normal"]
    assert meta.image_size == 32
    rows = read_local_manifest(folder)
    assert len(rows) == 48
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        assert set(meta.counts[split]) == {"normal", "abnormal"}, meta.counts
    assert sum(sum(c.values()) for c in meta.counts.values()) == 48
    assert (folder / META_FILE).is_file()

    import tensorflow as tf

    from contracts.processed import feature_spec

    names = [str(folder / n) for n in meta.shards["train"]]
    records = list(tf.data.TFRecordDataset(names))
    assert len(records) == sum(meta.counts["train"].values())
    ex = tf.io.parse_single_example(records[0], feature_spec())
    image = np.frombuffer(ex["image"].numpy(), dtype=np.uint8).reshape(32, 32, 3)
    assert image.std() > 1  # real pixels, not zeros
    assert int(ex["label"]) in (0, 1)


def test_unchanged_rerun_does_nothing(processed_tiny):
    from pipeline.run import run_pipeline

    settings, dataset, version = processed_tiny
    result = run_pipeline(dataset, settings)
    assert result["ingest"]["reused"] is True
    assert result["ingest"]["new"] == result["ingest"]["changed"] == result["ingest"]["deleted"] == 0
    assert result["validate"]["reused"] is True
    assert result["preprocess"]["created"] is False
    assert result["preprocess"]["dataset_version"] == version


def test_upload_skips_identical_and_ingest_diffs(tiny_dataset_factory, s3, tmp_path):
    from pipeline.ingest import ingest
    from pipeline.upload import upload_tree

    settings, dataset, root = tiny_dataset_factory({"neg": 5, "pos": 5})
    first = upload_tree(root, dataset, settings)
    assert first["uploaded"] == 10 and first["skipped"] == 0
    again = upload_tree(root, dataset, settings)
    assert again["uploaded"] == 0 and again["skipped"] == 10

    r1 = ingest(dataset, settings)
    assert (r1.new, r1.total, r1.reused) == (10, 10, False)
    # change one image, delete one, add one outside any class folder
    changed = sorted((root / "neg").iterdir())[0]
    changed.write_bytes((root / "pos" / "pos_0000.png").read_bytes())
    upload_tree(root, dataset, settings)
    bucket = settings.s3_bucket
    s3.delete_object(Bucket=bucket, Key=f"raw/{dataset}/pos/pos_0004.png")
    s3.put_object(Bucket=bucket, Key=f"raw/{dataset}/stray.png", Body=b"x")
    s3.put_object(Bucket=bucket, Key=f"raw/{dataset}/Unknown/a.png", Body=b"x")
    r2 = ingest(dataset, settings)
    assert (r2.new, r2.changed, r2.deleted, r2.unchanged) == (0, 1, 1, 8)
    assert r2.deleted_keys == [f"raw/{dataset}/pos/pos_0004.png"]
    assert sorted(r2.unassigned_keys) == [f"raw/{dataset}/Unknown/a.png", f"raw/{dataset}/stray.png"]
    latest = json.loads(s3.get_object(Bucket=bucket, Key=f"manifests/{dataset}/latest.json")["Body"].read())
    assert latest["manifest_key"] == r2.manifest_key and latest["counts"]["deleted"] == 1
    rows = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=r2.manifest_key)["Body"].read().splitlines()]
    assert len(rows) == 9
    row = next(r for r in rows if r["key"].endswith("neg/neg_0000.png"))
    assert row["label"] == "normal" and row["format"] == "PNG" and row["width"] == 48 and row["mode"] == "RGB"
    assert row["decoded"] is True and row["error"] is None

    assert ingest(dataset, settings).reused is True
    # Editing the spec (swapping the labels) relabels the reused rows and writes a new manifest.
    spec_file = settings.dataset_specs_dir / f"{dataset}.toml"
    text = spec_file.read_text().replace('"normal"', '"tmp"').replace('"abnormal"', '"normal"')
    spec_file.write_text(text.replace('"tmp"', '"abnormal"'))
    r3 = ingest(dataset, settings)
    assert r3.reused is False and r3.relabeled == 9 and r3.new == r3.changed == 0
    rows = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=r3.manifest_key)["Body"].read().splitlines()]
    assert {r["label"] for r in rows if "/neg/" in r["key"]} == {"abnormal"}


def test_rows_of_an_older_manifest_get_their_fingerprints_once(tiny_dataset_factory, s3, tmp_path):
    """A manifest written before near-duplicate fingerprints: the next ingest fills them in from the
    bytes (on a worker whose cache is empty: downloaded again) and writes a new manifest, once."""
    from contracts.near_duplicates import image_fingerprint
    from pipeline.ingest import ingest
    from pipeline.upload import upload_tree

    settings, dataset, root = tiny_dataset_factory({"neg": 4, "pos": 4})
    upload_tree(root, dataset, settings)
    first = ingest(dataset, settings)
    bucket = settings.s3_bucket

    def rows_of(key: str) -> list[dict]:
        return [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=key)["Body"].read().splitlines()]

    rows = rows_of(first.manifest_key)
    expected = {r["key"]: image_fingerprint((root / r["key"].split("/", 2)[2]).read_bytes()) for r in rows}
    assert {r["key"]: r["fingerprint"] for r in rows} == expected
    old = b"".join(json.dumps({k: v for k, v in r.items() if k != "fingerprint"}).encode() + b"\n" for r in rows)
    s3.put_object(Bucket=bucket, Key=first.manifest_key, Body=old)  # as an older HemaFlow wrote it
    other = settings.model_copy(update={"hemaflow_home": tmp_path / "other-worker"})
    filled = ingest(dataset, other)
    assert (filled.reused, filled.fingerprinted, filled.new, filled.unchanged) == (False, 8, 0, 8)
    assert {r["key"]: r["fingerprint"] for r in rows_of(filled.manifest_key)} == expected
    again = ingest(dataset, other)
    assert (again.reused, again.fingerprinted) == (True, 0)


def test_cache_miss_redownloads_and_detects_changed_objects(tiny_dataset_factory, s3, tmp_path):
    from pipeline.cache import CacheMismatch, cache_path, ensure_cached
    from pipeline.ingest import ingest
    from pipeline.upload import upload_tree
    from pipeline.validate import ValidationFailed, validate

    settings, dataset, root = tiny_dataset_factory({"neg": 3, "pos": 3})
    upload_tree(root, dataset, settings)
    result = ingest(dataset, settings)
    rows = [json.loads(x) for x in s3.get_object(Bucket=settings.s3_bucket, Key=result.manifest_key)["Body"]
            .read().splitlines()]
    row = rows[0]
    # Another worker: empty cache -> the bytes are fetched again by key and verified.
    other = settings.model_copy(update={"hemaflow_home": tmp_path / "other-worker"})
    assert not cache_path(other, row["sha256"]).exists()
    path = ensure_cached(row, other)
    assert path == cache_path(other, row["sha256"]) and len(path.read_bytes()) == row["bytes"]
    # The object changed in S3 after ingest: refuse to use it silently.
    s3.put_object(Bucket=settings.s3_bucket, Key=row["key"], Body=(root / "pos" / "pos_0000.png").read_bytes())
    path.unlink()
    with pytest.raises(CacheMismatch, match="changed after ingest"):
        ensure_cached(row, other)

    empty, _, _ = tiny_dataset_factory({"neg": 1, "pos": 1})
    name = empty.dataset_specs_dir.glob("*.toml").__next__().stem
    with pytest.raises(ValidationFailed, match="lists no images"):
        validate(ingest(name, empty).manifest_key, name, empty)


def test_threaded_encoding_writes_byte_identical_shards_on_rerun(tiny_dataset_factory, s3):
    """Encoder threads finish in any order; the shards must not depend on it."""
    import shutil

    from pipeline.ingest import ingest
    from pipeline.preprocess import preprocess
    from contracts.processed import META_FILE, local_version_dir
    from pipeline.storage import iter_objects
    from pipeline.upload import upload_tree
    from pipeline.validate import validate

    settings, dataset, root = tiny_dataset_factory({"neg": 12, "pos": 12}, size=(40, 56))  # needs resizing
    upload_tree(root, dataset, settings)
    validated = validate(ingest(dataset, settings).manifest_key, dataset, settings).validated_key
    outputs = []
    for _ in range(2):
        result = preprocess(validated, dataset, settings)
        assert result.created is True
        folder = local_version_dir(settings, dataset, result.dataset_version)
        outputs.append({p.name: p.read_bytes() for p in folder.iterdir() if p.name != META_FILE})
        s3.delete_object(Bucket=settings.s3_bucket, Key=result.prefix + META_FILE)
        shutil.rmtree(folder)
        # Stored shards and prepared pixels too, so that the second run encodes every shard again.
        for key in iter_objects(s3, settings.s3_bucket, f"processed/{dataset}/_shards/"):
            s3.delete_object(Bucket=settings.s3_bucket, Key=key["Key"])
        for sub in ("shards", "prepared"):
            shutil.rmtree(settings.hemaflow_home / "cache" / sub)
        assert "0 reused" in result.message
    assert outputs[0] == outputs[1] and any(name.endswith(".tfrecord") for name in outputs[0])

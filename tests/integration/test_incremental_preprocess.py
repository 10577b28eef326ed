"""Incremental preprocessing against the real SeaweedFS of the session stack (issue 14 item 2)."""

from __future__ import annotations

import shutil

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _run(settings, dataset):
    from pipeline.ingest import ingest
    from pipeline.preprocess import preprocess
    from pipeline.validate import validate

    validated = validate(ingest(dataset, settings).manifest_key, dataset, settings)
    return preprocess(validated.validated_key, dataset, settings)


def _shards(s3, settings, dataset, version) -> dict[str, tuple[str, bytes]]:
    """shard name -> (ETag, bytes) of a published version."""
    from pipeline.storage import load_meta

    meta = load_meta(dataset, version, settings)
    out = {}
    for name in (n for names in meta.shards.values() for n in names):
        obj = s3.get_object(Bucket=settings.s3_bucket, Key=meta.object_key(name))
        out[name] = (obj["ETag"], obj["Body"].read())
    return out


def _shard_of(settings, dataset, version) -> dict[str, str]:
    from contracts.processed import read_local_manifest
    from pipeline.storage import fetch_processed

    return {r["sha256"]: r["shard"] for r in read_local_manifest(fetch_processed(dataset, version, settings))}


def _add_images(root, count: int, seed: int) -> None:
    from tests.fixtures.data import make_image

    for i in range(count):
        folder = ("neg", "pos")[i % 2]
        make_image(seed + i, (200, 120, 160), (48, 48)).save(root / folder / f"new_{seed}_{i:04d}.png", "PNG")


def test_adding_and_removing_images_rewrites_only_the_shards_they_touch(tiny_dataset_factory, s3):
    from pipeline.storage import iter_objects
    from pipeline.upload import upload_tree

    settings, dataset, root = tiny_dataset_factory({"neg": 40, "pos": 40}, shard_size=4)
    upload_tree(root, dataset, settings)
    first = _run(settings, dataset)
    before = _shards(s3, settings, dataset, first.dataset_version)
    shard_before = _shard_of(settings, dataset, first.dataset_version)

    prepared = settings.hemaflow_home / "cache" / "prepared"
    prepared_before = sum(1 for p in prepared.rglob("*") if p.is_file())
    _add_images(root, 4, seed=9000)  # +5 %
    upload_tree(root, dataset, settings)
    second = _run(settings, dataset)
    assert second.created and second.dataset_version != first.dataset_version
    after = _shards(s3, settings, dataset, second.dataset_version)
    shard_after = _shard_of(settings, dataset, second.dataset_version)
    touched = {shard_after[sha] for sha in set(shard_after) - set(shard_before)}
    common = set(before) & set(after)
    unchanged = {n for n in common if before[n] == after[n]}
    assert touched and touched.isdisjoint(unchanged)
    assert unchanged == common - touched  # every untouched shard kept its bytes (and ETag)
    sizes = __import__("collections").Counter(shard_after.values())
    assert max(sizes.values()) <= 3 * settings.shard_size, sizes  # content buckets of about SHARD_SIZE images
    assert len(touched) <= 4 and len(unchanged) >= len(after) - 4 >= 3 * len(touched), (len(unchanged), len(after))
    # Ingest decoded (and prepared) exactly the 4 new images; preprocess decoded none again.
    assert sum(1 for p in prepared.rglob("*") if p.is_file()) == prepared_before + 4
    assert "(0 images decoded)" in second.message and f"{len(unchanged)} reused" in second.message
    assert f"({len(touched)} uploaded, 0 downloaded)" in second.message  # nothing copied or re-sent
    processed = {o["Key"] for o in iter_objects(s3, settings.s3_bucket, f"processed/{dataset}/")}
    assert len([k for k in processed if k.endswith(".tfrecord")]) == len(before) + len(touched)

    victim = sorted((root / "pos").glob("pos_*.png"))[0]
    victim_sha = __import__("hashlib").sha256(victim.read_bytes()).hexdigest()
    s3.delete_object(Bucket=settings.s3_bucket, Key=f"raw/{dataset}/pos/{victim.name}")
    # Another worker: no local copy of any shard, so reused shards are downloaded.
    from contracts.processed import local_version_dir

    shutil.rmtree(local_version_dir(settings, dataset, second.dataset_version))
    shutil.rmtree(settings.hemaflow_home / "cache" / "shards")
    third = _run(settings, dataset)
    removed = _shards(s3, settings, dataset, third.dataset_version)
    changed = {n for n in removed if after.get(n) != removed[n]}
    assert changed == {shard_after[victim_sha]}
    local = local_version_dir(settings, dataset, third.dataset_version)
    assert {n: (local / n).read_bytes() for n in removed} == {n: body for n, (_, body) in removed.items()}
    assert "0 images decoded" in third.message and f"(1 uploaded, {len(removed) - 1} downloaded)" in third.message


def test_version_and_bytes_do_not_depend_on_history(tiny_dataset_factory, s3, tmp_path):
    """A version built incrementally equals the same version built from scratch on a fresh cache."""
    from pipeline.upload import upload_tree

    settings, dataset, root = tiny_dataset_factory({"neg": 20, "pos": 20}, shard_size=4)
    upload_tree(root, dataset, settings)
    _run(settings, dataset)
    _add_images(root, 2, seed=7000)
    upload_tree(root, dataset, settings)
    incremental = _run(settings, dataset)
    built = _shards(s3, settings, dataset, incremental.dataset_version)

    # Same images under another dataset name, fresh home (no prepared cache, no shard index).
    fresh, other, other_root = tiny_dataset_factory({"neg": 1, "pos": 1}, shard_size=4,
                                                    hemaflow_home=tmp_path / "fresh-home")
    shutil.rmtree(other_root)
    shutil.copytree(root, other_root)
    upload_tree(other_root, other, fresh)
    scratch = _run(fresh, other)
    assert scratch.dataset_version == incremental.dataset_version
    assert "0 reused" in scratch.message
    assert _shards(s3, fresh, other, scratch.dataset_version) == built


def test_a_crash_mid_write_publishes_nothing_and_the_rerun_completes(tiny_dataset_factory, s3, monkeypatch):
    """Shards already stored when a run dies are complete objects (atomic PUT, atomic rename); the
    re-run reuses them and publishes the same bytes as an uninterrupted run would."""
    from contracts.processed import META_FILE, local_version_dir, version_prefix
    from pipeline import incremental
    from pipeline.storage import iter_objects, object_exists
    from pipeline.upload import upload_tree

    settings, dataset, root = tiny_dataset_factory({"neg": 20, "pos": 20}, shard_size=4)
    upload_tree(root, dataset, settings)
    real = incremental.write_shard
    calls = []

    def crash_on_third_shard(path, records):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(path, records)

    monkeypatch.setattr(incremental, "write_shard", crash_on_third_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(settings, dataset)
    monkeypatch.setattr(incremental, "write_shard", real)
    keys = [o["Key"] for o in iter_objects(s3, settings.s3_bucket, f"processed/{dataset}/")]
    assert not any(k.endswith(META_FILE) for k in keys), keys  # nothing published
    assert not list((settings.hemaflow_home / "cache" / "processed" / dataset).glob("*"))
    stored = list((settings.hemaflow_home / "cache" / "shards" / dataset).glob("*"))
    assert not [p for p in stored if p.name.endswith(".part")]  # the failed writer left no partial file

    result = _run(settings, dataset)
    assert result.created and f"{len(stored)} reused" in result.message
    assert object_exists(s3, settings.s3_bucket, version_prefix(dataset, result.dataset_version) + META_FILE)
    local = local_version_dir(settings, dataset, result.dataset_version)
    assert (local / META_FILE).is_file()
    published = _shards(s3, settings, dataset, result.dataset_version)
    assert {n: (local / n).read_bytes() for n in published} == {n: body for n, (_, body) in published.items()}

"""Content-bucketed shards and the prepared-pixel cache key (pipeline/incremental.py), without a stack."""

from __future__ import annotations

import hashlib

import numpy as np


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"sha256": hashlib.sha256(str(i).encode()).hexdigest(), "label": "ab"[i % 2]} for i in range(start, start + n)]


def test_bucket_count_is_a_stable_power_of_two():
    from pipeline.incremental import bucket_count

    assert [bucket_count(n, 100) for n in (0, 1, 100, 150, 280, 300, 1000)] == [1, 1, 1, 2, 2, 4, 8]
    # +5 % images never changes the count away from a power-of-two boundary
    assert bucket_count(1830, 512) == bucket_count(int(1830 * 1.05), 512) == 4


def test_adding_images_changes_only_the_buckets_they_hash_to():
    from pipeline.incremental import plan_shards, shard_key

    index = {"a": 0, "b": 1}
    prep = {"image_size": 32, "preprocess_version": 1}
    before = _rows(400)
    added = _rows(3, start=10_000)
    after = before + added
    plan_a = {b: shard_key(rows, index, prep) for b, _, rows in plan_shards(before, 25)}
    plan_b = {b: shard_key(rows, index, prep) for b, _, rows in plan_shards(after, 25)}
    assert set(plan_a) == set(plan_b) and len(plan_a) == 16
    changed = {b for b in plan_a if plan_a[b] != plan_b[b]}
    touched = {b for b, _, rows in plan_shards(after, 25) if any(r in added for r in rows)}
    assert changed == touched and 1 <= len(changed) <= 3
    # removing one image: only its bucket changes
    removed = {b: shard_key(rows, index, prep) for b, _, rows in plan_shards(before[1:], 25)}
    assert sum(removed[b] != plan_a[b] for b in plan_a) == 1


def test_shard_key_depends_on_labels_and_parameters():
    from pipeline.incremental import shard_key

    rows = _rows(5)
    base = shard_key(rows, {"a": 0, "b": 1}, {"image_size": 32, "preprocess_version": 1})
    assert shard_key(rows, {"a": 1, "b": 0}, {"image_size": 32, "preprocess_version": 1}) != base
    assert shard_key(rows, {"a": 0, "b": 1}, {"image_size": 32, "preprocess_version": 2}) != base
    assert shard_key(rows[::-1], {"a": 0, "b": 1}, {"image_size": 32, "preprocess_version": 1}) != base


def test_prepared_cache_is_keyed_by_every_preprocessing_parameter(tmp_path, monkeypatch):
    """PREPROCESS_VERSION, the crop policy and the size are all in the key: a change re-decodes."""
    from contracts.settings import get_settings
    from pipeline import incremental
    from pipeline import preprocess as pre
    from pipeline.incremental import prepared_path, prepared_pixels

    settings = get_settings(hemaflow_home=tmp_path, image_size=16)
    prep = pre.preprocessing_params(settings)
    assert {"image_size", "policy", "preprocess_version", "resample"} <= set(prep)
    sha = "ab" * 32
    raw = tmp_path / "raw"
    raw.write_bytes(b"x")
    calls = []

    def prepare(data: bytes):
        calls.append(data)
        return np.full((16, 16, 3), len(calls), dtype=np.uint8)

    first = prepared_pixels(settings, prep, sha, lambda: raw, prepare)
    assert prepared_pixels(settings, prep, sha, lambda: raw, prepare) == first and len(calls) == 1
    monkeypatch.setattr(incremental, "PREPROCESS_VERSION", incremental.PREPROCESS_VERSION + 1)
    bumped = pre.preprocessing_params(settings)
    other_policy = {**prep, "policy": "resize_longer_pad_square"}
    assert len({prepared_path(settings, p, sha) for p in (prep, bumped, other_policy)}) == 3
    assert prepared_pixels(settings, bumped, sha, lambda: raw, prepare) != first and len(calls) == 2
    # a truncated entry (killed writer on a non-atomic filesystem) is not trusted
    prepared_path(settings, prep, sha).write_bytes(first[:10])
    prepared_pixels(settings, prep, sha, lambda: raw, prepare)
    assert len(calls) == 3


def test_adding_five_percent_leaves_most_small_shards_unchanged():
    """With the default SHARD_SIZE a +5 % addition changes about 1 - exp(-0.05 * m) of the shards (m: mean
    images per shard, ~3-4 here): at least 75 % keep their key, so their bytes are neither written nor uploaded;
    with 512-image shards every shard changes (why the default is small)."""
    from contracts.settings import Settings
    from pipeline.incremental import plan_shards, shard_key

    index = {"a": 0, "b": 1}
    prep = {"image_size": 32, "preprocess_version": 1}
    before, added = _rows(2000), _rows(100, start=50_000)

    def changed_fraction(shard_size: int) -> float:
        old = {shard_key(rows, index, prep) for _, _, rows in plan_shards(before, shard_size)}
        new = [shard_key(rows, index, prep) for _, _, rows in plan_shards(before + added, shard_size)]
        return sum(k not in old for k in new) / len(new)

    default = Settings.model_fields["shard_size"].default
    assert 0.05 < changed_fraction(default) <= 0.25
    assert changed_fraction(512) == 1.0

"""Content-hash folds: every image is tested exactly once; validation never overlaps the test fold;
the pipeline split of the in-process harness is the pipeline's own."""

from __future__ import annotations

import hashlib

import numpy as np

from training.experiment import FolderData, fold_splits, pipeline_splits


def _data(n: int = 600) -> FolderData:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    return FolderData(np.zeros((n, 2, 2, 3), np.uint8), np.arange(n) % 3, hashes, ["a", "b", "c"], None)


def test_folds_partition_the_images():
    data, k = _data(), 5
    tested = np.concatenate([fold_splits(data, k, f, "salt")["test"] for f in range(k)])
    assert sorted(tested.tolist()) == list(range(len(data.y)))
    for f in range(k):
        idx = fold_splits(data, k, f, "salt")
        sets = [set(idx[s].tolist()) for s in ("train", "val", "test")]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert sum(map(len, sets)) == len(data.y)
        assert 0.1 < len(sets[1]) / len(data.y) < 0.2  # ~15 % of the rest as validation
        assert 0.15 < len(sets[2]) / len(data.y) < 0.25


def test_pipeline_split_matches_assign_splits():
    from contracts.settings import get_settings
    from contracts.splits import assign_splits

    data, s = _data(), get_settings()
    idx = pipeline_splits(data, s)
    expected = assign_splits(((h, data.labels[y]) for h, y in zip(data.sha256, data.y)), s.val_fraction,
                             s.test_fraction, s.split_salt)
    for split, members in idx.items():
        assert all(expected[data.sha256[i]] == split for i in members)

"""Content-hash splits: pure, stable across versions, and every small label reaches val and test."""

from __future__ import annotations

import hashlib
from collections import Counter

from contracts.splits import assign_splits, split_for_score, split_score


def _sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_split_is_a_pure_function_of_hash_and_salt():
    sha = _sha(1)
    assert split_score(sha, "a") == split_score(sha, "a")
    assert 0 <= split_score(sha, "a") < 1
    assert split_score(sha, "a") != split_score(sha, "b")
    assert split_for_score(0.01, 0.15, 0.15) == "test"
    assert split_for_score(0.2, 0.15, 0.15) == "val"
    assert split_for_score(0.31, 0.15, 0.15) == "train"


def test_fractions_are_respected_per_label():
    items = [(_sha(i), "a" if i % 3 else "b") for i in range(6000)]
    splits = assign_splits(items, 0.15, 0.15, "salt")
    for label in ("a", "b"):
        c = Counter(splits[s] for s, lab in items if lab == label)
        total = sum(c.values())
        assert abs(c["test"] / total - 0.15) < 0.03 and abs(c["val"] / total - 0.15) < 0.03, c


def test_an_image_keeps_its_split_when_the_dataset_grows():
    base = [(_sha(i), "a") for i in range(500)]
    grown = base + [(_sha(i), "a") for i in range(500, 900)]
    first = assign_splits(base, 0.15, 0.15, "s")
    second = assign_splits(grown, 0.15, 0.15, "s")
    assert all(first[s] == second[s] for s, _ in base)


def test_every_label_with_three_images_gets_val_and_test():
    for offset in range(200):
        items = [(_sha(offset * 10 + i), "tiny") for i in range(3)] + [(_sha(10_000 + i), "big") for i in range(50)]
        splits = assign_splits(items, 0.15, 0.15, f"salt{offset}")
        tiny = Counter(splits[s] for s, lab in items if lab == "tiny")
        assert tiny == {"train": 1, "val": 1, "test": 1}, (offset, tiny)
        assert splits == assign_splits(list(reversed(items)), 0.15, 0.15, f"salt{offset}")  # order-free


def test_labels_with_fewer_than_three_images_are_left_to_the_hash():
    items = [(_sha(i), "pair") for i in range(2)]
    splits = assign_splits(items, 0.15, 0.15, "x")
    assert all(splits[s] == split_for_score(split_score(s, "x"), 0.15, 0.15) for s, _ in items)

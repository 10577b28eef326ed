"""Near-duplicate fingerprints and groups, and the splits that keep a group together."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from contracts.near_duplicates import (NEAR_DUPLICATE_MAX_BITS, image_fingerprint, informative,
                                       near_duplicate_groups, near_pairs)
from contracts.splits import assign_splits, grouped_scores, split_score


def _field(seed: int, size: int = 224) -> np.ndarray:
    """A smear-like field: a few dark discs on a light, slightly noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 225.0) + rng.normal(0, 4, (size, size, 3))
    for _ in range(12):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(8, 30)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[disc] = rng.uniform([60, 20, 90], [160, 110, 200])
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _bits(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def test_a_re_encoded_or_slightly_shifted_field_is_a_near_duplicate():
    field = _field(1)
    original = image_fingerprint(_jpeg(field, 95))
    assert _bits(original, image_fingerprint(_jpeg(field, 60))) <= NEAR_DUPLICATE_MAX_BITS
    shifted = np.roll(field, 2, axis=1)
    assert _bits(original, image_fingerprint(_jpeg(shifted, 90))) <= NEAR_DUPLICATE_MAX_BITS
    png = io.BytesIO()
    Image.fromarray(field).save(png, "PNG")
    assert _bits(original, image_fingerprint(png.getvalue())) <= NEAR_DUPLICATE_MAX_BITS


def test_different_fields_are_far_apart():
    prints = [image_fingerprint(_jpeg(_field(seed))) for seed in range(40)]
    distances = [_bits(a, b) for i, a in enumerate(prints) for b in prints[i + 1:]]
    assert min(distances) > NEAR_DUPLICATE_MAX_BITS
    assert all(informative(p) for p in prints)


def test_flat_images_are_never_grouped():
    flat = image_fingerprint(_jpeg(np.full((64, 64, 3), 200, np.uint8)))
    assert not informative(flat)
    groups = near_duplicate_groups({"a" * 64: flat, "b" * 64: flat, "c" * 64: None})
    assert groups == {"a" * 64: "a" * 64, "b" * 64: "b" * 64, "c" * 64: "c" * 64}


def test_groups_are_chains_named_by_their_smallest_member():
    base = 0x0F0F_3C3C_5A5A_F0F0
    prints = {"d": base, "b": base ^ 0b111, "a": base ^ 0b111 ^ (0b111 << 20), "c": base ^ (2**40 - 1)}
    groups = near_duplicate_groups({k: f"{v:016x}" for k, v in prints.items()})
    assert groups["d"] == groups["b"] == groups["a"] == "a"  # d~b and b~a: one group through b
    assert groups["c"] == "c"


def _all_pairs(codes: np.ndarray, max_bits: int) -> set[tuple[int, int]]:
    distance = np.bitwise_count(codes[:, None] ^ codes[None, :])
    return {(int(i), int(j)) for i, j in zip(*np.nonzero(distance <= max_bits)) if i < j}


def _codes_with_near_copies(max_bits: int, n: int, skew: float) -> np.ndarray:
    """n random 64-bit codes (each bit set with probability `skew`, so bands collide often when it is
    far from 0.5), a third of them copied with 0..max_bits + 3 bits flipped (on both sides of the
    distance), a sixth twice (chains)."""
    rng = np.random.default_rng(max_bits)
    bits = rng.random((n, 64)) < skew
    codes = (bits.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    copies = []
    for code in np.concatenate([codes[: n // 3], codes[: n // 6]]):
        flips = rng.choice(64, size=int(rng.integers(0, max_bits + 4)), replace=False)
        copies.append(code ^ np.uint64(sum(1 << int(f) for f in flips)))
    return rng.permutation(np.concatenate([codes, np.asarray(copies, np.uint64)]))


@pytest.mark.parametrize("max_bits", [0, 1, 5, 9])
@pytest.mark.parametrize("skew", [0.5, 0.1])
def test_banded_pairs_are_exactly_all_pairs_within_the_distance(max_bits, skew):
    codes = _codes_with_near_copies(max_bits, 900, skew)
    pairs = near_pairs(codes, max_bits)
    expected = _all_pairs(codes, max_bits)
    assert len(expected) > 100  # planted copies within the distance (more by chance at skew 0.1)
    assert {tuple(map(int, p)) for p in pairs} == expected and len(pairs) == len(expected)
    assert near_pairs(codes[:1], max_bits).shape == near_pairs(codes[:0], max_bits).shape == (0, 2)


def test_a_distance_the_bands_cannot_guarantee_is_refused():
    with pytest.raises(ValueError, match="max_bits must be in"):
        near_pairs(np.zeros(3, np.uint64), 63)


def _dataset(n_fields: int = 150, copies_every: int = 3):
    """(sha, label, fingerprint) for generated fields, every third one saved twice (re-encoded)."""
    rows = []
    for seed in range(n_fields):
        field = _field(seed, 96)
        for quality in ((95, 70) if seed % copies_every == 0 else (95,)):
            data = _jpeg(field, quality)
            rows.append((hashlib.sha256(data).hexdigest(), "abnormal" if seed % 2 else "normal",
                         image_fingerprint(data), seed))
    return rows


@pytest.mark.parametrize("salt", ["hemaflow-v1", "another-salt", "third"])
def test_near_copies_share_a_split_and_would_not_without_fingerprints(salt):
    rows = _dataset()
    fingerprints = {sha: fp for sha, _, fp, _ in rows}
    grouped = assign_splits(((sha, label) for sha, label, _, _ in rows), 0.15, 0.15, salt, fingerprints)
    plain = assign_splits(((sha, label) for sha, label, _, _ in rows), 0.15, 0.15, salt)
    by_field: dict[int, list[str]] = {}
    for sha, _, _, seed in rows:
        by_field.setdefault(seed, []).append(sha)
    pairs = [shas for shas in by_field.values() if len(shas) == 2]
    assert len(pairs) == 50
    assert all(grouped[a] == grouped[b] for a, b in pairs)
    assert any(plain[a] != plain[b] for a, b in pairs)  # the leak the groups close
    singles = [shas[0] for shas in by_field.values() if len(shas) == 1]
    assert all(grouped[sha] == plain[sha] for sha in singles)  # nothing else moves


def test_a_group_takes_its_lowest_score():
    rows = _dataset(30)
    fingerprints = {sha: fp for sha, _, fp, _ in rows}
    scores = grouped_scores([sha for sha, *_ in rows], "salt", fingerprints)
    groups = near_duplicate_groups(fingerprints)
    for sha, group in groups.items():
        members = [h for h, g in groups.items() if g == group]
        assert scores[sha] == min(split_score(h, "salt") for h in members)


def test_folds_keep_near_copies_together():
    from training.experiment import FolderData, fold_splits

    rows = _dataset(90)
    data = FolderData(np.zeros((len(rows), 2, 2, 3), np.uint8), np.array([label == "abnormal" for _, label, *_ in rows]),
                      [sha for sha, *_ in rows], ["normal", "abnormal"], "abnormal", [fp for _, _, fp, _ in rows])
    fold_of = {}
    for f in range(3):
        for i in fold_splits(data, 3, f, "salt")["test"]:
            fold_of[rows[int(i)][3], rows[int(i)][0]] = f
    for seed in range(0, 90, 3):
        assert len({f for (s, _), f in fold_of.items() if s == seed}) == 1


def test_validation_reports_near_copies_with_different_labels():
    from pipeline.validate import near_duplicate_report

    a, b = _jpeg(_field(7), 95), _jpeg(_field(7), 70)
    rows = [{"sha256": hashlib.sha256(d).hexdigest(), "key": f"raw/x/{name}.jpg", "label": label,
             "fingerprint": image_fingerprint(d)} for d, name, label in ((a, "one", "normal"), (b, "two", "abnormal"))]
    rows.append({"sha256": "f" * 64, "key": "raw/x/three.jpg", "label": "normal",
                 "fingerprint": image_fingerprint(_jpeg(_field(8)))})
    report = near_duplicate_report(rows)
    assert report["groups"] == 1 and report["images"] == 2
    assert report["across_labels"] == [["abnormal: raw/x/two.jpg", "normal: raw/x/one.jpg"]]
    assert "different labels" in report["warnings"][0]

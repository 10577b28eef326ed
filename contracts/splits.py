"""Train/val/test splits decided by content hash.

Each image's split is a pure function of (sha256, SPLIT_SALT): the salted hash maps the
image to a score in [0, 1); scores below TEST_FRACTION are `test`, the next VAL_FRACTION
are `val`, the rest `train`. An image therefore keeps its split across dataset versions
(a champion and a candidate are compared on truly held-out images), and byte-identical
duplicates can never straddle splits. Because the score is independent of the label, every
label is split in the same proportions (stratified in expectation).

Near-duplicates (SPLITS_VERSION 2): given fingerprints (contracts.near_duplicates), every image
of a near-duplicate group takes the group's lowest score, so the group lands in one split
whatever the labels of its members. An image moves only when a near-copy of it with a lower
score arrives later; then the whole group moves together.

Small-label guarantee: a label with >= 3 images always gets at least one image in each of
test, val and train. When the hash leaves a split empty, the label's image whose score is
nearest that split's band is moved into it (deterministic; only tiny labels are affected).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping

SPLITS_VERSION = 2  # 2: near-duplicate groups share a split
MIN_IMAGES_FOR_ALL_SPLITS = 3


def split_score(sha256: str, salt: str) -> float:
    """The image's position in [0, 1), from its content hash and the salt."""
    digest = hashlib.sha256(f"{salt}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_for_score(score: float, val_fraction: float, test_fraction: float) -> str:
    if score < test_fraction:
        return "test"
    if score < test_fraction + val_fraction:
        return "val"
    return "train"


def _band_center(split: str, val_fraction: float, test_fraction: float) -> float:
    return {"test": test_fraction / 2, "val": test_fraction + val_fraction / 2,
            "train": (1 + test_fraction + val_fraction) / 2}[split]


def grouped_scores(shas: Iterable[str], salt: str, fingerprints: Mapping[str, str | None] | None = None
                   ) -> dict[str, float]:
    """sha256 -> split score; with fingerprints, the lowest score of the image's near-duplicate group."""
    from contracts.near_duplicates import near_duplicate_groups

    scores = {sha: split_score(sha, salt) for sha in shas}
    if not fingerprints:
        return scores
    groups = near_duplicate_groups({sha: fingerprints.get(sha) for sha in scores})
    lowest: dict[str, float] = {}
    for sha, group in groups.items():
        lowest[group] = min(lowest.get(group, 1.0), scores[sha])
    return {sha: lowest[groups[sha]] for sha in scores}


def assign_splits(
    items: Iterable[tuple[str, str]], val_fraction: float, test_fraction: float, salt: str,
    fingerprints: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """Map sha256 -> split for (sha256, label) pairs, with the small-label guarantee.

    `fingerprints` (sha256 -> fingerprint) keeps near-duplicate groups in one split; the small-label
    guarantee may still move one image of a group of a label with fewer than a handful of images."""
    pairs = list(items)
    scores = grouped_scores((sha for sha, _ in pairs), salt, fingerprints)
    by_label: dict[str, dict[str, float]] = defaultdict(dict)
    for sha, label in pairs:
        by_label[label][sha] = scores[sha]
    out: dict[str, str] = {}
    for label in sorted(by_label):
        scores = by_label[label]
        assigned = {sha: split_for_score(sc, val_fraction, test_fraction) for sha, sc in scores.items()}
        if len(scores) >= MIN_IMAGES_FOR_ALL_SPLITS:
            for wanted in ("test", "val", "train"):
                members = [sha for sha, sp in assigned.items() if sp == wanted]
                if members:
                    continue
                sizes = defaultdict(int)
                for sp in assigned.values():
                    sizes[sp] += 1
                # Take from splits that keep at least one image; nearest score to the band wins.
                donors = [sha for sha, sp in assigned.items() if sizes[sp] > 1]
                center = _band_center(wanted, val_fraction, test_fraction)
                pick = min(donors, key=lambda sha: (abs(scores[sha] - center), sha))
                assigned[pick] = wanted
        out.update(assigned)
    return out

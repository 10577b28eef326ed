"""Train/val/test splits decided by content hash.

Each image's split is a pure function of (sha256, SPLIT_SALT): the salted hash maps the
image to a score in [0, 1); scores below TEST_FRACTION are `test`, the next VAL_FRACTION
are `val`, the rest `train`. An image therefore keeps its split across dataset versions
(a champion and a candidate are compared on truly held-out images), and byte-identical
duplicates can never straddle splits. Because the score is independent of the label, every
label is split in the same proportions (stratified in expectation).

Small-label guarantee: a label with >= 3 images always gets at least one image in each of
test, val and train. When the hash leaves a split empty, the label's image whose score is
nearest that split's band is moved into it (deterministic; only tiny labels are affected).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

SPLITS_VERSION = 1
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


def assign_splits(
    items: Iterable[tuple[str, str]], val_fraction: float, test_fraction: float, salt: str
) -> dict[str, str]:
    """Map sha256 -> split for (sha256, label) pairs, with the small-label guarantee."""
    by_label: dict[str, dict[str, float]] = defaultdict(dict)
    for sha, label in items:
        by_label[label][sha] = split_score(sha, salt)
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

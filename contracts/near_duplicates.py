"""Near-duplicate images: a 64-bit gradient fingerprint per image and the groups it implies.

Why: the same smear field is often saved twice (re-encoded, refocused, shifted by a few pixels).
Byte-identical copies share a sha256 and so a split, but near-copies do not: on
`../shared/data/leukemia` 38 groups of distinct files (76 files) are the same field, and under the
hash split 12 of the 401 test images had their near-copy in train or validation, flattering every
test and k-fold figure (`benchmarks/near_duplicates.py`). `contracts.splits` puts a group in one split.

Fingerprint: the image decoded (JPEG at a reduced scale), converted to RGB then grey, resized to
9 x 8 and one bit per horizontal neighbour pair ("difference hash"), as 16 hex digits. A pure
function of the bytes. Two images are near-duplicates when their fingerprints differ in at most
NEAR_DUPLICATE_MAX_BITS bits. Measured on both built-in sets (against a 16 x 16 RGB
pixel-distance check): every pair within 5 bits is the same field, and pbc8's first pair of
different cells is 6 bits apart, so 5. Fingerprints with almost no gradient (blank or flat images)
are never grouped: they would pull unrelated blank images into one group.
"""

from __future__ import annotations

import numpy as np

NEAR_DUPLICATE_MAX_BITS = 5
FINGERPRINT_BITS = 64
FINGERPRINT_DECODE_SIZE = 64  # JPEG draft target: plenty for a 9 x 8 thumbnail
# Fewer set (or unset) bits than this: too flat to say anything about content.
MIN_INFORMATIVE_BITS = 4


def image_fingerprint(data: bytes, max_pixels: int | None = None) -> str:
    """The image's difference hash (16 hex digits); raises contracts.imaging.ImageRejected."""
    from PIL import Image

    from contracts.imaging import DEFAULT_MAX_PIXELS, open_image, to_rgb

    img = to_rgb(open_image(data, max_pixels or DEFAULT_MAX_PIXELS, draft_size=FINGERPRINT_DECODE_SIZE))
    grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def informative(fingerprint: str) -> bool:
    ones = int(fingerprint, 16).bit_count()
    return MIN_INFORMATIVE_BITS <= ones <= FINGERPRINT_BITS - MIN_INFORMATIVE_BITS


def _bands(max_bits: int) -> list[tuple[int, int]]:
    """(shift, width) of max_bits + 1 bands tiling the 64 bits: two codes within max_bits bits differ
    in at most max_bits bands, so they agree exactly on at least one (pigeonhole)."""
    count = max_bits + 1
    widths = [FINGERPRINT_BITS // count + (1 if i < FINGERPRINT_BITS % count else 0) for i in range(count)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [(int(shift), width) for shift, width in zip(shifts, widths)]


def near_pairs(codes: np.ndarray, max_bits: int = NEAR_DUPLICATE_MAX_BITS) -> np.ndarray:
    """[m, 2] index pairs (i < j) of the uint64 `codes` within max_bits bits, each pair once.

    Exact, and without comparing all pairs: only codes that agree on one of max_bits + 1 bands are
    compared (sorted by that band, position i against i + 1, i + 2, ... while the band still agrees),
    so the work follows the number of same-band pairs (about n^2 / 2^11 over six bands for 5 bits)
    rather than n^2, and memory stays O(n)."""
    if not 0 <= max_bits < FINGERPRINT_BITS - 1:
        raise ValueError(f"max_bits must be in [0, {FINGERPRINT_BITS - 2}], not {max_bits}")
    codes = np.asarray(codes, dtype=np.uint64)
    found = [np.empty((0, 2), np.int64)]
    for shift, width in _bands(max_bits):
        keys = (codes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        active, step = np.arange(len(codes) - 1), 1
        while active.size:  # sorted positions i whose band still equals that of i + step
            active = active[active + step < len(codes)]
            active = active[sorted_keys[active] == sorted_keys[active + step]]
            a, b = order[active], order[active + step]
            close = np.bitwise_count(codes[a] ^ codes[b]) <= max_bits
            found.append(np.stack([np.minimum(a, b)[close], np.maximum(a, b)[close]], axis=1))
            step += 1
    return np.unique(np.concatenate(found), axis=0)


def near_duplicate_groups(fingerprints: dict[str, str | None],
                          max_bits: int = NEAR_DUPLICATE_MAX_BITS) -> dict[str, str]:
    """sha256 -> group id (the group's smallest sha256) for every item with a usable fingerprint.

    Groups are the connected components of "within max_bits": a chain of near-copies is one group.
    Items without an informative fingerprint are their own group. Pairs come from `near_pairs`
    (exact; `benchmarks/near_duplicates.py --scale` times it against comparing all pairs)."""
    shas = sorted(fingerprints)
    usable = [h for h in shas if fingerprints[h] and informative(str(fingerprints[h]))]
    parent = {h: h for h in shas}

    def root(h: str) -> str:
        while parent[h] != h:
            parent[h] = parent[parent[h]]
            h = parent[h]
        return h

    codes = np.array([int(str(fingerprints[h]), 16) for h in usable], dtype=np.uint64)
    for i, j in near_pairs(codes, max_bits):
        a, b = root(usable[int(i)]), root(usable[int(j)])
        if a != b:
            parent[max(a, b)] = min(a, b)
    return {h: root(h) for h in shas}

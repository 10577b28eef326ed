"""Near-duplicate leakage between splits, before and after near-duplicate groups (contracts.splits).

For a folder-per-class dataset: how many distinct files are near-copies of another, and how many
test images (pipeline split) or k-fold test images have a near-copy on the training side, with the
content-hash split alone and with groups, on the splits and folds of the lever / k-fold harness
(training.experiment, the pipeline's own assignment). Also the cost: fingerprint time per image
(a sample) and grouping time.

`--scale N [N ...]` times the grouping's pair search (contracts.near_duplicates.near_pairs, banded)
against comparing all pairs (the method before it, kept here as the baseline) on N fingerprints
drawn bit by bit with the dataset's own bit frequencies, a third of them near-copies; all pairs only
up to ALL_PAIRS_MAX_N. Medians of --repeats runs, and the ratio.

    .venv/bin/python benchmarks/near_duplicates.py --dataset leukemia [--folds 3]
    .venv/bin/python benchmarks/near_duplicates.py --dataset pbc8 --scale 6000 50000 1000000
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIMED_IMAGES = 300  # images whose fingerprint is timed (the rest come from the harness's cache)
ALL_PAIRS_MAX_N = 50_000  # the baseline grows with n²: ~3 s here at 50 000, ~1 min at 200 000
ALL_PAIRS_BLOCK = 1 << 23  # pairwise distances held at once by the baseline (as the code before the bands)


def all_pairs(codes: np.ndarray, max_bits: int) -> int:
    """The baseline: every pair compared, in blocks of bounded memory; returns the pair count."""
    found, rows = 0, max(1, ALL_PAIRS_BLOCK // max(1, len(codes)))
    for start in range(0, len(codes), rows):
        distance = np.bitwise_count(codes[start:start + rows, None] ^ codes[None, start:])
        found += int(np.count_nonzero(np.triu(distance <= max_bits, k=1)))  # j > i: each pair once
    return found


def _pack(bits: np.ndarray) -> np.ndarray:
    """[n, 64] booleans -> n uint64 codes (bit b of each row at 1 << b)."""
    return (bits.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


def scaled_codes(prints: list[str], n: int, seed: int = 0) -> np.ndarray:
    """n codes: two thirds drawn with the real fingerprints' per-bit frequencies, a third copies of
    them with 0-7 bits flipped."""
    rng = np.random.default_rng(seed)
    real = np.array([[int(p, 16) >> b & 1 for b in range(64)] for p in prints], dtype=bool)
    codes = _pack(rng.random((n - n // 3, 64)) < real.mean(axis=0))
    noise = _pack(rng.random((n // 3, 64)) < rng.integers(0, 8, n // 3)[:, None] / 64)
    return rng.permutation(np.concatenate([codes, codes[rng.integers(0, len(codes), n // 3)] ^ noise]))


def _timed(fn, repeats: int) -> tuple[float, object]:
    """(median wall seconds of `repeats` calls, the last call's result)."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def scale(prints: list[str], sizes: list[int], repeats: int) -> None:
    from contracts.near_duplicates import NEAR_DUPLICATE_MAX_BITS, near_pairs

    for n in sizes:
        codes = scaled_codes(prints, n)
        banded_s, pairs = _timed(lambda: len(near_pairs(codes, NEAR_DUPLICATE_MAX_BITS)), repeats)
        line = f"n={n}: banded {banded_s:.3f} s ({pairs} pairs)"
        if n <= ALL_PAIRS_MAX_N:
            baseline_s, expected = _timed(lambda: all_pairs(codes, NEAR_DUPLICATE_MAX_BITS), repeats)
            if expected != pairs:
                raise SystemExit(f"n={n}: banded found {pairs} pairs, all pairs {expected}")
            line += f"; all pairs {baseline_s:.3f} s (same pairs); {baseline_s / banded_s:.1f}x faster"
        print(line, flush=True)


def leaks(split_of: dict[str, str], groups: dict[str, str], held_out: str) -> int:
    """Held-out images with a near-copy in another split."""
    members: dict[str, set[str]] = {}
    for sha, group in groups.items():
        members.setdefault(group, set()).add(split_of[sha])
    return sum(1 for sha, group in groups.items() if split_of[sha] == held_out and len(members[group]) > 1)


def held_out_of(data, idx: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 -> split name, from the harness's index arrays."""
    return {data.sha256[int(i)]: split for split, members in idx.items() for i in members}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--scale", type=int, nargs="*", default=[], help="time the pair search on N fingerprints")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from benchmarks.levers import CACHE
    from contracts.dataset_spec import load_spec
    from contracts.near_duplicates import image_fingerprint, near_duplicate_groups
    from contracts.settings import get_settings
    from training import experiment as ex

    s, spec = get_settings(), load_spec(args.dataset)
    # The harness's images: de-duplicated by sha256, unreadable ones left out, fingerprints included.
    data = ex.load_folder(args.data / args.dataset, spec, s.image_size, spec.crop, CACHE)
    if args.scale:
        scale(data.fingerprints or [], args.scale, args.repeats)
        return 0
    paths = sorted(p for p in (args.data / args.dataset).rglob("*") if p.suffix.lower() in ex.IMAGE_SUFFIXES)
    seconds = []
    for path in paths[:: max(1, len(paths) // TIMED_IMAGES)]:
        raw = path.read_bytes()
        started = time.perf_counter()
        image_fingerprint(raw)
        seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    groups = near_duplicate_groups(data.fingerprint_map())
    grouping_s = time.perf_counter() - started
    members: dict[str, list[str]] = {}
    for sha, group in groups.items():
        members.setdefault(group, []).append(sha)
    label_of = {sha: data.labels[int(y)] for sha, y in zip(data.sha256, data.y)}
    grouped = [m for m in members.values() if len(m) > 1]
    mixed = sum(1 for m in grouped if len({label_of[h] for h in m}) > 1)
    print(f"{args.dataset}: {len(data.sha256)} distinct files; {len(grouped)} near-duplicate groups holding "
          f"{sum(map(len, grouped))} files ({mixed} with mixed labels)")
    print(f"fingerprint: median {statistics.median(seconds) * 1000:.2f} ms per image ({len(seconds)} timed); "
          f"grouping {grouping_s:.2f} s")
    for name, variant in (("content hash only (splits v1)", dataclasses.replace(data, fingerprints=None)),
                          ("near-duplicate groups (splits v2)", data)):
        split_of = held_out_of(variant, ex.pipeline_splits(variant, s))
        fold_leaks = sum(leaks(held_out_of(variant, ex.fold_splits(variant, args.folds, f, s.split_salt)),
                               groups, "test") for f in range(args.folds))
        test = sum(1 for v in split_of.values() if v == "test")
        print(f"{name}: test images with a near-copy in train/val {leaks(split_of, groups, 'test')} of {test}; "
              f"validation images with one in train/test {leaks(split_of, groups, 'val')}; "
              f"{args.folds}-fold held-out images with one in their training folds {fold_leaks} of {len(split_of)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

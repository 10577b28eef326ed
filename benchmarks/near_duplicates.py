"""Near-duplicate leakage between splits, before and after near-duplicate groups (contracts.splits).

For a folder-per-class dataset: how many distinct files are near-copies of another, and how many
test images (pipeline split) or k-fold test images have a near-copy on the training side, with the
content-hash split alone and with groups. Also the cost: fingerprint time per image and grouping time.

    .venv/bin/python benchmarks/near_duplicates.py --dataset leukemia [--folds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def leaks(split_of: dict[str, str], groups: dict[str, str], held_out: str) -> int:
    """Held-out images with a near-copy in another split."""
    members: dict[str, set[str]] = {}
    for sha, group in groups.items():
        members.setdefault(group, set()).add(split_of[sha])
    return sum(1 for sha, group in groups.items() if split_of[sha] == held_out and len(members[group]) > 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args(argv)

    from contracts.dataset_spec import load_spec
    from contracts.near_duplicates import near_duplicate_groups
    from contracts.near_duplicates import image_fingerprint
    from contracts.settings import get_settings
    from contracts.splits import assign_splits, grouped_scores

    s, spec = get_settings(), load_spec(args.dataset)
    labels, prints, seconds = {}, {}, []
    for folder in spec.class_folders:
        for path in sorted((args.data / args.dataset / folder).glob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            started = time.perf_counter()
            prints[sha] = image_fingerprint(data)
            seconds.append(time.perf_counter() - started)
            labels[sha] = spec.label_of(folder)
    started = time.perf_counter()
    groups = near_duplicate_groups(prints)
    grouping_s = time.perf_counter() - started
    sizes: dict[str, int] = {}
    for group in groups.values():
        sizes[group] = sizes.get(group, 0) + 1
    in_groups = sum(n for n in sizes.values() if n > 1)
    mixed = sum(1 for g, n in sizes.items() if n > 1 and len({labels[h] for h, x in groups.items() if x == g}) > 1)
    print(f"{args.dataset}: {len(prints)} distinct files; {sum(1 for n in sizes.values() if n > 1)} near-duplicate "
          f"groups holding {in_groups} files ({mixed} with mixed labels)")
    print(f"fingerprint: median {statistics.median(seconds) * 1000:.2f} ms per image; grouping {grouping_s:.2f} s")
    for name, fps in (("content hash only (splits v1)", None), ("near-duplicate groups (splits v2)", prints)):
        split_of = assign_splits(labels.items(), s.val_fraction, s.test_fraction, s.split_salt, fps)
        scores = grouped_scores(labels, s.split_salt, fps)
        fold_of = {h: f"fold{int(scores[h] * args.folds)}" for h in labels}
        fold_leaks = sum(leaks({h: ("test" if fold_of[h] == f"fold{f}" else "rest") for h in labels}, groups, "test")
                         for f in range(args.folds))
        test = sum(1 for v in split_of.values() if v == "test")
        print(f"{name}: test images with a near-copy in train/val {leaks(split_of, groups, 'test')} of {test}; "
              f"validation images with one in train/test {leaks(split_of, groups, 'val')}; "
              f"{args.folds}-fold held-out images with one in their training folds {fold_leaks} of {len(labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

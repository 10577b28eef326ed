"""Threshold rules on saved k-fold models: what each rule gives on unseen folds, and which
abnormal images every configuration misses (no training: reads the logits that
`benchmarks/accuracy.py --folds K --lever NAME` saved).

    .venv/bin/python benchmarks/threshold_rules.py --dataset leukemia --folds 3 --lever width20 depth6 colour0
    ... --lever baseline seed2 seed3 --missed-csv missed.csv   # the images every lever misses, for review

For each lever and rule (training.evaluate.THRESHOLD_RULES), each fold's temperature and threshold
come from its own validation band, as the pipeline chooses them, and the test folds are pooled:
sensitivity and specificity with 95 % bootstrap intervals, missed positives and false alarms, plain
and as served (8-view TTA); with several levers (seeds of one recipe) their mean too. Then the
positives each lever misses as served, and how many of them every lever misses (a floor no
configuration moved) or only one does (variance between models).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVED = "tta (8 views)"


def saved_folds(dataset: str, crop: str, lever, folds: int, cache: Path) -> list[Path] | None:
    from training import experiment as ex

    paths = [cache / f"logits-{ex.lever_key(dataset, crop, lever, f'fold{f}of{folds}')}.npz" for f in range(folds)]
    return paths if all(p.is_file() for p in paths) else None


def binary_task(dataset: str, data_dir: Path):
    """(training settings, spec, images of every fold) of a two-label dataset; ValueError otherwise."""
    from benchmarks.levers import CACHE
    from contracts.dataset_spec import load_spec, training_settings
    from contracts.settings import get_settings
    from training import experiment as ex

    s = training_settings(get_settings(), dataset)
    spec = load_spec(dataset)
    if spec.positive_label is None:
        raise ValueError(f"{dataset} is not a two-label task: it has no decision threshold")
    return s, spec, ex.load_folder(data_dir / dataset, spec, s.image_size, spec.crop, CACHE)


def lever_folds(name: str, s, spec, folds: int) -> list[Path] | None:
    """The saved per-fold logits files of a benchmarks/levers.py lever, or None if a fold is missing."""
    from benchmarks.levers import CACHE, LEVERS
    from training import experiment as ex

    changes = dict(LEVERS[name])
    crop = changes.pop("crop", spec.crop)
    return saved_folds(spec.name, crop, ex.lever_from_settings(s, name=name, **changes), folds, CACHE)


def no_saved_logits(name: str, folds: int) -> str:
    return (f"{name}: no saved {folds}-fold logits (run benchmarks/accuracy.py --folds {folds} "
            f"--lever {name} first)")


def member_logits(member_paths: list[list[Path]], fold: int, variant: str):
    """(val_idx, test_idx, val logits, test logits, exact) of one fold: the mean of its members' logits,
    which is what an ensemble's head computes (training.model.assemble_ensemble). For TTA the members'
    logits are averaged per view, then the views' probabilities, as the served graph does; members
    saved before per-view logits were kept fall back to the mean of their view-averaged log
    probabilities, a close stand-in (exact False)."""
    import numpy as np

    from benchmarks.accuracy import _variants
    from benchmarks.stain_shift import tta_logits

    zs = [np.load(paths[fold]) for paths in member_paths]
    for z in zs[1:]:
        if not (np.array_equal(z["val_idx"], zs[0]["val_idx"]) and np.array_equal(z["test_idx"], zs[0]["test_idx"])):
            raise ValueError(f"fold {fold}: the members were not trained on the same split")
    splits = ("val", "test")
    if variant == SERVED and len(zs) > 1 and all(f"tta_views_{k}_logits" in z for z in zs for k in splits):
        val_logits, test_logits = (tta_logits(np.mean([z[f"tta_views_{k}_logits"] for z in zs], axis=0))
                                   for k in splits)
        return zs[0]["val_idx"], zs[0]["test_idx"], val_logits, test_logits, True
    pairs = [_variants(z)[variant] for z in zs]  # (val, test) logits of each member
    val_logits, test_logits = (np.mean([pair[k] for pair in pairs], axis=0) for k in (0, 1))
    return zs[0]["val_idx"], zs[0]["test_idx"], val_logits, test_logits, variant != SERVED or len(zs) == 1


def read_out(data, member_paths: list[list[Path]], variant: str, target: float, rule: str) -> dict:
    """Pooled decisions of every fold at its own validation threshold: intervals, misses, false alarms.
    `member_paths`: one list of per-fold logits files per model (several: their ensemble)."""
    import numpy as np

    from benchmarks.accuracy import _centred_on_threshold, evaluate_split
    from training.intervals import bootstrap_intervals

    ys, ps, missed, exact = [], [], set(), True
    pos = data.labels.index(data.positive_label)
    for fold in range(len(member_paths[0])):
        val_idx, test_idx, val_logits, test_logits, fold_exact = member_logits(member_paths, fold, variant)
        exact &= fold_exact
        ev = evaluate_split(data, val_idx, val_logits, test_idx, test_logits, target, rule)
        p = _centred_on_threshold(ev["p_test"], data, ev["threshold"])
        missed |= {data.sha256[i] for i, yi, pi in zip(test_idx, ev["y_test"], p[:, pos])
                   if yi == pos and pi < 0.5}
        ys.append(ev["y_test"])
        ps.append(p)
    y, p = np.concatenate(ys), np.concatenate(ps)
    decided = p[:, pos] >= 0.5
    return {"intervals": bootstrap_intervals(y, p, data.labels, data.positive_label, 0.5),
            "missed": missed, "false_alarms": int((decided & (y != pos)).sum()), "positives": int((y == pos).sum()),
            "negatives": int((y != pos).sum()), "exact": exact}


def format_read_out(r: dict) -> str:
    sens, specificity = r["intervals"]["sensitivity"], r["intervals"]["specificity"]
    return (f"sensitivity {sens['value']:.4f} [{sens['low']:.4f}, {sens['high']:.4f}] | specificity "
            f"{specificity['value']:.4f} [{specificity['low']:.4f}, {specificity['high']:.4f}] | "
            f"missed {len(r['missed'])} of {r['positives']} | false alarms {r['false_alarms']}"
            + ("" if r.get("exact", True) else " | approximate (members saved without per-view logits)"))


def print_means(read_outs: dict[tuple[str, str], list[dict]], noun: str) -> None:
    """One `mean of N <noun>` line per (rule, variant) read out for more than one lever or ensemble."""
    for (rule, variant), rs in read_outs.items():
        if len(rs) > 1:
            print(f"mean of {len(rs)} {noun} | {rule} | {variant} | {format_mean(rs)}")


def format_mean(rs: list[dict]) -> str:
    """Several levers' read-outs (e.g. seeds of one recipe) as one: pooled sensitivity and specificity,
    and the mean missed positives and false alarms per lever."""
    missed, positives = sum(len(r["missed"]) for r in rs), sum(r["positives"] for r in rs)
    alarms, negatives = sum(r["false_alarms"] for r in rs), sum(r["negatives"] for r in rs)
    return (f"sensitivity {1 - missed / positives:.4f} | specificity {1 - alarms / negatives:.4f} | "
            f"missed {missed / len(rs):.1f} | false alarms {alarms / len(rs):.1f} (per lever or ensemble)")


def write_missed_csv(out: Path, data_dir: Path, spec, counts: Counter, levers: int) -> int:
    """The positives missed as served by every one of `levers` levers: sha256, file (under data_dir),
    class folder; one CSV row each, so someone can look at them (label noise, or genuinely hard)."""
    import csv

    from training.experiment import files_by_hash

    rows = [(sha, str(path.relative_to(data_dir)), spec.class_folders[f])
            for sha, (f, path) in files_by_hash(data_dir, spec).items() if counts[sha] == levers]
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("sha256", "file", "class_folder"))
        writer.writerows(rows)
    tmp.replace(out)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.levers import LEVERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--lever", nargs="+", default=["baseline"], choices=sorted(LEVERS))
    parser.add_argument("--missed-csv", type=Path, default=None,
                        help="write the positives every lever misses as served (sha256, file, class folder)")
    args = parser.parse_args(argv)

    from training.evaluate import THRESHOLD_RULES

    try:
        s, spec, data = binary_task(args.dataset, args.data)
    except ValueError as e:
        parser.error(str(e))
    missed_as_served: dict[str, set[str]] = {}
    read_outs: dict[tuple[str, str], list[dict]] = {}
    for name in args.lever:
        paths = lever_folds(name, s, spec, args.folds)
        if paths is None:
            print(no_saved_logits(name, args.folds))
            continue
        for rule in THRESHOLD_RULES:
            for variant in ("plain", SERVED):
                r = read_out(data, [paths], variant, s.target_sensitivity, rule)
                print(f"{name} | {rule} | {variant} | {format_read_out(r)}")
                read_outs.setdefault((rule, variant), []).append(r)
                if variant == SERVED and rule == s.threshold_rule:
                    missed_as_served[name] = r["missed"]
    print_means(read_outs, "levers")
    if len(missed_as_served) > 1:
        counts = Counter(h for missed in missed_as_served.values() for h in missed)
        every = sum(1 for c in counts.values() if c == len(missed_as_served))
        print(f"missed as served ({s.threshold_rule} rule) by {len(missed_as_served)} levers: {len(counts)} images "
              f"by any, {every} by every one; images by number of levers missing them: "
              f"{dict(sorted(Counter(counts.values()).items()))}")
        if args.missed_csv is not None:
            n = write_missed_csv(args.missed_csv, args.data / args.dataset, spec, counts, len(missed_as_served))
            print(f"{n} images missed by every lever: {args.missed_csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

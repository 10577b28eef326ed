"""Threshold rules on saved k-fold models: what each rule gives on unseen folds, and which
abnormal images every configuration misses (no training: reads the logits that
`benchmarks/accuracy.py --folds K --lever NAME` saved).

    .venv/bin/python benchmarks/threshold_rules.py --dataset leukemia --folds 3 --lever width20 depth6 colour0

For each lever and rule (training.evaluate.THRESHOLD_RULES), each fold's temperature and threshold
come from its own validation band, as the pipeline chooses them, and the test folds are pooled:
sensitivity and specificity with 95 % bootstrap intervals, missed positives and false alarms, plain
and as served (8-view TTA). Then the positives each lever misses as served, and how many of them
every lever misses (a floor no configuration moved) or only one does (variance between models).
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


def read_out(data, paths: list[Path], variant: str, target: float, rule: str) -> dict:
    """Pooled decisions of every fold at its own validation threshold: intervals, misses, false alarms."""
    import numpy as np

    from benchmarks.accuracy import _centred_on_threshold, _variants, evaluate_split
    from training.intervals import bootstrap_intervals

    ys, ps, missed = [], [], set()
    pos = data.labels.index(data.positive_label)
    for path in paths:
        z = np.load(path)
        val_logits, test_logits = _variants(z)[variant]
        ev = evaluate_split(data, z["val_idx"], val_logits, z["test_idx"], test_logits, target, rule)
        p = _centred_on_threshold(ev["p_test"], data, ev["threshold"])
        missed |= {data.sha256[i] for i, yi, pi in zip(z["test_idx"], ev["y_test"], p[:, pos])
                   if yi == pos and pi < 0.5}
        ys.append(ev["y_test"])
        ps.append(p)
    y, p = np.concatenate(ys), np.concatenate(ps)
    decided = p[:, pos] >= 0.5
    return {"intervals": bootstrap_intervals(y, p, data.labels, data.positive_label, 0.5),
            "missed": missed, "false_alarms": int((decided & (y != pos)).sum()), "positives": int((y == pos).sum())}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.levers import CACHE, LEVERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--lever", nargs="+", default=["baseline"], choices=sorted(LEVERS))
    args = parser.parse_args(argv)

    from contracts.dataset_spec import load_spec, training_settings
    from contracts.settings import get_settings
    from training import experiment as ex
    from training.evaluate import THRESHOLD_RULES

    s = training_settings(get_settings(), args.dataset)
    spec = load_spec(args.dataset)
    if spec.positive_label is None:
        parser.error(f"{args.dataset} is not a two-label task: it has no decision threshold")
    data = ex.load_folder(args.data / args.dataset, spec, s.image_size, spec.crop, CACHE)
    missed_as_served: dict[str, set[str]] = {}
    for name in args.lever:
        changes = dict(LEVERS[name])
        crop = changes.pop("crop", spec.crop)
        paths = saved_folds(args.dataset, crop, ex.lever_from_settings(s, name=name, **changes), args.folds, CACHE)
        if paths is None:
            print(f"{name}: no saved {args.folds}-fold logits (run benchmarks/accuracy.py --folds {args.folds} "
                  f"--lever {name} first)")
            continue
        for rule in THRESHOLD_RULES:
            for variant in ("plain", SERVED):
                r = read_out(data, paths, variant, s.target_sensitivity, rule)
                sens, specificity = r["intervals"]["sensitivity"], r["intervals"]["specificity"]
                print(f"{name} | {rule} | {variant} | sensitivity {sens['value']:.4f} [{sens['low']:.4f}, "
                      f"{sens['high']:.4f}] | specificity {specificity['value']:.4f} "
                      f"[{specificity['low']:.4f}, {specificity['high']:.4f}] | "
                      f"missed {len(r['missed'])} of {r['positives']} | false alarms {r['false_alarms']}")
                if variant == SERVED and rule == s.threshold_rule:
                    missed_as_served[name] = r["missed"]
    if len(missed_as_served) > 1:
        counts = Counter(h for missed in missed_as_served.values() for h in missed)
        every = sum(1 for c in counts.values() if c == len(missed_as_served))
        print(f"missed as served ({s.threshold_rule} rule) by {len(missed_as_served)} levers: {len(counts)} images "
              f"by any, {every} by every one; images by number of levers missing them: "
              f"{dict(sorted(Counter(counts.values()).items()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

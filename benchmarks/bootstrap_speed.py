"""Bootstrap intervals' speed: the rank ROC AUC (training.intervals.roc_auc) against sklearn's.

    nice -n 5 .venv/bin/python benchmarks/bootstrap_speed.py [--n 2585] [--rounds 3]

`training.intervals.bootstrap_intervals` recomputes every figure on each of its 2 000 resamples, and
the k-fold read-outs (benchmarks/threshold_rules.py, benchmarks/ensembles.py) call it dozens of
times. On generated binary predictions (ties included, the size of leukemia's pooled 3 folds) the two
AUCs alternate round by round; prints the median seconds of each, their ratio, and whether the
intervals agree to 1e-12. No data needed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sklearn_auc(is_pos, scores) -> float:
    """The baseline: what the bootstrap called before (NaN with one class, as roc_auc does)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    is_pos = np.asarray(is_pos, int)
    return float(roc_auc_score(is_pos, scores)) if 0 < is_pos.sum() < len(is_pos) else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2585, help="images (leukemia's 3 folds pooled: 2 585)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import numpy as np

    import training.intervals as intervals

    rng = np.random.default_rng(0)
    y = (rng.random(args.n) < 0.84).astype(int)
    p_pos = np.round(np.clip(rng.random(args.n) * 0.8 + 0.2 * y, 0, 1), 3)  # overlapping, with ties
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    modes = {"sklearn roc_auc_score": sklearn_auc, "rank (shipped)": intervals.roc_auc}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    results = {}
    try:
        for _ in range(args.rounds):
            for name, auc in modes.items():
                intervals.roc_auc = auc
                start = time.perf_counter()
                results[name] = intervals.bootstrap_intervals(y, probs, ["normal", "abnormal"], "abnormal", 0.5)
                seconds[name].append(time.perf_counter() - start)
    finally:
        intervals.roc_auc = modes["rank (shipped)"]
    baseline = statistics.median(seconds["sklearn roc_auc_score"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name}: median {median:.2f} s per {intervals.N_BOOT}-resample bootstrap of {args.n} images "
              f"({baseline / median:.1f}x the baseline's speed)")
    a, b = results.values()
    same = all(abs(a[k][part] - b[k][part]) < 1e-12 for k in a for part in a[k])
    print(f"intervals identical to 1e-12: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

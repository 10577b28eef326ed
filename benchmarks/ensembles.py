"""Ensembles of saved k-fold models against their members: what averaging two or more networks'
logits gives on unseen folds, and what it costs to train (no training: reads the logits that
`benchmarks/accuracy.py --folds K --lever NAME` saved for each member).

    .venv/bin/python benchmarks/ensembles.py --dataset leukemia --folds 3 --ensemble width12+width12_seed2
    ... --ensemble baseline+seed2 baseline+seed3 seed2+seed3 --only-ensembles   # and their mean

Each fold's temperature and threshold come from the ensemble's own validation band, as the pipeline
chooses them for MODEL_ENSEMBLE_SIZE > 1 (whose head averages its members' logits); the test folds
are pooled: sensitivity and specificity with 95 % bootstrap intervals, missed positives and false
alarms, per threshold rule, plain and as served (8-view TTA: the members' logits averaged per view,
then the views' probabilities, as the served graph does; members saved before per-view logits were
kept give a close stand-in, marked approximate), and under each re-staining of
`benchmarks/stain_shift.py` (the other-lab proxy) at the shipped rule (`--restain-rule` for another;
given, it re-stains with `--only-ensembles` too).
With several ensembles, their mean per rule and re-staining; with several single networks (groups of
one lever, e.g. seeds of the shipped recipe), theirs, so an ensemble recipe can be set against them
(`--only-ensembles`: the ensembles alone, without their members, re-stained only with `--restain-rule`).

    ... --ensemble baseline seed2 seed3 seed4 seed5 --restain-rule validation   # five single networks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.levers import LEVERS
    from benchmarks.stain_shift import SHIFTS
    from benchmarks.threshold_rules import (SERVED, binary_task, format_read_out, lever_folds, no_saved_logits,
                                           print_means, read_out)
    from training.evaluate import THRESHOLD_RULES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--ensemble", nargs="+", required=True, metavar="LEVER+LEVER[+...]",
                        help="members joined by '+', each a benchmarks/levers.py lever with saved k-fold logits")
    parser.add_argument("--only-ensembles", action="store_true",
                        help="read out the ensembles only (not each member; re-stained only with --restain-rule)")
    parser.add_argument("--restain-rule", choices=THRESHOLD_RULES, default=None,
                        help="threshold rule of the re-stained read-outs (default: the spec's; "
                             "given, the ensembles are re-stained with --only-ensembles too)")
    args = parser.parse_args(argv)

    import numpy as np

    try:
        s, spec, data = binary_task(args.dataset, args.data)
    except ValueError as e:
        parser.error(str(e))

    def folds_of(name: str) -> list[Path]:
        if name not in LEVERS:
            parser.error(f"unknown lever {name!r} (benchmarks/levers.py LEVERS)")
        paths = lever_folds(name, s, spec, args.folds)
        if paths is None:
            parser.error(no_saved_logits(name, args.folds))
        return paths

    restain_rule = args.restain_rule or s.threshold_rule
    ensembles: dict[tuple[str, str], list[dict]] = {}
    singles: dict[tuple[str, str], list[dict]] = {}
    printed: set[str] = set()  # each member once, however many ensembles it is in
    for group in args.ensemble:
        names = group.split("+")
        members = {name: folds_of(name) for name in names}
        fit_s = [sum(float(np.load(p)["fit_s"]) for p in members[name]) for name in names]
        print(f"== {group}: fit {sum(fit_s):.0f} s over {args.folds} folds "
              f"({' + '.join(f'{f:.0f}' for f in fit_s)}) ==")
        rows = [] if args.only_ensembles else [(name, [paths]) for name, paths in members.items()
                                               if name not in printed]
        printed.update(names)
        if len(names) > 1:
            rows.append((f"ensemble of {len(names)}", list(members.values())))
        for label, member_paths in rows:
            means = ensembles if len(member_paths) > 1 else singles
            variants = [(rule, v) for rule in THRESHOLD_RULES for v in ("plain", SERVED)]
            if args.restain_rule or not args.only_ensembles:
                variants += [(restain_rule, f"restained {shift}") for shift in SHIFTS]
            for rule, variant in variants:  # re-stained: the other-lab proxy
                r = read_out(data, member_paths, variant, s.target_sensitivity, rule)
                print(f"{label} | {rule} | {variant} | {format_read_out(r)}")
                means.setdefault((rule, variant), []).append(r)
    print_means(singles, "single networks")
    print_means(ensembles, "ensembles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

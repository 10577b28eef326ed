"""`python -m training ...`: train, evaluate, promote, rollback and status without Airflow.

    python -m training train --dataset leukemia [--dataset-version V] [--no-promote] [--epochs N]
    python -m training evaluate --dataset leukemia --version 3
    python -m training promote --dataset leukemia --version 3 [--reason "..." [--by NAME]]
    python -m training rollback --dataset leukemia [--reason "..."]
    python -m training status --dataset leukemia
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time

from contracts.cli import run_command
from contracts.settings import get_settings


def _fmt(metrics: dict) -> str:
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "sensitivity", "specificity", "roc_auc", "pr_auc",
            "threshold", "brier", "ece")
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), (int, float)))


def _print_reviewed(comparison: dict) -> None:
    """The gate's figures on reviewed images (recorded, not gated on), when the version has any."""
    from ops.report import reviewed_line

    reviewed = comparison.get("reviewed") or {}
    if reviewed.get("n"):
        print(reviewed_line(reviewed, comparison.get("primary_metric")))


def _print_gate(result: dict) -> None:
    comp, decision = result["comparison"], result["decision"]
    print(f"candidate v{comp['candidate']['version']} on {comp['evaluated_on']} ({comp['test_images']} test images)")
    print("  " + _fmt(comp["candidate"]["metrics"]))
    champ = comp.get("champion")
    if champ and champ.get("metrics"):
        print(f"champion v{champ['version']} re-evaluated on the same split")
        print("  " + _fmt(champ["metrics"]))
    _print_reviewed(comp)
    verdict = "PASSED" if decision["passed"] else "NEEDS A PERSON" if decision.get("needs_review") else "FAILED"
    print(f"gate: {verdict} - {decision['reason']}")
    already = " (already; nothing changed)" if result["applied"].get("already_champion") else ""
    print(f"aliases: champion=v{result['applied'].get('champion')}{already}")


def _train(args: argparse.Namespace) -> int:
    from training.gate import promote_if_better
    from training.train import train_candidate

    overrides = {k: v for k, v in (("epochs", args.epochs), ("train_time_budget_s", args.time_budget)) if v}
    started = time.monotonic()

    def on_epoch(epoch: int, logs: dict) -> None:
        if not sys.stdout.isatty():
            shown = "  ".join(f"{k}={float(v):.4f}" for k, v in logs.items() if isinstance(v, (int, float)))
            print(f"epoch {epoch + 1}: {shown}  [{time.monotonic() - started:.0f}s]", flush=True)

    result = train_candidate(args.dataset, args.dataset_version, get_settings(),
                             verbose=1 if sys.stdout.isatty() else 0, on_epoch=on_epoch, **overrides)
    if result["skipped"] or result["resumed"]:
        print(f"{'skipped' if result['skipped'] else 'resumed'}: {result['reason']}")
    else:
        print(f"registered {result['model_name']} v{result['model_version']} (run {result['run_id']}, "
              f"{result['epochs_run']} epochs, {result['train_seconds']:.0f}s)")
        print("test: " + _fmt(result["metrics"]))
    if not args.no_promote and not result["skipped"]:
        _print_gate(promote_if_better(args.dataset, result["model_version"]))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.gate import decide_gate, evaluate_against_champion

    comparison = evaluate_against_champion(args.dataset, args.version)
    decision = decide_gate(comparison)
    if args.json:
        print(json.dumps({"comparison": comparison, "decision": decision}, indent=2, default=str))
        return 0
    print(f"would {'PASS' if decision['passed'] else 'FAIL'}: {decision['reason']}\n"
          f"candidate: {_fmt(comparison['candidate']['metrics'])}")
    _print_reviewed(comparison)
    return 0


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError) as exc:
        raise SystemExit("error: cannot tell who you are; say it with --by NAME") from exc


def _promote(args: argparse.Namespace) -> int:
    from training.gate import promote_by_person, promote_if_better

    if args.reason is None:
        result = promote_if_better(args.dataset, args.version)
    else:
        result = promote_by_person(args.dataset, args.version, args.reason, args.by or _login())
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_gate(result)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from training.registry import rollback

    result = rollback(args.dataset, reason=args.reason)
    print(f"@champion: v{result['from']} -> v{result['champion']} ({result['reason']}, {result['at']})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from training.registry import status

    info = status(args.dataset)
    if args.json or not info["exists"]:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['model_name']}: " + ", ".join(f"@{a}=v{v}" for a, v in sorted(info["aliases"].items())))
    for v in info["versions"]:
        m = v["metrics"]
        print(f"  v{v['version']:<4} {v['dataset_version'] or '-':<22} gate={v['gate'] or '-':<12} "
              f"bal_acc={m.get('balanced_accuracy', '-')}  macro_f1={m.get('macro_f1', '-')}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from training.bundle import sign_registered_bundle

    s = get_settings()
    done = sign_registered_bundle(s, s.model_name(args.dataset), args.version)
    print(f"signed {done['model']} version {done['version']} (run {done['run_id']}) with key {done['key_id']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a candidate on a processed version, then run the gate")
    p.add_argument("--dataset", default=None)
    p.add_argument("--dataset-version", default=None, help="default: the newest processed version")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="seconds (TRAIN_TIME_BUDGET_S)")
    p.add_argument("--no-promote", action="store_true", help="register only; skip the gate")
    p.set_defaults(func=_train)
    for name, func, help_ in (("evaluate", _evaluate, "compare a version with @champion (changes nothing)"),
                              ("promote", _promote, "run the gate for a version and move the aliases")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--dataset", default=None)
        p.add_argument("--version", required=True, help="registered model version")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
    # p is now the promote parser.
    p.add_argument("--reason", default=None,
                   help="a person's promotion (e.g. the champion is not comparable): why; recorded with --by")
    p.add_argument("--by", default=None, help="who promotes (default: the login name)")
    p = sub.add_parser("rollback", help="move @champion back to @previous-champion")
    p.add_argument("--dataset", default=None)
    p.add_argument("--reason", default="manual rollback")
    p.set_defaults(func=_rollback)
    p = sub.add_parser("sign", help="(re-)sign a version's serving bundle with BUNDLE_SIGNING_KEY (key rotation)")
    p.add_argument("--dataset", default=None, help="default: DATASET")
    p.add_argument("--version", default=None, help="default: the @champion version")
    p.set_defaults(func=_sign)
    p = sub.add_parser("status", help="aliases, versions and gate history")
    p.add_argument("--dataset", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.dataset = args.dataset or get_settings().dataset
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m screening score|feedback ...`: the screening workflow's commands, without Airflow."""

from __future__ import annotations

import argparse
import logging
import sys

from contracts.settings import get_settings
from contracts.cli import run_command
from screening.feedback_cli import add_feedback_command


def _score(args: argparse.Namespace) -> int:
    from screening.report import drift_verdict
    from screening.score import score_batch

    s = get_settings()
    dataset = args.dataset or s.dataset
    summaries = score_batch(dataset, args.batch, s)
    if not summaries:
        print(f"score    nothing to score: no batch under inbox/{dataset}/" + (f"{args.batch}/" if args.batch else ""))
    for r in summaries:
        state = "already scored (result kept)" if r["reused"] else "scored"
        print(f"score    batch {r['batch_id']}: {state} by {r['model_name']} v{r['model_version']}: "
              f"{r['n_scored']} scored, {r['n_bad']} unreadable; counts {r['counts']}")
        print(f"         {drift_verdict(r.get('drift'))}")
        print(f"         report s3://{s.s3_bucket}/{r['prefix']}{r['files']['report']}")
        if r.get("review_url"):
            print(f"         review {r['review_url']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m screening", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score inbox batches with the @champion bundle (skips complete results)")
    p.add_argument("--dataset", default=None, help="dataset spec name (default: the DATASET setting)")
    p.add_argument("--batch", default=None, help="batch id (default: every batch without a result for the champion)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=_score)
    add_feedback_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""`python -m screening feedback --dataset D [--batch ID]`: reviewed images into raw/ (see screening.feedback)."""

from __future__ import annotations

import argparse
import json


def _feedback(args: argparse.Namespace) -> int:
    from contracts.dataset_spec import SpecError
    from contracts.screening import InvalidBatchId
    from screening.feedback import apply_feedback

    try:
        result = apply_feedback(args.dataset, args.batch)
    except (SpecError, InvalidBatchId) as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def add_feedback_command(commands) -> None:
    """Register the `feedback` sub-command on an argparse sub-parsers object."""
    p = commands.add_parser("feedback", help="copy reviewed images into raw/<dataset>/<class>/ (idempotent)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--batch", default=None, help="one batch id (default: every reviewed batch)")
    p.set_defaults(func=_feedback)

"""`python -m screening ...`: the screening workflow's commands, without Airflow."""

from __future__ import annotations

import argparse
import sys

from screening.feedback_cli import add_feedback_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m screening", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_feedback_command(commands)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

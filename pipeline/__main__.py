"""`python -m pipeline ...`: every pipeline stage and the local stack, without Airflow."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli_stages import add_stage_commands
from pipeline.cli import run_command
from pipeline.settings import get_settings


def _stack(args: argparse.Namespace) -> int:
    from pipeline import stack

    settings = get_settings()
    if args.action == "up":
        for name, url in stack.up(settings).items():
            print(f"{name:8s} {url}")
        print(f"data and logs under {stack.stack_dir(settings)}")
    elif args.action == "down":
        stopped = stack.down(settings)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        rows = stack.status(settings)
        for row in rows:
            state = "healthy" if row.healthy else ("running" if row.running else "stopped")
            print(f"{row.name:10s} {state:8s} pid={row.pid or '-':<8} {row.endpoint}  log={row.log}")
        return 0 if all(r.healthy for r in rows if r.name in stack.SERVICES) else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stack", help="start, stop or report the local SeaweedFS + MLflow stack")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_stack)
    add_stage_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

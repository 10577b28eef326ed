"""`python -m pipeline ...`: every pipeline stage and the local stack, without Airflow."""

from __future__ import annotations

import argparse
import sys

from contracts import credentials
from contracts.cli import run_command
from contracts.settings import get_settings
from ops import stack, supervisor
from pipeline.cli_stages import add_stage_commands


def _stack(args: argparse.Namespace) -> int:
    if args.action == "up":
        credentials.init_secrets()  # per-install random secrets on first use (never rotated afterwards)
    settings = get_settings()
    if args.action == "up":
        for name, url in stack.up(settings).items():
            print(f"{name:8s} {url}")
        print(f"data and logs under {supervisor.stack_dir(settings)}")
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


def _secrets(args: argparse.Namespace) -> int:
    """init: generate missing per-install secrets; env: write a ready .env for docker compose;
    check: refuse (exit 1) when a component's secrets are guessable. Values are never printed."""
    if args.action == "init":
        path, added = credentials.init_secrets()
        if path is None:
            print("HEMAFLOW_SECRETS_FILE is empty: nothing generated (the environment supplies the secrets)")
        else:
            print(f"{path}: " + (f"generated {', '.join(added)}" if added else "every secret already set"))
    elif args.action == "env":
        path, filled = credentials.write_compose_env()
        print(f"{path}: " + (f"filled {', '.join(filled)}" if filled else "no empty secret to fill"))
    else:
        try:
            credentials.check_component(args.component)
        except credentials.WeakSecret as exc:
            print(str(exc))
            return 1
        print(f"{args.component}: no guessable secret")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stack", help="start, stop or report the local SeaweedFS + MLflow stack")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_stack)
    p = sub.add_parser("secrets", help="generate per-install secrets, write a compose .env, or check a component")
    p.add_argument("action", choices=["init", "env", "check"])
    p.add_argument("--component", choices=list(credentials.COMPONENTS), default="compose", help="for check")
    p.set_defaults(func=_secrets)
    add_stage_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

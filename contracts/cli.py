"""What every HemaFlow command line shares: one clear error line instead of a traceback."""

from __future__ import annotations

import argparse
import os
import sys


def run_command(args: argparse.Namespace) -> int:
    """Run `args.func(args)`; errors print one line (a traceback with --debug or HEMAFLOW_DEBUG=1)."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a CLI prints one clear line, not a traceback
        if getattr(args, "debug", False) or os.environ.get("HEMAFLOW_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

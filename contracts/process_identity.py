"""Which process is this: a pid plus the kernel's start time names one process instance.

Shared by the process supervisor (ops/supervisor.py: pid files that survive pid reuse) and
training claims (training/claim.py: is the claiming trainer still alive). Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True when `pid` is a live (non-zombie) process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        return state != "Z"
    except (OSError, IndexError):
        return True

def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot): with the pid it names one process
    instance, even after the process renames itself (as Airflow's components do)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None

"""With SERVING_WORKERS > 1: every worker serves the model the last reload swapped in.

`python -m serving` makes a private folder in shared memory (/dev/shm when there is one) and names
it in HEMAFLOW_SERVING_SYNC_DIR for its uvicorn workers. A worker that swaps its model (admin
reload or registry poll) publishes a higher generation number there; another worker, before a
request uses its model manager, sees the newer generation (one `stat` per request otherwise) and
reloads first, and concurrent requests wait for that reload. So once an admin reload has answered,
every request that starts afterwards, in any worker, runs on the new model. Only a number is
written there, never request data.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

SYNC_DIR_ENV = "HEMAFLOW_SERVING_SYNC_DIR"
GENERATION_FILE = "generation"


def make_sync_dir() -> Path:
    """The parent's shared folder (owner-only), in memory when the system has /dev/shm."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="hemaflow-serving-", dir=base))


def remove_sync_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Generation:
    """The model generation this worker serves (`seen`) and the newest one any worker published."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / GENERATION_FILE
        self._stamp: tuple[int, int] | None = None
        self.latest = self._read()
        self.seen = self.latest

    def _read(self) -> int:
        try:
            return int(self.path.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def pending(self) -> int | None:
        """A generation newer than the one served here, or None."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp != self._stamp:
            self._stamp = stamp
            self.latest = max(self.latest, self._read())
        return self.latest if self.latest > self.seen else None

    def publish(self) -> int:
        """After this worker swapped its model: one more than any generation so far."""
        with open(self.path.with_name(GENERATION_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            gen = self._read() + 1
            tmp = self.path.with_name(f"{GENERATION_FILE}.{os.getpid()}")
            tmp.write_text(str(gen))
            os.replace(tmp, self.path)
        self.latest = self.seen = gen
        return gen


def generation_from_env() -> Generation | None:
    folder = os.environ.get(SYNC_DIR_ENV)
    return Generation(Path(folder)) if folder else None

"""A pool of LiteRT signature runners of one model, so several threads can run it at once.

A LiteRT interpreter is not thread-safe, but its `Invoke` releases the GIL: with one interpreter
per inference thread (each single-threaded), two requests run the model on two cores at the same
time, which on small CPUs beats one interpreter using two XNNPACK threads per call (measured in
benchmarks/serving.py). A caller borrows a free runner and gives it back; with as many runners as
inference threads, nobody ever waits.
"""

from __future__ import annotations

import os
import queue
from typing import Any


def default_threads(configured: int, workers: int = 1) -> int:
    """SERVING_INFERENCE_THREADS, where 0 means this worker's share of the CPU cores the process may
    use (cores / SERVING_WORKERS, at least 1, at most 8)."""
    if configured > 0:
        return configured
    return max(1, min(8, cpu_cores() // max(1, workers)))


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class RunnerPool:
    """Callable like one signature runner; each call runs on a runner no other thread is using."""

    def __init__(self, runners: list[Any]) -> None:
        if not runners:
            raise ValueError("a runner pool needs at least one runner")
        self.size = len(runners)
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for runner in runners:
            self._free.put(runner)

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        runner = self._free.get()
        try:
            return runner(**inputs)
        finally:
            self._free.put(runner)

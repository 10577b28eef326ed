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
import threading
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
    """Callable like one signature runner; each call runs on a runner no other thread is using.

    `solo` (optional) is an interpreter using several threads: a call that finds no other call in
    flight runs on it, so a lone request gets the model's shortest latency, while concurrent
    requests spread over the single-threaded runners (less CPU per request, one per core).
    """

    def __init__(self, runners: list[Any], solo: Any | None = None) -> None:
        if not runners:
            raise ValueError("a runner pool needs at least one runner")
        self.size = len(runners)
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for runner in runners:
            self._free.put(runner)
        self._solo = solo
        self._solo_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._in_flight = 0

    def __call__(self, *args: Any, **inputs: Any) -> dict[str, Any]:
        with self._count_lock:
            self._in_flight += 1
            alone = self._in_flight == 1
        try:
            if alone and self._solo is not None and self._solo_lock.acquire(blocking=False):
                try:
                    return self._solo(*args, **inputs)
                finally:
                    self._solo_lock.release()
            runner = self._free.get()
            try:
                return runner(*args, **inputs)
            finally:
                self._free.put(runner)
        finally:
            with self._count_lock:
                self._in_flight -= 1

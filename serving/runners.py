"""A pool of LiteRT signature runners of one model, so several threads can run it at once.

A LiteRT interpreter is not thread-safe, but its `Invoke` releases the GIL: with one interpreter
per inference thread (each single-threaded), two requests run the model on two cores at the same
time, which on small CPUs beats one interpreter using two XNNPACK threads per call (measured in
benchmarks/serving.py). A caller borrows a free runner and gives it back; with as many runners as
inference threads, nobody ever waits.

A lone request may run on a multi-threaded interpreter instead (lowest latency on an idle machine),
but only while that has been measured faster than a single-threaded one: on a machine whose other
jobs keep the cores busy, a two-thread call waits for its slower half (median 3.8-15 ms on
2026-12-02 at load average 7-14, against ~2 ms idle; one thread: 3.3 ms) and uses up to ~25 % more
CPU (benchmarks/serving_profile.py).
"""

from __future__ import annotations

import os
import queue
import statistics
import threading
import time
from collections import deque
from typing import Any

# Every this-many lone calls one runs on the interpreter not currently preferred, to re-measure it.
EXPLORE_EVERY = 16
# The preference compares the median time per image of each interpreter's latest lone calls:
# one call descheduled by another job (a 100 ms outlier) does not flip it.
LONE_SAMPLES = 5


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
    flight runs on it while it is measured faster than a single-threaded runner for lone calls (median
    time per image of the latest LONE_SAMPLES; every EXPLORE_EVERY-th lone call tries the other), so a lone
    request gets the model's shortest latency on an idle machine and a loaded machine does not
    make it slower; concurrent requests spread over the single-threaded runners (less CPU per
    request, one per core).
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
        self._lone_calls = 0
        # ms per image of the latest lone calls on each kind of interpreter
        self.lone_ms: dict[str, deque[float]] = {k: deque(maxlen=LONE_SAMPLES) for k in ("solo", "pooled")}

    def __call__(self, *args: Any, **inputs: Any) -> dict[str, Any]:
        with self._count_lock:
            self._in_flight += 1
            alone = self._in_flight == 1
        try:
            if alone and self._solo is not None:
                return self._lone(args, inputs)
            return self._pooled(args, inputs)
        finally:
            with self._count_lock:
                self._in_flight -= 1

    def _pooled(self, args: tuple, inputs: dict[str, Any]) -> dict[str, Any]:
        runner = self._free.get()
        try:
            return runner(*args, **inputs)
        finally:
            self._free.put(runner)

    def prefers_solo(self) -> bool:
        """Whether a lone call goes to the solo interpreter: until a pooled runner has been measured
        faster for lone calls."""
        solo, pooled = self.lone_ms["solo"], self.lone_ms["pooled"]
        return not solo or not pooled or statistics.median(solo) <= statistics.median(pooled)

    def _lone(self, args: tuple, inputs: dict[str, Any]) -> dict[str, Any]:
        """A call with no other in flight, on the interpreter measured faster for such calls (timed)."""
        self._lone_calls += 1
        use_solo = self.prefers_solo() != (self._lone_calls % EXPLORE_EVERY == 0)
        if use_solo and not self._solo_lock.acquire(blocking=False):
            return self._pooled(args, inputs)
        start = time.perf_counter()
        try:
            out = self._solo(*args, **inputs) if use_solo else self._pooled(args, inputs)
        finally:
            if use_solo:
                self._solo_lock.release()
        self.lone_ms["solo" if use_solo else "pooled"].append((time.perf_counter() - start) * 1000.0 / _images_in(args))
        return out


def _images_in(args: tuple) -> int:
    """Images in a call's batch (N of an (N,S,S,3) array; 1 otherwise)."""
    shape = getattr(args[0], "shape", ()) if args else ()
    return int(shape[0]) if len(shape) == 4 and shape[0] else 1

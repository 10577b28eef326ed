"""Benchmark: the preprocess encoder (decode, prepare_image, Example bytes) three ways, one run.

    .venv/bin/python benchmarks/preprocess.py [--data ../shared/data/pbc8] [--size 224] [--images 1200]

- sequential: one image after another (the baseline);
- threads: what `pipeline.preprocess` does (a thread pool of max(2, cpus) workers);
- spawned processes: the process pool used before (it broke under Airflow's task runner).
Each mode runs REPEATS times, interleaved; prints the median images/s and the ratio to the
sequential baseline. Without the data folder it generates 360x363 JPEGs (like pbc8).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.preprocess import encode_cached_file  # noqa: E402


def _generated(folder: Path, count: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (363, 360, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def _encode(mode: str, paths: list[str], size: int) -> float:
    args = (paths, [size] * len(paths), [40_000_000] * len(paths), [0] * len(paths), ["-"] * len(paths))
    workers = max(2, os.cpu_count() or 2)
    started = time.perf_counter()
    if mode == "sequential":
        list(map(encode_cached_file, *args))
    elif mode == "threads":
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(encode_cached_file, *args))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(encode_cached_file, *args, chunksize=16))
    return len(paths) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pbc8")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data.is_dir():
            every = sorted(str(p) for p in args.data.glob("*/*") if p.is_file())
            paths = every[:: max(1, len(every) // args.images)][: args.images]
            source = str(args.data)
        else:
            paths, source = _generated(Path(tmp), args.images), "generated 360x363 JPEGs"
        modes = ("sequential", "threads", "spawned processes")
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:
                rates[mode].append(_encode(mode, paths, args.size))
    print(f"preprocess encoder: {len(paths)} images from {source} -> {args.size} px, "
          f"{os.cpu_count()} cpus, median of {args.repeats}")
    base = statistics.median(rates["sequential"])
    for mode in modes:
        median = statistics.median(rates[mode])
        print(f"  {mode:18s} {median:7.0f} images/s  ({median / base:.2f}x sequential)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

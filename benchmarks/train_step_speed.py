"""Training speed of the shipped network per compile mode: is there a faster way to fit on this CPU?

    nice -n 5 .venv/bin/python benchmarks/train_step_speed.py [--steps 30] [--rounds 3] [--modes eager-graph fused]

Fits the leukemia network (128 px input, width 16, depth 5, per-image stain normalisation, batch 32)
on random images, one epoch of --steps batches at a time, in one subprocess per mode: `eager-graph`
(Keras' BatchNormalization, what training did until 2026-12-05), `fused` (BatchNorm on TensorFlow's fused
kernel, training.fused_batchnorm), `xla` (Keras `jit_compile=True`) and `bf16` (the `mixed_bfloat16` policy;
oneDNN uses AVX512-BF16 where the CPU has it). The input is tf.data with training's options
(autotuning off, training.data). Modes alternate round by round so a busier moment
hits all of them; prints the median ms per step of each and its ratio to today's mode. No data needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("eager-graph", "fused", "xla", "bf16")
BASELINE = "eager-graph"


def one_round(mode: str, steps: int) -> float:
    """ms per step of one epoch (after a warm-up epoch) in this process."""
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    from training.data import configure_threads, fit_options
    from training.model import build_model

    configure_threads()
    if mode == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(32 * steps, 128, 128, 3)).astype("float32")
    y = rng.integers(0, 2, size=(32 * steps,))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).cache().prefetch(2).with_options(fit_options())
    net = build_model(2, 128, 128, 16, 5, seed=1, stain_normalisation="per_image", fused_batchnorm=mode == "fused")
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(),
                jit_compile=mode == "xla")
    net.fit(ds, epochs=1, verbose=0)  # tracing / compiling
    started = time.perf_counter()
    net.fit(ds, epochs=1, verbose=0)
    return 1000 * (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help=f"(always with {BASELINE})")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a worker: one mode, one round
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps({"ms_per_step": one_round(args.one, args.steps)}))
        return 0
    modes = [BASELINE, *(m for m in args.modes if m != BASELINE)]
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            times[mode].append(json.loads(out.strip().splitlines()[-1])["ms_per_step"])
    base = statistics.median(times[BASELINE])
    print(f"mode | median ms per step (batch 32, 128 px) | ratio to {BASELINE} | rounds")
    for mode in modes:
        med = statistics.median(times[mode])
        print(f"{mode} | {med:.1f} | {med / base:.2f}x | {', '.join(f'{t:.0f}' for t in times[mode])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What MODEL_ENSEMBLE_SIZE costs at serving: the interpreter's p50 for one image (and its 8 TTA
views) of the exported graph of an ensemble against the single shipped network, in one run.

    .venv/bin/python benchmarks/ensemble_latency.py --width 16 --ensemble 1x16 2x12 2x16

Weights do not change the time a graph takes, so the networks are untrained (no data, no
training); each graph is exported as serving loads it (training.bundle.convert_to_tflite, float32
and dynamic int8) and timed on the same random 224 px image, interleaved, medians of `--rounds`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def exported(members: int, width: int, depth: int, image_size: int, input_size: int, quantization: str) -> bytes:
    from training.bundle import convert_to_tflite
    from training.model import STAIN_PER_IMAGE, assemble_ensemble, build_model

    nets = [build_model(2, input_size, input_size, width, depth, seed=i, stain_normalisation=STAIN_PER_IMAGE)
            for i in range(members)]
    return convert_to_tflite(assemble_ensemble(nets, 2, image_size, input_size, width, depth), image_size,
                             quantization)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble", nargs="+", default=["1x16", "2x12"], metavar="MEMBERSxWIDTH",
                        help="configurations; the first is the baseline of the ratios")
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args(argv)

    import numpy as np

    from contracts.bundle import QUANTIZATION_DYNAMIC_INT8, QUANTIZATION_NONE, TFLiteRunner
    from contracts.tta import views

    image = np.random.default_rng(0).uniform(0, 255, (1, args.image_size, args.image_size, 3)).astype(np.float32)
    batches = {"one view": image, "8 TTA views": views(image)}
    runners = {}
    for config in args.ensemble:
        members, width = (int(v) for v in config.split("x"))
        for quantization in (QUANTIZATION_NONE, QUANTIZATION_DYNAMIC_INT8):
            model = exported(members, width, args.depth, args.image_size, args.input_size, quantization)
            runners[(config, quantization)] = TFLiteRunner(model)
    times: dict[tuple, list[float]] = {(key, view): [] for key in runners for view in batches}
    for _ in range(args.rounds):  # interleaved, so load on the machine hits every configuration alike
        for key, runner in runners.items():
            for view, batch in batches.items():
                start = time.perf_counter()
                runner(batch)
                times[(key, view)].append((time.perf_counter() - start) * 1000)
    base = args.ensemble[0]
    for (config, quantization), view in times:
        p50 = float(np.median(times[((config, quantization), view)]))
        ratio = p50 / float(np.median(times[((base, quantization), view)]))
        print(f"{config} {quantization} {view}: p50 {p50:.2f} ms ({ratio:.2f}x {base})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

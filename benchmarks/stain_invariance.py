"""How far each stain normalisation lets a re-staining move what the first convolution sees.

    .venv/bin/python benchmarks/stain_invariance.py --dataset leukemia --images 64

Reads --images images evenly spaced through ../shared/data/<dataset> (decoded with `prepare_image`
at the network input size), re-stains each with the shifts of benchmarks/stain_shift.py (one stain 30 %
stronger, the other 25 % weaker) and prints, per normalisation (none, per_image, macenko), the
mean absolute change of the normalised pixels relative to their own spread (mean absolute
deviation from each image's mean): 0 = the shift is invisible to the network. No training.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

def normalised(images: np.ndarray, how: str) -> np.ndarray:
    """uint8/float RGB 0..255 [N, S, S, 3] -> what the first conv of a `how` model sees."""
    from training.model import stain_normalisation_layer

    x = images.astype(np.float32) / 255.0
    layer = stain_normalisation_layer(how)
    return x if layer is None else np.asarray(layer(x))


def relative_movement(before: np.ndarray, after: np.ndarray) -> float:
    spread = np.abs(before - before.mean(axis=(1, 2), keepdims=True)).mean()
    return float(np.abs(before - after).mean() / spread)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="leukemia")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from benchmarks.stain_shift import STAIN_SCALES, scale_stains
    from contracts.imaging import prepare_image
    from training.experiment import IMAGE_SUFFIXES
    from training.model import LEVER_STAIN_NORMALISATIONS

    paths = sorted(p for p in (args.data / args.dataset).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        print(f"no images under {args.data / args.dataset}")
        return 2
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    images = np.stack([prepare_image(p.read_bytes(), args.size) for p in paths])
    print(f"{args.dataset}: {len(images)} images at {args.size} px; relative movement of the normalised pixels")
    print("normalisation | " + " | ".join(STAIN_SCALES))
    for how in LEVER_STAIN_NORMALISATIONS:
        base = normalised(images, how)
        moved = [relative_movement(base, normalised(scale_stains(images, h, e), how))
                 for h, e in STAIN_SCALES.values()]
        print(f"{how} | " + " | ".join(f"{m:.3f}" for m in moved))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

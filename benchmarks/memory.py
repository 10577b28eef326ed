"""Peak RSS of serving's image preparation for a 40 Mpx 16-bit PNG, alone and as a full batch,
before and after the bounded-memory changes.

    .venv/bin/python benchmarks/memory.py [--megapixels 40] [--batch 16]

"before" is the previous code path, kept verbatim below for the comparison: decode everything,
then check format and sides, then convert 16-bit to 8-bit through a float64 copy of the whole
image and build a full-size RGB image before resizing. "after" is the code that ships: format
and sides from the header first (`contracts.imaging.read_header`), strip-wise 16-bit conversion
(`high_bit_to_l`) and grey images resized before they become RGB (`prepare_image`).
Each measurement runs in a fresh process; peak RSS is the process high-water mark
(`ru_maxrss`) minus what it had after importing and reading the PNG bytes. A batch is what
`POST /v1/predict/batch` does: all uploads held in memory, prepared one after the other.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZE = 224  # IMAGE_SIZE


def make_png(path: Path, megapixels: float) -> tuple[int, int]:
    """A 16-bit grey PNG (a smooth gradient: small file, full-size decode)."""
    import numpy as np
    from PIL import Image

    width = int((megapixels * 1e6 * 1.6) ** 0.5)
    height = int(megapixels * 1e6 // width)
    row = np.linspace(0, 65535, width).astype(np.uint16)
    Image.fromarray(np.broadcast_to(row, (height, width)).copy()).save(path, format="PNG")
    return width, height


def prepare_before(data: bytes, max_pixels: int):
    """The previous serving path (serving/app.py `_prepare` + contracts.imaging.to_rgb), verbatim."""
    import numpy as np
    from PIL import Image, ImageOps

    from contracts.imaging import open_image, resize_center_crop

    img = open_image(data, max_pixels)  # full decode before any check
    fmt = str(img.format or "").upper()
    assert fmt in {"JPEG", "PNG", "TIFF", "BMP"} and min(img.size) >= 32 and max(img.size) <= 8192
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr8, mode="L").convert("RGB")
    else:
        img = img.convert("RGB")
    img = resize_center_crop(img, SIZE)
    return np.asarray(img, dtype=np.uint8).reshape(SIZE, SIZE, 3)


def prepare_after(data: bytes, max_pixels: int):
    """What serving ships (the same steps as serving/inference.py `prepare`)."""
    from contracts.imaging import prepare_image, read_header

    head = read_header(data, max_pixels)
    assert head.format.upper() in {"JPEG", "PNG", "TIFF", "BMP"}
    assert min(head.width, head.height) >= 32 and max(head.width, head.height) <= 8192
    return prepare_image(data, SIZE, max_pixels)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(path: Path, impl: str, count: int) -> dict:
    import numpy as np  # noqa: F401 - imported before the baseline, like the server has it
    from PIL import Image  # noqa: F401

    prepare = prepare_before if impl == "before" else prepare_after
    uploads = [bytes(path.read_bytes()) for _ in range(count)]  # distinct buffers, as uploads are
    baseline = _rss_mb()
    started = time.perf_counter()
    outputs = [prepare(data, 40_000_000) for data in uploads]
    seconds = time.perf_counter() - started
    assert all(o.shape == (SIZE, SIZE, 3) for o in outputs)
    return {"baseline_mb": round(baseline, 1), "peak_mb": round(_rss_mb(), 1),
            "added_mb": round(_rss_mb() - baseline, 1), "seconds": round(seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=40.0)
    parser.add_argument("--batch", type=int, default=16, help="SERVING_MAX_BATCH")
    parser.add_argument("--child", nargs=3, metavar=("PNG", "IMPL", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], int(args.child[2]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "grey16.png"
        width, height = make_png(png, args.megapixels)
        print(f"{width}x{height} 16-bit grey PNG ({width * height / 1e6:.1f} Mpx, {png.stat().st_size / 1e3:.0f} kB)")
        print(f"{'case':<22} {'impl':<7} {'peak RSS MB':>11} {'added MB':>9} {'seconds':>8}")
        for case, count in (("one image", 1), (f"batch of {args.batch}", args.batch)):
            for impl in ("before", "after"):
                out = subprocess.run([sys.executable, __file__, "--child", str(png), impl, str(count)],
                                     capture_output=True, text=True, check=True, cwd=REPO)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{case:<22} {impl:<7} {r['peak_mb']:>11.1f} {r['added_mb']:>9.1f} {r['seconds']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

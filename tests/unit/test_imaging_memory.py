"""High-bit-depth and grey images: the same pixels as the float64 reference, in bounded memory."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from contracts import imaging
from contracts.imaging import prepare_image, resize_center_crop, to_rgb


def reference_rgb(img: Image.Image) -> Image.Image:
    """The documented policy written the obvious way: the whole image as float64, then RGB."""
    if img.mode in imaging.HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    return img.convert("RGB")


def _image(kind: str, w: int, h: int, rng) -> Image.Image:
    if kind == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if kind == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if kind == "I":
        return Image.fromarray(rng.integers(-5, 300, (h, w)).astype(np.int32), "I")
    return Image.fromarray((rng.random((h, w)) * 300 - 10).astype(np.float32), "F")


@pytest.mark.parametrize("kind", ["I;16", "L", "I", "F"])
def test_same_pixels_as_the_float64_reference(kind):
    rng = np.random.default_rng(len(kind))
    for w, h in ((33, 517), (640, 48), (301, 299)):
        img = _image(kind, w, h, rng)
        assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(reference_rgb(img)))
        for size in (16, 224):
            assert np.array_equal(prepare_image(img, size), np.asarray(resize_center_crop(reference_rgb(img), size)))


def test_strip_boundaries_do_not_change_pixels(monkeypatch):
    img = _image("I;16", 50, 301, np.random.default_rng(3))
    monkeypatch.setattr(imaging, "STRIP_PIXELS", 37)  # rows of 1, many strips, a short last one
    assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(reference_rgb(img)))


def test_16bit_conversion_never_allocates_a_whole_image_float64_copy():
    h, w = 2500, 4000  # 10 Mpx: the float64 copy alone would be 80 MB
    img = Image.fromarray(np.broadcast_to(np.linspace(0, 65535, w).astype(np.uint16), (h, w)).copy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    tracemalloc.start()
    try:
        out = prepare_image(data, 224)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (224, 224, 3) and out[:, 0].mean() < out[:, -1].mean()
    # numpy's allocations are traced (Pillow's are not): the 10 MB 8-bit result + a few 2 MB strip
    # temporaries, where the whole-image float64 path needed several 80 MB arrays.
    assert peak < 24 * 1024 * 1024, f"{peak / 1e6:.0f} MB traced"

"""Large JPEGs are decoded at reduced scale (`Image.draft`) before `prepare_image` resizes them:
nearly the same pixels as a full decode, and the same function (so the same pixels) in training
and serving, so the draft cannot introduce train/serve skew."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from contracts import imaging
from contracts.imaging import ImageRejected, open_image, prepare_image
from tests.fixtures.data import encode, make_image

SIZE = 224
# Tolerance of the reduced-scale decode against a full decode, in 8-bit levels per channel value:
# the DCT-domain downscale and the full-size bilinear filter average slightly different footprints.
MEAN_ABS_TOLERANCE = 1.0
MAX_ABS_TOLERANCE = 8


def _full_decode(data: bytes) -> np.ndarray:
    """The reference: every pixel decoded at full size, then the same preparation."""
    img = open_image(data)
    assert img.size == Image.open(io.BytesIO(data)).size  # really no draft on this path
    return prepare_image(img, SIZE)


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


@pytest.fixture(scope="module")
def large_jpegs() -> dict[str, bytes]:
    smear = make_image(3, (200, 120, 160), (4000, 3000))  # noisy tinted field with a dark "cell"
    grey = make_image(4, (150, 150, 150), (2400, 3200)).convert("L")  # portrait, single channel
    return {"rgb_4000x3000": encode(smear, "JPEG", quality=90), "grey_2400x3200": encode(grey, "JPEG", quality=90)}


@pytest.mark.parametrize("name", ["rgb_4000x3000", "grey_2400x3200"])
def test_draft_decoded_large_jpeg_prepares_to_nearly_the_full_decode(large_jpegs, name):
    data = large_jpegs[name]
    drafted = open_image(data, draft_size=SIZE)
    width, height = Image.open(io.BytesIO(data)).size
    # The draft really decodes fewer pixels, and never below DRAFT_FACTOR x the prepared size.
    assert drafted.width * drafted.height * 16 <= width * height
    assert min(drafted.size) >= imaging.DRAFT_FACTOR * SIZE
    fast, full = prepare_image(data, SIZE), _full_decode(data)
    assert fast.shape == full.shape == (SIZE, SIZE, 3)
    diff = _diff(fast, full)
    assert diff.mean() <= MEAN_ABS_TOLERANCE and diff.max() <= MAX_ABS_TOLERANCE, (diff.mean(), diff.max())


def test_small_jpegs_and_other_formats_decode_at_full_size():
    img = make_image(5, (180, 90, 120), (400, 300))  # shorter side < 2 x 224: no reduction possible
    data = encode(img, "JPEG", quality=90)
    assert open_image(data, draft_size=SIZE).size == (400, 300)
    assert np.array_equal(prepare_image(data, SIZE), _full_decode(data))
    png = encode(make_image(6, (180, 90, 120), (1200, 1000)), "PNG")
    assert open_image(png, draft_size=SIZE).size == (1200, 1000)


def test_truncated_large_jpeg_is_still_rejected(large_jpegs):
    data = large_jpegs["rgb_4000x3000"]
    with pytest.raises(ImageRejected) as info:
        prepare_image(data[: len(data) // 2], SIZE)
    assert info.value.reason == "truncated"


def test_training_preprocessing_and_serving_use_the_same_drafted_pixels(large_jpegs, tmp_path):
    """preprocess encodes through `prepare_image(bytes)`, serving prepares through it too: a large JPEG
    gets the same reduced-scale decode in both (and it differs from a full decode, so this is the draft)."""
    from pipeline.preprocess import encode_cached_file
    from contracts.processed import encode_example
    from contracts.settings import get_settings
    from serving.inference import prepare

    data = large_jpegs["rgb_4000x3000"]
    path = tmp_path / "cached.jpg"
    path.write_bytes(data)
    trained = encode_cached_file(os.fspath(path), SIZE, 40_000_000, 1, "0" * 64)
    served = prepare(data, SIZE, get_settings().model_copy(update={"max_image_side": 8192}))
    assert trained == encode_example(served, 1, "0" * 64)
    assert trained != encode_example(_full_decode(data), 1, "0" * 64)

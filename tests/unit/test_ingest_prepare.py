"""Ingest's single decode (describe_and_prepare) gives the same facts as the full-decode checks, and the
pixels preprocess would compute: bad, unusual and large JPEG inputs, no stack needed."""

from __future__ import annotations

import numpy as np

from tests.fixtures.data import bad_images, encode, make_image, unusual_images


def _inputs() -> dict[str, bytes]:
    big = make_image(7, (200, 120, 160), (1200, 900))  # decoded at reduced scale by prepare (draft)
    out = {"big.jpg": encode(big, "JPEG", quality=90), "small.png": encode(make_image(3, (90, 60, 200)), "PNG")}
    out.update(unusual_images())
    out.update({name: data for name, (data, _) in bad_images().items()})
    jpeg = out["big.jpg"]
    out["truncated_big.jpg"] = jpeg[: len(jpeg) * 2 // 3]
    return out


def test_one_decode_gives_the_facts_of_the_full_decode_and_the_prepared_pixels():
    from contracts.settings import get_settings
    from pipeline.incremental import image_preparer
    from pipeline.ingest import describe_and_prepare, describe_bytes

    settings = get_settings(image_size=32)
    prepare = image_preparer(settings)
    rejected = set()
    for name, data in _inputs().items():
        facts, pixels = describe_and_prepare(data, settings.max_image_pixels, prepare)
        assert facts == describe_bytes(data, settings.max_image_pixels), name
        if facts["decoded"]:
            assert np.array_equal(pixels, prepare(data)), name
        else:
            rejected.add(name)
            assert pixels is None, name
    assert "truncated_big.jpg" in rejected and len(rejected) >= len(bad_images()) // 2, rejected

"""imaging: the one preprocessing function, mode conversions and the rejection reasons."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from contracts.imaging import ImageRejected, open_image, prepare_image, read_header
from tests.fixtures.data import bad_images, encode, png_claiming, unusual_images


def test_prepare_image_resizes_shorter_side_and_crops_centre():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 20:60] = 255  # a white centre band, exactly the centred 40x40 square
    out = prepare_image(encode(Image.fromarray(arr), "PNG"), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    # Only the centre square survives the crop (no stretching): interior pure white, edges only
    # softened by the bilinear filter, never the black margins.
    assert out[:, 1:-1].min() >= 250 and out.min() > 180


def test_prepare_image_accepts_pillow_images_and_bytes_identically():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    data = encode(img, "PNG")
    assert np.array_equal(prepare_image(data, 32), prepare_image(Image.open(__import__("io").BytesIO(data)), 32))


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_inputs_are_rejected_with_their_reason(name):
    data, reason = bad_images()[name]
    with pytest.raises(ImageRejected) as info:
        open_image(data)
    assert info.value.reason == reason
    assert info.value.detail  # a human-readable explanation


def test_bomb_header_is_refused_without_allocating_pixels():
    data = png_claiming(50_000, 50_000)
    assert len(data) < 200
    with pytest.raises(ImageRejected) as info:
        read_header(data)
    assert info.value.reason == "decompression_bomb"
    # A header under the Pillow limit but over ours is caught by our guard, from the header alone.
    with pytest.raises(ImageRejected, match="exceeds the limit of 1000000"):
        read_header(png_claiming(2000, 2000), max_pixels=1_000_000)


def test_cmyk_16bit_and_palette_alpha_are_converted_to_rgb():
    images = unusual_images()
    red = prepare_image(images["cmyk.jpg"], 16)
    assert red.shape == (16, 16, 3)
    assert red[..., 0].min() >= 240 and red[..., 1:].max() <= 15  # CMYK (0,255,255,0) is red
    grey = prepare_image(images["grey16.png"], 16)
    assert np.all(np.abs(grey.astype(int) - 127) <= 1)  # 16-bit mid-grey -> 8-bit mid-grey
    pal = prepare_image(images["palette_alpha.png"], 48)
    assert tuple(pal[24, 5]) == (0, 0, 255)  # opaque palette entry stays blue
    assert tuple(pal[24, 40]) == (255, 255, 255)  # transparent entry is composited on white


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 30))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = prepare_image(encode(img, "JPEG", exif=exif, quality=95), 30)
    assert out.shape == (30, 30, 3)
    # After rotation the image is 30 wide x 60 high; the centre crop straddles both halves.
    top, bottom = out[:5].mean(), out[-5:].mean()
    assert abs(top - bottom) > 100


def test_fit_policy_keeps_the_whole_field_and_pads_with_the_border_colour():
    """A 320x240 field with a marker at its left edge: `fit` keeps it, `center_crop` cuts it off."""
    arr = np.full((240, 320, 3), (200, 90, 110), dtype=np.uint8)
    arr[100:140, 0:30] = (20, 20, 200)  # an off-centre "cell" at the left edge
    data = encode(Image.fromarray(arr), "PNG")
    fit = prepare_image(data, 64, crop="fit")
    centre = prepare_image(data, 64)
    assert fit.shape == centre.shape == (64, 64, 3)
    blue = lambda a: (a[..., 2] > 150) & (a[..., 0] < 80)  # noqa: E731
    assert blue(fit).sum() > 10 and blue(centre).sum() == 0
    # 240/320 * 64 = 48 rows of image, 8 rows of padding above and below in the border colour.
    assert np.abs(fit[:8].astype(int) - (200, 90, 110)).max() <= 2
    assert np.abs(fit[-8:].astype(int) - (200, 90, 110)).max() <= 2


def test_policies_agree_on_square_images_and_default_is_center_crop():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 50, 3), dtype=np.uint8))
    assert np.array_equal(prepare_image(img, 20, crop="fit"), prepare_image(img, 20, crop="center_crop"))
    assert np.array_equal(prepare_image(img, 20), prepare_image(img, 20, crop="center_crop"))


def test_fit_policy_on_tall_and_grey_images():
    tall = Image.fromarray(np.full((90, 30), 77, dtype=np.uint8), mode="L")
    out = prepare_image(tall, 30, crop="fit")
    assert out.shape == (30, 30, 3) and (out == 77).all()


def test_unknown_crop_policy_is_refused():
    with pytest.raises(ValueError, match="crop policy"):
        prepare_image(Image.new("RGB", (10, 10)), 8, crop="stretch")

"""Image decoding, checks and the one preprocessing function.

`prepare_image` is used by the pipeline's preprocess stage *and* by the serving
container, so a model sees exactly the same pixels in training and in production.

Aspect-ratio policy: scale so the shorter side equals `size`, then crop the centred
`size` x `size` square. Smear fields and single-cell crops are centred and nearly
square, so this keeps the cells at their native proportions (no stretching) and loses
at most a thin margin of a non-square image. EXIF orientation is applied first.

Crop policies (`CROP_POLICIES`, chosen per dataset by the spec's `crop` and carried in the
bundle's `preprocessing.crop`, so serving applies the one the model was trained with):
`center_crop` as above (the default), or `fit`: scale the LONGER side to `size` and pad
the short side symmetrically with the image's own border colour (median of its edge pixels),
so a field whose subject is off-centre keeps its whole width (a 320x240 field would lose a
quarter of it to `center_crop`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Never silently accept a truncated file.
ImageFile.LOAD_TRUNCATED_IMAGES = False

RESAMPLE = Image.Resampling.BILINEAR
DEFAULT_MAX_PIXELS = 40_000_000
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# JPEGs are decoded at a reduced scale (1/2, 1/4 or 1/8 in the DCT, `Image.draft`) while both sides
# stay >= DRAFT_FACTOR x the prepared size, so the bilinear downscale after it still averages
# over several source pixels: a 4000 px JPEG decodes to 500 px in a fraction of the time and memory.
DRAFT_FACTOR = 2
# High-bit images are scaled to 8 bits this many pixels at a time: the float64 working set stays
# at a few MB instead of 8 bytes per pixel of the whole image (320 MB at 40 Mpx).
STRIP_PIXELS = 1 << 18
CENTER_CROP = "center_crop"
FIT = "fit"
CROP_POLICIES = (CENTER_CROP, FIT)
# Crop policy -> the `policy` recorded in a dataset version and a bundle (center_crop keeps its
# old name, so dataset versions made before crop policies existed keep their content hash).
CROP_POLICY_NAMES = {CENTER_CROP: "resize_shorter_center_crop", FIT: "resize_longer_pad_square"}


def crop_of(preprocessing: dict) -> str:
    """The crop policy a processed version was made with (from its `preprocessing` params)."""
    by_name = {v: k for k, v in CROP_POLICY_NAMES.items()}
    return by_name.get(str(preprocessing.get("policy", "")), CENTER_CROP)


class ImageRejected(ValueError):
    """An image that cannot be used; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    mode: str


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format, size and mode from the header only (cheap: no pixel decoding); raises ImageRejected."""
    img = _open_header(data, max_pixels)
    return ImageInfo(format=str(img.format or "UNKNOWN"), width=img.width, height=img.height, mode=img.mode)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode `data`, rejecting empty, non-image, bomb and truncated input.

    `draft_size`: the image will be prepared to this size, so a JPEG may be decoded at a reduced
    scale (DRAFT_FACTOR); every byte is still decoded, so truncation is still caught."""
    img = _open_header(data, max_pixels)
    if draft_size and img.format == "JPEG":
        img.draft(img.mode, (DRAFT_FACTOR * draft_size, DRAFT_FACTOR * draft_size))
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected("truncated", f"image data is incomplete or corrupt: {exc}") from None
    return img


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected("empty", "the file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "the file is not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("corrupt", f"cannot read image header: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            "decompression_bomb",
            f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
        )
    return img


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Decode completely and report format, size and mode; raises ImageRejected."""
    img = open_image(data, max_pixels)
    return ImageInfo(format=str(img.format or "UNKNOWN"), width=img.width, height=img.height, mode=img.mode)


def high_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float grey -> 8-bit "L", in strips of rows (bounded memory).

    Policy: 16-bit images and any whose maximum exceeds 255 are scaled from 0..65535, others
    from 0..255; values round half up and clip to 0..255."""
    width, height = img.size
    top = 65535.0 if img.mode.startswith("I;16") or max(0, img.getextrema()[1]) > 255 else 255.0
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, STRIP_PIXELS // max(1, width))
    for y in range(0, height, rows):
        strip = np.asarray(img.crop((0, y, width, min(height, y + rows))), dtype=np.float64)
        out[y : y + rows] = np.clip(strip / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited over white."""
    if img.mode == "RGB":
        return img
    if img.mode in HIGH_BIT_MODES:
        return high_bit_to_l(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageRejected("unsupported_mode", f"cannot convert mode {img.mode} to RGB: {exc}") from None


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size`, then crop the centred square."""
    width, height = img.size
    if (width, height) == (size, size):
        return img
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), RESAMPLE)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize_fit(img: Image.Image, size: int) -> Image.Image:
    """Scale the longer side to `size`, then pad to a centred square with the border colour."""
    width, height = img.size
    if (width, height) == (size, size):
        return img
    scale = size / max(width, height)
    new_w, new_h = max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale)))
    img = img.resize((new_w, new_h), RESAMPLE)
    if (new_w, new_h) == (size, size):
        return img
    canvas = Image.new(img.mode, (size, size), _border_colour(img))
    canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def _border_colour(img: Image.Image):
    """Median of the edge pixels: the background a field's padding should continue."""
    arr = np.asarray(img)
    edges = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    colour = np.median(edges, axis=0).astype(np.uint8)
    return tuple(int(c) for c in np.atleast_1d(colour)) if colour.ndim else int(colour)


def check_crop_policy(crop: str) -> str:
    if crop not in CROP_POLICIES:
        raise ValueError(f"unknown crop policy {crop!r}; expected one of {', '.join(CROP_POLICIES)}")
    return crop


def prepare_image(data: bytes | Image.Image, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                  crop: str = CENTER_CROP) -> np.ndarray:
    """Bytes or a Pillow image -> uint8 array of shape (size, size, 3). The serving contract.

    `crop` is the dataset's crop policy (`center_crop` or `fit`, see the module docstring). Bytes
    are decoded with `draft_size=size` (training and serving both pass bytes, so both see the
    same reduced-scale decode of large JPEGs)."""
    resize = resize_fit if check_crop_policy(crop) == FIT else resize_center_crop
    if isinstance(data, (bytes, bytearray, memoryview)):
        img = open_image(data, max_pixels, draft_size=size)
        ImageOps.exif_transpose(img, in_place=True)  # our own image: no full-size copy when upright
    else:
        img = ImageOps.exif_transpose(data) or data
    if img.mode in HIGH_BIT_MODES or img.mode == "L":
        # Grey: resize the 1-byte image, then replicate to RGB. The same pixels as converting first
        # (bilinear works per channel), without a full-size 4-byte-per-pixel RGB copy.
        img = resize(high_bit_to_l(img) if img.mode != "L" else img, size).convert("RGB")
    else:
        img = resize(to_rgb(img), size)
    return np.asarray(img, dtype=np.uint8).reshape(size, size, 3)

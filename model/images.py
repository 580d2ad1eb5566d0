"""Decoding untrusted image bytes into RGB PIL images, with size limits and clear errors.

Shoppers and catalogs send anything: truncated files, CMYK JPEGs, PNGs with alpha, grayscale, rotated
phone photos (HEIC from iPhones, AVIF), decompression bombs. Everything either becomes an RGB image or
raises ImageDecodeError.

Formats: JPEG, PNG and WebP always; AVIF where Pillow was built with libavif (the PyPI wheels since Pillow
11.3); HEIC/HEIF through the `pillow-heif` package (a dependency of vitrine; without it HEIC bytes get a clear
"not a recognised image" error).
"""

from __future__ import annotations

import io
import math
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError, features


def _formats() -> tuple[str, ...]:
    formats = ["JPEG", "PNG", "WEBP"]
    if features.check("avif"):
        formats.append("AVIF")
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # optional at run time: a minimal install still decodes the rest
        return tuple(formats)
    register_heif_opener()
    return (*formats, "HEIF")


DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # bytes of encoded input
DEFAULT_MAX_PIXELS = 40_000_000  # width * height after decoding
JPEG_DRAFT_FACTOR = 64  # a JPEG of up to this many times max_pixels is decoded at 1/2, 1/4 or 1/8 scale
# A JPEG is decoded at reduced scale only while it stays this many times the model's input. Measured with the
# default model on upscaled catalog photos (benchmarks/RESULTS.md, "Phone photos"): the embedding's cosine with
# the full decode's is 0.983 at worst at 2x (libjpeg's 1/8 scale is the 8x8 blocks' means: too coarse a box so
# close to the input); from 3x it is 0.9994-0.9997 in the median and 0.996 at worst over 300 phone-sized photos.
DECODE_MARGIN = 3


def decode_size_for(input_size: tuple[int, int], width_fraction: float = 1.0,
                    height_fraction: float = 1.0) -> tuple[int, int]:
    """(width, height) to decode an image at for a model input of `input_size` (H, W): DECODE_MARGIN times the
    input, divided by the fractions of the image's width and height that reach the input (a crop region, a
    training crop), each taken in (1e-4, 1]."""
    height, width = input_size
    return (math.ceil(width * DECODE_MARGIN / min(max(width_fraction, 1e-4), 1.0)),
            math.ceil(height * DECODE_MARGIN / min(max(height_fraction, 1e-4), 1.0)))
ALLOWED_FORMATS = _formats()


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says what was wrong."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any mode: alpha is composited onto white (product photos have white backgrounds)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB") if image.mode != "RGB" else image


def decode_image(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode JPEG/PNG/WebP (and AVIF/HEIC, see ALLOWED_FORMATS) bytes to an RGB image, EXIF orientation applied.

    `min_size` (width, height), as displayed: the smallest image the caller needs (a model's input, see
    `model.embedder.Embedder.decode_size`). A JPEG at least twice that size in both directions is decoded at
    the smallest of 1/2, 1/4 or 1/8 scale that keeps it at least `min_size` (the decoder's own DCT scaling:
    a 12-megapixel phone photo for the default model decodes at 1/8 scale, about 6x faster, and its full-size
    pixels are never allocated). Without it every image is decoded at full size.

    A JPEG with more than `max_pixels` pixels (a 48, 108 or 200 megapixel phone photo) is decoded at the
    smallest of 1/2, 1/4 or 1/8 scale that brings it under the limit, whatever `min_size` says; up to
    JPEG_DRAFT_FACTOR times the limit and Pillow's decompression-bomb ceiling. Other formats over the limit are
    refused.

    Raises ImageDecodeError when the input is empty, too large (bytes or pixels), of another format,
    truncated or corrupt.
    """
    if not data:
        raise ImageDecodeError("empty image: got 0 bytes")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"image too large: {len(data)} bytes > limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit below decides
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"image has {width}x{height} pixels (empty)")
            if width * height > max_pixels:
                _draft_under(image, max_pixels, min_size)
            elif min_size is not None and image.format == "JPEG":
                _draft_to(image, min_size)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image) or image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not a recognised image ({len(data)} bytes; expected one of "
                               f"{', '.join(ALLOWED_FORMATS)})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image rejected as a decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image ({len(data)} bytes): {exc}") from exc


DRAFT_SCALES = (8, 4, 2)  # the reduced scales (1/s) of libjpeg's DCT scaling, smallest image first


def _stored_size(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """`size` (width, height as displayed) in the file's stored orientation: swapped when the EXIF orientation
    (5-8) transposes the stored pixels."""
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the speed-up, exif_transpose copes with it
        orientation = None
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _covering_scale(image: Image.Image, min_size: tuple[int, int]) -> int:
    """The largest s of DRAFT_SCALES whose 1/s scale still covers `min_size` (width, height as displayed) in both
    directions; 1 when none does."""
    width, height = image.size
    stored = _stored_size(image, min_size)
    return next((s for s in DRAFT_SCALES if width // s >= stored[0] and height // s >= stored[1]), 1)


def _draft_to(image: Image.Image, min_size: tuple[int, int]) -> None:
    """Set a JPEG to decode at the smallest scale that still covers `min_size` (display orientation)."""
    scale = _covering_scale(image, min_size)
    if scale > 1:
        image.draft(None, (image.size[0] // scale, image.size[1] // scale))


def _draft_under(image: Image.Image, max_pixels: int, min_size: tuple[int, int] | None = None) -> None:
    """Set a JPEG to decode at the largest of 1/2, 1/4, 1/8 scale with at most `max_pixels` (smaller still when
    `min_size` allows it); else refuse it."""
    width, height = image.size
    refused = ImageDecodeError(f"image has {width}x{height} pixels, over the limit of {max_pixels} pixels"
                               + (f" (a JPEG may have up to {JPEG_DRAFT_FACTOR} times that: it is decoded "
                                  "at reduced scale)" if image.format != "JPEG" else ""))
    if image.format != "JPEG" or width * height > max_pixels * JPEG_DRAFT_FACTOR:
        raise refused
    scale = next((s for s in reversed(DRAFT_SCALES) if -(-width // s) * -(-height // s) <= max_pixels), None)
    if scale is None:
        raise refused
    if min_size is not None:
        scale = max(scale, _covering_scale(image, min_size))
    image.draft(None, (width // scale, height // scale))
    if image.size[0] * image.size[1] > max_pixels:
        raise refused


def check_region(x: float, y: float, width: float, height: float) -> None:
    """ValueError unless (x, y, width, height) is a non-empty rectangle inside the unit square (1e-4 slack)."""
    slack = 1e-4
    values = (x, y, width, height)
    if not all(math.isfinite(v) for v in values) or width <= 0 or height <= 0 or x < 0 or y < 0 \
            or x + width > 1 + slack or y + height > 1 + slack:
        raise ValueError(f"the crop region (x {x:g}, y {y:g}, width {width:g}, height {height:g}) must lie inside "
                         "the image: fractions of its width and height with x, y >= 0, width, height > 0, "
                         "x + width <= 1 and y + height <= 1")


def crop_fraction(image: Image.Image, x: float, y: float, width: float, height: float) -> Image.Image:
    """The part of `image` given in fractions of its size (check_region's rules), at least 1x1 pixel."""
    check_region(x, y, width, height)
    w, h = image.size
    left, top = min(w - 1, int(round(x * w))), min(h - 1, int(round(y * h)))
    right = max(left + 1, min(w, int(round((x + width) * w))))
    bottom = max(top + 1, min(h, int(round((y + height) * h))))
    return image.crop((left, top, right, bottom))


RESIZE_MODES = ("crop", "stretch", "pad")


def fit_aspect(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`image` brought to the aspect ratio width:height before it is resized to the model's input.

    crop: the centred window of that aspect; stretch: unchanged (the resize then distorts any other aspect);
    pad: centred on white (the catalog's background), nothing cut or distorted but the product smaller. For
    an image already at the model's aspect the three modes give the same pixels. Measured with the default
    model on reframed test queries (benchmarks/exp_aspect.py): crop recovers a centred product in a wider
    photo (4:3, 16:9, square) where stretch squeezes it and pad shrinks it (the model is sensitive to the
    product's scale); stretch is best by 2-6 points when the photo is tighter than the product.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    w, h = image.size
    if mode == "stretch" or w * height == h * width:
        return image
    if mode == "crop":
        if w * height > h * width:  # too wide: keep the centre columns
            new_w = max(1, round(h * width / height))
            left = (w - new_w) // 2
            return image.crop((left, 0, left + new_w, h))
        new_h = max(1, round(w * height / width))
        top = (h - new_h) // 2
        return image.crop((0, top, w, top + new_h))
    if w * height > h * width:  # too wide: add white rows above and below
        size = (w, max(h, round(w * height / width)))
    else:
        size = (max(w, round(h * width / height)), h)
    if size == (w, h):
        return image
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image.convert("RGB"), ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas

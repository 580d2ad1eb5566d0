"""decode_image: every accepted format and mode becomes RGB; bad input raises ImageDecodeError clearly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.images import ImageDecodeError, decode_image

MINI_IMAGES = Path(__file__).resolve().parents[1] / "data" / "mini-catalog" / "images"


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_real_catalog_jpeg_decodes() -> None:
    path = sorted(MINI_IMAGES.glob("*.jpg"))[0]
    image = decode_image(path.read_bytes())
    assert image.mode == "RGB" and image.size[1] == 80


@pytest.mark.parametrize("data, message", [
    (b"", "empty image"),
    (b"this is not an image at all", "not a recognised image"),
    (b"GIF89a" + b"\x00" * 64, "not a recognised image"),
])
def test_garbage_raises_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_truncated_jpeg_raises() -> None:
    data = _encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_size_limits() -> None:
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data, max_bytes=10)
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(data, max_pixels=99 * 99)


def test_a_jpeg_over_the_pixel_limit_is_decoded_at_reduced_scale() -> None:
    """A 48/108-megapixel phone JPEG is not refused: the decoder scales it by 1/2, 1/4 or 1/8 to fit the limit
    (shown here with a small limit); the picture, its colours and its EXIF orientation are the same."""
    photo = Image.open(sorted(MINI_IMAGES.glob("*.jpg"))[0]).convert("RGB")
    big = photo.resize((1200, 1600), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    for mode in ("RGB", "CMYK", "L"):
        data = _encode(big.convert(mode), "JPEG", quality=92, exif=exif.tobytes())
        out = decode_image(data, max_pixels=200_000)  # 1/2 scale would be 480k pixels: 1/4 it is
        assert out.mode == "RGB" and out.size == (400, 300), (mode, out.size)
        full = decode_image(data)  # under the default limit: decoded at full size
        assert full.size == (1600, 1200)
        a = np.asarray(out.resize((80, 60)), dtype=np.float32)
        b = np.asarray(full.resize((80, 60)), dtype=np.float32)
        assert np.abs(a - b).mean() < 4.0, mode
    png = _encode(big, "PNG")
    with pytest.raises(ImageDecodeError, match="over the limit of 200000 pixels .a JPEG may have up to 64 times"):
        decode_image(png, max_pixels=200_000)
    with pytest.raises(ImageDecodeError, match="over the limit of 20000 pixels$"):
        decode_image(_encode(big, "JPEG"), max_pixels=20_000)  # even 1/8 scale (150x200) is over


def _big_photo(size: tuple[int, int] = (1200, 1600)) -> Image.Image:
    """A real catalog photo upscaled to phone-photo proportions (width, height)."""
    return Image.open(sorted(MINI_IMAGES.glob("*.jpg"))[0]).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def test_min_size_decodes_a_large_jpeg_at_the_smallest_scale_that_covers_it() -> None:
    """With min_size a JPEG decodes at the smallest DCT scale (1/2, 1/4, 1/8) that is still at least that large
    both ways; the picture is the full decode's, made smaller."""
    data = _encode(_big_photo(), "JPEG", quality=92)
    full = decode_image(data)
    assert full.size == (1200, 1600)
    assert decode_image(data, min_size=(192, 256)).size == (300, 400)  # 1/8 would be 150 wide, under 192
    assert decode_image(data, min_size=(150, 200)).size == (150, 200)  # 1/8 covers it exactly
    assert decode_image(data, min_size=(601, 10)).size == (1200, 1600)  # not even 1/2 covers it: full scale
    assert decode_image(data, min_size=(1, 1)).size == (150, 200)
    reduced = decode_image(data, min_size=(300, 400))
    a = np.asarray(reduced.resize((60, 80), Image.Resampling.BILINEAR), dtype=np.float32)
    b = np.asarray(full.resize((60, 80), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(a - b).mean() < 3.0


def test_min_size_is_read_in_display_orientation() -> None:
    """A phone JPEG stored landscape with EXIF orientation 6 (shown portrait): min_size is what the shopper sees,
    so the scale is chosen on the transposed size."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_big_photo((1600, 1200)), "JPEG", quality=92, exif=exif.tobytes())
    assert decode_image(data).size == (1200, 1600)
    # displayed 1200x1600: 1/8 (150x200) covers 100x200 ...
    assert decode_image(data, min_size=(100, 200)).size == (150, 200)
    # ... but not 160x90, which the stored 200x150 at 1/8 would only cover without the transpose
    out = decode_image(data, min_size=(160, 90))
    assert out.size == (300, 400) and out.size[0] >= 160


def test_min_size_leaves_other_formats_and_small_jpegs_alone_and_still_finds_truncation() -> None:
    big = _big_photo()
    assert decode_image(_encode(big, "PNG"), min_size=(1, 1)).size == (1200, 1600)  # only JPEG scales in decoding
    small = _encode(big.resize((120, 160)), "JPEG")
    assert decode_image(small, min_size=(96, 128)).size == (120, 160)  # under twice the size: full scale
    data = _encode(big, "JPEG", quality=92)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], min_size=(1, 1))  # the whole stream is still decoded and checked


def test_min_size_and_the_pixel_limit_together() -> None:
    """Over max_pixels the limit decides the least reduction; min_size may reduce further, never less."""
    data = _encode(_big_photo((1600, 1200)), "JPEG", quality=92)
    assert decode_image(data, max_pixels=500_000).size == (800, 600)
    assert decode_image(data, max_pixels=500_000, min_size=(100, 100)).size == (200, 150)
    assert decode_image(data, max_pixels=500_000, min_size=(1000, 1000)).size == (800, 600)


def test_png_alpha_is_composited_on_white() -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    out = decode_image(_encode(image, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"),
                                       ("CMYK", "JPEG"), ("RGB", "WEBP"), ("RGBA", "WEBP"), ("I;16", "PNG")])
def test_modes_and_formats_decode_to_rgb(mode: str, fmt: str) -> None:
    image = Image.new("RGB", (20, 10), (120, 60, 30)).convert(mode)
    out = decode_image(_encode(image, fmt))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_cmyk_jpeg_colours_survive() -> None:
    out = decode_image(_encode(Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK"), "JPEG", quality=95))
    pixel = out.getpixel((8, 8))
    assert isinstance(pixel, tuple)
    red, green, blue = pixel
    assert red > 150 and green < 80 and blue < 80


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 30)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_formats_decode_close_to_the_jpeg(fmt: str) -> None:
    """HEIC (iPhone photos, via pillow-heif) and AVIF: a real catalog photo re-encoded decodes to its pixels."""
    from model.images import ALLOWED_FORMATS

    assert fmt in ALLOWED_FORMATS, f"{fmt} support missing (pillow-heif not installed / Pillow without libavif?)"
    original = decode_image(sorted(MINI_IMAGES.glob("*.jpg"))[0].read_bytes())
    out = decode_image(_encode(original, fmt, quality=95))
    assert out.mode == "RGB" and out.size == original.size
    import numpy as np

    difference = np.abs(np.asarray(out, dtype=np.float32) - np.asarray(original, dtype=np.float32)).mean()
    assert difference < 6.0, f"{fmt} round trip changed the pixels by {difference:.1f} on average"


def test_heic_with_alpha_is_composited_on_white() -> None:
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    image.paste((200, 20, 20, 255), (4, 4, 12, 12))
    out = decode_image(_encode(image, "HEIF", quality=100))
    corner, centre = out.getpixel((0, 0)), out.getpixel((8, 8))
    assert isinstance(corner, tuple) and isinstance(centre, tuple)
    assert min(corner) > 235 and centre[0] > 150 and centre[1] < 80


def test_fit_aspect_pads_crops_or_stretches() -> None:
    import numpy as np

    from model.images import fit_aspect

    wide = Image.new("RGB", (40, 20), (10, 20, 30))  # 2:1, for a 3:4 (width:height) model input
    padded = fit_aspect(wide, 3, 4, "pad")
    assert padded.size == (40, 53)  # white rows above and below, product centred and undistorted
    pixels = np.asarray(padded)
    assert (pixels[:16] == 255).all() and (pixels[-17:] == 255).all() and (pixels[16:36] == (10, 20, 30)).all()
    assert fit_aspect(wide, 3, 4, "crop").size == (15, 20)  # the centre columns
    assert fit_aspect(wide, 3, 4, "stretch") is wide
    tall = Image.new("RGB", (10, 40), (1, 2, 3))
    assert fit_aspect(tall, 3, 4, "pad").size == (30, 40) and fit_aspect(tall, 3, 4, "crop").size == (10, 13)
    same = Image.new("RGB", (60, 80))
    assert all(fit_aspect(same, 96, 128, mode) is same for mode in ("pad", "crop", "stretch"))
    with pytest.raises(ValueError, match="unknown resize mode 'zoom'"):
        fit_aspect(wide, 3, 4, "zoom")

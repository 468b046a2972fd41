from __future__ import annotations

import io
import time
import warnings

import pytest
from PIL import Image, ImageFile

from pipeline import reasons
from pipeline.images import ImageLimits, dataset_bytes, decode_image, to_rgb
from pipeline.synthetic import bomb_png


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, (200, 40, 40)).convert(mode)


def test_rgb_jpeg_passes_unchanged() -> None:
    data = encode(photo(), "JPEG")
    out = decode_image(data)
    assert out.ok and out.image.mode == "RGB" and out.image.size == (40, 30)
    assert not out.converted and out.format == "JPEG"
    assert dataset_bytes(data, out) is data  # original bytes kept


@pytest.mark.parametrize("data, reason", [
    (None, reasons.IMAGE_MISSING),
    (b"", reasons.IMAGE_MISSING),
    (b"\x00" * 100, reasons.IMAGE_UNDECODABLE),
    (encode(photo(), "JPEG")[:200], reasons.IMAGE_UNDECODABLE),
    (encode(Image.new("RGB", (1, 1)), "PNG"), reasons.IMAGE_TOO_SMALL),
    (bomb_png(20000, 20000), reasons.IMAGE_TOO_LARGE),
    (encode(photo(size=(64, 8)), "PNG"), reasons.IMAGE_TOO_SMALL),
    (encode(photo(), "TIFF"), reasons.IMAGE_UNDECODABLE),  # not an accepted format
])
def test_bad_bytes_give_reason_codes(data: bytes | None, reason: str) -> None:
    out = decode_image(data)
    assert out.reason == reason and out.image is None and out.detail
    assert out.reason in reasons.ALL


def test_bomb_refused_from_header_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    started = time.perf_counter()
    # 9000x9000 is under Pillow's own threshold, so our header check is what refuses it.
    out = decode_image(bomb_png(9000, 9000))
    assert out.reason == reasons.IMAGE_TOO_LARGE and "px limit" in out.detail
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("action", ["error", "ignore"])
def test_pillow_bomb_warning_zone_is_refused(action: str) -> None:
    # 10000x10000 lies between Image.MAX_IMAGE_PIXELS and twice it, where Pillow only warns. Refused
    # with the warning as an error (our import-time filter) and without it (our own header check).
    with warnings.catch_warnings():
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        out = decode_image(bomb_png(10000, 10000), ImageLimits(max_pixels=10**10))
    assert out.reason == reasons.IMAGE_TOO_LARGE


def test_byte_and_pixel_limits_are_configurable() -> None:
    data = encode(photo(size=(64, 64)), "JPEG")
    assert decode_image(data, ImageLimits(max_bytes=100)).reason == reasons.IMAGE_TOO_LARGE
    assert decode_image(data, ImageLimits(max_pixels=1000)).reason == reasons.IMAGE_TOO_LARGE
    assert decode_image(data, ImageLimits(min_side=100)).reason == reasons.IMAGE_TOO_SMALL


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("P", "PNG"), ("1", "PNG"),
                                       ("LA", "PNG"), ("RGBA", "PNG"), ("RGB", "GIF"), ("RGB", "BMP"),
                                       ("RGBA", "WEBP")])
def test_modes_convert_to_rgb(mode: str, fmt: str) -> None:
    data = encode(photo(mode), fmt)
    out = decode_image(data)
    assert out.ok and out.image.mode == "RGB" and out.image.size == (40, 30)
    stored = dataset_bytes(data, out)
    again = decode_image(stored)
    assert again.ok and not again.converted  # the stored image needs no further conversion
    assert again.format in ("JPEG", "PNG", "WEBP")


def test_alpha_is_composited_on_white() -> None:
    image = Image.new("RGBA", (20, 20), (255, 0, 0, 0))          # fully transparent red
    image.paste((0, 0, 255, 255), (0, 0, 10, 20))                 # opaque blue left half
    out = decode_image(encode(image, "PNG"))
    assert out.converted
    assert out.image.getpixel((15, 10)) == (255, 255, 255)
    assert out.image.getpixel((5, 10)) == (0, 0, 255)


def test_palette_transparency_and_16bit() -> None:
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    out = decode_image(encode(pal, "PNG", transparency=0))
    assert out.image.getpixel((1, 1)) == (255, 255, 255)
    deep = Image.new("I;16", (20, 20), 65535)
    out = decode_image(encode(deep, "PNG"))
    assert out.ok and out.image.getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_keeps_rgb_object() -> None:
    image = photo()
    assert to_rgb(image) is image


def test_draft_decodes_large_jpeg_smaller() -> None:
    data = encode(photo(size=(1600, 1200)), "JPEG")
    out = decode_image(data, draft=(224, 224))
    assert out.ok and 224 <= min(out.image.size) < 1200

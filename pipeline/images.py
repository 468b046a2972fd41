"""Decode and validate product images: bytes in, an RGB PIL image or a stable reason code out.

One pure function, `decode_image`, serves ingest (validation), the training loader and scoring, so a
picture is judged and converted the same way everywhere. Limits are checked from the header before any
pixel is decoded, so decompression bombs cost microseconds, not gigabytes. The images of `image_uri`
catalogs are read by `pipeline.image_sources`.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from . import reasons

# Pillow only *warns* between MAX_IMAGE_PIXELS and twice that. We want an error. The filter is set once
# at import because `warnings.catch_warnings` is not thread-safe and images are decoded in threads.
# Correctness does not depend on it (test runners reset filters): `_pixel_limit` never exceeds Pillow's
# threshold, so an image in the warning zone is refused by our own header check as well.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# The catalog contract names JPEG, PNG and WebP; GIF and BMP are common enough in the wild to accept.
# Restricting formats also keeps Pillow's rarer, less hardened parsers away from untrusted bytes.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# Formats stored as-is in the dataset when the image is already RGB; others are re-encoded.
KEEP_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
LOSSY_FORMATS = frozenset({"JPEG", "WEBP"})
JPEG_QUALITY = 95
WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000      # 40 MP (e.g. 8000x5000); also below Pillow's own bomb threshold
    min_side: int = 16                # smaller than this is a tracking pixel or an icon, not a product


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class Decoded:
    """The outcome of `decode_image`: `image` is set (RGB) exactly when `reason` is None."""
    image: Image.Image | None
    reason: str | None = None
    detail: str = ""
    format: str | None = None
    converted: bool = False           # the source was not plain RGB (CMYK, palette, alpha, grayscale...)

    @property
    def ok(self) -> bool:
        return self.reason is None


def _refuse(reason: str, detail: str, fmt: str | None = None) -> Decoded:
    return Decoded(image=None, reason=reason, detail=detail, format=fmt)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale (some PNG/TIFF) to 8-bit; Pillow cannot convert them to RGB directly."""
    if image.mode.startswith("I"):
        return image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return image.convert("L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparent pixels are composited on white, the usual catalog background."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)


def _pixel_limit(limits: ImageLimits) -> int:
    pillow = Image.MAX_IMAGE_PIXELS
    return min(limits.max_pixels, pillow) if pillow else limits.max_pixels


def _check_header(image: Image.Image, limits: ImageLimits) -> Decoded | None:
    width, height = image.size
    if width * height > _pixel_limit(limits):
        return _refuse(reasons.IMAGE_TOO_LARGE,
                       f"{width}x{height} px > {_pixel_limit(limits)} px limit", image.format)
    if min(width, height) < limits.min_side:
        return _refuse(reasons.IMAGE_TOO_SMALL,
                       f"{width}x{height} px; minimum side is {limits.min_side} px", image.format)
    return None


def decode_image(data: bytes | None, limits: ImageLimits = DEFAULT_LIMITS,
                 draft: tuple[int, int] | None = None) -> Decoded:
    """Fully decode `data` within `limits` and convert it to RGB; never raises on bad bytes.

    `draft` (loader only) lets JPEG decode at a reduced scale no smaller than that size, which is much
    faster for photos far larger than the model input. Limits are still checked on the full size.
    """
    if data is None:
        return _refuse(reasons.IMAGE_MISSING, "null image")
    if len(data) == 0:
        return _refuse(reasons.IMAGE_MISSING, "empty image (0 bytes)")
    if len(data) > limits.max_bytes:
        return _refuse(reasons.IMAGE_TOO_LARGE, f"{len(data)} bytes > {limits.max_bytes} byte limit")
    try:
        image = _open(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return _refuse(reasons.IMAGE_TOO_LARGE, str(exc))
    except Image.UnidentifiedImageError:
        return _refuse(reasons.IMAGE_UNDECODABLE, f"not an image in a supported format {ALLOWED_FORMATS}")
    except Exception as exc:  # any parser failure on untrusted bytes is a row problem, not a crash
        return _refuse(reasons.IMAGE_UNDECODABLE, f"{type(exc).__name__}: {exc}")
    fmt = image.format
    refused = _check_header(image, limits)
    if refused is not None:
        return refused
    try:
        if draft is not None and fmt == "JPEG":
            image.draft("RGB", draft)
        image.load()
        source_mode = image.mode
        transparent = "transparency" in image.info
        rgb = to_rgb(image)
    except Exception as exc:
        return _refuse(reasons.IMAGE_UNDECODABLE, f"{type(exc).__name__}: {exc}", fmt)
    return Decoded(image=rgb, format=fmt, converted=source_mode != "RGB" or transparent)


def encode_rgb(image: Image.Image, lossless: bool) -> bytes:
    """Re-encode a converted image: PNG when the source was lossless, JPEG q95 otherwise."""
    buf = io.BytesIO()
    if lossless:
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def dataset_bytes(data: bytes, decoded: Decoded) -> bytes:
    """The bytes to store in the dataset: the original when it is already RGB JPEG/PNG/WebP (no generation
    loss, provenance kept byte for byte), else the converted image re-encoded."""
    if not decoded.converted and decoded.format in KEEP_FORMATS:
        return data
    assert decoded.image is not None
    return encode_rgb(decoded.image, lossless=decoded.format not in LOSSY_FORMATS)

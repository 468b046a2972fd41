"""Decode and validate product images: bytes in, an RGB PIL image or a stable reason code out.

One pure function, `decode_image`, serves ingest (validation), the training loader and scoring, so a
picture is judged and converted the same way everywhere. Limits are checked from the header before any
pixel is decoded, so decompression bombs cost microseconds, not gigabytes. For a model, it decodes straight
to what the model's transform keeps of the picture (`model_view`), so a batch holds batch-size small
images whatever the sizes of the originals. The images of `image_uri`
catalogs are read by `pipeline.io.image_sources`.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image

from .. import reasons

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
# A model-sized decode (`decode_image(draft=...)`) lets libjpeg scale by 1/2, 1/4 or 1/8 only while the
# shorter side stays at least this many times the model's input side, so the bicubic resize that follows
# still does most of the low-pass: the model input then stays within a few levels of the full decode's
# (tests/test_images.py measures it). Scaled down to the model side itself, it was off by up to 48 of 255.
JPEG_DRAFT_GAP = 4
# An image longer than this many times its width (or wider than this many times its height) is cut down to
# the model's view at decode even when small: resized whole, a 16 x 600,000 strip would become 224 x 8.4 M.
MAX_ASPECT = 4
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


def model_view(image: Image.Image, side: int, extent: tuple[float, float] | None = None) -> Image.Image:
    """What the model's eval transform (`cmaclip.transforms.image_transform`: torchvision's Resize of the
    shorter side to `side`, bicubic, then CenterCrop to `side` x `side`) keeps of `image`, resampled from
    just that region.

    The same sampling positions, filter and order of passes as the two steps, so the same pixels up to
    floating-point rounding (tests/test_images.py compares them), but the cost follows `side`: nothing
    outside the crop is resampled. `extent` is the part of `image` that holds the picture when JPEG draft
    mode decoded it at 1/n scale: (width / n, height / n) of the original, where the decoded size is
    rounded up.
    """
    width, height = extent or image.size
    if width <= height:  # torchvision's rule: the longer side is truncated, not rounded
        new_w, new_h = side, int(side * height / width)
    else:
        new_w, new_h = int(side * width / height), side
    left, top = int(round((new_w - side) / 2.0)), int(round((new_h - side) / 2.0))  # CenterCrop's offsets
    sx, sy = width / new_w, height / new_h
    # min(): side * (width / side) can exceed width by an ulp, and Pillow refuses a box past the edge.
    x0, y0, x1, y1 = left * sx, top * sy, min((left + side) * sx, width), min((top + side) * sy, height)
    bicubic = Image.Resampling.BICUBIC
    # Each pass rounds to 8 bits, so the order shows at sharp edges (up to 25 levels): run the passes one
    # at a time, in the order Pillow picks for the whole resize, the second on the lines the first made.
    if _vertical_first(image.size, (new_w, new_h)):
        a, b = _lines(x0, x1, sx, image.width)
        tall = image.resize((b - a, side), bicubic, box=(a, y0, b, y1))
        return tall.resize((side, side), bicubic, box=(x0 - a, 0, x1 - a, side))
    a, b = _lines(y0, y1, sy, image.height)
    wide = image.resize((side, b - a), bicubic, box=(x0, a, x1, b))
    return wide.resize((side, side), bicubic, box=(0, y0 - a, side, y1 - a))


def _vertical_first(size: tuple[int, int], out: tuple[int, int]) -> bool:
    """Pillow 13's order of passes for a resize from `size` to `out` (libImaging/Resample.c): vertical first
    when both sides shrink and the height loses more than twice as many pixels as the width."""
    (width, height), (out_w, out_h) = size, out
    return width >= out_w and height >= out_h and height - out_h > 2 * (width - out_w)


def _lines(lo: float, hi: float, scale: float, limit: int) -> tuple[int, int]:
    """The source rows (or columns) that a bicubic pass over [lo, hi), at `scale` source px per output px,
    reads: 2 source px either side, 2 x scale when shrinking (plus one for rounding)."""
    reach = 2 * max(scale, 1.0) + 1
    return max(0, int(lo - reach)), min(limit, math.ceil(hi + reach))


def _needs_view(size: tuple[float, float], side: int) -> bool:
    """Larger than the model's input (the resize would shrink it), or so elongated that the transform's
    resize would make a long strip: worth cutting down at decode. Smaller images are left to the transform."""
    short, long = sorted(size)
    return short > side or long > MAX_ASPECT * short


def _jpeg_draft(image: Image.Image, side: int) -> tuple[float, float]:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the shorter side stays >= JPEG_DRAFT_GAP x `side`,
    so the full-size image is never held. Returns the picture's extent in the decoded image."""
    want = JPEG_DRAFT_GAP * side
    drafted = image.draft("RGB", (want, want))
    return drafted[1][2:] if drafted else image.size


def decode_image(data: bytes | None, limits: ImageLimits = DEFAULT_LIMITS,
                 draft: tuple[int, int] | None = None) -> Decoded:
    """Decode `data` within `limits` and convert it to RGB; never raises on bad bytes.

    Without `draft` (ingest), the full image. With `draft`, the square input size of a model, the image
    as that model sees it (`model_view`), so a decoded image costs the same whatever its size: JPEG
    decodes at a reduced scale, and the full-size pixels of other formats are released before returning.
    Limits are always checked on the full size, from the header, before any pixel is decoded.
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
        image.close()
        return refused
    rgb, extent = None, image.size
    try:
        if draft is not None and fmt == "JPEG":
            extent = _jpeg_draft(image, max(draft))
        image.load()
        converted = image.mode != "RGB" or "transparency" in image.info
        rgb = to_rgb(image)
        if draft is not None and _needs_view(extent, max(draft)):
            rgb = model_view(rgb, max(draft), extent)
    except Exception as exc:
        return _refuse(reasons.IMAGE_UNDECODABLE, f"{type(exc).__name__}: {exc}", fmt)
    finally:
        if rgb is not image:  # free the source's pixels now, not when the collector gets to them
            image.close()
    return Decoded(image=rgb, format=fmt, converted=converted)


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

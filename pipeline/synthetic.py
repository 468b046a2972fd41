"""A synthetic product catalog for the demo and the tests: drawn products with templated titles.

The image always shows the three attributes (silhouette -> `style`, fill -> `color`, `pattern`); the title
mentions each only part of the time, at the rates the CMA-CLIP paper measured on retail titles (color
~67%, pattern ~25%, style ~15%), and a few percent of titles contradict the image. So neither modality
alone is enough, which is the point of the model. Every row is a pure function of (seed, row number).
"""
from __future__ import annotations

import io
import random
import struct
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pyarrow as pa
from PIL import Image, ImageDraw

from . import reasons
from .io.parquet_writer import AtomicParquetWriter

IMAGE_SIZE = 64
ROW_GROUP_ROWS = 1024
JPEG_QUALITY = 90

COLORS: dict[str, tuple[int, int, int]] = {
    "Black": (25, 25, 25), "White": (248, 248, 248), "Grey": (128, 128, 128), "Red": (205, 30, 35),
    "Orange": (245, 130, 20), "Yellow": (245, 215, 40), "Green": (35, 150, 65), "Blue": (40, 95, 215),
    "Navy": (20, 30, 95), "Purple": (125, 50, 165), "Pink": (245, 145, 190), "Brown": (120, 75, 35),
}
PATTERNS = ("plain", "striped", "dotted", "checked")

# Silhouettes as polygons in the unit square; the style label is the silhouette.
SILHOUETTES: dict[str, list[tuple[float, float]]] = {
    "T-Shirt": [(.36, .12), (.64, .12), (.92, .30), (.82, .44), (.71, .37), (.71, .90), (.29, .90),
                (.29, .37), (.18, .44), (.08, .30)],
    "Sweater": [(.36, .12), (.64, .12), (.88, .25), (.96, .86), (.84, .88), (.73, .40), (.73, .90),
                (.27, .90), (.27, .40), (.16, .88), (.04, .86), (.12, .25)],
    "Dress": [(.41, .07), (.59, .07), (.62, .36), (.86, .93), (.14, .93), (.38, .36)],
    "Skirt": [(.33, .22), (.67, .22), (.88, .82), (.12, .82)],
    "Trousers": [(.28, .07), (.72, .07), (.77, .93), (.56, .93), (.50, .36), (.44, .93), (.23, .93)],
    "Tote Bag": [(.18, .36), (.82, .36), (.86, .92), (.14, .92)],
}
STYLES = tuple(SILHOUETTES)

COLOR_WORDS = {name: [name] for name in COLORS} | {"Navy": ["Navy", "Navy Blue"], "Grey": ["Grey", "Gray"]}
PATTERN_WORDS = {"plain": ["Plain", "Solid"], "striped": ["Striped", "Stripe"],
                 "dotted": ["Polka Dot", "Dotted"], "checked": ["Checked", "Plaid", "Check"]}
STYLE_WORDS = {"T-Shirt": ["T-Shirt", "Tee"], "Sweater": ["Sweater", "Jumper"], "Dress": ["Dress"],
               "Skirt": ["Skirt"], "Trousers": ["Trousers", "Pants"], "Tote Bag": ["Tote Bag", "Tote"]}
BRANDS = ("Acme", "Northwind", "Contoso", "Fabrikam", "Tailspin", "Woodgrove", "Litware", "Adatum")
FILLERS = ("Cotton", "Everyday", "Classic", "Slim Fit", "Relaxed", "Premium", "Organic", "Summer", "")
GENERIC_NOUNS = ("Item", "Piece", "Garment", "Apparel", "Original")

MENTION_RATES = {"color": 0.67, "pattern": 0.25, "style": 0.15}
MISLEAD_RATE = 0.04  # among titles that mention something; ~3% of all titles

# One row of each bad kind (--with-bad-rows) and the reason ingest must give it (None: kept, converted).
BAD_ROWS: dict[str, str | None] = {
    "zero_bytes": reasons.IMAGE_MISSING,
    "truncated_jpeg": reasons.IMAGE_UNDECODABLE,
    "random_bytes": reasons.IMAGE_UNDECODABLE,
    "png_alpha": None,
    "cmyk_jpeg": None,
    "grayscale": None,
    "one_pixel": reasons.IMAGE_TOO_SMALL,
    "huge_header": reasons.IMAGE_TOO_LARGE,
    "null_image": reasons.IMAGE_MISSING,
    "null_title": None,
    "messy_title": None,
    "title_not_text": reasons.TITLE_NOT_TEXT,
    "label_not_text": reasons.LABEL_NOT_TEXT,
    "missing_id": reasons.PRODUCT_ID_MISSING,
    "duplicate_id": reasons.DUPLICATE_ID,  # two rows, one id, different labels: one kept, one quarantined
}
MESSY_TITLE = "Acme\x00 Red\x07 Striped\tDress\r\n 👗👩🏽\u200d💻 فستان أحمر \u200fمخطط\x1b"
NOT_UTF8 = b"\xff\xfe\x80 not text"


@dataclass(frozen=True)
class Product:
    product_id: str
    color: str
    pattern: str
    style: str
    title: str
    mentions: frozenset[str]
    misleading: bool


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (30, 30, 30) if luminance > 140 else (240, 240, 240)


@lru_cache(maxsize=None)
def _fill_layer(color: str, pattern: str, size: int) -> Image.Image:
    """The garment's fabric, larger than the canvas so each image can show it at a random phase.
    Cached: only (colors x patterns) distinct layers exist, which is what makes generation fast."""
    base = COLORS[color]
    ink = _contrast(base)
    side = size + size // 4
    layer = Image.new("RGB", (side, side), base)
    draw = ImageDraw.Draw(layer)
    step = max(6, size // 9)
    line = max(1, step // 6)  # thin ink keeps the base color dominant, so `color` stays visible
    if pattern == "striped":
        for y in range(0, side, step):
            draw.rectangle([0, y, side, y + 2 * line - 1], fill=ink)
    elif pattern == "dotted":
        r = max(1, step // 4)
        for y in range(step // 2, side, step):
            for x in range(step // 2 + (y // step % 2) * step // 2, side, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    elif pattern == "checked":
        for v in range(0, side, step):
            draw.rectangle([v, 0, v + line - 1, side], fill=ink)
            draw.rectangle([0, v, side, v + line - 1], fill=ink)
    return layer


def _polygon(style: str, size: int, rng: random.Random) -> list[tuple[float, float]]:
    scale = size * rng.uniform(0.82, 1.0)
    dx = rng.uniform(0, size - scale)
    dy = rng.uniform(0, size - scale)
    return [(dx + x * scale, dy + y * scale) for x, y in SILHOUETTES[style]]


def draw_product(color: str, pattern: str, style: str, rng: random.Random,
                 size: int = IMAGE_SIZE) -> Image.Image:
    """An RGB picture of the product; the fill covers most of the silhouette so its color dominates."""
    tone = rng.randint(200, 235)
    background = (tone + rng.randint(-8, 8), tone + rng.randint(-8, 8), tone + rng.randint(-8, 8))
    canvas = Image.new("RGB", (size, size), background)
    mask = Image.new("L", (size, size), 0)
    points = _polygon(style, size, rng)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    layer = _fill_layer(color, pattern, size)
    ox, oy = rng.randrange(size // 4), rng.randrange(size // 4)
    canvas.paste(layer.crop((ox, oy, ox + size, oy + size)), (0, 0), mask)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(points, outline=(70, 70, 70))
    if style == "Tote Bag":  # the handle tells a bag from a skirt
        x0, y0 = points[0]
        x1 = points[1][0]
        w = x1 - x0
        draw.arc([x0 + w * 0.25, y0 - w * 0.35, x1 - w * 0.25, y0 + w * 0.35], 180, 360,
                 fill=COLORS[color], width=max(2, size // 20))
    return canvas


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _other(value: str, choices: tuple[str, ...], rng: random.Random) -> str:
    return rng.choice([c for c in choices if c != value])


def make_title(color: str, pattern: str, style: str, rng: random.Random) -> tuple[str, frozenset[str], bool]:
    """A title that mentions each attribute at its paper rate; rarely one mention is wrong."""
    mentions = frozenset(k for k, p in MENTION_RATES.items() if rng.random() < p)
    said = {"color": color, "pattern": pattern, "style": style}
    misleading = bool(mentions) and rng.random() < MISLEAD_RATE
    if misleading:
        lie = rng.choice(sorted(mentions))
        said[lie] = _other(said[lie], {"color": tuple(COLORS), "pattern": PATTERNS, "style": STYLES}[lie], rng)
    words = [rng.choice(BRANDS), rng.choice(FILLERS)]
    if "color" in mentions:
        words.append(rng.choice(COLOR_WORDS[said["color"]]))
    if "pattern" in mentions:
        words.append(rng.choice(PATTERN_WORDS[said["pattern"]]))
    words.append(rng.choice(STYLE_WORDS[said["style"]]) if "style" in mentions else rng.choice(GENERIC_NOUNS))
    return " ".join(w for w in words if w), mentions, misleading


def row_rng(seed: int, index: int) -> random.Random:
    """Row `index` depends only on (seed, index), not on chunking or on the rows before it."""
    return random.Random(seed * 1_000_003 + index)


def make_product(seed: int, index: int) -> tuple[Product, random.Random]:
    rng = row_rng(seed, index)
    color, pattern, style = rng.choice(tuple(COLORS)), rng.choice(PATTERNS), rng.choice(STYLES)
    title, mentions, misleading = make_title(color, pattern, style, rng)
    return Product(f"syn-{seed}-{index:07d}", color, pattern, style, title, mentions, misleading), rng


def make_row(seed: int, index: int, size: int = IMAGE_SIZE) -> dict[str, Any]:
    product, rng = make_product(seed, index)
    image = encode_jpeg(draw_product(product.color, product.pattern, product.style, rng, size))
    return {"product_id": product.product_id, "title": product.title, "image": image,
            "color": product.color, "pattern": product.pattern, "style": product.style}


# --- bad rows ----------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width * 3 + 1) * 4, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels)
            + _png_chunk(b"IEND", b""))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _alpha_png(picture: Image.Image) -> bytes:
    """The product on a transparent background (as cut-outs usually come)."""
    rgba = picture.convert("RGBA")
    corner = picture.getpixel((0, 0))
    alpha = Image.eval(picture.convert("L"), lambda _: 255)
    for xy in ((x, y) for x in range(picture.width) for y in range(picture.height)):
        if picture.getpixel(xy) == corner:
            alpha.putpixel(xy, 0)
    rgba.putalpha(alpha)
    return _png(rgba)


def _bad_image(kind: str, picture: Image.Image, rng: random.Random) -> bytes | None:
    good = encode_jpeg(picture)
    return {
        "zero_bytes": b"",
        "truncated_jpeg": good[: len(good) // 2],
        "random_bytes": rng.randbytes(2048),
        "png_alpha": _alpha_png(picture),
        "cmyk_jpeg": encode_jpeg(picture.convert("CMYK")),
        "grayscale": encode_jpeg(picture.convert("L")),
        "one_pixel": _png(Image.new("RGB", (1, 1), (255, 0, 0))),
        "huge_header": bomb_png(),
        "null_image": None,
    }.get(kind, good)


def bad_rows(seed: int) -> list[dict[str, Any]]:
    """One row per kind in BAD_ROWS (two for duplicate_id). Text cells are bytes: a per-row text type
    error only exists in an untyped (binary) column, as legacy writers produce."""
    rows = []
    for n, kind in enumerate(BAD_ROWS):
        row = make_row(seed + 7919, n)
        rng = row_rng(seed + 104729, n)
        picture = Image.open(io.BytesIO(row["image"])).convert("RGB")
        row["product_id"] = None if kind == "missing_id" else f"bad-{kind}"
        row["image"] = _bad_image(kind, picture, rng)
        row["title"] = {"null_title": None, "messy_title": MESSY_TITLE}.get(kind, row["title"])
        rows.append(row)
        if kind == "duplicate_id":
            rows.append(row | {"color": _other(row["color"], tuple(COLORS), rng)})
    for row in rows:
        for key in ("title", "color", "pattern", "style"):
            row[key] = None if row[key] is None else row[key].encode("utf-8")
        if row["product_id"] == "bad-title_not_text":
            row["title"] = NOT_UTF8
        if row["product_id"] == "bad-label_not_text":
            row["color"] = NOT_UTF8
    return rows


# --- writing -----------------------------------------------------------------------------------------

def catalog_schema(text: pa.DataType = pa.string()) -> pa.Schema:
    return pa.schema([("product_id", pa.string()), ("title", text), ("image", pa.binary()),
                      ("color", text), ("pattern", text), ("style", text)])


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def _good_rows(seed: int, start: int, stop: int, size: int) -> list[dict[str, Any]]:
    return [make_row(seed, i, size) for i in range(start, stop)]


def make_catalog(rows: int, out_uri: str, seed: int = 0, with_bad_rows: bool = False,
                 image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """Write a catalog Parquet file of `rows` products (plus the bad rows) to `out_uri`; return stats."""
    started = time.perf_counter()
    schema = catalog_schema(pa.binary() if with_bad_rows else pa.string())
    # One row group per chunk, the bad rows in their own; snappy (pyarrow's default), as the catalogs the
    # benchmarks read were written.
    with AtomicParquetWriter(out_uri, schema, compression="snappy") as writer:
        for start in range(0, rows, ROW_GROUP_ROWS):
            chunk = _good_rows(seed, start, min(rows, start + ROW_GROUP_ROWS), image_size)
            if with_bad_rows:
                chunk = [_as_bytes(r) for r in chunk]
            writer.write(_table(chunk, schema))
        extra = bad_rows(seed) if with_bad_rows else []
        if extra:
            writer.write(_table(extra, schema))
    seconds = time.perf_counter() - started
    return {"uri": out_uri, "rows": rows + len(extra), "good_rows": rows, "bad_rows": len(extra),
            "seed": seed, "seconds": round(seconds, 3), "rows_per_s": round(rows / max(seconds, 1e-9), 1),
            "mention_rates": measured_rates(seed, min(rows, 5000))}


def _as_bytes(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.encode("utf-8") if isinstance(v, str) and k != "product_id" else v for k, v in row.items()}


def measured_rates(seed: int, rows: int) -> dict[str, float]:
    """How often titles mention each attribute (and mislead), over the first `rows` products."""
    if rows == 0:
        return {}
    products = [make_product(seed, i)[0] for i in range(rows)]
    rates = {k: sum(k in p.mentions for p in products) / rows for k in MENTION_RATES}
    rates["misleading"] = sum(p.misleading for p in products) / rows
    return {k: round(v, 4) for k, v in rates.items()}

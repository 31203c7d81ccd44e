"""Generators for good and bad image files (tests and benchmarks). Everything is deterministic per seed.

Good images look like product shots (white background, a coloured box + label band + mild noise), so
JPEG sizes are realistic. Bad-file writers cover what a real bucket collects: empty and tiny files,
HTML/XML error pages saved as .jpg, partial downloads, damaged bytes, decompression bombs, odd modes.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# ------------------------------------------------------------------------------------------------ good


def product_image(width: int = 400, height: int = 400, seed: int = 0) -> Image.Image:
    """An RGB 'pack shot': white background, a randomly coloured/placed box, a label band, some noise."""
    rng = np.random.default_rng(seed)
    arr = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, y0 = rng.integers(0, max(1, width // 4)), rng.integers(0, max(1, height // 4))
    x1 = rng.integers(x0 + max(2, width // 3), width + 1)
    y1 = rng.integers(y0 + max(2, height // 3), height + 1)
    colour = rng.integers(20, 235, size=3)
    yy = np.linspace(0.75, 1.0, y1 - y0)[:, None, None]
    arr[y0:y1, x0:x1] = (colour[None, None, :] * yy).astype(np.uint8)
    band = y0 + (y1 - y0) // 3
    arr[band : band + max(1, (y1 - y0) // 6), x0:x1] = rng.integers(0, 255, size=3)
    noise = rng.integers(-8, 9, size=arr.shape, dtype=np.int16)  # sensor-like noise, cheap to draw
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")


def marker_image(width: int = 120, height: int = 80) -> Image.Image:
    """White image with a red block in the top-left corner: shows orientation after transforms."""
    arr = np.full((height, width, 3), 255, dtype=np.uint8)
    arr[: height // 3, : width // 3] = (255, 0, 0)
    return Image.fromarray(arr, "RGB")


def jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=quality, **kw)
    return b.getvalue()


def png_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


def write(path: str | Path, data: bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def write_jpeg(path, width=400, height=400, seed=0, quality=90) -> Path:
    return write(path, jpeg_bytes(product_image(width, height, seed), quality))


def write_format(path, fmt: str, width=200, height=160, seed=0, mode: str = "RGB") -> Path:
    """A good product image in any Pillow-writable format (WEBP, BMP, TIFF, GIF, PNG ...)."""
    img = product_image(width, height, seed)
    if mode != "RGB":
        img = img.convert(mode)
    b = io.BytesIO()
    img.save(b, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return write(path, b.getvalue())


# ------------------------------------------------------------------------------------------------ odd modes (usable, need normalisation)


def write_cmyk_jpeg(path, width=200, height=160, seed=0) -> Path:
    return write(path, jpeg_bytes(product_image(width, height, seed).convert("CMYK")))


def write_grey_jpeg(path, width=200, height=160, seed=0) -> Path:
    return write(path, jpeg_bytes(product_image(width, height, seed).convert("L")))


def write_palette_png(path, width=200, height=160, seed=0) -> Path:
    return write(path, png_bytes(product_image(width, height, seed).convert("P", palette=Image.Palette.ADAPTIVE)))


def write_png16_grey(path, width=200, height=160, seed=0) -> Path:
    """16-bit greyscale PNG: a horizontal ramp 0..65535 (left black, right white, middle ~mid-grey)
    plus +-64 (of 65535) noise, invisible at 8 bits but it keeps the file realistic in size."""
    ramp = np.linspace(0, 65535, width)[None, :]
    noise = np.random.default_rng(seed).integers(-64, 65, size=(height, width))
    arr = np.clip(ramp + noise, 0, 65535).astype(np.uint16)
    return write(path, png_bytes(Image.fromarray(arr)))


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def png_raw(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes, comment: str = "") -> bytes:
    """Hand-made PNG (valid CRCs) from filtered scanline bytes, with an optional tEXt comment."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    text = _png_chunk(b"tEXt", b"Comment\x00" + comment.encode("latin-1")) if comment else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + text
        + _png_chunk(b"IDAT", zlib.compress(raw_rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def write_png16_rgb(path, width=120, height=90, seed=0) -> Path:
    """16-bit-per-channel RGB PNG (Pillow reads it as 8-bit 'RGB', but it is not a plain 8-bit file)."""
    rgb8 = np.asarray(product_image(width, height, seed), dtype=np.uint16)
    rgb16 = (rgb8 * 257).astype(">u2")
    rows = b"".join(b"\x00" + rgb16[y].tobytes() for y in range(height))
    return write(path, png_raw(width, height, 16, 2, rows))


def write_rgba_png(path, width=200, height=160, seed=0) -> Path:
    """RGBA product image whose left half is fully transparent (must become white)."""
    img = product_image(width, height, seed).convert("RGBA")
    a = np.asarray(img).copy()
    a[:, : width // 2, 3] = 0
    a[:, : width // 2, :3] = (0, 0, 0)  # hidden colour under the transparent part is black
    return write(path, png_bytes(Image.fromarray(a, "RGBA")))


def write_la_png(path, width=120, height=90, seed=0) -> Path:
    """Grey + alpha: dark grey (about 40) with alpha ramping from 0 (left) to 255 (right)."""
    arr = np.zeros((height, width, 2), dtype=np.uint8)
    arr[..., 0] = 40 + np.random.default_rng(seed).integers(0, 3, size=(height, width))
    arr[..., 1] = np.linspace(0, 255, width).astype(np.uint8)[None, :]
    return write(path, png_bytes(Image.fromarray(arr, "LA")))


def write_exif_rotated_jpeg(path, width=120, height=80, orientation: int = 6) -> Path:
    """A JPEG whose *displayed* image is ``marker_image(width, height)`` (red block top-left), stored
    rotated and tagged with EXIF orientation 3, 6 or 8."""
    shown = marker_image(width, height)
    stored = {
        3: shown.transpose(Image.Transpose.ROTATE_180),
        6: shown.transpose(Image.Transpose.ROTATE_90),  # viewer rotates 90 deg clockwise to display
        8: shown.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return write(path, jpeg_bytes(stored, quality=95, exif=exif.tobytes()))


# ------------------------------------------------------------------------------------------------ bad


def write_empty(path) -> Path:
    return write(path, b"")


def write_tiny_bytes(path) -> Path:
    """A valid but minuscule JPEG (8x8, < 1 KiB)."""
    data = jpeg_bytes(Image.new("RGB", (8, 8), (200, 10, 10)), quality=30)
    assert len(data) < 1024
    return write(path, data)


def write_tiny_dimensions(path, width=16, height=400, seed=0) -> Path:
    """Many bytes (noise PNG) but a 16 px short side."""
    rng = np.random.default_rng(seed)
    return write(path, png_bytes(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))))


def write_html_as_jpg(path) -> Path:
    body = "<p>The requested object is not available. Please sign in.</p>\n" * 40
    page = f"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body>{body}</body></html>\n"
    return write(path, page.encode())


def write_xml_error_as_jpg(path) -> Path:
    msg = "<Message>Access Denied</Message>" * 40
    return write(path, f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>{msg}</Error>'.encode())


def write_truncated_jpeg(path, width=400, height=400, seed=0, keep: float = 0.6) -> Path:
    """A partial download: the first ``keep`` share of a valid JPEG."""
    data = jpeg_bytes(product_image(width, height, seed))
    return write(path, data[: int(len(data) * keep)])


def _scan_start(jpeg: bytes) -> int:
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def write_corrupt_jpeg(path, width=400, height=400, seed=0) -> Path:
    """Garbage overwriting bytes in the middle of the entropy-coded data (starts with an illegal
    marker, as damaged data often does). Length and everything after stay intact."""
    data = bytearray(jpeg_bytes(product_image(width, height, seed)))
    start = _scan_start(bytes(data))
    mid = start + (len(data) - start) // 2
    rng = np.random.default_rng(seed)
    junk = b"\xff\x5a" + rng.integers(0, 256, 126, dtype=np.uint8).tobytes()
    data[mid : mid + len(junk)] = junk
    return write(path, bytes(data))


def write_corrupt_png(path, width=200, height=160, seed=0) -> Path:
    """A PNG with 64 zero bytes in the middle of IDAT: zlib happily inflates it (Pillow decodes it
    without error), only the chunk CRC shows the damage."""
    data = bytearray(png_bytes(product_image(width, height, seed)))
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    mid = idat + 4 + length // 2
    data[mid : mid + 64] = bytes(64)
    return write(path, bytes(data))


def zero_block(path, at: float = 0.5, n: int = 256) -> Path:
    """Damage an existing file in place (a local copy that no longer matches S3)."""
    p = Path(path)
    data = bytearray(p.read_bytes())
    i = int(len(data) * at)
    data[i : i + n] = bytes(min(n, len(data) - i))
    p.write_bytes(bytes(data))
    return p


def write_unsupported(path, width=64, height=64, fmt: str = "PPM", seed=0) -> Path:
    """A real image in a format outside the allowed set (default: PPM)."""
    b = io.BytesIO()
    product_image(width, height, seed).save(b, fmt)
    return write(path, b.getvalue())


def png_bomb_bytes(width=30_000, height=30_000, rows: int = 64) -> bytes:
    """A small (about 2 KiB) but valid-looking 1-bit PNG declaring ``width x height`` pixels (only the
    first ``rows`` rows of data are present: decoding it would allocate the full size first)."""
    row = b"\x00" + bytes((width + 7) // 8)
    return png_raw(width, height, 1, 0, row * rows, comment="decompression bomb " * 100)


def write_png_bomb(path, width=30_000, height=30_000, rows: int = 64) -> Path:
    return write(path, png_bomb_bytes(width, height, rows))


def jpeg_sof_bomb_bytes(width=60_000, height=60_000, seed=0) -> bytes:
    """A valid small JPEG whose SOF (frame header) is patched to claim ``width x height`` pixels."""
    data = bytearray(jpeg_bytes(product_image(200, 200, seed)))
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        sof = data.find(marker)
        if sof >= 0:
            break
    assert sof >= 0, "no SOF marker"
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)  # FFCx, length(2), precision(1), Y, X
    return bytes(data)


def animated_gif_bytes(width=200, height=160, frames: int = 4, seed=0) -> bytes:
    """An animated GIF of ``frames`` different product images (frame 0 = ``product_image(w, h, seed)``)."""
    imgs = [product_image(width, height, seed + i) for i in range(frames)]
    b = io.BytesIO()
    imgs[0].save(b, "GIF", save_all=True, append_images=imgs[1:], duration=100, loop=0)
    return b.getvalue()


def svg_bytes(n_shapes: int = 40) -> bytes:
    """An SVG drawing (XML text, over 1 KiB) as product DBs sometimes hold for logos."""
    shapes = "".join(f'<rect x="{i * 5}" y="{i * 3}" width="40" height="30" fill="#{i * 6 % 256:02x}8040"/>'
                     for i in range(n_shapes))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="400" '
            f'height="300" viewBox="0 0 400 300">{shapes}</svg>\n').encode()


def slow_png_bytes(width=6000, height=6000, idat_bytes: int = 4) -> bytes:
    """A valid, black RGB PNG that is small on disk (about 2 MiB) but slow to inspect: large (36 MP,
    under the default 50 MP cap), the Paeth filter on every row, and the compressed stream split into
    ``idat_bytes``-byte IDAT chunks (each one a round trip through Pillow's and our chunk loops). About
    1 s to inspect on a laptop core; the DECODE_TIMEOUT tests give it a limit far below that."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    z = zlib.compress((b"\x04" + bytes(width * 3)) * height, 1)
    idat = b"".join(_png_chunk(b"IDAT", z[i : i + idat_bytes]) for i in range(0, len(z), idat_bytes))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + idat + _png_chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ manifest


def md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


def manifest_row(sku: str, path: str | Path, key: str | None = None, etag: str | None = None) -> dict:
    """A manifest row as ingest writes it; etag defaults to the quoted MD5 of the file's current bytes
    (what S3 returns for a single-part upload)."""
    p = Path(path)
    data = p.read_bytes() if p.exists() else b""
    return {
        "sku": sku,
        "key": key or f"raw/{sku}/{p.name}",
        "etag": etag if etag is not None else md5_etag(data),
        "bytes": len(data),
        "path": str(p.resolve()),
    }


def make_manifest(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["sku", "key", "etag", "bytes", "path"])


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

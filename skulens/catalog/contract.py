"""The catalog contract: where things live in the bucket and what a safe SKU id / key is.

Layout (documented in the README)::

    catalog/products.csv                 sku (required, unique), name, category, packshot (optional), other attributes
    catalog/images/<sku>/<file>          product DB images, any number per SKU
    shelf/crops/<sku>/<file>             labelled shelf crops held out for evaluation
    shelf/photos/<file> + shelf/boxes.csv (photo,sku,x,y,w,h)  full shelf photos to cut crops from

Packshot (the product's reference image, optional): the ``packshot`` column of products.csv names one file
of ``catalog/images/<sku>/`` by its file name (``front.jpg``, not a path; a value written as
``<sku>/front.jpg`` or ``images/<sku>/front.jpg`` is read as ``front.jpg``). A SKU whose cell is empty, or
a products.csv without the column, falls back to the file-name convention: an image named
``packshot.<ext>`` (any case, e.g. ``packshot.jpg``) in the SKU's folder. Where it is used: the
RetailKLIP gallery (one image per SKU + shelf-like views) and the confusion-plot thumbnails take the
packshot, else the SKU's first image by path. Everything else is unchanged: every usable image of a SKU
is indexed, and a SKU with 1..2 usable images (a launch with only its packshot) is indexed and evaluated
but never trained on. A packshot cell that is not a safe file name, or that names a file that is not in
the SKU's folder or that the cleaning drops, never fails a run: it is reported (``skulens import``
warnings, ``CleanResult.packshots`` / ``packshots.csv`` with the reason) and the SKU falls back to the
rule above. :func:`packshot_names` parses the column.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote

import pandas as pd

PRODUCTS_KEY = "catalog/products.csv"
CATALOG_IMAGES_PREFIX = "catalog/images/"
SHELF_CROPS_PREFIX = "shelf/crops/"
SHELF_PHOTOS_PREFIX = "shelf/photos/"
SHELF_BOXES_KEY = "shelf/boxes.csv"
INDEX_PREFIX = "index/"

#: SKU ids: letters, digits and ``._-``, 1..128 chars, not starting with a dot.
SKU_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
#: File names: any printable characters except path separators; no leading dot-dot tricks.
MAX_KEY_BYTES = 1024
#: One key segment (SKU folder or file name), in UTF-8 bytes: under the 255-byte file-system name limit
#: with room for the names the local cache derives from it (download temp files, ``<stem>.png`` copies).
MAX_NAME_BYTES = 240
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
BOXES_COLUMNS = ["photo", "sku", "x", "y", "w", "h"]
#: products.csv column naming a SKU's reference image (a file name in catalog/images/<sku>/); optional
PACKSHOT_COLUMN = "packshot"
#: file-name convention when products.csv names none: ``packshot.<image suffix>`` (case-insensitive)
PACKSHOT_STEM = "packshot"


class CatalogError(ValueError):
    """Input that breaks the catalog contract; the message says what and where."""


def validate_sku(sku: str) -> str:
    if not isinstance(sku, str) or not SKU_RE.match(sku):
        raise CatalogError(
            f"unsafe or invalid SKU id {sku!r}: use 1-128 characters from A-Z a-z 0-9 . _ - "
            "(not starting with '.'), no slashes, spaces or control characters"
        )
    return sku


def validate_name_part(part: str, what: str = "file name") -> str:
    if not part or part in {".", ".."}:
        raise CatalogError(f"invalid {what} {part!r}")
    if "/" in part or "\\" in part:
        raise CatalogError(f"invalid {what} {part!r}: path separators are not allowed")
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"} for ch in part):
        raise CatalogError(f"invalid {what} {part!r}: control or unassigned characters are not allowed")
    if part != part.strip():
        raise CatalogError(f"invalid {what} {part!r}: leading or trailing whitespace")
    decoded = part
    for _ in range(3):  # %2F, %252F ...: a separator once something URL-decodes the name
        decoded, before = unquote(decoded), decoded
        if "/" in decoded or "\\" in decoded or decoded in {".", ".."}:
            raise CatalogError(
                f"invalid {what} {part!r}: percent-encoded path separator or '.'/'..' (decodes to {decoded!r})"
            )
        if decoded == before:
            break
    if len(part.encode("utf-8")) > MAX_NAME_BYTES:
        raise CatalogError(f"invalid {what} {part[:40]!r}...: longer than {MAX_NAME_BYTES} bytes")
    return part


def validate_relative_key(rel: str) -> str:
    """A relative key like ``<sku>/<file>``: no absolute paths, no ``..``, no control characters."""
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise CatalogError(f"invalid key {rel!r}: absolute paths are not allowed")
    parts = rel.split("/")
    for part in parts:
        if part in {"", ".", ".."}:
            raise CatalogError(f"invalid key {rel!r}: empty, '.' or '..' path segments are not allowed")
        validate_name_part(part, "key segment")
    if len(rel.encode("utf-8")) > MAX_KEY_BYTES:
        raise CatalogError(f"invalid key {rel[:60]!r}...: longer than {MAX_KEY_BYTES} bytes")
    return rel


@dataclass(frozen=True)
class ImageKey:
    sku: str
    filename: str


def parse_image_key(key: str, prefix: str) -> ImageKey:
    """``<prefix><sku>/<file>`` -> ImageKey; raises CatalogError for anything else."""
    if not key.startswith(prefix):
        raise CatalogError(f"key {key!r} is not under {prefix!r}")
    rel = validate_relative_key(key[len(prefix):])
    parts = rel.split("/")
    if len(parts) != 2:
        raise CatalogError(f"key {key!r}: expected {prefix}<sku>/<file>, got {len(parts)} segments")
    return ImageKey(sku=validate_sku(parts[0]), filename=parts[1])


def is_image_name(name: str) -> bool:
    return "." in name and name[name.rfind("."):].lower() in IMAGE_SUFFIXES


_CSV_SNIFF = (
    ((b"<!doctype html", b"<html"), "looks like an HTML page (an error or login page saved as {name}?)"),
    ((b"<?xml", b"<error"), "looks like XML (an S3/HTTP error document saved as {name}?)"),
    ((b"{", b"["), "looks like JSON"),
    ((b"%pdf",), "looks like a PDF document"),
)


def _csv_text(data: bytes | str, name: str) -> str:
    """Bytes of a CSV file -> text (UTF-8, optional BOM), or a one-line CatalogError for anything else."""
    if isinstance(data, str):
        text = data
    else:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise CatalogError(f"{name} is UTF-16 encoded: save it as UTF-8 CSV")
        head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        for prefixes, why in _CSV_SNIFF:
            if head.startswith(prefixes):
                raise CatalogError(f"{name} is not CSV: it {why.format(name=name)}")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            kind = "binary data" if b"\x00" in data[:4096] else "not UTF-8 text"
            raise CatalogError(
                f"{name} is {kind} (byte 0x{data[exc.start]:02x} at offset {exc.start}): save it as UTF-8 CSV"
            ) from None
    text = text.removeprefix("\ufeff")
    if "\x00" in text:
        raise CatalogError(f"{name} is binary data (NUL bytes), not CSV text")
    if not text.strip():
        raise CatalogError(f"{name} is empty")
    return text


_KEY_COLUMNS = ("sku", "photo")


def _parse_csv(text: str, name: str) -> pd.DataFrame:
    """Strict comma-separated parse into string columns: quoted fields may hold commas and newlines; a row
    with more (non-empty) fields than the header is an error (pandas would silently turn the first column
    into the index and shift every SKU id); shorter rows are padded with ""."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        width = len(header)
        rows = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) > width:
                if any(f.strip() for f in row[width:]):
                    raise CatalogError(
                        f"{name} line {reader.line_num}: {len(row)} fields but the header has {width} "
                        "(an unquoted comma in a value? quote values that contain commas)"
                    )
                row = row[:width]
            elif len(row) < width:
                row = row + [""] * (width - len(row))
            rows.append(row)
    except csv.Error as exc:
        raise CatalogError(f"{name} is not a readable CSV: line {reader.line_num}: {exc}") from None
    columns: list[str] = []
    for i, c in enumerate(header):
        c = c.strip() or f"Unnamed: {i}"
        if c in columns:
            if c in _KEY_COLUMNS:
                raise CatalogError(f"{name} has the column {c!r} twice")
            c = next(f"{c}.{k}" for k in range(1, width + 1) if f"{c}.{k}" not in columns)  # as pandas does
        columns.append(c)
    return pd.DataFrame(rows, columns=columns, dtype=str)


def _missing_column_hint(columns: list[str]) -> str:
    if len(columns) == 1 and any(sep in columns[0] for sep in (";", "\t", "|")):
        return " (the file seems to use ';', tab or '|' as separator: skulens reads comma-separated files)"
    return ""


def read_products(data: bytes | str) -> pd.DataFrame:
    """Parse products.csv with SKU ids kept as strings (UPCs keep their leading zeros).

    UTF-8 with or without a BOM; quoted fields may contain commas and newlines. Anything that is not a
    CSV with a ``sku`` column (binary, JSON, an HTML error page, UTF-16, rows wider than the header)
    raises a CatalogError with a one-line message. Duplicate or empty ids are ``check_products``' job.
    """
    df = _parse_csv(_csv_text(data, "products.csv"), "products.csv")
    if "sku" not in df.columns:
        cols = [c[:40] for c in df.columns[:10]]
        raise CatalogError(
            f"products.csv has no 'sku' column (columns: {cols}){_missing_column_hint(list(df.columns))}"
        )
    df["sku"] = df["sku"].str.strip()
    for col in ("name", "category"):
        if col not in df.columns:
            df[col] = ""
    if PACKSHOT_COLUMN in df.columns:
        df[PACKSHOT_COLUMN] = df[PACKSHOT_COLUMN].fillna("").astype(str).str.strip()
    return df


def _packshot_file(sku: str, value: str) -> str:
    """One packshot cell -> the file name it names within ``catalog/images/<sku>/`` (CatalogError if unsafe)."""
    v = value.strip()
    for prefix in (CATALOG_IMAGES_PREFIX + sku + "/", "images/" + sku + "/", sku + "/"):
        if v.startswith(prefix):
            v = v[len(prefix):]
            break
    validate_name_part(v, "packshot file name")
    if not is_image_name(v):
        raise CatalogError(f"packshot {value!r} is not an image file name (one of {sorted(IMAGE_SUFFIXES)})")
    return v


def packshot_names(products: pd.DataFrame | None) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """The ``packshot`` column of products.csv: ``({sku: file name}, problems)``; ``problems`` lists
    ``(sku, cell, why)`` for cells that are not a safe image file name (those SKUs fall back to the
    ``packshot.<ext>`` convention / first image). Empty cells and a missing column name nothing."""
    if products is None or PACKSHOT_COLUMN not in products.columns or "sku" not in products.columns:
        return {}, []
    names: dict[str, str] = {}
    problems: list[tuple[str, str, str]] = []
    skus = products["sku"].fillna("").astype(str).str.strip()
    cells = products[PACKSHOT_COLUMN].fillna("").astype(str).str.strip()
    for sku, cell in zip(skus, cells):
        if not sku or not cell or sku in names:
            continue
        try:
            names[sku] = _packshot_file(sku, cell)
        except CatalogError as exc:
            problems.append((sku, cell, str(exc)))
    return names, problems


def is_packshot_convention(filename: str) -> bool:
    """``packshot.<image suffix>`` (any case): the reference image when products.csv names none."""
    return is_image_name(filename) and filename[: filename.rfind(".")].lower() == PACKSHOT_STEM


def check_products(df: pd.DataFrame) -> list[str]:
    """Contract problems in products.csv (empty list when fine)."""
    problems = []
    empty = df["sku"].eq("")
    if empty.any():
        problems.append(f"{int(empty.sum())} row(s) with an empty sku")
    dup = df.loc[~empty & df["sku"].duplicated(keep=False), "sku"]
    if len(dup):
        problems.append(f"duplicate sku ids: {sorted(set(dup))[:10]}")
    bad = [s for s in df.loc[~empty, "sku"] if not SKU_RE.match(s)]
    if bad:
        problems.append(f"unsafe sku ids: {bad[:10]}")
    return problems


def read_boxes(data: bytes) -> pd.DataFrame:
    """Parse shelf/boxes.csv (photo,sku,x,y,w,h); a CatalogError with a one-line message when unreadable."""
    df = _parse_csv(_csv_text(data, "boxes.csv"), "boxes.csv")
    missing = [c for c in BOXES_COLUMNS if c not in df.columns]
    if missing:
        raise CatalogError(f"boxes.csv is missing columns {missing} (expected {BOXES_COLUMNS})"
                           f"{_missing_column_hint(list(df.columns))}")
    df = df[BOXES_COLUMNS].copy()
    df["photo"] = df["photo"].str.strip()
    df["sku"] = df["sku"].str.strip()
    for c in ("x", "y", "w", "h"):
        num = pd.to_numeric(df[c].str.strip(), errors="coerce")
        bad = num.isna()
        if bad.any():
            rows = [int(i) + 1 for i in df.index[bad][:5]]
            raise CatalogError(f"boxes.csv: column {c!r} is not a number in data row(s) {rows} (1-based)")
        df[c] = num
    return df

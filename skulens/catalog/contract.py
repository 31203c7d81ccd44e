"""The catalog contract: where things live in the bucket and what a safe SKU id / key is.

Layout (documented in the README)::

    catalog/products.csv                 sku (required, unique), name, category, other attributes
    catalog/images/<sku>/<file>          product DB images, any number per SKU
    shelf/crops/<sku>/<file>             labelled shelf crops held out for evaluation
    shelf/photos/<file> + shelf/boxes.csv (photo,sku,x,y,w,h)  full shelf photos to cut crops from
"""

from __future__ import annotations

import io
import re
import unicodedata
from dataclasses import dataclass

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
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
BOXES_COLUMNS = ["photo", "sku", "x", "y", "w", "h"]


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
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn"} for ch in part):
        raise CatalogError(f"invalid {what} {part!r}: control or unassigned characters are not allowed")
    if part != part.strip():
        raise CatalogError(f"invalid {what} {part!r}: leading or trailing whitespace")
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


def read_products(data: bytes | str) -> pd.DataFrame:
    """Parse products.csv with SKU ids kept as strings (UPCs keep their leading zeros)."""
    buf = io.BytesIO(data.encode() if isinstance(data, str) else data)
    try:
        df = pd.read_csv(buf, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several types for broken CSV
        raise CatalogError(f"products.csv is not a readable CSV: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    if "sku" not in df.columns:
        raise CatalogError(f"products.csv has no 'sku' column (columns: {list(df.columns)})")
    df["sku"] = df["sku"].str.strip()
    for col in ("name", "category"):
        if col not in df.columns:
            df[col] = ""
    return df


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
    df = pd.read_csv(io.BytesIO(data), dtype={"photo": str, "sku": str})
    missing = [c for c in BOXES_COLUMNS if c not in df.columns]
    if missing:
        raise CatalogError(f"boxes.csv is missing columns {missing} (expected {BOXES_COLUMNS})")
    return df[BOXES_COLUMNS]

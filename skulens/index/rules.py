"""Which catalog images go into the SKU index: one rule for the full build (``sku_index``) and the
incremental update (``index_update``).

An image is indexable when the cleaning stage (:func:`skulens.data.clean.clean_catalog`) keeps it,
checked against ``products.csv`` (an image of a SKU missing from it is dropped as ``UNKNOWN_SKU``) with
the cleaning thresholds of the launchpad (``CleanSettings``, defaults from ``params.yaml``), and its
SKU has a role in :data:`INDEXED_ROLES` (every kept SKU: ``train`` and ``index``, one good image is
enough to be recognizable).

The full build records the thresholds it applied (:data:`RULE_META`) and the catalog SKUs that
``products.csv`` did not list (:data:`UNLISTED_META`) in the index meta; ``index_update`` applies the
recorded thresholds and compares the products membership with the recorded one, so a SKU that leaves
``products.csv`` leaves the index (and one that enters it is indexed) even when its images did not change.

Known difference: the full build sees the whole catalog at once, the update only the SKUs it re-checks.
Byte-identical images filed under two SKUs (``DUPLICATE_ACROSS_SKUS``) are found by the update through
equal S3 ETags (the SKUs sharing an ETag with a changed SKU are re-checked with it), so only copies
uploaded with different multipart part sizes (equal bytes, different ETags) escape it. The catalog-level
blocking checks (``max_dropped_share``, ``no_sku_copies_another``) gate the full build's run, not the update.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pandas as pd

from skulens.data.clean import (
    DUPLICATE_ACROSS_SKUS,
    UNKNOWN_SKU,
    CleanConfig,
    CleanResult,
    _product_skus,
    clean_catalog,
)

#: roles (see :mod:`skulens.data.clean`) whose images are indexed: every kept SKU
INDEXED_ROLES = ("train", "index")
#: index meta: the cleaning thresholds the index applies (what :func:`config_from_rule` reads back)
RULE_META = "clean"
#: index meta: catalog SKUs whose images were not indexed because products.csv did not list them
UNLISTED_META = "unlisted"
#: index meta: {key: etag} of the files dropped as DUPLICATE_ACROSS_SKUS (so the update re-checks their SKUs
#: together when one copy changes)
DUPLICATES_META = "cross_sku_duplicates"
#: CleanConfig fields that decide whether an image is kept (the rest are execution settings)
RULE_FIELDS = ("min_bytes", "max_bytes", "min_side", "max_pixels", "min_images_per_sku", "min_index_images",
               "allowed_formats", "cross_sku_duplicates", "verify_etag", "decode_timeout_s")


def rule_of(cfg: CleanConfig) -> dict:
    """The thresholds of ``cfg`` that decide indexability, JSON-ready (stored in the index meta)."""
    out = {}
    for name in RULE_FIELDS:
        v = getattr(cfg, name)
        out[name] = list(v) if isinstance(v, tuple) else v
    return out


def config_from_rule(rule: dict | None, default: CleanConfig | None = None, workers: int | None = 1) -> CleanConfig:
    """The CleanConfig that applies ``rule`` (an index's recorded thresholds; missing fields and a missing
    rule fall back to ``default``, itself defaulting to the CleanConfig defaults = params.yaml's)."""
    base = default or CleanConfig()
    known = {k: (tuple(v) if k == "allowed_formats" else v) for k, v in (rule or {}).items() if k in RULE_FIELDS}
    cfg = dataclasses.replace(base, **known)
    return dataclasses.replace(cfg, workers=workers) if workers is not None else cfg


def listed_skus(products: pd.DataFrame | None) -> set[str] | None:
    """The SKU ids of ``products.csv`` (None: no products table, every SKU counts as listed)."""
    return _product_skus(products)


def check_images(manifest: pd.DataFrame, products: pd.DataFrame | None, out_dir: str | os.PathLike,
                 cfg: CleanConfig, progress: bool = False) -> CleanResult:
    """Inspect ``manifest``'s files with the cleaning rules, against ``products`` (the full build's
    ``cleaned_catalog`` and the update's check of the changed SKUs are this one call)."""
    return clean_catalog(manifest, products, Path(out_dir), cfg, progress=progress)


def indexable(cleaned: CleanResult) -> pd.DataFrame:
    """The rows to embed: kept images of SKUs with an indexed role, whose clean file exists
    (columns ``sku, key, clean_path``, sorted by sku then path)."""
    from skulens.index.build import catalog_frame

    kept = cleaned.kept
    if "role" in kept.columns:
        kept = kept[kept["role"].isin(INDEXED_ROLES)]
    return catalog_frame(kept)


def unlisted_of(cleaned: CleanResult) -> list[str]:
    """Catalog SKUs dropped because products.csv does not list them."""
    d = cleaned.dropped_skus
    if d is None or not len(d):
        return []
    return sorted(set(d.loc[d["reason"] == UNKNOWN_SKU, "sku"].astype(str)))


def sources_of(cleaned: CleanResult) -> dict[str, str]:
    """{catalog key: etag} of every file the check looked at, kept or dropped."""
    img = cleaned.images
    return dict(zip(img["key"].astype(str), img["etag"].astype(str)))


def duplicates_of(cleaned: CleanResult) -> dict[str, str]:
    """{key: etag} of the files the check dropped as byte-identical copies filed under other SKUs."""
    img = cleaned.images
    d = img[img["reason"] == DUPLICATE_ACROSS_SKUS] if "reason" in img.columns else img.iloc[:0]
    return dict(zip(d["key"].astype(str), d["etag"].astype(str)))


def build_meta(cleaned: CleanResult) -> dict:
    """What a full build records in the index meta so that ``index_update`` applies the same rule."""
    cfg = cleaned.config or CleanConfig()
    return {RULE_META: rule_of(cfg), UNLISTED_META: unlisted_of(cleaned), DUPLICATES_META: duplicates_of(cleaned)}

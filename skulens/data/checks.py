"""Report-level data-quality checks (pure functions, no Dagster): each returns ``(passed, metadata)``
with JSON-serialisable metadata, ready to become a Dagster ``AssetCheckResult``."""

from __future__ import annotations

from typing import Any

import pandas as pd

from skulens.data.clean import FILE_REASONS, SKU_TOO_FEW_IMAGES, CleanConfig, CleanResult

_LIST_CAP = 50  # keep metadata small: at most this many example ids


def check_dropped_share(result: CleanResult, max_share: float | None = None) -> tuple[bool, dict[str, Any]]:
    """Fails when more than ``max_share`` (default: the threshold the catalog was cleaned with,
    ``result.config.max_dropped_share``) of the manifest's files were dropped (any reason)."""
    if max_share is None:
        max_share = result.config.max_dropped_share
    s = result.stats
    share = float(s.get("share_dropped", 0.0))
    return share <= max_share, {
        "share_dropped": round(share, 4),
        "max_share": max_share,
        "files_in": int(s.get("files_in", 0)),
        "files_dropped": int(s.get("files_dropped", 0)),
        "dropped_by_reason": dict(s.get("dropped_by_reason", {})),
    }


def check_products_unique(products: pd.DataFrame) -> tuple[bool, dict[str, Any]]:
    """Fails when products.csv has no ``sku`` column, a null/blank SKU id, or a SKU id more than once
    (ids compared as stripped strings)."""
    if "sku" not in products.columns:
        return False, {"error": "products has no 'sku' column", "columns": [str(c) for c in products.columns]}
    raw = products["sku"]
    ids = raw.astype("string").str.strip()
    null_mask = raw.isna() | (ids == "").fillna(True)
    dup = ids[~null_mask]
    dup_ids = sorted(dup[dup.duplicated(keep=False)].unique().tolist())
    null_rows = [int(i) for i in products.index[null_mask.to_numpy()]]
    return not dup_ids and not null_rows, {
        "products": len(products),
        "distinct_skus": int(dup.nunique()),
        "duplicate_skus": dup_ids[:_LIST_CAP],
        "n_duplicate_skus": len(dup_ids),
        "null_sku_rows": null_rows[:_LIST_CAP],
        "n_null_sku_rows": len(null_rows),
    }


def cross_sku_duplication(images: pd.DataFrame) -> pd.DataFrame:
    """Per SKU: how many of its valid images (passed the per-file checks) have byte-identical copies
    under another SKU. Columns: sku, valid_images, shared_images, share, other_skus (sorted list)."""
    cols = ["sku", "valid_images", "shared_images", "share", "other_skus"]
    if images.empty:
        return pd.DataFrame(columns=cols)
    valid = images[~images["reason"].isin(FILE_REASONS) & images["sha256"].notna()][["sku", "sha256"]]
    valid = valid.drop_duplicates().astype({"sku": str, "sha256": str})  # a within-SKU duplicate counts once
    valid["shared"] = valid.groupby("sha256")["sku"].transform("size") > 1
    per = valid.groupby("sku", sort=True).agg(valid_images=("sha256", "size"), shared_images=("shared", "sum"))
    shared = valid[valid["shared"]]
    pairs = shared.merge(shared, on="sha256", suffixes=("", "_other"))
    pairs = pairs[pairs["sku"] != pairs["sku_other"]]
    others = pairs.groupby("sku")["sku_other"].agg(lambda s: sorted(set(s)))
    per["share"] = per["shared_images"] / per["valid_images"]
    per["other_skus"] = [others.get(sku, []) for sku in per.index]
    per = per.reset_index()
    per["shared_images"] = per["shared_images"].astype("int64")
    return per[cols]


def check_cross_sku_duplication(result: CleanResult, max_share: float = 0.5) -> tuple[bool, dict[str, Any]]:
    """Fails when some SKU has more than ``max_share`` of its valid images byte-identical to images of
    another SKU (two SKU ids for one product, or one product's photos uploaded under the wrong id)."""
    table = cross_sku_duplication(result.images)
    bad = table[table["share"] > max_share]
    return bad.empty, {
        "max_share": max_share,
        "n_skus_over": len(bad),
        "skus_over": [
            {"sku": r.sku, "share": round(float(r.share), 3), "shared_images": int(r.shared_images),
             "valid_images": int(r.valid_images), "other_skus": list(r.other_skus)[:10]}
            for r in bad.head(_LIST_CAP).itertuples()
        ],
        "skus_with_any_shared": int((table["shared_images"] > 0).sum()) if not table.empty else 0,
        "cross_sku_duplicate_groups": int(result.stats.get("cross_sku_duplicate_groups", 0)),
    }


def check_min_images(result: CleanResult, cfg: CleanConfig | None = None,
                     max_skus_below: int = 0) -> tuple[bool, dict[str, Any]]:
    """Roles of the kept SKUs: ``train`` (>= ``min_images_per_sku`` usable images, a training class)
    or ``index`` (fewer: indexed and recognizable, never trained on). Fails when a kept SKU breaks
    its role's minimum (an invariant of ``clean_catalog``), or when more than ``max_skus_below``
    catalog SKUs were dropped with no usable image at all (products the recognizer will not know)."""
    cfg = cfg or result.config or CleanConfig()
    min_n, min_idx = cfg.min_images_per_sku, cfg.min_index_images
    kept = result.kept
    per_sku = kept.groupby("sku").size() if not kept.empty else pd.Series(dtype="int64")
    role = kept.groupby("sku")["role"].first() if "role" in kept.columns and not kept.empty else \
        pd.Series("train", index=per_sku.index)
    bad_train = sorted(per_sku[(role == "train") & (per_sku < min_n)].index.tolist())
    bad_index = sorted(per_sku[per_sku < min_idx].index.tolist())
    index_only = sorted(per_sku[role == "index"].index.tolist())
    ds = result.dropped_skus
    too_few = ds[ds["reason"] == SKU_TOO_FEW_IMAGES].sort_values("sku")
    passed = not bad_train and not bad_index and len(too_few) <= max_skus_below
    return passed, {
        "min_images_per_sku": min_n,
        "min_index_images": min_idx,
        "skus_kept": len(per_sku),
        "skus_train": int((role == "train").sum()),
        "skus_index_only": len(index_only),
        "index_only_skus": index_only[:_LIST_CAP],
        "min_kept_images": int(per_sku.min()) if len(per_sku) else 0,
        "kept_skus_below_min": (bad_train + bad_index)[:_LIST_CAP],
        "n_skus_dropped_too_few": len(too_few),
        "max_skus_below": max_skus_below,
        "skus_dropped_too_few": [
            {"sku": r.sku, "usable_images": int(r.usable_images)} for r in too_few.head(_LIST_CAP).itertuples()
        ],
    }

"""Held-out split and breadth/depth balancing of a cleaned catalog (RetailKLIP recipe).

Input is a cleaned catalog DataFrame with at least the columns ``sku`` (str) and ``clean_path`` (str,
local image path); any other columns (key, sha256, ...) are carried along.

* :func:`split_validation` holds out the same number of images per SKU, deterministically.
* :func:`balance` keeps every SKU (breadth) and brings each one to exactly ``depth`` rows (depth):
  SKUs with more images are undersampled, SKUs with fewer are oversampled with copies that are
  flagged ``augment=True`` so the training loader applies the shelf augmentation to them.
* :func:`choose_depth` runs a small sweep over candidate depths with a caller-supplied scorer.

Randomness is derived from ``(seed, sku)`` (not from the row order or the other SKUs), so adding a
new SKU to the catalog leaves the split and the sampled images of every existing SKU unchanged.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

__all__ = ["balance", "choose_depth", "label_map", "split_validation", "suggest_depth", "training_classes"]

MIN_TRAIN_PER_SKU = 2


def _sku_rng(seed: int, sku: str, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(str(sku).encode("utf-8")), int(salt)])


def _check(df: pd.DataFrame) -> None:
    missing = {"sku", "clean_path"} - set(df.columns)
    if missing:
        raise ValueError(f"catalog is missing column(s) {sorted(missing)}; have {list(df.columns)}")
    if df["sku"].isna().any() or df["clean_path"].isna().any():
        raise ValueError("catalog has empty sku or clean_path values")


def _stable_sorted(group: pd.DataFrame) -> pd.DataFrame:
    """Rows of one SKU in an order that does not depend on the input row order."""
    keys = ["clean_path"] + [c for c in ("key", "sha256") if c in group.columns]
    return group.sort_values(keys, kind="mergesort")


def split_validation(df: pd.DataFrame, per_sku: int = 1, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``df`` into ``(train_df, val_df)`` holding out ``per_sku`` images of every SKU.

    Stratified by SKU and deterministic by ``seed``. Each SKU keeps at least
    ``MIN_TRAIN_PER_SKU`` (2) images for training: a SKU with ``n`` images holds out
    ``min(per_sku, max(n - 2, 0))`` of them, so SKUs with 1 or 2 images are not validated at all and
    SKUs with ``n < per_sku + 2`` hold out fewer than ``per_sku``. Both frames keep all input columns
    and a fresh RangeIndex; rows are ordered by SKU.
    """
    _check(df)
    if per_sku < 0:
        raise ValueError("per_sku must be >= 0")
    train_parts, val_parts = [], []
    for sku, group in df.groupby("sku", sort=True):
        group = _stable_sorted(group)
        n = len(group)
        n_val = min(per_sku, max(n - MIN_TRAIN_PER_SKU, 0))
        order = _sku_rng(seed, sku, salt=1).permutation(n)
        val_idx = np.sort(order[:n_val])
        train_idx = np.sort(order[n_val:])
        train_parts.append(group.iloc[train_idx])
        val_parts.append(group.iloc[val_idx])
    cols = list(df.columns)
    train_df = pd.concat(train_parts, ignore_index=True) if train_parts else df.iloc[:0].copy()
    val_df = pd.concat(val_parts, ignore_index=True) if val_parts else df.iloc[:0].copy()
    return train_df[cols].reset_index(drop=True), val_df[cols].reset_index(drop=True)


def training_classes(kept: pd.DataFrame) -> pd.DataFrame:
    """The rows of SKUs that are training classes: ``role == "train"`` when the cleaned catalog
    carries roles (see :mod:`skulens.data.clean`), else every row."""
    if "role" not in kept.columns:
        return kept
    return kept[kept["role"] == "train"].reset_index(drop=True)


def label_map(skus: Iterable[str]) -> dict[str, int]:
    """SKU -> integer label, by sorted SKU string (stable, independent of row order)."""
    return {sku: i for i, sku in enumerate(sorted({str(s) for s in skus}))}


def balance(train_df: pd.DataFrame, depth: int, seed: int = 0) -> pd.DataFrame:
    """Breadth- and depth-balanced training set: every SKU, exactly ``depth`` rows each.

    * SKU with ``n >= depth`` images: ``depth`` distinct images sampled without replacement
      (``augment=False``, ``copy=0``).
    * SKU with ``n < depth`` images: all ``n`` originals (``augment=False``, ``copy=0``) plus
      ``depth - n`` oversampled copies cycling through a shuffled order of the originals
      (``augment=True``, ``copy=1, 2, ...`` = how many times that image has been repeated).

    Returns columns ``sku, clean_path, label, augment, copy`` followed by the other input columns.
    ``label`` comes from :func:`label_map` (sorted SKUs). Deterministic by ``seed``.
    """
    _check(train_df)
    depth = int(depth)
    if depth < 1:
        raise ValueError("depth must be >= 1")
    labels = label_map(train_df["sku"])
    parts = []
    for sku, group in train_df.groupby("sku", sort=True):
        group = _stable_sorted(group).reset_index(drop=True)
        n = len(group)
        rng = _sku_rng(seed, sku, salt=2)
        if n >= depth:
            idx = np.sort(rng.choice(n, size=depth, replace=False))
            copies = np.zeros(depth, dtype=int)
        else:
            extra = depth - n
            cycle = np.concatenate([rng.permutation(n) for _ in range(extra // n + 1)])[:extra]
            idx = np.concatenate([np.arange(n), cycle])
            copies = np.zeros(depth, dtype=int)
            seen = np.zeros(n, dtype=int)
            for j in range(n, depth):
                seen[idx[j]] += 1
                copies[j] = seen[idx[j]]
        part = group.iloc[idx].copy()
        part["label"] = labels[str(sku)]
        part["copy"] = copies
        part["augment"] = copies > 0
        parts.append(part)
    front = ["sku", "clean_path", "label", "augment", "copy"]
    if not parts:
        return pd.DataFrame(columns=front)
    out = pd.concat(parts, ignore_index=True)
    out["sku"] = out["sku"].astype(str)
    out["label"] = out["label"].astype(int)
    out["copy"] = out["copy"].astype(int)
    out["augment"] = out["augment"].astype(bool)
    rest = [c for c in out.columns if c not in front]
    return out[front + rest].reset_index(drop=True)


def suggest_depth(train_df: pd.DataFrame, lo: int = 8, hi: int = 64) -> int:
    """A default depth: the median number of images per SKU, clipped to ``[lo, hi]``."""
    _check(train_df)
    counts = train_df.groupby("sku").size()
    if counts.empty:
        return lo
    return int(np.clip(int(np.ceil(counts.median())), lo, hi))


def choose_depth(
    train_df: pd.DataFrame,
    candidates: Iterable[int],
    score: Callable[[int], float],
) -> tuple[int, Mapping[int, float]]:
    """Small sweep: call ``score(depth)`` (higher is better, e.g. validation top-1 of a short
    fine-tune on ``balance(train_df, depth)``) for each candidate depth and return
    ``(best_depth, {depth: score})``. Ties go to the smaller depth (cheaper epochs)."""
    _check(train_df)
    scores: dict[int, float] = {}
    for d in sorted({int(c) for c in candidates}):
        if d < 1:
            raise ValueError(f"depth candidates must be >= 1, got {d}")
        scores[d] = float(score(d))
    if not scores:
        raise ValueError("no depth candidates given")
    best = max(scores, key=lambda d: (scores[d], -d))
    return best, scores

"""Evaluate retrieval on shelf crops: top-1/top-k, per-SKU and per-category accuracy, confusions.

Also builds the RetailKLIP-style gallery (one catalog image per SKU plus N shelf-like augmentations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from skulens.index.sku_index import SkuIndex
from skulens.model.augment import shelf_augment


@dataclass
class EvalReport:
    """Result of :func:`evaluate`.

    ``per_sku``: columns sku, name, category, n, top1, topk (one row per true SKU of the queries).
    ``per_category``: category, n, top1, category_acc. ``confusions``: true, predicted, count,
    true_name, predicted_name (top-1 mistakes, most frequent first). ``predictions``: one row per
    query (true, predicted, score, correct, in_topk).
    """

    n: int
    k: int
    top1: float
    top5: float
    category_acc: float | None
    per_sku: pd.DataFrame
    per_category: pd.DataFrame | None
    confusions: pd.DataFrame
    predictions: pd.DataFrame
    n_unknown: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def topk(self) -> float:
        return self.top5

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics (for MLflow / promotion decisions)."""
        out = {"top1": self.top1, f"top{self.k}": self.top5, "n_queries": float(self.n),
               "n_unknown_sku": float(self.n_unknown),
               "n_skus_evaluated": float(len(self.per_sku))}
        if self.k != 5:
            out["top5"] = self.top5
        if self.category_acc is not None:
            out["category_acc"] = self.category_acc
        if len(self.per_sku):
            out["mean_per_sku_top1"] = float(self.per_sku["top1"].mean())
        return out

    def summary(self) -> str:
        cat = f", category {self.category_acc:.3f}" if self.category_acc is not None else ""
        return f"n={self.n} top1={self.top1:.3f} top{self.k}={self.top5:.3f}{cat}"


def _products_lookup(products: pd.DataFrame | None) -> tuple[dict, dict]:
    if products is None or len(products) == 0:
        return {}, {}
    p = products.copy()
    p["sku"] = p["sku"].astype(str)
    p = p.drop_duplicates("sku").set_index("sku")
    names = p["name"].astype(str).to_dict() if "name" in p else {}
    cats = p["category"].fillna("").astype(str).str.strip().to_dict() if "category" in p else {}
    cats = {k: v for k, v in cats.items() if v}  # an empty category is unknown, not a category
    return names, cats


def evaluate(
    query_vectors: np.ndarray,
    query_skus: Sequence[str],
    index: SkuIndex,
    products: pd.DataFrame | None = None,
    k: int = 5,
) -> EvalReport:
    """Search every query against ``index`` and score the SKU predictions.

    ``top1``/``top5`` are over all queries (queries whose SKU is missing from the index count as
    misses; their number is ``n_unknown``). ``k`` is the cut-off for ``top5`` (default 5).
    Category accuracy (needs ``products`` with a ``category`` column) is the fraction of queries
    (with a known true category) whose top-1 SKU is in the true SKU's category.
    """
    q = np.asarray(query_vectors, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    true = np.asarray([str(s) for s in query_skus], dtype=object)
    if len(true) != q.shape[0]:
        raise ValueError(f"{q.shape[0]} query vectors but {len(true)} query skus")
    if len(true) == 0:
        raise ValueError("no queries to evaluate")
    names, cats = _products_lookup(products)

    hits = index.search(q, k=k)
    pred = np.asarray([h[0][0] if h else "" for h in hits], dtype=object)
    score = np.asarray([h[0][1] if h else np.nan for h in hits], dtype=np.float64)
    in_topk = np.asarray([t in {s for s, _ in h} for t, h in zip(true, hits)], dtype=bool)
    correct = pred == true
    known = set(index.sku_list)
    n_unknown = int(sum(t not in known for t in true))

    preds = pd.DataFrame({"true": true, "predicted": pred, "score": score,
                          "correct": correct, "in_topk": in_topk})
    per_sku = (preds.groupby("true", sort=True)
               .agg(n=("correct", "size"), top1=("correct", "mean"), topk=("in_topk", "mean"))
               .reset_index().rename(columns={"true": "sku"}))
    per_sku.insert(1, "name", per_sku["sku"].map(names).fillna(""))
    per_sku.insert(2, "category", per_sku["sku"].map(cats).fillna(""))
    per_sku = per_sku.sort_values(["top1", "n", "sku"], ascending=[True, False, True]).reset_index(drop=True)

    category_acc = None
    per_category = None
    if cats:
        tc = preds["true"].map(cats)
        pc = preds["predicted"].map(cats)
        preds["true_category"] = tc
        preds["predicted_category"] = pc
        cat_ok = (tc == pc) & tc.notna()
        preds["category_correct"] = cat_ok
        category_acc = float(cat_ok[tc.notna()].mean()) if tc.notna().any() else None
        per_category = (preds.assign(true_category=tc.fillna("?"))
                        .groupby("true_category", sort=True)
                        .agg(n=("correct", "size"), top1=("correct", "mean"),
                             category_acc=("category_correct", "mean"))
                        .reset_index().rename(columns={"true_category": "category"}))

    wrong = preds.loc[~preds["correct"], ["true", "predicted"]]
    confusions = (wrong.groupby(["true", "predicted"]).size().rename("count").reset_index()
                  .sort_values(["count", "true", "predicted"], ascending=[False, True, True])
                  .reset_index(drop=True))
    confusions["true_name"] = confusions["true"].map(names).fillna("")
    confusions["predicted_name"] = confusions["predicted"].map(names).fillna("")

    return EvalReport(
        n=len(true), k=int(k), top1=float(correct.mean()), top5=float(in_topk.mean()),
        category_acc=category_acc, per_sku=per_sku, per_category=per_category,
        confusions=confusions, predictions=preds, n_unknown=n_unknown,
    )


# ====================================================================== RetailKLIP gallery
_PATH_COLUMNS = ("path", "image_path", "local_path", "file", "image")


def _path_column(df: pd.DataFrame, image_col: str | None) -> str:
    if image_col is not None:
        return image_col
    for c in _PATH_COLUMNS:
        if c in df.columns:
            return c
    raise KeyError(f"catalog_df needs an image path column (one of {_PATH_COLUMNS}); got {list(df.columns)}")


def retailklip_gallery(
    encoder,
    catalog_df: pd.DataFrame,
    n_aug: int = 8,
    seed: int = 0,
    image_col: str | None = None,
    key_col: str | None = "key",
    model_version: str | None = None,
    batch_size: int = 64,
) -> SkuIndex:
    """RetailKLIP variant gallery: for each SKU take one catalog image (its packshot: the row whose
    ``packshot`` column is true, see :mod:`skulens.catalog.contract`; else the first by path order) and
    embed it plus ``n_aug`` shelf-like augmentations (:func:`skulens.model.augment.shelf_augment`, seeded
    per SKU so the result does not depend on catalog order). Returns an :class:`SkuIndex` with
    ``1 + n_aug`` rows per SKU; row keys are ``<image key>`` and ``<image key>#aug<i>``. The meta records
    ``packshot_skus``: how many SKUs are represented by their packshot.

    ``catalog_df`` has a ``sku`` column and a local image path column (``image_col``, or the first of
    path/image_path/local_path/file/image); ``key_col`` (if present) is the S3 key recorded per row.
    """
    import zlib

    from skulens.data.images import load_rgb
    from skulens.index.build import packshot_mask, reference_rows
    from skulens.model.embed import embed_images

    if n_aug < 0:
        raise ValueError("n_aug must be >= 0")
    col = _path_column(catalog_df, image_col)
    df = catalog_df.copy()
    df[col] = df[col].astype(str)
    first = reference_rows(df, col)  # the packshot, else the first image by path
    n_packshot = int(packshot_mask(first).sum())
    if "packshot" in first.columns:
        first = first.drop(columns="packshot")  # itertuples below: no name clash
    vecs, skus, keys = [], [], []
    for row in first.itertuples(index=False):
        sku, path = row.sku, getattr(row, col)
        key = str(getattr(row, key_col)) if key_col and key_col in df.columns else path
        base = load_rgb(path)
        rng = np.random.default_rng([int(seed), zlib.crc32(sku.encode())])
        views = [base] + [shelf_augment(base, rng) for _ in range(n_aug)]
        vecs.append(embed_images(encoder, views, batch_size=batch_size))
        skus.extend([sku] * len(views))
        keys.extend([key] + [f"{key}#aug{i}" for i in range(1, n_aug + 1)])
    dim = getattr(encoder, "embed_dim", None) or (vecs[0].shape[1] if vecs else 0)
    vectors = np.concatenate(vecs, axis=0) if vecs else np.zeros((0, dim), dtype=np.float32)
    return SkuIndex(vectors=vectors, skus=skus, keys=keys, model_version=model_version,
                    meta={"variant": "retailklip", "n_aug": int(n_aug), "seed": int(seed),
                          "packshot_skus": n_packshot})

"""The open-set claim of an evaluation: top-1 on SKUs a model was trained on vs SKUs it never saw, and per category.

A SKU is *seen* by a model when it was one of that model's ArcFace training classes (the ``trained`` list of
the ``catalog_state.json`` logged to its training run, :func:`skulens.catalog.state.training_record`);
every other SKU of the shelf crops is *unseen*: index-only SKUs (too few images to train on), launches
added after training, held-out products. The un-fine-tuned base tower has seen none. Every query of an
:class:`~skulens.evaluation.retrieval.EvalReport` falls in exactly one of seen / unseen and in exactly one
category (the true SKU's ``category`` in products.csv; ``?`` when it has none), so the counts add up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from skulens.evaluation.retrieval import EvalReport

#: the category of a query whose SKU has none (the same label as EvalReport.per_category)
UNKNOWN_CATEGORY = "?"
#: the first row of :func:`open_set_table`: every query
ALL = "(all)"
SPLITS = ("seen", "unseen")


def _scores(correct: np.ndarray, in_topk: np.ndarray, mask: np.ndarray, suffix: str = "") -> dict:
    n = int(mask.sum())
    return {f"n{suffix}": n,
            f"top1{suffix}": float(correct[mask].mean()) if n else float("nan"),
            f"top5{suffix}": float(in_topk[mask].mean()) if n else float("nan")}


def query_categories(report: EvalReport, products: pd.DataFrame | None = None) -> pd.Series | None:
    """The true category of every query of ``report`` (``?`` where the SKU has none), or None when no
    product has a category. Taken from the report (``evaluate`` with products) or from ``products``."""
    p = report.predictions
    if "true_category" in p.columns:
        return p["true_category"].fillna(UNKNOWN_CATEGORY).astype(str)
    if products is None or "category" not in products.columns:
        return None
    cats = products.assign(sku=products["sku"].astype(str)).drop_duplicates("sku").set_index("sku")["category"]
    cats = cats.fillna("").astype(str).str.strip()
    cats = cats[cats != ""]
    if cats.empty:
        return None
    return p["true"].astype(str).map(cats).fillna(UNKNOWN_CATEGORY)


def open_set_table(report: EvalReport, trained_skus: Iterable[str] | None,
                   products: pd.DataFrame | None = None) -> pd.DataFrame:
    """Top-1 / top-k of ``report`` split by seen vs unseen SKUs and by category.

    One row for every query (``category`` = ``(all)``) then one per true category (sorted), with columns
    ``category, n, top1, top5`` and, when ``trained_skus`` is given (the model's training classes; empty
    for the base tower), ``n_seen, top1_seen, top5_seen, n_unseen, top1_unseen, top5_unseen``. ``top5``
    is the report's top-k (k = 5 by default). A group without queries scores NaN."""
    p = report.predictions
    correct = p["correct"].to_numpy(dtype=bool)
    in_topk = p["in_topk"].to_numpy(dtype=bool)
    seen = None
    if trained_skus is not None:
        trained = {str(s) for s in trained_skus}
        seen = p["true"].astype(str).isin(trained).to_numpy()
    cats = query_categories(report, products)
    groups = [(ALL, np.ones(len(p), dtype=bool))]
    if cats is not None:
        values = cats.to_numpy()
        groups += [(c, values == c) for c in sorted(set(values))]
    rows = []
    for name, mask in groups:
        row = {"category": name, **_scores(correct, in_topk, mask)}
        if seen is not None:
            row.update(_scores(correct, in_topk, mask & seen, "_seen"))
            row.update(_scores(correct, in_topk, mask & ~seen, "_unseen"))
        rows.append(row)
    return pd.DataFrame(rows)


def category_slug(category: str) -> str:
    """A category as an MLflow metric-name part: lower case ``[a-z0-9_]``, at most 48 characters."""
    s = re.sub(r"[^a-z0-9]+", "_", str(category).strip().lower()).strip("_")[:48]
    return s or "unknown"


def open_set_metrics(table: pd.DataFrame) -> dict[str, float]:
    """The flat numbers of an :func:`open_set_table` (no NaN: a group without queries gives only its n):
    ``n_seen, top1_seen, top5_seen, n_unseen, top1_unseen, top5_unseen`` (when the table has the split)
    and ``n_cat_<slug>, top1_cat_<slug>`` per category (:func:`category_slug`; a clash gets ``_2``...)."""
    out: dict[str, float] = {}

    def put(key: str, v) -> None:
        if v is not None and math.isfinite(float(v)):
            out[key] = float(v)

    rows = table.to_dict("records")
    if rows and "n_seen" in rows[0]:
        for split in SPLITS:
            for m in ("n", "top1", "top5"):
                put(f"{m}_{split}", rows[0][f"{m}_{split}"])
    used: set[str] = set()
    for r in rows[1:]:
        slug, i = category_slug(r["category"]), 2
        while slug in used:
            slug, i = f"{category_slug(r['category'])}_{i}", i + 1
        used.add(slug)
        put(f"n_cat_{slug}", r["n"])
        put(f"top1_cat_{slug}", r["top1"])
    return out


def add_open_set(evaluation: dict, trained: dict[str, Iterable[str] | None],
                 products: pd.DataFrame | None = None) -> dict:
    """Add the open-set split to an :func:`skulens.evaluation.compare.evaluate_all` result, in place.

    ``trained``: role -> that model's training SKUs (None: unknown, e.g. a model trained before they
    were recorded; the base tower is always ``set()``: it has seen none). For every evaluated role and
    gallery, ``evaluation["models"][role]["open_set"][gallery]`` = ``{"metrics": open_set_metrics,
    "table": the open_set_table as records}`` and ``evaluation["models"][role]["trained_skus"]`` = how
    many SKUs it was trained on (None: unknown). Kept apart from ``metrics`` (the promotion decision's).
    Returns ``evaluation``."""
    for role, reps in evaluation["reports"].items():
        skus = set() if role == "base" else trained.get(role)
        skus = None if skus is None else {str(s) for s in skus}
        model = evaluation["models"][role]
        model["trained_skus"] = None if skus is None else len(skus)
        model["open_set"] = {}
        for g, rep in reps.items():
            table = open_set_table(rep, skus, products)
            records = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                       for r in table.to_dict("records")]
            model["open_set"][g] = {"metrics": open_set_metrics(table), "table": records}
    return evaluation


def model_label(role: str, m: dict) -> str:
    """How a model is named in the evaluation's tables: its role, and its registry version if it has one."""
    return role + (f" v{m['version']}" if m.get("version") else "")


def open_set_frame(evaluation: dict) -> pd.DataFrame:
    """Every role's and gallery's :func:`open_set_table` in one long table (columns ``model, gallery``
    first): the MLflow artifact ``open_set.csv``."""
    frames = []
    for role, m in evaluation["models"].items():
        for g, os_ in (m.get("open_set") or {}).items():
            df = pd.DataFrame(os_["table"])
            df.insert(0, "gallery", g)
            df.insert(0, "model", model_label(role, m))
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

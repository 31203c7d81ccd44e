"""Plots of an evaluation: per-SKU accuracy and the most frequent confusions (matplotlib, Agg)."""

from __future__ import annotations

import os

import numpy as np

from skulens.evaluation.retrieval import EvalReport
from skulens.model.augment import shelf_augment  # noqa: F401  (also re-exported for existing callers)


# ====================================================================== plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_per_sku(report: EvalReport, path: str | os.PathLike, max_bars: int = 60) -> str:
    """Horizontal bar chart of per-SKU top-1 accuracy (worst ``max_bars`` SKUs) saved as PNG."""
    plt = _plt()
    df = report.per_sku.sort_values(["top1", "sku"]).head(max_bars).iloc[::-1]
    labels = [f"{s} {n[:28]}".strip() + f" (n={c})" for s, n, c in zip(df["sku"], df["name"], df["n"])]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(df) + 1.2)))
    try:
        colors = ["#c0392b" if v < 0.5 else "#e67e22" if v < 0.8 else "#27ae60" for v in df["top1"]]
        ax.barh(range(len(df)), df["top1"], color=colors)
        ax.set_yticks(range(len(df)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlim(0, 1)
        ax.axvline(report.top1, color="k", ls="--", lw=1, label=f"overall top-1 {report.top1:.3f}")
        ax.set_xlabel("top-1 accuracy")
        shown = "" if len(report.per_sku) <= max_bars else f" (worst {max_bars} of {len(report.per_sku)})"
        ax.set_title(f"Per-SKU top-1{shown}")
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return str(path)


def plot_per_category(table, path: str | os.PathLike, title: str = "Top-1 per category") -> str:
    """Grouped horizontal bars of an open-set table (:func:`skulens.evaluation.splits.open_set_table`; a
    DataFrame or its records): top-1 of every query and, when the table has the split, of the SKUs the model
    was trained on (seen) and of those it never saw (unseen), for ``(all)`` and each category. PNG."""
    import pandas as pd

    plt = _plt()
    df = pd.DataFrame(table).iloc[::-1].reset_index(drop=True)  # (all) on top
    bars = [("top1", "n", "all", "#34495e")]
    if "top1_seen" in df.columns:
        bars += [("top1_seen", "n_seen", "seen in training", "#27ae60"),
                 ("top1_unseen", "n_unseen", "never seen", "#e67e22")]
    h = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.32 * len(df) * len(bars) + 1.2)))
    try:
        y = np.arange(len(df))
        for i, (col, ncol, label, color) in enumerate(bars):
            vals = pd.to_numeric(df[col], errors="coerce").fillna(0.0).to_numpy()
            pos = y + (len(bars) - 1 - i) * h - 0.4 + h / 2
            ax.barh(pos, vals, height=h, color=color, label=label)
            for yy, v, n in zip(pos, vals, df[ncol]):
                ax.text(min(float(v), 0.93) + 0.01, yy, f"n={int(n or 0)}", va="center", fontsize=6)
        ax.set_yticks(y)
        ax.set_yticklabels([str(c)[:30] for c in df["category"]], fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("top-1 accuracy")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(bars), fontsize=7, frameon=False)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return str(path)


def plot_confusions(
    report: EvalReport, thumbnails: dict, path: str | os.PathLike, top: int = 8, thumb_px: int = 96
) -> str:
    """PNG with one row per most-confused pair: true SKU thumbnail, predicted SKU thumbnail, count.

    ``thumbnails`` maps sku -> image path (or PIL image); missing thumbnails show as grey boxes.
    """
    from skulens.data.images import load_rgb

    plt = _plt()
    conf = report.confusions.head(top)
    rows = max(1, len(conf))
    fig, axes = plt.subplots(rows, 2, figsize=(5.2, 2.3 * rows), squeeze=False)

    def thumb(sku):
        src = thumbnails.get(sku)
        if src is None:
            return np.full((thumb_px, thumb_px, 3), 200, dtype=np.uint8)
        try:
            im = load_rgb(src)
        except Exception:  # noqa: BLE001 - unreadable thumbnail should not break the report
            return np.full((thumb_px, thumb_px, 3), 200, dtype=np.uint8)
        im.thumbnail((thumb_px * 2, thumb_px * 2))
        return np.asarray(im)

    try:
        if len(conf) == 0:
            for ax in axes[0]:
                ax.axis("off")
            axes[0][0].text(0, 0.5, "no confusions", fontsize=12)
        for i, r in enumerate(conf.itertuples(index=False)):
            for j, (sku, nm, lab) in enumerate([(r.true, r.true_name, "true"), (r.predicted, r.predicted_name, "pred")]):
                ax = axes[i][j]
                ax.imshow(thumb(sku))
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{lab}: {sku}\n{str(nm)[:26]}", fontsize=7)
            axes[i][1].set_xlabel(f"x{r.count}", fontsize=9, color="#c0392b")
        fig.suptitle(f"Most confused SKU pairs (top-1 {report.top1:.3f})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return str(path)

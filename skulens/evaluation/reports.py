"""Tables, report files and inline images of an evaluation (for Dagster metadata and MLflow)."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pandas as pd

from skulens.evaluation.compare import MODEL_ROLES
from skulens.evaluation.plots import plot_confusions, plot_per_category, plot_per_sku
from skulens.evaluation.splits import ALL, open_set_frame
from skulens.evaluation.splits import model_label as _label
from skulens.index.build import thumbnails


def comparison_table(evaluation: dict) -> pd.DataFrame:
    """One row per (model, gallery): top-1, top-5, category accuracy, mean per-SKU top-1."""
    rows = []
    for role in MODEL_ROLES:
        m = evaluation["models"].get(role)
        if not m:
            continue
        for g, met in m["metrics"].items():
            rows.append({"model": role + (f" v{m['version']}" if m.get("version") else ""), "gallery": g,
                         "top1": round(met.get("top1", float("nan")), 4),
                         "top5": round(met.get("top5", float("nan")), 4),
                         "category_acc": round(met["category_acc"], 4) if "category_acc" in met else None,
                         "mean_per_sku_top1": round(met.get("mean_per_sku_top1", float("nan")), 4),
                         "crops_per_s": m.get("crops_per_s")})
    return pd.DataFrame(rows)


def confusions_table(evaluation: dict, gallery: str = "catalog", top: int = 10) -> pd.DataFrame:
    """Top confused pairs (true -> predicted, count) of every evaluated model on ``gallery``."""
    frames = []
    for role, reps in evaluation["reports"].items():
        rep = reps.get(gallery)
        if rep is None or len(rep.confusions) == 0:
            continue
        c = rep.confusions.head(top)[["true", "true_name", "predicted", "predicted_name", "count"]].copy()
        c.insert(0, "model", role)
        frames.append(c)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def per_sku_table(evaluation: dict, gallery: str = "catalog") -> pd.DataFrame:
    """Per-SKU top-1 of each model side by side (worst challenger SKUs first)."""
    out = None
    for role, reps in evaluation["reports"].items():
        rep = reps.get(gallery)
        if rep is None:
            continue
        df = rep.per_sku[["sku", "name", "n", "top1"]].rename(columns={"top1": f"top1_{role}"})
        out = df if out is None else out.merge(df[["sku", f"top1_{role}"]], on="sku", how="outer")
    if out is None:
        return pd.DataFrame()
    sort = "top1_challenger" if "top1_challenger" in out else out.columns[-1]
    return out.sort_values([sort, "sku"]).reset_index(drop=True)


def open_set_summary(evaluation: dict) -> pd.DataFrame:
    """One row per (model, gallery) of the open-set split (:func:`skulens.evaluation.splits.add_open_set`):
    the number of SKUs the model was trained on, then n / top-1 / top-5 of the queries of SKUs it was trained
    on (seen) and of those it never saw (unseen). Empty when the split was not added."""
    rows = []
    for role in MODEL_ROLES:
        m = evaluation["models"].get(role)
        if not m or not m.get("open_set"):
            continue
        for g, os_ in m["open_set"].items():
            all_row = os_["table"][0]
            row = {"model": _label(role, m), "gallery": g,
                   "trained_skus": m.get("trained_skus") if m.get("trained_skus") is not None else "unknown",
                   "n": all_row["n"], "top1": _r(all_row["top1"])}
            for split in ("seen", "unseen"):
                row[f"n_{split}"] = all_row.get(f"n_{split}")
                row[f"top1_{split}"] = _r(all_row.get(f"top1_{split}"))
                row[f"top5_{split}"] = _r(all_row.get(f"top5_{split}"))
            rows.append(row)
    return pd.DataFrame(rows)


def _r(v):
    return None if v is None else round(float(v), 4)


def per_category_table(evaluation: dict, gallery: str = "catalog") -> pd.DataFrame:
    """Per category (and ``(all)``) on ``gallery``: n, then each model's top-1; for the first model (the
    challenger, when there is one) also top-5 and top-1 on seen / unseen SKUs. Empty without categories."""
    out, first = None, True
    for role in MODEL_ROLES:
        m = evaluation["models"].get(role)
        os_ = ((m or {}).get("open_set") or {}).get(gallery)
        if not os_ or len(os_["table"]) < 2:  # only the (all) row: the products have no category
            continue
        df = pd.DataFrame(os_["table"])
        cols = {"top1": f"top1_{role}"}
        if first:
            cols.update({"top5": f"top5_{role}", "n_seen": "n_seen", "top1_seen": f"top1_seen_{role}",
                         "n_unseen": "n_unseen", "top1_unseen": f"top1_unseen_{role}"})
        keep = [c for c in ["category", "n", *cols] if c in df.columns]
        df = df[keep].rename(columns=cols)
        for c in df.columns:
            if c.startswith("top"):
                df[c] = df[c].map(_r)
        out = df if first else out.merge(df.drop(columns=["n"]), on="category", how="outer")
        first = False
    if out is None:
        return pd.DataFrame()
    return out.sort_values("category", key=lambda s: s.map(lambda c: "" if c == ALL else f"~{c}")).reset_index(drop=True)


def write_reports(evaluation: dict, catalog: pd.DataFrame, out_dir: str | os.PathLike,
                  gallery: str = "catalog", top_confusions: int = 8) -> dict[str, str]:
    """Write the challenger's plots (per-SKU accuracy, confused pairs with thumbnails) as PNG and the
    tables (comparison, per-SKU, confusions, summary JSON). Returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    role = next((r for r in MODEL_ROLES if r in evaluation["reports"]), None)  # the challenger, when there is one
    if role is None:
        raise ValueError("nothing was evaluated")
    rep = evaluation["reports"][role][gallery]
    paths = {
        "per_sku_png": plot_per_sku(rep, out_dir / "per_sku_accuracy.png"),
        "confusions_png": plot_confusions(rep, thumbnails(catalog), out_dir / "confusions.png", top=top_confusions),
    }
    os_ = (evaluation["models"][role].get("open_set") or {}).get(gallery)
    if os_:  # the open-set split (add_open_set): per category, seen vs never seen in training
        paths["per_category_png"] = plot_per_category(
            os_["table"], out_dir / "per_category_accuracy.png",
            title=f"{role} top-1 per category, SKUs seen in training vs never seen ({gallery} gallery)")
        open_set_frame(evaluation).to_csv(out_dir / "open_set.csv", index=False)
        paths["open_set_csv"] = str(out_dir / "open_set.csv")
    comparison_table(evaluation).to_csv(out_dir / "comparison.csv", index=False)
    per_sku_table(evaluation, gallery).to_csv(out_dir / "per_sku.csv", index=False)
    confusions_table(evaluation, gallery, top=50).to_csv(out_dir / "confusions.csv", index=False)
    summary = {k: v for k, v in evaluation.items() if k != "reports"}
    (out_dir / "evaluation.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    paths.update({"comparison_csv": str(out_dir / "comparison.csv"), "per_sku_csv": str(out_dir / "per_sku.csv"),
                  "confusions_csv": str(out_dir / "confusions.csv"), "summary_json": str(out_dir / "evaluation.json")})
    return paths


def png_markdown(path: str | os.PathLike, title: str = "", max_side: int = 720, max_bytes: int = 350_000) -> str:
    """Markdown with the PNG embedded as a base64 data URI (downscaled to ``max_side`` px); if it is
    still larger than ``max_bytes``, only the file path."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, "PNG", optimize=True)
    data = buf.getvalue()
    if len(data) > max_bytes:
        return f"{title}\n\n`{path}` ({len(data) // 1024} KiB, too large to embed)"
    b64 = base64.b64encode(data).decode()
    return f"{title}\n\n![{Path(path).stem}](data:image/png;base64,{b64})\n\n`{path}`"

"""Tables, report files and inline images of an evaluation (for Dagster metadata and MLflow)."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pandas as pd

from skulens.evaluation.compare import MODEL_ROLES
from skulens.evaluation.plots import plot_confusions, plot_per_sku
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

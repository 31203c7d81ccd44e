"""The on-disk dataset layout shared by the Dagster assets and `dvc repro` (dvc.yaml).

    data/raw/images/<sku>/<file>     local mirror of catalog/images (not tracked: S3 is the source)
    data/raw/manifest.parquet        sku, key, etag, bytes, path (relative to data/raw)
    data/raw/products.csv
    data/clean/                      DVC-tracked: the cleaned dataset
        manifest.parquet             kept images: sku, key, etag, sha256, width, height, format, clean_path (relative)
        images/<sku>/<file>          the kept images (normalised ones as PNG)
        dropped_files.csv, dropped_skus.csv, stats.json, params.json
    data/balanced/                   DVC-tracked: the balanced training set
        train.parquet, val.parquet   rows pointing into data/clean/images (relative paths)
        params.json
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pandas as pd


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _relative(paths: pd.Series, root: Path) -> pd.Series:
    return paths.map(lambda p: os.path.relpath(p, root))


def _absolute(paths: pd.Series, root: Path) -> pd.Series:
    return paths.map(lambda p: str((root / p).resolve()) if not os.path.isabs(p) else p)


# --- raw -------------------------------------------------------------------------------------------
def write_raw(manifest: pd.DataFrame, products: pd.DataFrame, raw_dir: Path) -> None:
    raw_dir = Path(raw_dir)
    m = manifest.copy()
    m["path"] = _relative(m["path"], raw_dir)
    _atomic_parquet(m, raw_dir / "manifest.parquet")
    _atomic_text(products.to_csv(index=False), raw_dir / "products.csv")


def read_raw(raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    from skulens.catalog.contract import read_products

    raw_dir = Path(raw_dir)
    m = pd.read_parquet(raw_dir / "manifest.parquet")
    m["path"] = _absolute(m["path"], raw_dir)
    return m, read_products((raw_dir / "products.csv").read_bytes())


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` with the fully written ``staging`` folder (renames; never a half-written target)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


# --- clean -----------------------------------------------------------------------------------------
def _link_or_copy(src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_clean(result, clean_dir: Path, params: dict) -> pd.DataFrame:
    """Materialise a CleanResult as a self-contained dataset folder; returns kept rows with absolute paths.

    The folder is rebuilt from scratch (files are unlinked, never edited in place, so files DVC
    linked from its cache are never modified).
    """
    clean_dir = Path(clean_dir)
    staging = clean_dir.with_name(f".{clean_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    kept = result.kept.copy()
    rel = []
    used: set[tuple[str, str]] = set()
    for row in kept.itertuples(index=False):
        src = str(row.clean_path)
        name = Path(row.key).name
        if row.normalised:
            name = Path(name).stem + ".png"
        if (row.sku, name) in used:  # e.g. a normalised x.jpg next to a plain x.png: both would be x.png
            name = f"{Path(name).stem}.{str(row.sha256)[:12]}{Path(name).suffix}"
        used.add((row.sku, name))
        dst = staging / "images" / row.sku / name
        _link_or_copy(src, dst)
        rel.append(os.path.relpath(clean_dir / "images" / row.sku / name, clean_dir))
    kept["clean_path"] = rel
    keep_cols = [c for c in kept.columns if c != "path"]
    _atomic_parquet(kept[keep_cols], staging / "manifest.parquet")
    result.write_csv(staging)
    # the versioned folder must be a function of the data and the params only: no timings or worker counts
    volatile = {"seconds", "seconds_inspect", "seconds_normalise", "images_per_s", "workers", "backend"}
    stats = {k: v for k, v in result.stats.items() if k not in volatile}
    _atomic_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", staging / "stats.json")
    _atomic_text(json.dumps(params, indent=2, sort_keys=True, default=str) + "\n", staging / "params.json")
    _swap_in(staging, clean_dir)
    return read_clean(clean_dir)


def read_clean(clean_dir: Path) -> pd.DataFrame:
    clean_dir = Path(clean_dir)
    df = pd.read_parquet(clean_dir / "manifest.parquet")
    df["clean_path"] = _absolute(df["clean_path"], clean_dir)
    return df


# --- balanced --------------------------------------------------------------------------------------
def write_balanced(train: pd.DataFrame, val: pd.DataFrame, clean_dir: Path, out_dir: Path, params: dict) -> None:
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, df in (("train", train), ("val", val)):
        d = df.copy()
        d["clean_path"] = _relative(d["clean_path"], Path(clean_dir).resolve())
        _atomic_parquet(d, staging / f"{name}.parquet")
    _atomic_text(json.dumps(params, indent=2, sort_keys=True, default=str) + "\n", staging / "params.json")
    _swap_in(staging, out_dir)


def read_balanced(out_dir: Path, clean_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = []
    for name in ("train", "val"):
        d = pd.read_parquet(Path(out_dir) / f"{name}.parquet")
        d["clean_path"] = _absolute(d["clean_path"], Path(clean_dir).resolve())
        out.append(d)
    return out[0], out[1]


def params_dict(obj) -> dict:
    if is_dataclass(obj):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(obj).items()}
    return dict(obj)


def read_params(root: Path, section: str) -> dict:
    import yaml

    path = Path(root) / "params.yaml"
    if not path.exists():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get(section, {}) or {}

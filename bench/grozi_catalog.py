"""Lay out GroZi-120 as a skulens catalog + shelf set, to run the real job on real images.

    .venv/bin/python bench/grozi_catalog.py --out /tmp/grozi-k1 --k 1
    export SKULENS_HOME=/tmp/grozi-k1/home
    .venv/bin/skulens import catalog /tmp/grozi-k1/catalog && .venv/bin/skulens import shelf /tmp/grozi-k1/shelf
    .venv/bin/skulens run --no-demo

Protocol (bench_grozi.py's): per product, frames ordered by N in ``videoN.jpg``; the catalog holds the
first ``--k`` frames of every product (``--k 1``: one image per product, the single-shot setting),
the shelf crops are the last half of the frames. With ``--train-first-half`` the catalog holds the
first half of the frames instead for ``--train-frac`` of the products (rich SKUs, trained on) and
the first ``--k`` for the others. Files are hard links (no copy); nothing of GroZi is written into
the repository.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grozi import DEFAULT_DATA, load_grozi  # noqa: E402


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--k", type=int, default=1, help="catalog images per (sparse) product: its first k frames")
    ap.add_argument("--train-first-half", action="store_true",
                    help="rich products: the first half of their frames in the catalog")
    ap.add_argument("--train-frac", type=float, default=0.75, help="share of rich products (with --train-first-half)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np
    import pandas as pd

    root = Path(args.data)
    df = load_grozi(root)
    products = pd.read_csv(root / "products.csv", dtype={"sku": str})
    skus = np.array(sorted(df["sku"].unique()))
    rich = set()
    if args.train_first_half:
        rng = np.random.default_rng(args.seed)
        rich = set(rng.choice(skus, size=round(args.train_frac * len(skus)), replace=False).tolist())
    if args.out.exists():
        shutil.rmtree(args.out / "catalog", ignore_errors=True)
        shutil.rmtree(args.out / "shelf", ignore_errors=True)
    cat, shelf = args.out / "catalog", args.out / "shelf"
    half = df["rank"] < df["n"] // 2
    in_cat = (df["sku"].isin(rich) & half) | (~df["sku"].isin(rich) & (df["rank"] < args.k))
    for r in df[in_cat].itertuples():
        _link(Path(r.clean_path), cat / "images" / r.sku / Path(r.clean_path).name)
    for r in df[~half].itertuples():
        _link(Path(r.clean_path), shelf / r.sku / Path(r.clean_path).name)
    cat.mkdir(parents=True, exist_ok=True)
    with open(cat / "products.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sku", "name", "category"])
        for p in products.itertuples():
            w.writerow([p.sku, p.name, "grocery"])
    print(f"{args.out}: catalog {int(in_cat.sum())} images of {df['sku'].nunique()} products "
          f"({len(rich)} rich); shelf {int((~half).sum())} crops")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Do the sparse-SKU shelf views pay? Top-1 of the published index with and without them.

    .venv/bin/python bench/bench_sparse_views.py --home .skulens

Reads what a finished `skulens run` left in SKULENS_HOME: the published index (the copy `skulens
recognize` cached under cache/recognize/index/), the model that built it (cache/models, by the
sha256 the index records) and the shelf crops (cache/shelf/crops/<sku>/). Embeds the crops once and
scores 1-NN top-1 against (a) the catalog images only and (b) the index as published (catalog
images + the views of the sparse SKUs), overall and for the sparse SKUs' crops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default=".skulens", type=Path, help="SKULENS_HOME of a finished run")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)

    import numpy as np

    from skulens.index.sku_index import SkuIndex
    from skulens.model.embed import embed_images
    from skulens.model.io import load_encoder

    found = sorted((args.home / "cache" / "recognize" / "index").glob("*.npz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no cached index under {args.home}/cache/recognize/index: run `skulens recognize` once")
    idx = SkuIndex.load(found[-1])
    enc = load_encoder(args.home / "cache" / "models" / "sha256" / idx.meta["model_sha256"] / "encoder.pt")
    crops = sorted(str(p) for p in (args.home / "cache" / "shelf" / "crops").glob("*/*"))
    true = np.array([Path(p).parent.name for p in crops])
    q = embed_images(enc, crops, batch_size=args.batch_size, progress=True)
    keys, skus = np.asarray(idx.keys).astype(str), np.asarray(idx.skus).astype(str)
    base = np.array(["#aug" not in k for k in keys])
    sparse_skus = {s for s, k in zip(skus, keys) if "#aug" in k}
    is_sparse = np.array([t in sparse_skus for t in true])
    print(f"index {found[-1].name}: {base.sum()} catalog images, {(~base).sum()} views of {len(sparse_skus)} sparse "
          f"SKUs; {len(crops)} crops ({is_sparse.sum()} of sparse SKUs); rule {idx.meta.get('sparse')}")
    for name, m in (("catalog images only", base), ("as published (+ views)", np.ones_like(base))):
        pred = skus[m][(q @ idx.vectors[m].T).argmax(1)]
        ok = pred == true
        print(f"{name:<24} rows {int(m.sum()):>6}  top-1 {ok.mean():.4f}  sparse SKUs {ok[is_sparse].mean():.4f}"
              if is_sparse.any() else f"{name:<24} rows {int(m.sum()):>6}  top-1 {ok.mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Balanced training datasets (RetailKLIP 4.1.3): every SKU kept, each brought to depth D."""

from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from assets import OWNERS
from resources import DvcResource, LocalStateResource, S3Resource
from skulens.data import balance as bal
from skulens.data import bundles, layout

GROUP = "data_quality"
TAGS = {"skulens/domain": "data"}  # the skulens package this asset calls into
_P = layout.read_params(Path(__file__).resolve().parent.parent, "balance")


class BalanceSettings(dg.Config):
    """Depth/breadth balancing (defaults from params.yaml `balance:`)."""

    depth: int = Field(default=_P.get("depth", 16), description="images per SKU after balancing (0 = median per SKU)")
    val_per_sku: int = Field(default=_P.get("val_per_sku", 1), description="catalog images per SKU held out for validation")
    seed: int = Field(default=_P.get("seed", 0))


@dg.asset(group_name=GROUP, pool="dvc", kinds={"pandas"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "cpu"})
def balanced_dataset(context: dg.AssetExecutionContext, config: BalanceSettings, cleaned_catalog,
                     dvc: DvcResource, s3: S3Resource, state: LocalStateResource) -> dg.MaterializeResult:
    """Held-out validation split (equal per SKU) and a training set with exactly D rows per SKU,
    also packed as one content-addressed bundle in S3 for training on another machine."""
    kept = cleaned_catalog.kept
    kept = bal.training_classes(kept)  # index-only SKUs (< min_images_per_sku images) are indexed, not trained on
    train_src, val = bal.split_validation(kept, per_sku=config.val_per_sku, seed=config.seed)
    depth = config.depth or bal.suggest_depth(train_src)
    train = bal.balance(train_src, depth, seed=config.seed)
    params = {"depth": depth, "val_per_sku": config.val_per_sku, "seed": config.seed}
    layout.write_balanced(train, val, dvc.data_dir("clean"), dvc.data_dir("balanced"), params)
    bundle = bundles.ensure(s3.client(), s3.bucket, dvc.data_dir("balanced"), dvc.data_dir("clean"),
                            state.path("bundles") / "balanced.tar")
    per_sku = train.groupby("sku").size() if len(train) else pd.Series([0])
    context.log.info(f"balanced: {train['sku'].nunique()} training SKUs x {depth} = {len(train)} rows "
                     f"({int(train['augment'].sum())} oversampled copies); validation {len(val)} images")
    return dg.MaterializeResult(
        value={"train": train, "val": val, "depth": depth,
               "bundle": {k: bundle[k] for k in ("uri", "sha256", "bytes")}},
        metadata={"skus": int(train["sku"].nunique()), "index_only_skus": int(
                      cleaned_catalog.kept["sku"].nunique() - kept["sku"].nunique()),
                  "depth": depth, "train_rows": len(train),
                  "oversampled_copies": int(train["augment"].sum()),
                  "undersampled_skus": int((train_src.groupby("sku").size() > depth).sum()) if len(train_src) else 0,
                  "val_images": len(val), "bundle": bundle["uri"], "bundle_bytes": bundle["bytes"],
                  "bundle_uploaded": bundle["uploaded"], "rows_per_sku_min": int(per_sku.min()), "rows_per_sku_max": int(per_sku.max())},
    )

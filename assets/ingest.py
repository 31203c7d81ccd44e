"""Ingest: the catalog and the shelf evaluation set, pulled incrementally from S3."""

import dagster as dg
import pandas as pd

from assets import OWNERS
from resources import LocalStateResource, S3Resource
from skulens.catalog import contract, ingest

GROUP = "ingest"
TAGS = {"skulens/domain": "catalog"}  # the skulens package this asset calls into


def _table(rows: list[tuple], columns: list[str], limit: int = 50) -> dg.MetadataValue:
    return dg.MetadataValue.md(pd.DataFrame(rows[:limit], columns=columns).to_markdown(index=False) if rows else "none")


@dg.asset(group_name=GROUP, kinds={"s3", "pandas"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "cpu"})
def catalog_products(s3: S3Resource) -> dg.MaterializeResult:
    """`catalog/products.csv`: one row per SKU (sku, name, category, attributes)."""
    df = ingest.fetch_products(s3.client(), s3.bucket)
    problems = contract.check_products(df)
    return dg.MaterializeResult(
        value=df,
        metadata={
            "skus": len(df),
            "columns": list(df.columns),
            "categories": int(df["category"].replace("", pd.NA).nunique()),
            "contract_problems": problems or "none",
            "preview": dg.MetadataValue.md(df.head(10).to_markdown(index=False)),
        },
    )


@dg.asset(group_name=GROUP, kinds={"s3"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "cpu"})
def catalog_images(context: dg.AssetExecutionContext, s3: S3Resource, state: LocalStateResource) -> dg.MaterializeResult:
    """Product DB images (`catalog/images/<sku>/<file>`) mirrored locally; only the delta is downloaded."""
    res = ingest.sync_images(s3.client(), s3.bucket, contract.CATALOG_IMAGES_PREFIX, state.path("cache", "catalog"))
    for key, why in res.rejected[:20]:
        context.log.warning(f"skipped {key}: {why}")
    for key, err in res.failed:
        context.log.error(f"download failed for {key}: {err} (will be retried next run)")
    return dg.MaterializeResult(value=res.manifest, metadata=_sync_metadata(res))


@dg.asset(group_name=GROUP, kinds={"s3"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "cpu"})
def shelf_crops(context: dg.AssetExecutionContext, s3: S3Resource, state: LocalStateResource) -> dg.MaterializeResult:
    """Labelled shelf crops for evaluation: `shelf/crops/<sku>/` plus crops cut from `shelf/photos/` by `boxes.csv`."""
    root = state.path("cache", "shelf")
    res = ingest.sync_images(s3.client(), s3.bucket, contract.SHELF_CROPS_PREFIX, root / "crops")
    cut, cut_rejected = ingest.sync_shelf_photos(s3.client(), s3.bucket, root)
    manifest = pd.concat([res.manifest.assign(source="crop"), cut.assign(source="photo")], ignore_index=True)
    for key, why in (res.rejected + cut_rejected)[:20]:
        context.log.warning(f"skipped {key}: {why}")
    meta = _sync_metadata(res)
    meta.update({"crops_from_photos": len(cut), "photo_boxes_rejected": len(cut_rejected),
                 "objects": len(manifest), "skus": int(manifest["sku"].nunique()) if len(manifest) else 0})
    return dg.MaterializeResult(value=manifest, metadata=meta)


def _sync_metadata(res: ingest.SyncResult) -> dict:
    meta = dict(res.stats())
    meta["bytes_downloaded"] = dg.MetadataValue.int(res.bytes_downloaded)
    if res.rejected:
        meta["rejected_keys"] = _table(res.rejected, ["key", "reason"])
    if res.failed:
        meta["failed_downloads"] = _table(res.failed, ["key", "error"])
    if res.added or res.changed or res.removed:
        delta = [("added", k) for k in res.added[:20]] + [("changed", k) for k in res.changed[:20]] + \
                [("removed", k) for k in res.removed[:20]]
        meta["delta_sample"] = _table(delta, ["change", "key"])
    return meta

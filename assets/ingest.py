"""Ingest: the catalog and the shelf evaluation set, pulled incrementally from S3."""

import unicodedata

import dagster as dg
import pandas as pd
from pydantic import Field

from assets import OWNERS
from resources import LocalStateResource, S3Resource
from skulens.catalog import contract, ingest

GROUP = "ingest"
TAGS = {"skulens/domain": "catalog"}  # the skulens package this asset calls into


_HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # unicode categories never shown raw


def _shown(text: str) -> str:
    """A bucket key as logs and metadata show it: control, format and line-separator characters escaped, so
    a hostile key (a newline, a bidi override) cannot forge a log line or break a table."""
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _HIDDEN else ch
                   for ch in str(text))


def _table(rows: list[tuple], columns: list[str], limit: int = 50) -> dg.MetadataValue:
    if not rows:
        return dg.MetadataValue.md("none")
    shown = [tuple(_shown(v).replace("|", "\\|") for v in row) for row in rows[:limit]]
    return dg.MetadataValue.md(pd.DataFrame(shown, columns=columns).to_markdown(index=False))


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


class IngestSettings(dg.Config):
    max_failed_downloads: int = Field(
        default=0, ge=0,
        description="downloads that may still fail after the S3 client's retries before the asset fails; above it the "
                    "run stops (a partial mirror would drop those images from training and the index) and the next run "
                    "fetches only what is missing")


def _fail_on_failed_downloads(res: ingest.SyncResult, allowed: int, what: str) -> None:
    if len(res.failed) <= allowed:
        return
    key, err = res.failed[0]
    raise dg.Failure(
        description=f"{len(res.failed)} {what} download(s) failed after retries (first: {_shown(key)}: {_shown(err)}); "
                    f"the {res.downloaded} that downloaded are kept and the next run fetches only the rest",
        metadata={"failed_downloads": _table(res.failed, ["key", "error"]), **res.stats()},
    )


@dg.asset(group_name=GROUP, kinds={"s3"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "cpu"})
def catalog_images(context: dg.AssetExecutionContext, config: IngestSettings, s3: S3Resource,
                   state: LocalStateResource) -> dg.MaterializeResult:
    """Product DB images (`catalog/images/<sku>/<file>`) mirrored locally; only the delta is downloaded."""
    res = ingest.sync_images(s3.client(), s3.bucket, contract.CATALOG_IMAGES_PREFIX, state.path("cache", "catalog"))
    for key, why in res.rejected[:20]:
        context.log.warning(f"skipped {_shown(key)}: {_shown(why)}")
    for key, err in res.failed:
        context.log.error(f"download failed for {_shown(key)}: {_shown(err)} (will be retried next run)")
    _fail_on_failed_downloads(res, config.max_failed_downloads, "catalog image")
    return dg.MaterializeResult(value=res.manifest, metadata=_sync_metadata(res))


@dg.asset(group_name=GROUP, kinds={"s3"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "cpu"})
def shelf_crops(context: dg.AssetExecutionContext, config: IngestSettings, s3: S3Resource,
                state: LocalStateResource) -> dg.MaterializeResult:
    """Labelled shelf crops for evaluation: `shelf/crops/<sku>/` plus crops cut from `shelf/photos/` by `boxes.csv`."""
    root = state.path("cache", "shelf")
    res = ingest.sync_images(s3.client(), s3.bucket, contract.SHELF_CROPS_PREFIX, root / "crops")
    _fail_on_failed_downloads(res, config.max_failed_downloads, "shelf crop")
    cut, cut_rejected = ingest.sync_shelf_photos(s3.client(), s3.bucket, root)
    manifest = pd.concat([res.manifest.assign(source="crop"), cut.assign(source="photo")], ignore_index=True)
    for key, why in (res.rejected + cut_rejected)[:20]:
        context.log.warning(f"skipped {_shown(key)}: {_shown(why)}")
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

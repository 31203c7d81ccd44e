"""Incremental SKU index update: new or changed SKUs are embedded with the champion and published
as a new index version; no retraining. Launched by the catalog sensor (pipelines/automation.py)."""

import time

import dagster as dg
from pydantic import Field

from assets.quality import CleanSettings
from resources import LocalStateResource, S3Resource
from resources.mlflow import MlflowResource
from skulens.catalog import contract, ingest
from skulens.index.update import publish_update


class IndexUpdateConfig(dg.Config):
    reason: str = Field(default="manual", description="why this update runs (the sensor fills in the batch)")
    batch_size: int = 64


def champion_encoder(mlflow: MlflowResource, state: LocalStateResource):
    """``(engine, ref)`` of the champion, through the one model cache (skulens.registry.store): the compiled
    inference engine (``mlflow.inference_backend``), loaded from the engine cache after its first compile."""
    store = mlflow.store(state.cache_path("models"))
    ref = store.champion()
    if ref is None:
        raise dg.Failure(f"no champion for registered model {mlflow.model_name!r} yet: run the main job first")
    return store.engine(ref), store.complete(ref)


@dg.op(tags={"kind": "index"})
def update_sku_index(context: dg.OpExecutionContext, config: IndexUpdateConfig, s3: S3Resource,
                     mlflow: MlflowResource, state: LocalStateResource) -> dict:
    """Ingest the catalog delta, embed only new/changed SKUs with the champion, drop deleted SKUs, publish
    by compare-and-swap (a race lost to another publisher is redone on top of the winner's version)."""
    t0 = time.perf_counter()
    client = s3.client()

    def resync():
        return ingest.sync_images(client, s3.bucket, contract.CATALOG_IMAGES_PREFIX, state.path("cache", "catalog"))

    def products_now():  # the full build's membership rule: an image of a SKU not in products.csv is not indexed
        try:
            return ingest.fetch_products(client, s3.bucket)
        except contract.CatalogError as e:
            raise dg.Failure(f"skulens error: {e}; the index is left as it is") from e

    sync = resync()
    products = products_now()
    t_ingest = time.perf_counter() - t0

    def champion():
        encoder, ref = champion_encoder(mlflow, state)
        return encoder, ref.version, {"model_name": mlflow.model_name, "model_uri": ref.uri, "model_sha256": ref.sha256,
                                      "inference_backend": getattr(encoder, "backend", "torch")}

    def fresh():
        again = resync()
        return again.manifest, [k for k, _ in again.failed], products_now()

    for key, err in sync.failed:
        context.log.warning(f"download failed for {key}: {err}; its SKU stays as indexed until the next update")
    outcome, report = publish_update(client, s3.bucket, champion, sync.manifest,
                                     state.path("cache", "index-normalised"),
                                     resync=fresh, cache_dir=state.path("cache", "index"),
                                     batch_size=config.batch_size, reason=config.reason,
                                     failed_keys=[k for k, _ in sync.failed], products=products,
                                     clean_config=CleanSettings().core())  # params.yaml, as cleaned_catalog
    if not outcome["published"]:
        context.log.info("catalog and index agree: nothing to publish")
        return {"published": None, "reason": config.reason}
    published, version = outcome["version"], outcome["model_version"]
    seconds = {"ingest": round(t_ingest, 3), **report.seconds, "publish": outcome["publish_seconds"],
               "op_total": round(time.perf_counter() - t0, 3)}
    published_as = outcome.get("mode") + (f" (compacted: {outcome['compacted']})" if outcome.get("compacted") else "")
    context.log.info(f"published index {published}: {len(report.changed_skus)} SKU(s) checked "
                     f"({report.embedded_images} images embedded), {len(report.removed_skus)} removed"
                     + (f" ({len(report.delisted_skus)} no longer in products.csv)" if report.delisted_skus else "")
                     + f"; published as {published_as}, base index loaded by {outcome.get('base_load')}; {seconds}"
                     + (f"; redone on top of {outcome['rebased_on']} after {len(outcome['conflicts'])} race(s) lost"
                        if outcome["conflicts"] else ""))
    context.log_event(dg.AssetMaterialization(
        asset_key="sku_index",
        description="incremental update (catalog sensor)",
        metadata={"index_version": published, "model_version": version, "rows": outcome["count"],
                  "skus": outcome.get("n_skus"),
                  "changed_skus": dg.MetadataValue.json(report.changed_skus[:200]),
                  "removed_skus": dg.MetadataValue.json(report.removed_skus[:200]),
                  "delisted_skus": dg.MetadataValue.json(report.delisted_skus[:200]),
                  "embedded_images": report.embedded_images, "files_dropped": len(report.dropped_files),
                  "seconds": dg.MetadataValue.json(seconds), "reason": config.reason,
                  "publish_attempts": outcome["attempts"], "races_lost": len(outcome["conflicts"]),
                  "published_as": published_as, "chain_deltas": len(outcome.get("deltas") or []),
                  "base_load": str(outcome.get("base_load")),
                  "deferred_skus": dg.MetadataValue.json(report.deferred_skus[:200])},
    ))
    return {"published": published, "changed_skus": report.changed_skus, "removed_skus": report.removed_skus,
            "delisted_skus": report.delisted_skus, "seconds": seconds, "mode": outcome.get("mode")}


@dg.job(executor_def=dg.in_process_executor, tags={"skulens/kind": "index-update"},
        description="Embed new/changed catalog SKUs with the champion and publish a new index version (no training).")
def index_update():
    update_sku_index()

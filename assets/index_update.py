"""Incremental SKU index update: new or changed SKUs are embedded with the champion and published
as a new index version; no retraining. Launched by the catalog sensor (pipelines/automation.py)."""

import dagster as dg
from pydantic import Field

from assets.quality import CleanSettings
from resources import LocalStateResource, S3Resource
from resources.mlflow import MlflowResource
from skulens.catalog import contract
from skulens.index.update import update_from_catalog


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
    def champion():
        encoder, ref = champion_encoder(mlflow, state)
        return encoder, ref.version, {"model_name": mlflow.model_name, "model_uri": ref.uri, "model_sha256": ref.sha256,
                                      "inference_backend": getattr(encoder, "backend", "torch")}

    def failed(key, err):
        context.log.warning(f"download failed for {key}: {err}; its SKU stays as indexed until the next update")

    try:  # the one update, shared with the warm worker (`skulens index-worker`, skulens.index.worker)
        done = update_from_catalog(s3.client(), s3.bucket, champion, state.path("cache", "catalog"),
                                   state.path("cache", "index-normalised"), cache_dir=state.path("cache", "index"),
                                   batch_size=config.batch_size, reason=config.reason,
                                   clean_config=CleanSettings().core(),  # params.yaml, as cleaned_catalog
                                   on_failed_download=failed)
    except contract.CatalogError as e:
        raise dg.Failure(f"skulens error: {e}; the index is left as it is") from e
    outcome, report, seconds = done.outcome, done.report, done.seconds
    context.log.info(done.summary())
    if not outcome["published"]:  # e.g. the warm worker published this change first: recorded, nothing duplicated
        context.add_output_metadata({"outcome": "catalog and index agree: nothing to publish",
                                     "index_version": str(outcome.get("version")), "reason": config.reason,
                                     "seconds": dg.MetadataValue.json(seconds)})
        return {"published": None, "reason": config.reason, "index_version": outcome.get("version")}
    published, version = outcome["version"], outcome["model_version"]
    published_as = done.published_as
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

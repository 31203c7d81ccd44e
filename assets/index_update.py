"""Incremental SKU index update: new or changed SKUs are embedded with the champion and published
as a new index version; no retraining. Launched by the catalog sensor (pipelines/automation.py)."""

import time

import dagster as dg
import numpy as np
from pydantic import Field

from resources import LocalStateResource, S3Resource
from resources.mlflow import MlflowResource
from skulens.catalog import contract, ingest
from skulens.index.update import SOURCES_META, update_index


class IndexUpdateConfig(dg.Config):
    reason: str = Field(default="manual", description="why this update runs (the sensor fills in the batch)")
    batch_size: int = 64


def champion_encoder(mlflow: MlflowResource, state: LocalStateResource):
    """``(encoder, ref)`` of the champion, through the one model cache (skulens.registry.store)."""
    store = mlflow.store(state.cache_path("models"))
    ref = store.champion()
    if ref is None:
        raise dg.Failure(f"no champion for registered model {mlflow.model_name!r} yet: run the main job first")
    return store.encoder(ref), store.complete(ref)


@dg.op(tags={"kind": "index"})
def update_sku_index(context: dg.OpExecutionContext, config: IndexUpdateConfig, s3: S3Resource,
                     mlflow: MlflowResource, state: LocalStateResource) -> dict:
    """Ingest the catalog delta, embed only new/changed SKUs with the champion, drop deleted SKUs, publish."""
    from skulens.index.publish import NoIndexPublished, load_current, publish_index
    from skulens.index.sku_index import SkuIndex

    t0 = time.perf_counter()
    client = s3.client()
    sync = ingest.sync_images(client, s3.bucket, contract.CATALOG_IMAGES_PREFIX, state.path("cache", "catalog"))
    t_ingest = time.perf_counter() - t0
    encoder, ref = champion_encoder(mlflow, state)
    version = ref.version
    model_meta = {"model_name": mlflow.model_name, "model_uri": ref.uri, "model_sha256": ref.sha256}
    try:
        index, pointer = load_current(client, s3.bucket, cache_dir=state.path("cache", "index"))
    except NoIndexPublished:
        index, pointer = None, None
    if index is None or index.model_version != version:
        context.log.info(f"index model {getattr(index, 'model_version', None)} != champion {version}: building in full")
        index = SkuIndex(np.zeros((0, encoder.embed_dim), np.float32), np.array([], dtype=str),
                         np.array([], dtype=str), model_version=version, meta={SOURCES_META: {}})
    index.meta.update(model_meta)
    new, report = update_index(encoder, index, sync.manifest, state.path("cache", "index-normalised"), version,
                               batch_size=config.batch_size)
    if not report.changed_skus and not report.removed_skus and pointer is not None:
        context.log.info("catalog and index agree: nothing to publish")
        return {"published": None, "reason": config.reason}
    new.meta["update"] = {"reason": config.reason, "changed_skus": len(report.changed_skus),
                          "removed_skus": len(report.removed_skus)}
    t_pub = time.perf_counter()
    published = publish_index(client, s3.bucket, new)
    t_pub = time.perf_counter() - t_pub
    seconds = {"ingest": round(t_ingest, 3), **report.seconds, "publish": round(t_pub, 3),
               "op_total": round(time.perf_counter() - t0, 3)}
    context.log.info(f"published index {published}: {len(report.changed_skus)} SKU(s) embedded "
                     f"({report.embedded_images} images), {len(report.removed_skus)} removed; {seconds}")
    context.log_event(dg.AssetMaterialization(
        asset_key="sku_index",
        description="incremental update (catalog sensor)",
        metadata={"index_version": published, "model_version": version, "rows": len(new), "skus": len(new.sku_list),
                  "changed_skus": dg.MetadataValue.json(report.changed_skus[:200]),
                  "removed_skus": dg.MetadataValue.json(report.removed_skus[:200]),
                  "embedded_images": report.embedded_images, "files_dropped": len(report.dropped_files),
                  "seconds": dg.MetadataValue.json(seconds), "reason": config.reason},
    ))
    return {"published": published, "changed_skus": report.changed_skus, "removed_skus": report.removed_skus,
            "seconds": seconds}


@dg.job(executor_def=dg.in_process_executor, tags={"skulens/kind": "index-update"},
        description="Embed new/changed catalog SKUs with the champion and publish a new index version (no training).")
def index_update():
    update_sku_index()

"""The SKU index: every cleaned catalog image embedded with the current champion, published atomically to S3."""

import dagster as dg
from pydantic import Field

from assets import OWNERS
from resources import LocalStateResource, S3Resource, SparseViewsResource
from resources.mlflow import MlflowResource
from resources.training import TrainingResource
from skulens.index import build
from skulens.model import embed

GROUP = "index"
TAGS = {"skulens/domain": "index"}  # the skulens package this asset calls into


class IndexSettings(dg.Config):
    prefix: str = Field(default="index", description="S3 prefix: <prefix>/versions/<version>.npz + <prefix>/CURRENT.json")
    batch_size: int = 64


@dg.asset(group_name=GROUP, pool="gpu", deps=["registered_model"], kinds={"numpy", "s3"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "gpu"})
def sku_index(context: dg.AssetExecutionContext, config: IndexSettings, cleaned_catalog, mlflow: MlflowResource,
              s3: S3Resource, training: TrainingResource, state: LocalStateResource,
              sparse_views: SparseViewsResource) -> dg.MaterializeResult:
    """Nearest-neighbour index of the cleaned catalog built with the champion (after this run's promotion
    decision); a new immutable version is uploaded and verified before `CURRENT.json` moves to it."""
    from skulens.catalog import contract, ingest
    from skulens.index import publish, update

    client = s3.client()
    start = publish.read_pointer(client, s3.bucket, config.prefix)  # what this build replaces (compare-and-swap)
    store = mlflow.store(state.cache_path("models"))
    index, version = build.build_full_index(  # the one indexable rule (skulens.index.rules), as index_update
        store, cleaned_catalog,
        device=embed.resolve_device(training.device), batch_size=config.batch_size,
        meta={"dagster_run_id": context.run.run_id},
        cache_dir=state.path("cache", "embeddings"),
        sparse_below=sparse_views.below, sparse_views=sparse_views.views, aug_seed=sparse_views.seed,
    )

    def rebase(built, base):  # another publisher (index_update) won the race: add what it saw, on top of it
        context.log.warning(f"index moved to {base.version} during the build: rebasing onto the catalog now")
        champion = store.champion()
        manifest = ingest.sync_images(client, s3.bucket, contract.CATALOG_IMAGES_PREFIX,
                                      state.path("cache", "catalog")).manifest
        return update.rebase_build(store.engine(store.version(version), device=embed.resolve_device(training.device)),
                                   built, base, manifest,
                                   state.path("cache", "index-normalised"),
                                   champion.version if champion else None, batch_size=config.batch_size,
                                   products=ingest.fetch_products(client, s3.bucket))

    pointer = build.publish_if_changed(client, s3.bucket, index, prefix=config.prefix, start=start, rebase=rebase,
                                       cache_dir=state.path("cache", "index"))
    if not pointer.get("version"):
        raise dg.Failure("no index was published: a newer index built with another champion won the race")
    context.log.info(f"index {pointer['version']} ({'published' if pointer['published'] else 'unchanged'}): "
                     f"{len(index)} images, {index.meta['n_skus']} SKUs, model v{version}"
                     + (f"; rebased after {len(pointer['conflicts'])} race(s) lost" if pointer["conflicts"] else ""))
    pointer_url = f"s3://{s3.bucket}/{config.prefix.strip('/')}/CURRENT.json"
    return dg.MaterializeResult(
        value={k: v for k, v in pointer.items() if k != "etag"},
        metadata={"version": pointer["version"], "published": pointer["published"], "count": len(index),
                  "skus": index.meta["n_skus"], "sparse_skus": index.meta["sparse"]["skus"],
                  "sparse_rule": f"< {sparse_views.below} images: + {sparse_views.views} views per image",
                  "sku_list": ", ".join(index.sku_list[:200]) + (" ..." if index.meta["n_skus"] > 200 else ""),
                  "embed_dim": index.embed_dim, "model_name": mlflow.model_name,
                  "inference_backend": str(index.meta.get("inference_backend", "torch")),
                  "inference_preprocess": str(index.meta.get("inference_preprocess", "exact")),
                  "model_version": version, "pointer": pointer_url,
                  "object": f"s3://{s3.bucket}/{pointer['key']}", "sha256": pointer["sha256"],
                  "previous_version": str(pointer.get("previous")),
                  "publish_attempts": pointer["attempts"], "races_lost": len(pointer["conflicts"])},
    )

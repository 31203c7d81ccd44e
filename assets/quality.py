"""Data quality: clean the catalog, validate it (GE + asset checks), version it with DVC."""

from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from assets import OWNERS
from resources import DvcResource, LocalStateResource
from skulens.data import checks, layout
from skulens.data.clean import CleanConfig, clean_catalog
from skulens.data.dvc import git_revision

GROUP = "data_quality"
TAGS = {"skulens/domain": "data"}  # the skulens package this asset calls into
_P = layout.read_params(Path(__file__).resolve().parent.parent, "clean")


class CleanSettings(dg.Config):
    """Cleaning thresholds (defaults from params.yaml `clean:`)."""

    min_bytes: int = Field(default=_P.get("min_bytes", 1024), description="files smaller than this are dropped")
    min_side: int = Field(default=_P.get("min_side", 32), description="images with a side under this (px) are dropped")
    max_pixels: int = Field(default=_P.get("max_pixels", 50_000_000), description="decompression-bomb cap")
    min_images_per_sku: int = Field(default=_P.get("min_images_per_sku", 3),
                                    description="usable images a SKU needs to be a training class; SKUs with fewer "
                                                "are index-only (indexed and recognizable, never trained on)")
    min_index_images: int = Field(default=_P.get("min_index_images", 1),
                                  description="SKUs with fewer usable images than this are dropped")
    max_dropped_share: float = Field(default=_P.get("max_dropped_share", 0.2),
                                     description="the blocking checks fail when more than this share of files is "
                                                 "dropped (set here once; the checks read it from the cleaned catalog)")
    cross_sku_duplicates: str = Field(default="drop_all", description="drop_all | keep_first | keep_all")
    decode_timeout_s: float = Field(default=_P.get("decode_timeout_s", 20.0), ge=0,
                                    description="per-file decode time limit in seconds (DECODE_TIMEOUT); 0 = off")

    def core(self) -> CleanConfig:
        return CleanConfig(min_bytes=self.min_bytes, min_side=self.min_side, max_pixels=self.max_pixels,
                           min_images_per_sku=self.min_images_per_sku, min_index_images=self.min_index_images,
                           cross_sku_duplicates=self.cross_sku_duplicates, max_dropped_share=self.max_dropped_share,
                           decode_timeout_s=self.decode_timeout_s)


def _md_table(df: pd.DataFrame, limit: int = 100) -> dg.MetadataValue:
    if df.empty:
        return dg.MetadataValue.md("none")
    return dg.MetadataValue.md(df.head(limit).to_markdown(index=False))


@dg.asset(group_name=GROUP, pool="dvc", kinds={"pandas"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "cpu"})
def cleaned_catalog(context: dg.AssetExecutionContext, config: CleanSettings, catalog_images: pd.DataFrame,
                    catalog_products: pd.DataFrame, dvc: DvcResource, state: LocalStateResource) -> dg.MaterializeResult:
    """Every catalog image kept or dropped with a reason; kept images form `data/clean` (DVC-tracked)."""
    cfg = config.core()
    if len(catalog_images) == 0:
        raise dg.Failure("skulens error: the catalog has no images (nothing under catalog/images/ in the bucket); "
                         "upload one with `skulens import catalog DIR` (layout: DIR/products.csv, DIR/images/<sku>/)")
    layout.write_raw(catalog_images, catalog_products, dvc.data_dir("raw"))
    result = clean_catalog(catalog_images, catalog_products, state.path("cache", "normalised"), cfg, progress=True)
    params = layout.params_dict(cfg)
    params.pop("workers", None)
    result.kept = layout.write_clean(result, dvc.data_dir("clean"), params)
    s = result.stats
    if s["files_kept"] == 0:
        raise dg.Failure(f"skulens error: no usable catalog image: all {s['files_in']} file(s) were dropped "
                         f"({', '.join(f'{k} {v}' for k, v in s['dropped_by_reason'].items())}); see "
                         f"{dvc.data_dir('clean', 'dropped_files.csv')} and upload readable JPEG/PNG/WebP images")
    context.log.info(f"cleaned {s['files_in']} files in {s['seconds']}s ({s['images_per_s']} images/s): "
                     f"kept {s['files_kept']}, dropped {s['files_dropped']} ({s['dropped_by_reason']})")
    return dg.MaterializeResult(
        value=result,
        metadata={
            "files_in": s["files_in"], "files_kept": s["files_kept"], "files_dropped": s["files_dropped"],
            "share_dropped": round(s["share_dropped"], 4), "skus_kept": s["skus_kept"], "skus_dropped": s["skus_dropped"],
            "skus_train": s["skus_train"], "skus_index_only": s["skus_index_only"],
            "sku_roles": _md_table(result.sku_roles),
            "skus_with_packshot": s.get("skus_with_packshot", 0), "packshot_problems": s.get("packshot_problems", 0),
            "packshots": _md_table(result.packshots if result.packshots is not None else pd.DataFrame()),
            "normalised": s["normalised"], "images_per_s": s["images_per_s"],
            "dropped_by_reason": s["dropped_by_reason"],
            "dropped_files": _md_table(result.dropped_files),
            "dropped_skus": _md_table(result.dropped_skus),
            "dropped_files_csv": dg.MetadataValue.path(str(dvc.data_dir("clean", "dropped_files.csv"))),
            "dataset_dir": dg.MetadataValue.path(str(dvc.data_dir("clean"))),
        },
    )


def _check(passed: bool, meta: dict, severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    clean = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else dg.MetadataValue.json(v))
             for k, v in meta.items()}
    return dg.AssetCheckResult(passed=bool(passed), metadata=clean, severity=severity)


@dg.asset_check(asset=cleaned_catalog, blocking=True, description="At most max_dropped_share of the files were dropped.")
def dropped_share_below_threshold(cleaned_catalog) -> dg.AssetCheckResult:
    return _check(*checks.check_dropped_share(cleaned_catalog))  # the threshold cleaned_catalog was configured with


@dg.asset_check(asset=cleaned_catalog, blocking=True,
                description="No SKU's images are mostly byte-duplicates of another SKU's (mislabelled catalog).")
def no_sku_copies_another(cleaned_catalog) -> dg.AssetCheckResult:
    return _check(*checks.check_cross_sku_duplication(cleaned_catalog))


@dg.asset_check(asset=cleaned_catalog, blocking=False,
                description="SKU roles: warns when catalog SKUs were dropped with no usable image; "
                            "reports the index-only SKUs (fewer than min_images_per_sku images).")
def skus_with_enough_images(cleaned_catalog) -> dg.AssetCheckResult:
    passed, meta = checks.check_min_images(cleaned_catalog)
    return _check(passed, meta, severity=dg.AssetCheckSeverity.WARN)


@dg.asset_check(asset="catalog_products", blocking=True, description="products.csv: SKU ids unique and non-empty.")
def products_sku_unique(catalog_products: pd.DataFrame) -> dg.AssetCheckResult:
    return _check(*checks.check_products_unique(catalog_products))


@dg.asset_check(asset=cleaned_catalog, blocking=True, additional_ins={"catalog_products": dg.AssetIn()},
                description="Great Expectations suite over products.csv and the per-image table; Data Docs rendered.")
def great_expectations_suite(context: dg.AssetCheckExecutionContext, cleaned_catalog,
                             catalog_products: pd.DataFrame, state: LocalStateResource) -> dg.AssetCheckResult:
    from skulens.data.expectations import validate_catalog

    report = validate_catalog(cleaned_catalog.images, catalog_products, cleaned_catalog.config,
                              docs_dir=state.path("gx"),
                              run_name=context.run.run_id)
    meta = report.to_metadata()
    out = {"evaluated": meta["evaluated"], "failed": meta["failed"] or "none", "seconds": meta["seconds"],
           "results": dg.MetadataValue.md(pd.DataFrame(
               [{k: r[k] for k in ("table", "expectation", "column", "success", "observed")} for r in meta["results"]]
           ).to_markdown(index=False))}
    # the results table above is the report the UI shows; the same as one offline HTML file (no CDN), and the
    # GX Data Docs (which need the network for their styles) as paths to open from a shell or file manager
    html = state.path("gx", "reports") / f"{context.run.run_id}.html"
    html.write_text(report.to_html(f"skulens data quality: run {context.run.run_id[:8]}"))
    out["report_html"] = dg.MetadataValue.path(str(html))
    if report.docs_path:
        out["gx_data_docs"] = dg.MetadataValue.path(str(report.docs_path.resolve()))
    return dg.AssetCheckResult(passed=report.success, metadata=out)


@dg.asset(group_name=GROUP, pool="dvc", deps=["cleaned_catalog", "balanced_dataset"], kinds={"dvc"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "cpu"})
def dataset_version(context: dg.AssetExecutionContext, dvc: DvcResource) -> dg.MaterializeResult:
    """Record data/clean and data/balanced in dvc.lock (`dvc commit`) and push them to the S3 remote."""
    repo = dvc.repo()
    stages = [s for s in ("clean", "balance") if dvc.data_dir({"clean": "clean", "balance": "balanced"}[s]).exists()]
    repo.commit(*stages)
    pushed = repo.push(*stages)
    version = {
        "clean_md5": repo.out_md5("clean", "data/clean"),
        "balanced_md5": repo.out_md5("balance", "data/balanced"),
        **git_revision(dvc.repo_dir),
    }
    context.log.info(f"dataset version {version}; {pushed.strip().splitlines()[-1] if pushed.strip() else ''}")
    return dg.MaterializeResult(value=version, metadata={k: str(v) for k, v in version.items()})

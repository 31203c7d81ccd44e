"""Evaluation and registry: score the challenger against the champion and the base tower on the same
shelf crops, register it in MLflow, promote it only when it wins, export the champion to ONNX."""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from assets import OWNERS
from resources import LocalStateResource, SparseViewsResource
from resources.mlflow import MlflowResource
from resources.training import TrainingResource
from skulens.evaluation import compare, reports, splits
from skulens.index import rules
from skulens.model import embed, export
from skulens.registry import promotion

GROUP = "evaluation"
TAGS = {"skulens/domain": "evaluation"}  # the skulens package this asset calls into


def _md(df: pd.DataFrame, limit: int = 40) -> dg.MetadataValue:
    return dg.MetadataValue.md(df.head(limit).to_markdown(index=False) if len(df) else "none")


def _run_url(mlflow: MlflowResource, run_id: str) -> dg.MetadataValue:
    exp = mlflow.client().get_run(run_id).info.experiment_id
    return dg.MetadataValue.url(f"{mlflow.tracking_uri}/#/experiments/{exp}/runs/{run_id}")


def _trained_skus(context: dg.AssetExecutionContext, mlflow: MlflowResource, trained_encoder: dict,
                  champion_run_id: str | None) -> dict:
    """role -> the SKUs that model was trained on: the ``trained`` list of the ``catalog_state.json`` of its
    training run (None: not recorded or MLflow did not answer; its open-set split is then left out). The base
    tower, and a challenger that is the base tower, have seen none."""
    from skulens.registry.promotion import _run_record

    def of(run_id):
        if not run_id:
            return None
        try:
            with mlflow.bounded():
                record = _run_record(mlflow.client(), run_id)
        except Exception as e:  # noqa: BLE001 - a missing split must not fail the evaluation
            context.log.warning(f"training SKUs of run {run_id} not readable ({type(e).__name__}): "
                                "no seen/unseen split for it")
            return None
        return None if record is None or "trained" not in record else record["trained"]

    return {"challenger": set() if trained_encoder.get("base_tower") else of(trained_encoder.get("mlflow_run_id")),
            "champion": of(champion_run_id), "base": set()}


class EvalSettings(dg.Config):
    """How the shelf crops are scored (every model on the same crops and galleries)."""

    k: int = Field(default=5, description="top-k cut-off (top-5 accuracy)")
    n_aug: int = Field(default=8, description="RetailKLIP gallery: shelf-like augmentations per SKU image")
    aug_seed: int = Field(default=0, description="seed of the RetailKLIP gallery augmentations")
    sources: list[str] = Field(default=["crop", "photo"],
                               description="shelf crop sources: crop (shelf/crops/) and photo (cut by boxes.csv)")
    include_base: bool = Field(default=True, description="also score the un-fine-tuned base tower")
    include_champion: bool = Field(default=True, description="also score the current champion (if any)")
    batch_size: int = 64
    top_confusions: int = Field(default=8, description="confused pairs shown in the plot")


@dg.asset(group_name=GROUP, pool="gpu", kinds={"pytorch", "mlflow"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "gpu"})
def model_evaluation(context: dg.AssetExecutionContext, config: EvalSettings, trained_encoder: dict,
                     cleaned_catalog, shelf_crops: pd.DataFrame, catalog_products: pd.DataFrame,
                     mlflow: MlflowResource, training: TrainingResource,
                     state: LocalStateResource, sparse_views: SparseViewsResource) -> dg.MaterializeResult:
    """Challenger vs champion vs base tower on the same shelf crops: 1-NN against every cleaned catalog
    image and against the RetailKLIP gallery; top-1/top-5, per-SKU and category accuracy, confusions, and the
    open-set split: top-1 on the SKUs each model was trained on vs those it never saw, and per category."""
    crops = compare.select_crops(shelf_crops, config.sources)
    catalog = rules.indexable(cleaned_catalog)  # the gallery is what the index holds
    device = embed.resolve_device(training.device)
    store = mlflow.store(state.cache_path("models"))
    if len(crops) and not set(crops["sku"]) & set(catalog["sku"]):
        raise dg.Failure(f"skulens error: none of the {crops['sku'].nunique()} SKUs of the shelf crops is in the cleaned "
                         "catalog (e.g. " + ", ".join(sorted(set(crops["sku"]))[:3]) + "); upload their catalog "
                         "images to catalog/images/<sku>/ or label the crops with catalog SKU ids")
    skipped = not trained_encoder.get("encoder_uri")
    if trained_encoder.get("skipped"):
        context.log.warning(trained_encoder["reason"])
    challenger = None if skipped else store.fetch(trained_encoder["encoder_uri"], trained_encoder["encoder_sha256"])
    ev = compare.evaluate_all(
        str(challenger) if challenger else None, crops, catalog, catalog_products, store,
        k=config.k, n_aug=config.n_aug, aug_seed=config.aug_seed,
        base_seed=int((trained_encoder.get("train_config") or {}).get("seed") or 0),
        batch_size=config.batch_size, device=device,
        include_base=config.include_base and not trained_encoder.get("base_tower"),  # the challenger is the base
        include_champion=config.include_champion, cache_dir=state.path("cache", "embeddings"),
        echo=context.log.info, sparse_below=sparse_views.below, sparse_views=sparse_views.views,
        base_spec=trained_encoder.get("spec") if skipped else None,
    )
    unknown = sorted(set(crops["sku"]) - set(catalog["sku"]))
    if unknown:
        context.log.warning(f"{len(unknown)} shelf-crop SKU(s) are not in the catalog and cannot be recognized "
                            f"(counted as errors): {', '.join(unknown[:10])}")
    if ev["champion_error"]:
        context.log.warning(f"champion not evaluated: {ev['champion_error']} (it will not be replaced)")
    # the open-set claim: top-1 on the SKUs each model was trained on vs those it never saw, and per category
    splits.add_open_set(ev, _trained_skus(context, mlflow, trained_encoder, ev.get("champion_run_id")),
                        catalog_products)
    files = reports.write_reports(ev, catalog, state.path("evaluation", context.run.run_id[:8]),
                             top_confusions=config.top_confusions)
    run_id = trained_encoder.get("mlflow_run_id")
    if run_id:
        promotion.log_to_run(mlflow.tracking_uri, run_id, compare.flat_metrics(ev), files,
                      tags={"eval_set": ev["eval_set"], "eval.champion_version": ev["champion_version"] or "none"})

    m = ev["models"]
    meta = {
        "eval_set": ev["eval_set"], "crops": ev["n_crops"], "crop_skus": ev["n_crop_skus"],
        "crop_sources": ev["sources"], "device": device,
        "champion_version": ev["champion_version"] or "none",
        "comparison": _md(reports.comparison_table(ev)),
        "top_confused_pairs": _md(reports.confusions_table(ev, top=5)),
        "per_sku_accuracy": _md(reports.per_sku_table(ev), limit=60),
        "per_sku_plot": dg.MetadataValue.md(reports.png_markdown(files["per_sku_png"], "Challenger per-SKU top-1")),
        "confusions_plot": dg.MetadataValue.md(reports.png_markdown(files["confusions_png"], "Challenger confused pairs")),
        "plots_dir": dg.MetadataValue.path(str(Path(files["per_sku_png"]).parent)),
        "training": trained_encoder.get("reason") or "fine-tuned",
        "shelf_crop_skus_not_in_catalog": len(unknown),
    }
    if run_id:
        meta["mlflow_run"] = _run_url(mlflow, run_id)
    meta["open_set"] = _md(reports.open_set_summary(ev))
    meta["per_category"] = _md(reports.per_category_table(ev), limit=60)
    if "per_category_png" in files:
        shown = next(r for r in compare.MODEL_ROLES if r in ev["reports"])  # the challenger, when there is one
        meta["per_category_plot"] = dg.MetadataValue.md(reports.png_markdown(
            files["per_category_png"], f"{shown.title()} top-1 per category: SKUs seen in training vs never seen"))
    for role in compare.MODEL_ROLES:
        if role in m:
            for g, met in m[role]["metrics"].items():
                for key in ("top1", "top5", "top1_sparse", "top1_rich"):
                    if met.get(key) is not None:
                        meta[f"{role}_{g}_{key}"] = dg.MetadataValue.float(round(met[key], 4))
                split = ((m[role].get("open_set") or {}).get(g) or {}).get("metrics", {})
                for key in ("top1_seen", "top1_unseen"):
                    if key in split:
                        meta[f"{role}_{g}_{key}"] = dg.MetadataValue.float(round(split[key], 4))
                for key in ("n_seen", "n_unseen"):
                    if key in split:
                        meta[f"{role}_{g}_{key}"] = int(split[key])
    if ev["champion_error"]:
        meta["champion_error"] = ev["champion_error"]
    inf = ev.get("inference") or {}
    backends = inf.get("backends") or {}
    meta["inference_backend"] = ", ".join(f"{r}: {b}" for r, b in backends.items()) or "none"
    meta["inference_preprocess"] = ", ".join(f"{r}: {p}" for r, p in (inf.get("preprocess") or {}).items()) or "none"
    par = inf.get("parity")
    if par:  # the compiled engine vs PyTorch on a sample of these crops
        meta["parity_backend"] = par["backend"]
        meta["parity_crops"] = par["n"]
        meta["parity_max_abs_diff"] = dg.MetadataValue.float(float(par["max_abs_diff"]))
        meta["parity_min_cosine"] = dg.MetadataValue.float(float(par["min_cosine"]))
        if par.get("top1_agreement") is not None:
            meta["parity_top1_agreement"] = dg.MetadataValue.float(float(par["top1_agreement"]))
        if par.get("engine_crops_per_s"):
            meta["parity_crops_per_s"] = f"{par['backend']} {par['engine_crops_per_s']}, torch {par['torch_crops_per_s']}"
    return dg.MaterializeResult(value={k: v for k, v in ev.items() if k != "reports"}, metadata=meta)


class PromotionSettings(dg.Config):
    """When a challenger replaces the champion."""

    margin: float = Field(default=0.0, description="challenger must beat the champion by at least this "
                                                   "(0 = any improvement; a tie is never promoted)")
    metric: str = Field(default="top1", description="top1 | top5 | category_acc | mean_per_sku_top1")
    gallery: str = Field(default="catalog", description="catalog (all cleaned images) | retailklip")
    register_rejected: bool = Field(default=False, description="also register a challenger that is not promoted "
                                    "(a tie or a regression), marked kept-champion; off: nothing new is registered "
                                    "and its training run is tagged with the decision")


def _blocking_check_keys() -> list:
    from assets import quality

    return [spec.key for cd in dg.load_asset_checks_from_modules([quality]) for spec in cd.check_specs
            if spec.blocking]


def _latest_checks(context: dg.AssetExecutionContext) -> tuple[bool, dict]:
    """Latest results of the blocking data checks (assets/quality.py): (none failed, name -> status).

    Blocking checks already stop a run that fails them; this also covers a run that materializes the
    model assets alone after a failed check run."""
    try:
        records = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(_blocking_check_keys())
    except Exception as e:  # noqa: BLE001 - optional: the blocking checks gate the run anyway
        context.log.info(f"latest check results not readable ({type(e).__name__}); relying on blocking checks")
        return True, {}
    summary, ok = {}, True
    for key, rec in records.items():
        ev = rec.evaluation
        status = rec.status.value
        if status == "FAILED" and (ev is None or ev.severity == dg.AssetCheckSeverity.ERROR):
            ok = False
        summary[key.name] = status.lower()
    return ok, summary


@dg.asset(group_name=GROUP, kinds={"mlflow"}, owners=OWNERS,
          tags={**TAGS, "skulens/domain": "registry", "skulens/compute": "cpu"})
def registered_model(context: dg.AssetExecutionContext, config: PromotionSettings, trained_encoder: dict,
                     model_evaluation: dict, mlflow: MlflowResource, state: LocalStateResource) -> dg.MaterializeResult:
    """The challenger registered in MLflow (alias `challenger`, lineage: DVC md5s, git rev, train config,
    eval set); promoted to `champion` only if it beats the champion on the same crops."""
    checks_passed, checks = _latest_checks(context)
    if not trained_encoder.get("encoder_uri"):  # training skipped and a champion exists: nothing new
        reason = f"nothing registered: {trained_encoder.get('reason', 'no challenger')}"
        champ = model_evaluation.get("champion_version")
        context.log.info(reason)
        return dg.MaterializeResult(
            value={"version": None, "registered": False, "promoted": False, "reason": reason,
                   "decision": "kept-champion", "champion_version": champ,
                   "previous_champion": champ, "metric": config.metric, "gallery": config.gallery,
                   "margin": config.margin, "eval_set": model_evaluation["eval_set"], "challenger_metric": None,
                   "champion_metric": None, "checks_passed": checks_passed, "model_name": mlflow.model_name,
                   "clean_md5": (trained_encoder.get("dataset_version") or {}).get("clean_md5")},
            metadata={"model_name": mlflow.model_name, "version": "none", "promoted": False, "registered": False,
                      "decision": dg.MetadataValue.md(f"**nothing registered**: {reason}"), "reason": reason[:500],
                      "champion_version": str(champ)})
    local = mlflow.store(state.cache_path("models")).fetch(trained_encoder["encoder_uri"],
                                                           trained_encoder["encoder_sha256"])
    from skulens.registry.model_registry import RegistrationError

    try:
        res = promotion.register_and_decide(
            mlflow.tracking_uri, mlflow.model_name, {**trained_encoder, "encoder_path": str(local)}, model_evaluation,
            metric=config.metric, gallery=config.gallery, margin=config.margin, checks_passed=checks_passed,
            experiment=mlflow.experiment, extra_lineage={"dagster_run_id": context.run.run_id},
            tags={"dagster.run_id": context.run.run_id}, register_rejected=config.register_rejected,
        )
    except RegistrationError as e:  # one line: where, which step, and that a re-run is safe
        raise dg.Failure(description=f"skulens error: {e}",
                         metadata={"mlflow": e.tracking_uri, "failed_step": e.step, "version": str(e.version),
                                   "promoted": e.promoted}) from e
    if res["version"] is None:  # not promoted, not registered: the champion stays, the registry is unchanged
        context.log.warning(f"not promoted, nothing registered (champion v{res['champion_version']} stays): "
                            f"{res['reason']}")
        return dg.MaterializeResult(value=res, metadata={
            "model_name": mlflow.model_name, "version": "none", "promoted": False, "registered": False,
            "decision": dg.MetadataValue.md(f"**kept champion** (nothing registered): {res['reason']}"),
            "reason": res["reason"][:500], "champion_version": str(res["champion_version"]),
            "previous_champion": str(res["previous_champion"]),
            "metric": f"{res['gallery']}/{res['metric']}", "margin": res["margin"],
            "challenger_metric": res["challenger_metric"],
            "champion_metric": res["champion_metric"] if res["champion_metric"] is not None else "n/a",
            "eval_set": res["eval_set"], "checks_passed": checks_passed, "checks": dg.MetadataValue.json(checks),
            "mlflow_run": _run_url(mlflow, res["training_run_id"]) if res.get("training_run_id") else "n/a"})
    (context.log.info if res["promoted"] else context.log.warning)(
        f"v{res['version']}: {'PROMOTED to champion' if res['promoted'] else 'not promoted'}: {res['reason']}")
    try:
        from skulens.registry.store import bounded_http

        with bounded_http(10, 1):
            mv = mlflow.client().get_model_version(mlflow.model_name, res["version"])
            run_url = _run_url(mlflow, mv.run_id)
    except Exception as e:  # noqa: BLE001 - registered and decided: only the links are missing
        context.log.warning(f"v{res['version']} registered, but MLflow did not answer for its metadata: "
                            f"{type(e).__name__}")
        mv, run_url = None, "n/a"
    meta = {
        "model_name": mlflow.model_name, "version": res["version"], "promoted": res["promoted"], "registered": True,
        "reason": res["reason"][:500],
        "decision": dg.MetadataValue.md(f"**{'promoted' if res['promoted'] else 'kept champion'}**: {res['reason']}"),
        "champion_version": str(res["champion_version"]),
        "previous_champion": str(res["previous_champion"]),
        "metric": f"{res['gallery']}/{res['metric']}", "margin": res["margin"],
        "challenger_metric": res["challenger_metric"],
        "champion_metric": res["champion_metric"] if res["champion_metric"] is not None else "n/a",
        "eval_set": res["eval_set"], "checks_passed": checks_passed,
        "checks": dg.MetadataValue.json(checks),
        "lineage": dg.MetadataValue.json({k[len("lineage."):]: v for k, v in ((mv.tags if mv else None) or {}).items()
                                          if k.startswith("lineage.")}),
        "mlflow_run": run_url,
    }
    return dg.MaterializeResult(value=res, metadata=meta)


class OnnxSettings(dg.Config):
    opset: int = 17
    atol: float = Field(default=1e-4, description="max |onnxruntime - torch| allowed on a random batch")


@dg.asset(group_name=GROUP, deps=["registered_model"], kinds={"onnx", "mlflow"}, owners=OWNERS,
          tags={**TAGS, "skulens/domain": "model", "skulens/compute": "cpu"})
def onnx_export(context: dg.AssetExecutionContext, config: OnnxSettings, mlflow: MlflowResource,
                state: LocalStateResource) -> dg.MaterializeResult:
    """The champion encoder as ONNX (dynamic batch), parity-checked with onnxruntime, logged to its MLflow run."""
    info = export.export_champion_onnx(mlflow.store(state.cache_path("models")), state.path("export"),
                                   opset=config.opset, atol=config.atol)
    context.log.info(f"champion v{info['version']} -> {info['path']} (max |diff| {info['max_abs_diff']:.2e})")
    return dg.MaterializeResult(
        value=info,
        metadata={"model_version": info["version"], "max_abs_diff": dg.MetadataValue.float(info["max_abs_diff"]),
                  "max_cos_diff": dg.MetadataValue.float(info["max_cos_diff"]), "opset": info["opset"],
                  "input_shape": json.dumps(info["input_shape"]), "embed_dim": info["embed_dim"],
                  "size_bytes": info["size_bytes"], "path": dg.MetadataValue.path(info["path"]),
                  "artifact": info["artifact_uri"], "uploaded": info["uploaded"],
                  "mlflow_run": _run_url(mlflow, info["run_id"])},
    )

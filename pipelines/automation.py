"""Schedules and sensors: nightly retrain, catalog uploads -> index update, champion change -> rebuild."""

import json
import os

import dagster as dg

from resources import S3Resource
from resources.mlflow import MlflowResource
from skulens.catalog.state import catalog_state, config_hash, scan_step

NIGHTLY_CRON = os.environ.get("SKULENS_NIGHTLY_CRON", "0 2 * * *")
TIMEZONE = os.environ.get("SKULENS_TIMEZONE", "UTC")
SKIP_UNCHANGED = os.environ.get("SKULENS_SKIP_UNCHANGED", "1") not in ("0", "false", "no")
SENSOR_INTERVAL = int(os.environ.get("SKULENS_SENSOR_INTERVAL", "3"))  # seconds between catalog checks
# seconds of catalog listing per sensor tick; a bigger catalog is listed over several ticks (Dagster stops a
# sensor evaluation after 60 s; one listing of 30k keys took 7.2 s on SeaweedFS)
SENSOR_SCAN_BUDGET_S = float(os.environ.get("SKULENS_SENSOR_SCAN_BUDGET_S", "20"))
NIGHTLY_CONFIG = os.environ.get("SKULENS_NIGHTLY_CONFIG")  # a YAML run config for the nightly run, e.g. training knobs


def nightly_run_config() -> dict:
    """The nightly run's config: ``$SKULENS_NIGHTLY_CONFIG`` (a YAML run config as in the launchpad, e.g.
    ``ops: {trained_encoder: {config: {epochs: 8}}}``), or none (the asset defaults)."""
    if not NIGHTLY_CONFIG:
        return {}
    from pathlib import Path

    import yaml

    path = Path(NIGHTLY_CONFIG)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"SKULENS_NIGHTLY_CONFIG={NIGHTLY_CONFIG}: not a readable YAML run config ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"SKULENS_NIGHTLY_CONFIG={NIGHTLY_CONFIG}: a run config is a mapping, got {type(cfg).__name__}")
    return cfg


def training_config_hash(run_config: dict | None = None) -> str:
    """The hash ``trained_encoder`` tags its run with (``train.config_hash``), for the training settings of
    ``run_config`` (default: the nightly run's)."""
    from assets.training import TrainSettings

    run_config = nightly_run_config() if run_config is None else run_config
    cfg = ((run_config.get("ops") or {}).get("trained_encoder") or {}).get("config") or {}
    return config_hash(TrainSettings(**cfg).model_dump())


def retrain_thresholds() -> tuple[int, float]:
    """``(min changed SKUs, min changed share)`` from SKULENS_RETRAIN_MIN_CHANGED_SKUS (default 1) and
    SKULENS_RETRAIN_MIN_CHANGED_SHARE (default 0), read at each evaluation."""
    raw_n = os.environ.get("SKULENS_RETRAIN_MIN_CHANGED_SKUS", "1")
    raw_share = os.environ.get("SKULENS_RETRAIN_MIN_CHANGED_SHARE", "0")
    try:
        n, share = int(raw_n), float(raw_share)
    except ValueError as e:
        raise ValueError(f"SKULENS_RETRAIN_MIN_CHANGED_SKUS={raw_n!r} / SKULENS_RETRAIN_MIN_CHANGED_SHARE="
                         f"{raw_share!r}: expected an integer and a number between 0 and 1") from e
    if n < 1 or not 0.0 <= share <= 1.0:
        raise ValueError(f"SKULENS_RETRAIN_MIN_CHANGED_SKUS must be >= 1 (got {n}) and "
                         f"SKULENS_RETRAIN_MIN_CHANGED_SHARE within [0, 1] (got {share})")
    return n, share


def nightly_schedule(job) -> dg.ScheduleDefinition:
    @dg.schedule(job=job, cron_schedule=NIGHTLY_CRON, execution_timezone=TIMEZONE,
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description="Nightly retrain, only when it pays: skipped (with the reason) when the training "
                             "config is unchanged and fewer than SKULENS_RETRAIN_MIN_CHANGED_SKUS (1) trainable SKUs "
                             "are new or changed since the champion was trained (SKULENS_SKIP_UNCHANGED=0 to always "
                             "retrain).")
    def nightly_retrain(context: dg.ScheduleEvaluationContext, s3: S3Resource, mlflow: MlflowResource):
        state = catalog_state(s3.client(), s3.bucket)
        cfg = training_config_hash()
        tick = context.scheduled_execution_time.strftime("%Y-%m-%d")
        tags = {"skulens/catalog": state.fingerprint[:16], "skulens/config": cfg}
        if SKIP_UNCHANGED:
            decision = retrain_check(s3, mlflow, state, cfg)
            if not decision.retrain:
                return dg.SkipReason(decision.reason)
            tags["skulens/retrain_reason"] = decision.reason[:200]
        return dg.RunRequest(run_key=f"nightly-{tick}-{state.fingerprint[:12]}-{cfg}", tags=tags,
                             run_config=nightly_run_config())

    return nightly_retrain


def retrain_check(s3: S3Resource, mlflow: MlflowResource, state=None, cfg: str | None = None):
    """The retrain policy (:func:`skulens.catalog.state.retrain_decision`) on the catalog in S3 and the champion
    in MLflow: a ``RetrainDecision`` (``retrain``, one-line ``reason``). The nightly schedule and `skulens run`
    skip on it."""
    from assets.quality import CleanSettings
    from skulens.catalog import contract, ingest
    from skulens.catalog.state import retrain_decision
    from skulens.registry.promotion import champion_training_state

    state = state or catalog_state(s3.client(), s3.bucket)
    cfg = cfg or training_config_hash()
    champ = champion_training_state(mlflow.tracking_uri, mlflow.model_name, mlflow.experiment, cfg)
    listed = None
    if champ is not None and champ["record"] is not None:
        try:  # SKUs missing from products.csv are never trained on
            listed = set(ingest.fetch_products(s3.client(), s3.bucket)["sku"])
        except contract.CatalogError:
            listed = None
    n, share = retrain_thresholds()
    return retrain_decision(
        state.images, state.fingerprint, cfg, champ["version"] if champ else None,
        champion_tags=champ["tags"] if champ else None, record=champ["record"] if champ else None,
        listed=listed, min_images_per_sku=CleanSettings().min_images_per_sku, min_changed_skus=n,
        min_changed_share=share, rejected=champ["rejected"] if champ else None)


def unchanged_since_champion(s3: S3Resource, mlflow: MlflowResource, state=None, cfg: str | None = None) -> str | None:
    """Why retraining would not pay (:func:`retrain_check`), or None when it would (something trainable changed,
    the training config changed, or there is no champion). `skulens run` skips `main` on it."""
    decision = retrain_check(s3, mlflow, state, cfg)
    return None if decision.retrain else decision.reason


def catalog_sensor(job: dg.JobDefinition, scan_budget_s: float | None = None,
                   page_size: int = 1000) -> dg.SensorDefinition:
    """The catch-all for catalog changes (the index worker's upload notes are the fast path). Each tick lists
    ``catalog/`` for at most ``scan_budget_s`` seconds (``SKULENS_SENSOR_SCAN_BUDGET_S``, 20); a catalog too
    big for one tick is listed over several, the listing's position and running fingerprint kept in the
    cursor (:func:`skulens.catalog.state.scan_step`). A finished listing whose fingerprint differs from
    the last one becomes one ``index_update`` run, keyed by that fingerprint."""
    budget = SENSOR_SCAN_BUDGET_S if scan_budget_s is None else float(scan_budget_s)

    @dg.sensor(job=job, minimum_interval_seconds=SENSOR_INTERVAL, default_status=dg.DefaultSensorStatus.STOPPED,
               description="New, changed or deleted catalog images -> one index-update run per batch (no retraining).")
    def catalog_upload_sensor(context: dg.SensorEvaluationContext, s3: S3Resource):
        previous = json.loads(context.cursor) if context.cursor else {}
        scan, done = scan_step(s3.client(), s3.bucket, previous.get("scan"), budget, page_size=page_size)
        if done is None:  # a big catalog: the listing goes on next tick from where it stopped
            context.update_cursor(json.dumps({**previous, "scan": scan}))
            return dg.SkipReason(f"catalog listing in progress: {scan['n']} images in {scan['pages']} pages so "
                                 f"far; it continues next tick")
        fp, n = done["fingerprint"], done["images"]
        settled = {"fingerprint": fp, "images": n}
        if previous.get("fingerprint") == fp:
            if previous != settled:  # a multi-tick listing just ended: drop its position from the cursor
                context.update_cursor(json.dumps(settled))
            return dg.SkipReason(f"catalog unchanged ({n} images)")
        # The fingerprint in the cursor moves only here: a restart resumes from the last batch it emitted,
        # and the run_key makes Dagster drop a repeat of the same batch.
        context.update_cursor(json.dumps(settled))
        if not previous.get("fingerprint"):
            context.log.info("first listing: recording the catalog state; the index is brought up to date once")
        reason = f"catalog {fp[:12]}: {n} images"
        return dg.RunRequest(run_key=f"catalog-{fp[:24]}",
                             run_config={"ops": {"update_sku_index": {"config": {"reason": reason}}}},
                             tags={"skulens/catalog": fp[:16]})

    return catalog_upload_sensor


def champion_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(job=job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
               description="When the `champion` alias moves (here or in the MLflow UI), rebuild the index in full.")
    def champion_change_sensor(context: dg.SensorEvaluationContext, mlflow: MlflowResource):
        from skulens.registry.model_registry import get_champion

        champ = get_champion(mlflow.tracking_uri, mlflow.model_name)
        if champ is None:
            return dg.SkipReason("no champion yet")
        version = str(champ[0])
        if context.cursor == version:
            return dg.SkipReason(f"champion still v{version}")
        context.update_cursor(version)
        return dg.RunRequest(run_key=f"champion-v{version}",
                             run_config={"ops": {"update_sku_index": {"config": {"reason": f"champion v{version}"}}}})

    return champion_change_sensor

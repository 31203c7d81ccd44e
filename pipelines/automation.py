"""Schedules and sensors: nightly retrain, catalog uploads -> index update, champion change -> rebuild."""

import json
import os

import dagster as dg

from resources import S3Resource
from resources.mlflow import MlflowResource
from skulens.catalog.state import catalog_state, config_hash

NIGHTLY_CRON = os.environ.get("SKULENS_NIGHTLY_CRON", "0 2 * * *")
TIMEZONE = os.environ.get("SKULENS_TIMEZONE", "UTC")
SKIP_UNCHANGED = os.environ.get("SKULENS_SKIP_UNCHANGED", "1") not in ("0", "false", "no")
SENSOR_INTERVAL = int(os.environ.get("SKULENS_SENSOR_INTERVAL", "15"))


def training_config_hash() -> str:
    from assets.training import TrainSettings

    return config_hash(TrainSettings().model_dump())


def nightly_schedule(job) -> dg.ScheduleDefinition:
    @dg.schedule(job=job, cron_schedule=NIGHTLY_CRON, execution_timezone=TIMEZONE,
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description="Nightly retrain; skipped when neither the catalog nor the training config changed "
                             "since the champion was trained (SKULENS_SKIP_UNCHANGED=0 to always retrain).")
    def nightly_retrain(context: dg.ScheduleEvaluationContext, s3: S3Resource, mlflow: MlflowResource):
        state = catalog_state(s3.client(), s3.bucket)
        cfg = training_config_hash()
        tick = context.scheduled_execution_time.strftime("%Y-%m-%d")
        if SKIP_UNCHANGED:
            why = unchanged_since_champion(s3, mlflow, state, cfg)
            if why:
                return dg.SkipReason(why)
        return dg.RunRequest(run_key=f"nightly-{tick}-{state.fingerprint[:12]}-{cfg}",
                             tags={"skulens/catalog": state.fingerprint[:16], "skulens/config": cfg})

    return nightly_retrain


def unchanged_since_champion(s3: S3Resource, mlflow: MlflowResource, state=None, cfg: str | None = None) -> str | None:
    """Why retraining would repeat the champion (the catalog fingerprint and the training config hash equal the
    ones it was trained on), or None when something changed or there is no champion. The nightly schedule and
    `skulens run` skip on it."""
    from skulens.registry.model_registry import get_champion

    state = state or catalog_state(s3.client(), s3.bucket)
    cfg = cfg or training_config_hash()
    champ = get_champion(mlflow.tracking_uri, mlflow.model_name)
    if champ is None:
        return None
    tags = _champion_tags(mlflow, champ[0])
    if tags.get("catalog.fingerprint") == state.fingerprint and tags.get("train.config_hash") == cfg:
        return (f"catalog ({state.fingerprint[:12]}) and training config ({cfg}) unchanged since champion "
                f"v{champ[0]}: nothing to retrain")
    return None


def _champion_tags(mlflow: MlflowResource, version: str) -> dict:
    client = mlflow.client()
    mv = client.get_model_version(mlflow.model_name, str(version))
    return client.get_run(mv.run_id).data.tags if mv.run_id else {}


def catalog_sensor(job: dg.JobDefinition) -> dg.SensorDefinition:
    @dg.sensor(job=job, minimum_interval_seconds=SENSOR_INTERVAL, default_status=dg.DefaultSensorStatus.STOPPED,
               description="New, changed or deleted catalog images -> one index-update run per batch (no retraining).")
    def catalog_upload_sensor(context: dg.SensorEvaluationContext, s3: S3Resource):
        state = catalog_state(s3.client(), s3.bucket)
        previous = json.loads(context.cursor) if context.cursor else {}
        if previous.get("fingerprint") == state.fingerprint:
            return dg.SkipReason(f"catalog unchanged ({len(state.images)} images)")
        # The cursor moves only here: a restart resumes from the last batch it emitted, and the
        # run_key makes Dagster drop a repeat of the same batch.
        context.update_cursor(json.dumps({"fingerprint": state.fingerprint, "images": len(state.images)}))
        if not previous:
            context.log.info("first tick: recording the catalog state; the index is brought up to date once")
        reason = f"catalog {state.fingerprint[:12]}: {len(state.images)} images"
        return dg.RunRequest(run_key=f"catalog-{state.fingerprint[:24]}",
                             run_config={"ops": {"update_sku_index": {"config": {"reason": reason}}}},
                             tags={"skulens/catalog": state.fingerprint[:16]})

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

"""The skulens code location. This module only composes; domain logic lives in skulens/, assets in assets/."""

import os
import warnings
from pathlib import Path

import dagster as dg

from assets import datasets, evaluation, index, index_update, ingest, quality, training
from pipelines import automation
from resources import DvcResource, LocalStateResource, S3Resource, SparseViewsResource
from resources.mlflow import MlflowResource
from resources.training import TrainingResource
from skulens.ops.settings import ACCESS_KEY_VAR, SECRET_KEY_VAR, Settings, load_local_env

# Dagster itself passes `owners` when it re-binds our sensors to resources; we do not set it. Its beta
# warning says nothing about this project, so it is not shown on every load of the code location.
warnings.filterwarnings("ignore", message=r"Parameter `owners` of initializer `SensorDefinition", category=dg.BetaWarning)

settings = load_local_env(Settings.from_env())

ROOT = Path(__file__).resolve().parent.parent
modules = [ingest, quality, datasets, training, evaluation, index]
all_assets = dg.load_assets_from_modules(modules)
all_checks = dg.load_asset_checks_from_modules(modules)

main_job = dg.define_asset_job(
    name="main",
    selection=dg.AssetSelection.all(),
    description="The whole pipeline: ingest -> clean + checks -> balance -> DVC version -> train -> evaluate -> register -> index.",
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[main_job, index_update.index_update],
    schedules=[automation.nightly_schedule(main_job)],
    sensors=[automation.catalog_sensor(index_update.index_update), automation.champion_sensor(index_update.index_update)],
    resources={
        "s3": S3Resource(
            endpoint_url=settings.s3_endpoint,
            bucket=settings.bucket,
            region=settings.region,
            access_key_id=dg.EnvVar(ACCESS_KEY_VAR),
            secret_access_key=dg.EnvVar(SECRET_KEY_VAR),
        ),
        "state": LocalStateResource(home=str(settings.home), cache=str(settings.cache_dir)),
        "mlflow": MlflowResource(tracking_uri=settings.mlflow_uri, model_name=settings.model_name),
        "sparse_views": SparseViewsResource(),
        "training": TrainingResource(mode=os.environ.get("SKULENS_TRAINING_MODE", "local")),
        "dvc": DvcResource(
            repo_dir=os.environ.get("SKULENS_PROJECT_DIR") or str(ROOT),  # the git + DVC checkout datasets live in
            endpoint_url=settings.s3_endpoint,
            bucket=settings.bucket,
            access_key_id=dg.EnvVar(ACCESS_KEY_VAR),
            secret_access_key=dg.EnvVar(SECRET_KEY_VAR),
        ),
    },
)

"""The skulens code location. This module only composes; domain logic lives in skulens/, assets in assets/."""


import dagster as dg

from assets import ingest
from resources import LocalStateResource, S3Resource
from skulens.settings import ACCESS_KEY_VAR, SECRET_KEY_VAR, Settings, load_local_env

settings = load_local_env(Settings.from_env())

all_assets = dg.load_assets_from_modules([ingest])

main_job = dg.define_asset_job(
    name="main",
    selection=dg.AssetSelection.all(),
    description="The whole pipeline: ingest the catalog and shelf set from S3 (later: clean, train, evaluate, index).",
)

defs = dg.Definitions(
    assets=all_assets,
    jobs=[main_job],
    resources={
        "s3": S3Resource(
            endpoint_url=settings.s3_endpoint,
            bucket=settings.bucket,
            region=settings.region,
            access_key_id=dg.EnvVar(ACCESS_KEY_VAR),
            secret_access_key=dg.EnvVar(SECRET_KEY_VAR),
        ),
        "state": LocalStateResource(home=str(settings.home)),
    },
)

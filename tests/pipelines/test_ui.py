"""The Dagster UI, through the real webserver's GraphQL API: a `main` run launched as a user would (the
launchpad's `launchRun` with a tiny training config), queued and run by the real daemon; then the asset
graph, the run's steps and checks, and an asset's typed metadata are what the UI shows."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from skulens.catalog import importer
from skulens.ops.services import ServiceManager, free_port
from skulens.ops.settings import Settings

TINY = {"model": "tiny-test", "epochs": 1, "batch_size": 8, "base_lr": 2e-3, "arcface_lr": 2e-2}
ASSETS = {"catalog_products", "catalog_images", "shelf_crops", "cleaned_catalog", "balanced_dataset",
          "dataset_version", "trained_encoder", "model_evaluation", "registered_model", "onnx_export", "sku_index"}


def _gql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"{url}/graphql", data=body, headers={"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=120).read())
    assert "errors" not in out, out["errors"]
    return out["data"]


LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""

RUN = """
query($id: ID!) {
  runOrError(runId: $id) {
    ... on Run { status stepStats { stepKey status } }
  }
}"""

GRAPH = """
{
  assetNodes {
    assetKey { path }
    description groupName kinds
    owners { ... on TeamAssetOwner { team } ... on UserAssetOwner { email } }
    tags { key value }
    dependencyKeys { path }
  }
}"""

ASSET = """
query($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations(limit: 1) { runId metadataEntries { label __typename } }
      definition {
        assetChecksOrError { ... on AssetChecks { checks { name blocking
          executionForLatestMaterialization { status } } } }
      }
    }
  }
}"""


@pytest.mark.timeout(900)
def test_ui_shows_the_asset_graph_a_main_run_its_checks_and_typed_metadata(s3, mlflow_server, demo_dir, dvc_repo,
                                                                           tmp_path):
    repo, bucket = dvc_repo
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    importer.import_shelf(s3.client(), bucket, demo_dir / "shelf", progress=False).raise_for_failures()
    settings = Settings(home=tmp_path / "home", s3_port=int(s3.endpoint.rsplit(":", 1)[1]),
                        mlflow_port=int(mlflow_server.uri.rsplit(":", 1)[1]), dagster_port=free_port(), bucket=bucket,
                        model_name=f"ui-{bucket}")
    mgr = ServiceManager(settings, extra_env={"SKULENS_PROJECT_DIR": str(repo)})
    try:
        mgr.start("dagster-webserver")
        mgr.start("dagster-daemon")
        url = settings.dagster_url
        run_config = {"ops": {"trained_encoder": {"config": TINY}, "balanced_dataset": {"config": {"depth": 4}}}}
        params = {"selector": {"repositoryLocationName": "skulens", "repositoryName": "__repository__",
                               "jobName": "main"}, "runConfigData": run_config, "mode": "default"}
        launched = _gql(url, LAUNCH, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        deadline = time.monotonic() + 780
        while True:
            run = _gql(url, RUN, {"id": run_id})["runOrError"]
            if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") or time.monotonic() > deadline:
                break
            time.sleep(3)
        steps = {s["stepKey"]: s["status"] for s in run["stepStats"]}
        assert run["status"] == "SUCCESS", steps
        assert ASSETS <= set(steps) and all(v == "SUCCESS" for v in steps.values())
        assert "cleaned_catalog_great_expectations_suite" in steps  # a check's own step

        nodes = {"/".join(n["assetKey"]["path"]): n for n in _gql(url, GRAPH)["assetNodes"]}
        assert set(nodes) == ASSETS
        for name, n in nodes.items():
            assert n["description"] and n["kinds"] and n["owners"] == [{"team": "ml-platform"}], name
            assert {"skulens/domain", "skulens/compute"} <= {t["key"] for t in n["tags"]}, name
        deps = {name: {"/".join(d["path"]) for d in n["dependencyKeys"]} for name, n in nodes.items()}
        assert deps["cleaned_catalog"] >= {"catalog_images", "catalog_products"}
        assert "balanced_dataset" in deps["trained_encoder"] and "trained_encoder" in deps["model_evaluation"]
        assert "registered_model" in deps["sku_index"]

        asset = _gql(url, ASSET, {"key": {"path": ["cleaned_catalog"]}})["assetOrError"]
        mat = asset["assetMaterializations"][0]
        assert mat["runId"] == run_id
        types = {e["label"]: e["__typename"] for e in mat["metadataEntries"]}
        assert types["files_kept"] == "IntMetadataEntry" and types["dropped_files_csv"] == "PathMetadataEntry"
        assert types["sku_roles"] == "MarkdownMetadataEntry"
        checks = {c["name"]: c for c in asset["definition"]["assetChecksOrError"]["checks"]}
        assert checks["dropped_share_below_threshold"]["blocking"]  # bad data stops training
        assert not checks["skus_with_enough_images"]["blocking"]  # a one-packshot SKU is indexed, not a failure
        assert all(c["executionForLatestMaterialization"]["status"] == "SUCCEEDED" for c in checks.values())
    finally:
        mgr.down()

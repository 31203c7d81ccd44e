"""Catalog days, simulated end to end (bench/simulate_days.py, reduced): the real daemon, the catalog
sensor, the nightly schedule evaluated per simulated day and launched through the webserver's GraphQL API
(the launchpad's ``launchRun``), a tiny model. Asserts the invariants of issue 11: new and redesigned SKUs
recognizable after their update, delisted SKUs never returned, no regression promoted, training skipped (with
its reason) when it would not pay; then what the Dagster UI shows of the last nightly run: the asset graph,
the run's steps and checks, and an asset's typed metadata."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASSETS = {"catalog_products", "catalog_images", "shelf_crops", "cleaned_catalog", "balanced_dataset",
          "dataset_version", "trained_encoder", "model_evaluation", "registered_model", "onnx_export", "sku_index"}

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

RUN = """
query($id: ID!) {
  runOrError(runId: $id) {
    ... on Run { status stepStats { stepKey status } }
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


def _simulator():
    spec = importlib.util.spec_from_file_location("simulate_days", ROOT / "bench" / "simulate_days.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["simulate_days"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_timeline_is_seeded_and_deterministic():
    sim = _simulator()
    skus = [f"s{i:02d}" for i in range(30)]
    a = sim.build_timeline(skus, 10, 8, 2, 2, 3, 4, 2, seed=1)
    b = sim.build_timeline(skus, 10, 8, 2, 2, 3, 4, 2, seed=1)
    assert [vars(d) for d in a] == [vars(d) for d in b]
    assert len(a[0].launches) == 8 and all(len(d.launches) == 2 for d in a[1:])
    launched = [s for d in a for s, _ in d.launches]
    assert len(set(launched)) == len(launched)  # a SKU launches once
    assert any(p for d in a for _, p in d.launches)  # some launches are packshot-only
    live = set()
    for d in a:  # redesigns and delistings only touch SKUs live before that day
        assert set(d.redesigns) <= live and set(d.delists) <= live
        live = (live - set(d.delists)) | {s for s, _ in d.launches}


def _ui_view(stack) -> dict:
    """What the Dagster UI shows of the last nightly `main` run, read through the webserver's GraphQL API."""
    import dagster as dg

    run = stack.instance.get_runs(filters=dg.RunsFilter(job_name="main"), limit=1)[0]
    view = {"run_id": run.run_id, "run": stack.gql(RUN, {"id": run.run_id})["runOrError"],
            "nodes": {"/".join(n["assetKey"]["path"]): n for n in stack.gql(GRAPH)["assetNodes"]},
            "cleaned": stack.gql(ASSET, {"key": {"path": ["cleaned_catalog"]}})["assetOrError"]}
    return view


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_simulated_days_keep_the_recognizer_current_and_the_ui_shows_them(tmp_path):
    """About 4 minutes on 2 cores: 3 days, two `main` runs launched through the webserver and run by the daemon."""
    sim = _simulator()
    out = tmp_path / "sim"
    argv = ["--out", str(out), "--source", "demo", "--products", "12", "--initial", "6", "--days", "3",
            "--launches-per-day", "2", "--packshot-every", "2", "--redesign-every", "1", "--delist-every", "2",
            "--bad-every", "1", "--model", "tiny-test", "--epochs", "1", "--batch-size", "8",
            "--shelf-per-sku", "1", "--retrain-min-changed", "4", "--sensor-interval", "2", "--in-process"]
    ui = {}
    env_before = dict(os.environ)
    summary = sim.simulate(sim.parse_args(argv), before_down=lambda stack: ui.update(_ui_view(stack)))
    # the stack's settings (its S3 endpoint, nightly config, retrain threshold, DAGSTER_HOME) do not outlive it
    # in this process: the tests that run after this one in the same worker see the environment they had
    assert dict(os.environ) == env_before
    days = list(csv.DictReader(open(out / "days.csv")))
    uploads = list(csv.DictReader(open(out / "uploads.csv")))
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["days"] == 3 and len(days) == 3
    assert summary["update_failures"] == 0 and summary["main_failures"] == 0
    # every launch (a packshot-only one too) and every redesign is recognizable after its update
    assert {u["group"] for u in uploads} == {"new", "redesigned"}
    assert all(u["seconds_to_recognizable"] not in ("", None) for u in uploads), uploads
    assert summary["recognizable"] == summary["uploads_probed"] == 6
    assert summary["not_indexable"] == summary["indexable_not_recognized"] == 0
    # delisted on day 2: never returned afterwards
    assert summary["delisted_returned"] == 0 and int(days[2]["delisted"]) == 1
    # day 0 trains the first champion; day 1 changes 3 trainable SKUs (a launch, a redesign, a SKU with a bad
    # upload) < 4: skipped, and says why; day 2 brings the count since the champion to 6: retrained
    assert days[0]["nightly"] == "ran" and days[0]["decision"] == "promoted"
    assert days[1]["nightly"] == "skipped" and "nothing to retrain" in days[1]["reason"], days[1]
    assert days[2]["nightly"] == "ran" and days[2]["decision"] in ("promoted", "kept-champion")
    # whatever day 2 decided, a promotion never lowered top-1 on the day's crops
    assert summary["days_a_promotion_lowered_top1"] == []
    assert (out / "report.html").read_text().count("data:image/png;base64") == 3

    # ---- the UI's view of day 2's nightly run (launched like the launchpad does, run by the daemon)
    steps = {s["stepKey"]: s["status"] for s in ui["run"]["stepStats"]}
    assert ui["run"]["status"] == "SUCCESS", steps
    assert ASSETS <= set(steps) and all(v == "SUCCESS" for v in steps.values()), steps
    assert "cleaned_catalog_great_expectations_suite" in steps  # a check's own step
    nodes = ui["nodes"]
    assert set(nodes) == ASSETS
    for name, n in nodes.items():
        assert n["description"] and n["kinds"] and n["owners"] == [{"team": "ml-platform"}], name
        assert {"skulens/domain", "skulens/compute"} <= {t["key"] for t in n["tags"]}, name
    deps = {name: {"/".join(d["path"]) for d in n["dependencyKeys"]} for name, n in nodes.items()}
    assert deps["cleaned_catalog"] >= {"catalog_images", "catalog_products"}
    assert "balanced_dataset" in deps["trained_encoder"] and "trained_encoder" in deps["model_evaluation"]
    assert "registered_model" in deps["sku_index"]
    mat = ui["cleaned"]["assetMaterializations"][0]
    assert mat["runId"] == ui["run_id"]
    types = {e["label"]: e["__typename"] for e in mat["metadataEntries"]}
    assert types["files_kept"] == "IntMetadataEntry" and types["dropped_files_csv"] == "PathMetadataEntry"
    assert types["sku_roles"] == "MarkdownMetadataEntry"
    checks = {c["name"]: c for c in ui["cleaned"]["definition"]["assetChecksOrError"]["checks"]}
    assert checks["dropped_share_below_threshold"]["blocking"]  # bad data stops training
    assert not checks["skus_with_enough_images"]["blocking"]  # a one-packshot SKU is indexed, not a failure
    status = {n: c["executionForLatestMaterialization"]["status"] for n, c in checks.items()}
    # the bad uploads are recorded drops under the threshold; packshot-only launches make the roles check warn
    assert all(v == "SUCCEEDED" for n, v in status.items() if checks[n]["blocking"]), status
    assert status["skus_with_enough_images"] in ("SUCCEEDED", "FAILED"), status

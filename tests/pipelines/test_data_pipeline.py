"""Clean -> checks -> balance -> DVC version, through Dagster against real S3, plus `dvc repro` outside Dagster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from assets import datasets as dataset_assets
from assets import ingest as ingest_assets
from assets import quality
from skulens.catalog import importer
from skulens.catalog.s3 import list_objects
from tests.conftest import pipeline_resources

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _resources(s3, bucket, repo, home):
    return pipeline_resources(s3, bucket, repo, home)


ASSETS = [ingest_assets.catalog_products, ingest_assets.catalog_images, quality.cleaned_catalog,
          dataset_assets.balanced_dataset, quality.dataset_version]
CHECKS = [quality.dropped_share_below_threshold, quality.no_sku_copies_another, quality.skus_with_enough_images,
          quality.products_sku_unique, quality.great_expectations_suite]


@pytest.fixture
def instance(dagster_instance):
    return dagster_instance


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


@pytest.mark.slow
def test_demo_catalog_is_cleaned_checked_balanced_and_versioned(s3, demo_dir, dvc_repo, tmp_path, instance):
    repo, bucket = dvc_repo
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    result = dg.materialize(ASSETS + CHECKS, resources=_resources(s3, bucket, repo, tmp_path / "state"),
                            instance=instance)
    assert result.success
    checks = _checks(result)
    assert checks["dropped_share_below_threshold"] and checks["great_expectations_suite"]
    assert checks["products_sku_unique"] and checks["no_sku_copies_another"]
    assert checks["skus_with_enough_images"]  # the demo's two-image SKU is kept (index-only), nothing dropped

    cleaned = result.output_for_node("cleaned_catalog")
    reasons = dict(zip(cleaned.dropped_files["key"].str.rsplit("/", n=1).str[-1], cleaned.dropped_files["reason"]))
    assert {"empty.jpg", "error-page.jpg", "truncated.jpg", "thumb.jpg"} <= set(reasons)
    assert ("00-copy.jpg" in reasons) != ("00.jpg" in reasons)  # one of the two identical files is kept
    assert len(set(reasons.values())) >= 5
    # the lone two-image SKU (8 demo SKUs + 1) is kept as an index-only SKU: indexed, not trained on
    roles = cleaned.sku_roles.set_index("sku")["role"]
    assert roles["demo-009"] == "index" and (roles.drop("demo-009") == "train").all()
    assert "demo-009" not in set(cleaned.dropped_skus["sku"])
    clean_dir = repo / "data" / "clean"
    assert (clean_dir / "manifest.parquet").exists() and (clean_dir / "dropped_files.csv").exists()
    assert len(list((clean_dir / "images").rglob("*"))) >= len(cleaned.kept)

    bal = result.output_for_node("balanced_dataset")
    assert set(bal["train"].groupby("sku").size()) == {bal["depth"]}
    assert set(bal["train"]["sku"]) == set(cleaned.kept["sku"]) - {"demo-009"}

    version = result.output_for_node("dataset_version")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert version["clean_md5"] == next(o["md5"] for o in lock["stages"]["clean"]["outs"] if o["path"] == "data/clean")
    assert version["balanced_md5"] and len(version["git_rev"]) == 40
    # the pipeline's own outputs (data/, dvc.lock: ignored, not shipped) do not make the checkout dirty
    assert version["git_dirty"] is False
    pushed = list(list_objects(s3.client(), bucket, "dvc/"))
    assert len(pushed) >= len(cleaned.kept)  # every kept image is in the DVC remote on S3

    # outside Dagster: `dvc status` agrees the workspace matches dvc.lock, and `dvc repro` rebuilds the same data
    env = dict(os.environ, SKULENS_S3_ENDPOINT=s3.endpoint, SKULENS_BUCKET=bucket, SKULENS_HOME=str(tmp_path / "state"),
               PATH=f"{BIN}:{os.environ['PATH']}")
    st = subprocess.run([str(BIN / "dvc"), "status", "clean", "balance"], cwd=repo, env=env, capture_output=True, text=True)
    assert st.returncode == 0 and "changed" not in st.stdout, st.stdout
    shutil.rmtree(repo / "data" / "clean")
    shutil.rmtree(repo / "data" / "balanced")
    rp = subprocess.run([str(BIN / "dvc"), "repro", "--force"], cwd=repo, env=env, capture_output=True, text=True,
                        timeout=600)
    assert rp.returncode == 0, rp.stderr[-3000:] + rp.stdout[-3000:]
    kept_again = pd.read_parquet(repo / "data" / "clean" / "manifest.parquet")
    assert sorted(kept_again["sha256"]) == sorted(cleaned.kept["sha256"])
    # same data + same params -> the same dataset version, whether Dagster or `dvc repro` built it
    lock2 = yaml.safe_load((repo / "dvc.lock").read_text())
    assert next(o["md5"] for o in lock2["stages"]["clean"]["outs"] if o["path"] == "data/clean") == version["clean_md5"]


def test_blocking_check_stops_training_data_on_a_bad_catalog(s3, tmp_path, dvc_repo, instance):
    repo, bucket = dvc_repo
    src = tmp_path / "bad"
    from skulens.catalog.demo import write_demo

    write_demo(src, n_skus=4, images_per_sku=3, crops_per_sku=0, photos=0, bad_files=False)
    for i, d in enumerate(sorted((src / "catalog" / "images").iterdir())):
        for j in range(2):
            (d / f"broken{j}.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(3000))  # corrupt JPEGs: 40% of files
    importer.import_catalog(s3.client(), bucket, src / "catalog", progress=False).raise_for_failures()
    result = dg.materialize(ASSETS + CHECKS, resources=_resources(s3, bucket, repo, tmp_path / "state"),
                            instance=instance, raise_on_error=False)
    checks = _checks(result)
    assert checks["dropped_share_below_threshold"] is False
    materialized = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert "cleaned_catalog" in materialized
    assert "balanced_dataset" not in materialized and "dataset_version" not in materialized


def test_the_checks_enforce_the_threshold_set_once_on_the_asset(s3, demo_dir, dvc_repo, tmp_path, instance):
    """max_dropped_share is set once, in cleaned_catalog's launchpad config; the blocking checks read it from the
    cleaned catalog (no copy of the cleaning config on the checks)."""
    repo, bucket = dvc_repo
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    strict = dg.RunConfig(ops={"cleaned_catalog": quality.CleanSettings(max_dropped_share=0.01)})
    result = dg.materialize(ASSETS[:3] + [quality.dropped_share_below_threshold, quality.great_expectations_suite],
                            resources=_resources(s3, bucket, repo, tmp_path / "state"), instance=instance,
                            run_config=strict, raise_on_error=False)
    evals = {e.check_name: e for e in result.get_asset_check_evaluations()}
    share = result.output_for_node("cleaned_catalog").stats["share_dropped"]
    assert 0.01 < share <= 0.2  # the demo's bad files: over the strict threshold, under the default one
    assert not evals["dropped_share_below_threshold"].passed
    assert evals["dropped_share_below_threshold"].metadata["max_share"].value == 0.01
    assert not evals["great_expectations_suite"].passed
    report = Path(evals["great_expectations_suite"].metadata["report_html"].value)
    assert report.is_file() and "FAILED" in report.read_text()  # the offline report of that check

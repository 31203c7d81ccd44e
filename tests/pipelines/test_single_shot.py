"""The single-shot setting through Dagster on real S3 + MLflow: a packshot-only catalog (one image per
SKU) runs `main` to a published index and a correct recognition; a mixed catalog trains on its rich
SKUs and indexes all of them, the sparse ones with shelf-like views, in the full build and in
index_update alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from assets import datasets as dataset_assets
from assets import evaluation, index, quality, training
from assets import ingest as ingest_assets
from skulens.catalog import importer
from tests.conftest import pipeline_resources

ASSETS = [ingest_assets.catalog_products, ingest_assets.catalog_images, ingest_assets.shelf_crops,
          quality.cleaned_catalog, dataset_assets.balanced_dataset, quality.dataset_version,
          training.trained_encoder, evaluation.model_evaluation, evaluation.registered_model, index.sku_index]
CHECKS = [quality.dropped_share_below_threshold, quality.skus_with_enough_images]
TINY = {"model": "tiny-test", "epochs": 1, "batch_size": 8, "base_lr": 2e-3, "arcface_lr": 2e-2}
VIEWS = 2  # shelf-like views per image of a sparse SKU (small: tests stay fast)


def _run(res, instance, ops: dict | None = None):
    cfg = {"trained_encoder": training.TrainSettings(**TINY),
           "balanced_dataset": dataset_assets.BalanceSettings(depth=6),
           "model_evaluation": evaluation.EvalSettings(n_aug=2, sparse_views=VIEWS, include_base=False),
           "sku_index": index.IndexSettings(sparse_views=VIEWS), **(ops or {})}
    result = dg.materialize(ASSETS + CHECKS, resources=res, instance=instance, run_config=dg.RunConfig(ops=cfg))
    assert result.success
    return result


def _recognizer(res, s3, bucket, tmp_path):
    from skulens.serving.recognize import Recognizer

    store = res["mlflow"].store(Path(res["state"].home) / "cache" / "models")
    return Recognizer.from_services(res["mlflow"].tracking_uri, res["mlflow"].model_name, s3.client(), bucket,
                                    tmp_path / "rec", store=store)


def test_packshot_only_catalog_is_indexed_and_recognized(s3, mlflow_server, dvc_repo, tmp_path, dagster_instance):
    from skulens.catalog.demo import write_demo

    demo = tmp_path / "demo"
    write_demo(demo, n_skus=8, images_per_sku=1, crops_per_sku=2, photos=0, bad_files=False)
    repo, bucket = dvc_repo
    client = s3.client()
    importer.import_catalog(client, bucket, demo / "catalog", progress=False).raise_for_failures()
    importer.import_shelf(client, bucket, demo / "shelf", progress=False).raise_for_failures()
    res = pipeline_resources(s3, bucket, repo, tmp_path / "state", mlflow_server.uri)
    r = _run(res, dagster_instance)

    cleaned = r.output_for_node("cleaned_catalog")
    assert cleaned.stats["files_dropped"] == 0 and cleaned.stats["skus_index_only"] == 8
    assert set(cleaned.kept["role"]) == {"index"}
    assert len(r.output_for_node("balanced_dataset")["train"]) == 0
    trained = r.output_for_node("trained_encoder")
    assert trained["skipped"] and trained["base_tower"] and "training skipped" in trained["reason"]
    ev = r.output_for_node("model_evaluation")
    m = ev["models"]["challenger"]["metrics"]["catalog"]
    assert m["n_sparse"] == ev["n_crops"] == 16 and m["n_rich"] == 0  # every SKU is sparse here
    reg = r.output_for_node("registered_model")
    assert reg["promoted"] and reg["version"] == "1"  # the base tower is the first model
    idx = r.output_for_node("sku_index")
    assert idx["published"] and idx["count"] == 8 * (1 + VIEWS) and idx["n_skus"] == 8

    rec = _recognizer(res, s3, bucket, tmp_path)
    assert rec.model_version == "1" and rec.index.meta["sparse"]["skus"] == 8
    packshot = sorted((demo / "catalog" / "images").glob("*/00.jpg"))[3]
    hit = rec.recognize(str(packshot), k=3)[0]
    assert hit["sku"] == packshot.parent.name and hit["score"] == pytest.approx(1.0, abs=1e-4)

    # a second run with nothing new: training skipped again, the champion stays, nothing registered
    r2 = _run(res, dagster_instance)
    t2 = r2.output_for_node("trained_encoder")
    assert t2["skipped"] and t2["encoder_uri"] is None and "champion v1 stays" in t2["reason"]
    assert r2.output_for_node("registered_model")["version"] is None
    ev2 = r2.output_for_node("model_evaluation")
    assert "challenger" not in ev2["models"] and ev2["champion_version"] == "1"
    assert r2.output_for_node("sku_index")["model_version"] == "1"


def test_mixed_catalog_trains_on_rich_skus_and_indexes_all(s3, mlflow_server, dvc_repo, tmp_path, dagster_instance):
    from skulens.catalog.demo import write_demo
    from skulens.index.publish import load_current

    demo = tmp_path / "demo"
    write_demo(demo, n_skus=9, images_per_sku=4, crops_per_sku=2, photos=0, bad_files=False)
    sparse = sorted(p.name for p in (demo / "catalog" / "images").iterdir())[-3:]
    for sku in sparse:  # three launches with one packshot each
        for f in sorted((demo / "catalog" / "images" / sku).glob("*.jpg"))[1:]:
            f.unlink()
    repo, bucket = dvc_repo
    client = s3.client()
    importer.import_catalog(client, bucket, demo / "catalog", progress=False).raise_for_failures()
    importer.import_shelf(client, bucket, demo / "shelf", progress=False).raise_for_failures()
    res = pipeline_resources(s3, bucket, repo, tmp_path / "state", mlflow_server.uri)
    r = _run(res, dagster_instance, {"trained_encoder": training.TrainSettings(**TINY, min_train_images=12)})

    roles = r.output_for_node("cleaned_catalog").sku_roles.set_index("sku")["role"]
    assert sorted(roles[roles == "index"].index) == sparse and (roles == "train").sum() == 6
    bal = r.output_for_node("balanced_dataset")
    assert set(bal["train"]["sku"]) == set(roles[roles == "train"].index)  # trained on the rich SKUs only
    trained = r.output_for_node("trained_encoder")
    assert not trained.get("skipped") and trained["encoder_uri"].startswith("runs:/")
    m = r.output_for_node("model_evaluation")["models"]["challenger"]["metrics"]["catalog"]
    assert m["n_sparse"] == 3 * 2 and m["n_rich"] == 6 * 2
    idx = r.output_for_node("sku_index")
    assert idx["n_skus"] == 9 and idx["count"] == 6 * 4 + 3 * (1 + VIEWS)  # every SKU, sparse ones with views

    # index_update applies the same rule to a new packshot-only SKU (no retraining)
    new = demo / "new-sku"
    shutil.copytree(demo / "catalog" / "images" / sparse[0], new / "images" / "NEW-001")
    (new / "products.csv").write_text((demo / "catalog" / "products.csv").read_text()
                                      + "NEW-001,New Launch 100 g,snacks,Acme,100 g\n")
    (new / "images" / "NEW-001" / "00.jpg").write_bytes(
        _other_image((demo / "catalog" / "images" / sparse[0] / "00.jpg")))
    importer.import_catalog(client, bucket, new, progress=False).raise_for_failures()
    from assets import index_update

    result = index_update.index_update.execute_in_process(resources=res, instance=dagster_instance)
    assert result.success
    current, _ = load_current(client, bucket, cache_dir=tmp_path / "idx")
    keys = [k for k, s in zip(current.keys, current.skus) if s == "NEW-001"]
    assert len(keys) == 1 + current.meta["sparse"]["views"] and current.meta["sparse"]["views"] == VIEWS


def _other_image(path: Path) -> bytes:
    """A different, valid JPEG (a new product's packshot): the demo packshot mirrored."""
    import io

    from PIL import Image, ImageOps

    buf = io.BytesIO()
    ImageOps.mirror(Image.open(path).convert("RGB")).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _failure_text(result) -> str:
    evs = [e for e in result.all_events if e.is_step_failure]
    assert evs, "expected a step failure"
    err = evs[0].step_failure_data.error
    return " ".join(filter(None, [err.message, *(c.message for c in [err.cause] if c)]))


def test_a_catalog_with_no_usable_image_fails_with_one_clear_line(s3, dvc_repo, tmp_path, dagster_instance):
    cat = tmp_path / "bad"
    (cat / "images" / "SKU-1").mkdir(parents=True)
    (cat / "images" / "SKU-1" / "a.jpg").write_bytes(b"<html>502 Bad Gateway</html>" + b" " * 2000)
    (cat / "images" / "SKU-1" / "b.jpg").write_bytes(b"")
    (cat / "products.csv").write_text("sku,name\nSKU-1,Broken Product\n")
    repo, bucket = dvc_repo
    importer.import_catalog(s3.client(), bucket, cat, progress=False).raise_for_failures()
    res = pipeline_resources(s3, bucket, repo, tmp_path / "state")
    result = dg.materialize([ingest_assets.catalog_products, ingest_assets.catalog_images, quality.cleaned_catalog],
                            resources=res, instance=dagster_instance, raise_on_error=False)
    assert not result.success
    text = _failure_text(result)
    assert "skulens error: no usable catalog image: all 2 file(s) were dropped" in text
    assert "NOT_AN_IMAGE 1" in text and "EMPTY 1" in text and "dropped_files.csv" in text


def test_shelf_crops_of_unknown_skus_fail_with_one_clear_line(s3, mlflow_server, dvc_repo, tmp_path, dagster_instance):
    from skulens.catalog.demo import write_demo

    demo = tmp_path / "demo"
    write_demo(demo, n_skus=4, images_per_sku=1, crops_per_sku=1, photos=0, bad_files=False)
    shelf = tmp_path / "shelf"
    for i, crop in enumerate(sorted((demo / "shelf").glob("*/crop00.jpg"))):
        (shelf / f"OTHER-{i}").mkdir(parents=True)
        (shelf / f"OTHER-{i}" / "c.jpg").write_bytes(crop.read_bytes())
    repo, bucket = dvc_repo
    importer.import_catalog(s3.client(), bucket, demo / "catalog", progress=False).raise_for_failures()
    importer.import_shelf(s3.client(), bucket, shelf, progress=False).raise_for_failures()
    res = pipeline_resources(s3, bucket, repo, tmp_path / "state", mlflow_server.uri)
    cfg = {"trained_encoder": training.TrainSettings(**TINY)}
    result = dg.materialize(ASSETS[:8], resources=res, instance=dagster_instance, raise_on_error=False,
                            run_config=dg.RunConfig(ops=cfg))
    assert not result.success
    text = _failure_text(result)
    assert "skulens error: none of the 4 SKUs of the shelf crops is in the cleaned catalog" in text


def test_skulens_run_reports_the_error_line_and_the_log(tmp_path):
    """`skulens run` echoes the job's output, keeps it in a log, and names the one-line cause."""
    import sys

    from skulens.ops.cli import _run_logged

    code = ("import sys; print('lots of events'); "
            "print('dagster._core.definitions.events.Failure: skulens error: no usable catalog image: all 3 dropped'); "
            "print('Traceback (most recent call last): ...'); "
            "print('    raise dg.Failure(f\\'skulens error: no usable catalog image: all {n} dropped\\')'); sys.exit(1)")
    rc, log, error = _run_logged([sys.executable, "-c", code], {}, tmp_path, tmp_path / "logs" / "run.log")
    assert rc == 1 and error == "no usable catalog image: all 3 dropped"
    assert "lots of events" in log.read_text() and "Traceback" in log.read_text()


def test_skulens_run_console_shows_events_not_debug_or_tracebacks():
    from skulens.ops.cli import _ConsoleFilter

    ev = "2026-12-01 16:07:30 +0000 - dagster - {} - main - 75c2 - 16307 - cleaned_catalog - {}\n"
    lines = [
        ("running Dagster job 'main' ...\n", True),
        (ev.format("DEBUG", "STEP_START - Started execution"), False),
        (ev.format("INFO", "cleaned 2 files"), True),
        ("/x/site-packages/dagster/sensor_definition.py:809: BetaWarning: Parameter `owners` is in beta\n", False),
        ("  return SensorDefinition(\n", False),
        (ev.format("ERROR", 'STEP_FAILURE - Execution of step "cleaned_catalog" failed.'), True),
        ("dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred while executing op:\n", False),
        ("\n", False),
        ("The above exception was caused by the following exception:\n", False),
        ("dagster._core.definitions.events.Failure: skulens error: no usable catalog image\n", False),
        ("  File \"/work/main/assets/quality.py\", line 53, in cleaned_catalog\n", False),
        (ev.format("ERROR", "sku_index - Dependencies for step sku_index failed: ['x']. Not executing."), False),
        (ev.format("ERROR", 'RUN_FAILURE - Execution of run for "main" failed.'), True),
    ]
    show = _ConsoleFilter()
    assert [show(line) for line, _ in lines] == [want for _, want in lines]

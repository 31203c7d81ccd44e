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
           "model_evaluation": evaluation.EvalSettings(n_aug=2, include_base=False), **(ops or {})}
    from resources import SparseViewsResource

    res = {**res, "sparse_views": SparseViewsResource(views=VIEWS)}  # one rule for the evaluation and the index
    result = dg.materialize(ASSETS + CHECKS, resources=res, instance=instance, run_config=dg.RunConfig(ops=cfg))
    assert result.success
    return result


def _recognizer(res, s3, bucket, tmp_path):
    from skulens.serving.recognize import Recognizer

    store = res["mlflow"].store(Path(res["state"].home) / "cache" / "models")
    return Recognizer.from_services(res["mlflow"].tracking_uri, res["mlflow"].model_name, s3.client(), bucket,
                                    tmp_path / "rec", store=store)


@pytest.mark.slow
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
    split = ev["models"]["challenger"]["open_set"]["catalog"]["metrics"]  # the base tower: nothing was seen
    assert ev["models"]["challenger"]["trained_skus"] == 0 and split["n_seen"] == 0 and split["n_unseen"] == 16
    assert split["top1_unseen"] == pytest.approx(m["top1"]) and "top1_seen" not in split
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
    assert ev2["models"]["champion"]["open_set"]["catalog"]["metrics"]["n_unseen"] == 16  # v1: the base tower
    assert r2.output_for_node("sku_index")["model_version"] == "1"


@pytest.mark.slow
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
    # the open-set claim: the three launches were never trained on; their crops are the unseen ones
    meta = {k: v.value for k, v in r.asset_materializations_for_node("model_evaluation")[-1].metadata.items()}
    assert meta["challenger_catalog_n_seen"] == 6 * 2 and meta["challenger_catalog_n_unseen"] == 3 * 2
    assert 0 <= meta["challenger_catalog_top1_unseen"] <= 1 and 0 <= meta["challenger_catalog_top1_seen"] <= 1
    assert meta["challenger_catalog_n_seen"] * meta["challenger_catalog_top1_seen"] + meta[
        "challenger_catalog_n_unseen"] * meta["challenger_catalog_top1_unseen"] == pytest.approx(18 * m["top1"], abs=1e-3)
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


def test_skulens_run_console_shows_only_runner_lines_and_keeps_all_in_the_log(tmp_path, capsys):
    """`skulens run` shows the runner's console lines, and keeps Dagster's events, warnings and tracebacks
    in the log; the failed asset and its cause come back as the one-line error."""
    import sys

    from skulens.ops.cli import MARK, PROGRESS, _run_logged

    code = ("import sys; "
            "print('2026-12-01 16:07:30 +0000 - dagster - DEBUG - main - STEP_START'); "
            f"print({MARK!r} + 'cleaned_catalog       3.2s  kept 30/32 files'); "
            f"print('Downloading artifacts: 100%|###| 1/1\\r' + {MARK!r} + 'model_evaluation  1m00s  top-1 91.9%'); "
            f"print({PROGRESS!r} + 'trained_encoder    running 20.0s'); "
            "print('/x/sensor_definition.py:809: BetaWarning: Parameter owners is in beta'); "
            "print('Traceback (most recent call last): ...'); "
            f"print({MARK!r} + 'skulens error: trained_encoder: out of memory'); sys.exit(1)")
    rc, log, error = _run_logged([sys.executable, "-c", code], {}, tmp_path, tmp_path / "logs" / "run.log")
    shown = capsys.readouterr().out
    assert rc == 1 and error == "trained_encoder: out of memory"
    assert "cleaned_catalog       3.2s  kept 30/32 files" in shown and "trained_encoder    running" in shown
    assert "model_evaluation  1m00s  top-1 91.9%" in shown and "Downloading" not in shown  # after a tqdm bar
    assert "DEBUG" not in shown and "BetaWarning" not in shown and "Traceback" not in shown
    kept = log.read_text()
    assert "STEP_START" in kept and "BetaWarning" in kept and "Traceback" in kept


def test_skulens_run_says_why_when_the_runner_dies_outside_a_step(tmp_path, capsys):
    import sys

    from skulens.ops.cli import _run_logged

    code = "import sys; print('ModuleNotFoundError: No module named pipelines'); sys.exit(1)"
    rc, _, error = _run_logged([sys.executable, "-c", code], {}, tmp_path, tmp_path / "run.log")
    assert rc == 1 and error == "ModuleNotFoundError: No module named pipelines"


def test_job_runner_prints_one_line_per_asset_check_and_failure(tmp_path):
    """pipelines.console executes through Dagster's in-process API on a real instance: one line per asset
    (duration + key figure), one per check, and the failed asset with its skulens error."""
    from pipelines.console import run_job

    @dg.asset
    def cleaned_catalog():
        return dg.MaterializeResult(metadata={"files_in": 32, "files_kept": 30, "skus_kept": 8, "skus_train": 7,
                                              "skus_index_only": 1})

    @dg.asset_check(asset=cleaned_catalog, blocking=True)
    def enough_images():
        return dg.AssetCheckResult(passed=True)

    @dg.asset(deps=[cleaned_catalog])
    def trained_encoder():
        raise dg.Failure("skulens error: no SKU has 3 images: upload more")

    @dg.asset(deps=[trained_encoder])
    def sku_index():
        return 1

    defs = dg.Definitions(assets=[cleaned_catalog, trained_encoder, sku_index], asset_checks=[enough_images],
                          jobs=[dg.define_asset_job("main", selection=dg.AssetSelection.all())])
    lines = []
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        ok, run_id, failed = run_job("main", instance=instance, defs=defs, emit=lines.append)
        assert instance.get_run_by_id(run_id).is_failure  # the run is in the instance, as in the UI
    assert not ok and failed == [("trained_encoder", "skulens error: no SKU has 3 images: upload more")]
    cleaned = [ln for ln in lines if ln.startswith("cleaned_catalog ")]
    assert len(cleaned) == 1 and cleaned[0].endswith("kept 30/32 files, 8 SKUs (7 to train, 1 index-only)")
    assert any(ln.split()[:3] == ["check", "enough_images", "passed"] for ln in lines)
    assert not any(ln.startswith("cleaned_catalog_enough_images") for ln in lines)  # no bare step line for a check
    assert any(ln.startswith("trained_encoder") and "FAILED  skulens error: no SKU has 3 images" in ln for ln in lines)
    assert not any(ln.startswith("sku_index") and "s  " in ln for ln in lines)  # never ran

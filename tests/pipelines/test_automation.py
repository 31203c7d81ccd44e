"""Catalog sensor, champion sensor, nightly skip logic and the incremental index update, on real S3 + MLflow."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest

from assets.index_update import index_update
from pipelines import automation
from resources import LocalStateResource, S3Resource
from resources.mlflow import MlflowResource
from skulens.catalog import importer
from skulens.index.update import index_delta

KEY = dg.EnvVar("SKULENS_S3_ACCESS_KEY_ID")
SECRET = dg.EnvVar("SKULENS_S3_SECRET_ACCESS_KEY")


def _s3(s3, bucket):
    return S3Resource(endpoint_url=s3.endpoint, bucket=bucket, access_key_id=KEY, secret_access_key=SECRET)


def test_index_delta_per_sku():
    indexed = {"catalog/images/a/1.jpg": "e1", "catalog/images/b/1.jpg": "e2", "catalog/images/c/1.jpg": "e3"}
    current = {"catalog/images/a/1.jpg": "e1", "catalog/images/b/1.jpg": "CHANGED", "catalog/images/d/1.jpg": "e4"}
    d = index_delta(current, indexed)
    assert d.changed_skus == ["b", "d"] and d.removed_skus == ["c"]
    assert index_delta(indexed, indexed).empty


def test_catalog_sensor_one_run_per_batch_and_cursor_survives_restart(s3, demo_dir):
    bucket = s3.new_bucket("sens")
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    sensor = automation.catalog_sensor(index_update)
    resources = {"s3": _s3(s3, bucket)}

    ctx = dg.build_sensor_context(resources=resources)
    first = sensor(ctx)
    assert isinstance(first, dg.RunRequest) and first.run_key.startswith("catalog-")
    cursor = ctx.cursor
    assert json.loads(cursor)["images"] > 0

    # nothing changed: no run
    ctx2 = dg.build_sensor_context(cursor=cursor, resources=resources)
    assert isinstance(sensor(ctx2), dg.SkipReason)

    # a batch of uploads (a new SKU with 2 images) -> exactly one run request
    c = s3.client()
    img = next((demo_dir / "catalog" / "images").rglob("00.jpg")).read_bytes()
    c.put_object(Bucket=bucket, Key="catalog/images/new-sku/a.jpg", Body=img)
    c.put_object(Bucket=bucket, Key="catalog/images/new-sku/b.jpg", Body=img + b"\0")
    ctx3 = dg.build_sensor_context(cursor=cursor, resources=resources)
    batch = sensor(ctx3)
    assert isinstance(batch, dg.RunRequest) and batch.run_key != first.run_key

    # "daemon restart": a fresh evaluation with the persisted cursor does not repeat the batch
    ctx4 = dg.build_sensor_context(cursor=ctx3.cursor, resources=resources)
    assert isinstance(sensor(ctx4), dg.SkipReason)


def test_catalog_sensor_lists_a_big_catalog_over_several_ticks(s3, demo_dir):
    """A catalog too big for one tick's listing budget: each tick lists from where the last stopped
    (position and running fingerprint in the cursor), and only a finished listing can request a run."""
    from skulens.catalog.state import catalog_state

    bucket = s3.new_bucket("sensbig")
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    sensor = automation.catalog_sensor(index_update, scan_budget_s=0.0, page_size=10)  # one page a tick
    resources = {"s3": _s3(s3, bucket)}

    def until_done(cursor):
        ticks = 0
        while True:
            ctx = dg.build_sensor_context(cursor=cursor, resources=resources)
            out = sensor(ctx)
            ticks += 1
            cursor = ctx.cursor
            if isinstance(out, dg.SkipReason) and "in progress" in out.skip_message:
                assert json.loads(cursor)["scan"]["n"] > 0
                continue
            return out, cursor, ticks

    first, cursor, ticks = until_done(None)
    n = len(catalog_state(s3.client(), bucket).images)
    assert ticks >= n // 10 >= 3 and isinstance(first, dg.RunRequest)  # a tick per page of 10 keys
    fp = catalog_state(s3.client(), bucket).set_fingerprint
    assert first.tags["skulens/catalog"] == fp[:16] and first.run_key == f"catalog-{fp[:24]}"
    assert json.loads(cursor) == {"fingerprint": fp, "images": n}

    # a full listing later with nothing changed: no run, and the cursor is back to the settled state
    again, cursor2, _ = until_done(cursor)
    assert isinstance(again, dg.SkipReason) and "unchanged" in again.skip_message
    assert json.loads(cursor2) == {"fingerprint": fp, "images": n}

    # an upload: the next finished listing requests exactly one run, for the new state
    img = next((demo_dir / "catalog" / "images").rglob("00.jpg")).read_bytes()
    s3.client().put_object(Bucket=bucket, Key="catalog/images/aaa-new/a.jpg", Body=img)
    batch, cursor3, _ = until_done(cursor2)
    fp2 = catalog_state(s3.client(), bucket).set_fingerprint
    assert isinstance(batch, dg.RunRequest) and batch.run_key == f"catalog-{fp2[:24]}" != first.run_key
    assert json.loads(cursor3)["images"] == n + 1


def _register_champion(mlflow_uri, model_name, tmp_path):
    """Put a (tiny, untrained) encoder in the registry as champion: the index path needs no training."""
    from skulens.model.factory import ModelSpec, create_encoder
    from skulens.model.io import save_encoder
    from skulens.registry.model_registry import log_and_register, promote

    enc = create_encoder(ModelSpec(name="tiny-test"))
    path = save_encoder(enc, tmp_path / "enc" / "encoder.pt")
    version = log_and_register(mlflow_uri, model_name, str(path), metrics={"top1": 0.5}, params={}, tags={},
                               lineage={"eval_set": "t"})
    promote(mlflow_uri, model_name, version)
    return str(version)


def test_new_sku_recognizable_and_deleted_sku_gone_without_training(s3, mlflow_server, demo_dir, tmp_path):
    bucket = s3.new_bucket("upd")
    model_name = f"m-{bucket}"
    version = _register_champion(mlflow_server.uri, model_name, tmp_path)
    src = tmp_path / "cat"
    shutil.copytree(demo_dir / "catalog", src)
    new_dir = src / "images" / "brand-new"
    importer.import_catalog(s3.client(), bucket, src, progress=False).raise_for_failures()
    resources = {"s3": _s3(s3, bucket), "state": LocalStateResource(home=str(tmp_path / "state")),
                 "mlflow": MlflowResource(tracking_uri=mlflow_server.uri, model_name=model_name)}

    first = index_update.execute_in_process(resources=resources)
    assert first.success
    out1 = first.output_for_node("update_sku_index")
    assert out1["published"] and len(out1["changed_skus"]) >= 8  # full build: the model had no index

    # a new product arrives: only it is embedded
    from skulens.catalog.demo import Product, _jpeg_bytes, render_packshot

    new_dir.mkdir()
    p = Product(sku="brand-new", name="New", category="snacks", shape="can", brand="NEWBRAND",
                primary=(10, 200, 120), secondary=(250, 20, 200), pattern="dots", logo="star", size="1 l")
    for v in range(2):
        (new_dir / f"{v}.jpg").write_bytes(_jpeg_bytes(render_packshot(p, view=v), 92))
    products = (src / "products.csv").read_text()
    (src / "products.csv").write_text(products + "brand-new,New,snacks,NEWBRAND,1 l\n")  # listed: indexable
    importer.import_catalog(s3.client(), bucket, src, progress=False).raise_for_failures()
    second = index_update.execute_in_process(resources=resources)
    out2 = second.output_for_node("update_sku_index")
    assert out2["changed_skus"] == ["brand-new"] and out2["removed_skus"] == []
    mats = second.asset_materializations_for_node("update_sku_index")
    assert mats and mats[0].asset_key == dg.AssetKey("sku_index")

    from skulens.serving.recognize import Recognizer

    rec = Recognizer.from_services(mlflow_server.uri, model_name, s3.client(), bucket, cache_dir=tmp_path / "rc")
    assert rec.index_version == out2["published"] and str(rec.model_version) == version
    hit = rec.recognize([str(new_dir / "0.jpg")], k=3)[0]
    assert hit["sku"] == "brand-new"

    # the user deletes a SKU from the catalog: it leaves the index
    gone = "demo-002"
    for obj in list(s3.client().list_objects_v2(Bucket=bucket, Prefix=f"catalog/images/{gone}/")["Contents"]):
        s3.client().delete_object(Bucket=bucket, Key=obj["Key"])
    third = index_update.execute_in_process(resources=resources)
    out3 = third.output_for_node("update_sku_index")
    assert out3["removed_skus"] == [gone] and out3["changed_skus"] == []
    rec.maybe_reload(force=True)
    assert gone not in rec.index.sku_list
    probe = rec.recognize([str(src / "images" / gone / "01.jpg")], k=5)[0]
    assert all(s != gone for s, _ in [(t["sku"], t["score"]) for t in probe["topk"]])

    # a SKU delisted in products.csv, its images still in S3: it leaves the index at the next update
    delisted = "demo-003"
    shutil.rmtree(src / "images" / gone)  # the local copy of the catalog agrees with the bucket
    (src / "products.csv").write_text("".join(ln for ln in (src / "products.csv").read_text().splitlines(True)
                                              if not ln.startswith(f"{delisted},")))
    importer.import_catalog(s3.client(), bucket, src, progress=False).raise_for_failures()
    assert s3.client().list_objects_v2(Bucket=bucket, Prefix=f"catalog/images/{delisted}/")["KeyCount"] > 0
    out4 = index_update.execute_in_process(resources=resources).output_for_node("update_sku_index")
    assert out4["removed_skus"] == out4["delisted_skus"] == [delisted] and out4["changed_skus"] == []
    rec.maybe_reload(force=True)
    assert delisted not in rec.index.sku_list and "brand-new" in rec.index.sku_list


def test_champion_sensor_fires_once_per_new_champion(s3, mlflow_server, tmp_path):
    model_name = f"champ-{tmp_path.name[-8:]}"
    sensor = automation.champion_sensor(index_update)
    res = {"mlflow": MlflowResource(tracking_uri=mlflow_server.uri, model_name=model_name)}
    assert isinstance(sensor(dg.build_sensor_context(resources=res)), dg.SkipReason)  # no champion yet
    v1 = _register_champion(mlflow_server.uri, model_name, tmp_path / "a")
    ctx = dg.build_sensor_context(resources=res)
    req = sensor(ctx)
    assert isinstance(req, dg.RunRequest) and req.run_key == f"champion-v{v1}"
    assert isinstance(sensor(dg.build_sensor_context(cursor=ctx.cursor, resources=res)), dg.SkipReason)
    v2 = _register_champion(mlflow_server.uri, model_name, tmp_path / "b")
    req2 = sensor(dg.build_sensor_context(cursor=ctx.cursor, resources=res))
    assert isinstance(req2, dg.RunRequest) and req2.run_key == f"champion-v{v2}"


@pytest.mark.parametrize("same", [True, False])
def test_nightly_skips_when_nothing_changed(s3, mlflow_server, demo_dir, tmp_path, same):
    from mlflow.tracking import MlflowClient

    from skulens.catalog.state import catalog_state

    bucket = s3.new_bucket("night")
    model_name = f"n-{bucket}"
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    version = _register_champion(mlflow_server.uri, model_name, tmp_path)
    client = MlflowClient(mlflow_server.uri)
    run_id = client.get_model_version(model_name, version).run_id
    fp = catalog_state(s3.client(), bucket).fingerprint
    client.set_tag(run_id, "catalog.fingerprint", fp if same else "something-else")
    client.set_tag(run_id, "train.config_hash", automation.training_config_hash())
    schedule = automation.nightly_schedule(dg.define_asset_job("main"))
    ctx = dg.build_schedule_context(resources={"s3": _s3(s3, bucket),
                                               "mlflow": MlflowResource(tracking_uri=mlflow_server.uri,
                                                                        model_name=model_name)},
                                    scheduled_execution_time=__import__("datetime").datetime(2026, 11, 22, 2))
    result = schedule.evaluate_tick(ctx)
    if same:
        assert result.skip_message and "unchanged" in result.skip_message
    else:
        assert len(result.run_requests) == 1


def test_skulens_run_runner_skips_main_when_nothing_changed_since_the_champion(s3, mlflow_server, demo_dir, tmp_path):
    """`skulens run` applies the nightly rule: the job runner exits SKIPPED_EXIT with one line, and runs nothing."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from skulens.catalog.state import catalog_state
    from skulens.ops.cli import MARK, SKIPPED_EXIT

    bucket = s3.new_bucket("runskip")
    model_name = f"r-{bucket}"
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    version = _register_champion(mlflow_server.uri, model_name, tmp_path)
    client = MlflowClient(mlflow_server.uri)
    run_id = client.get_model_version(model_name, version).run_id
    client.set_tag(run_id, "catalog.fingerprint", catalog_state(s3.client(), bucket).fingerprint)
    client.set_tag(run_id, "train.config_hash", automation.training_config_hash())
    env = dict(os.environ, SKULENS_S3_ENDPOINT=s3.endpoint, SKULENS_BUCKET=bucket, SKULENS_MLFLOW_URI=mlflow_server.uri,
               SKULENS_MODEL_NAME=model_name, SKULENS_HOME=str(tmp_path / "home"),
               DAGSTER_HOME=str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    proc = subprocess.run([sys.executable, "-m", "pipelines.console", "--job", "main"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == SKIPPED_EXIT, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(MARK))
    assert f"unchanged since champion v{version}" in line and "--force" in line
    assert not list((tmp_path / "dagster").rglob("*.db"))  # no run was started


def test_nightly_retrains_only_when_enough_trainable_skus_changed(s3, mlflow_server, demo_dir, tmp_path, monkeypatch):
    """The retrain policy through the schedule: the champion's training run records its catalog per SKU
    (catalog_state.json). A packshot-only launch never counts; one new trainable SKU is below a threshold of 2
    (skip, with the count and the threshold) and reaches the default of 1 (a run request carrying the reason);
    a challenger already trained on this catalog and config and not promoted makes the schedule skip."""
    import datetime

    from mlflow.tracking import MlflowClient

    from skulens.catalog import ingest
    from skulens.catalog.state import CATALOG_STATE_ARTIFACT, catalog_state, training_record
    from skulens.registry.model_registry import experiment_id

    bucket = s3.new_bucket("policy")
    model_name = f"p-{bucket}"
    c = s3.client()
    importer.import_catalog(c, bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    version = _register_champion(mlflow_server.uri, model_name, tmp_path)
    ml = MlflowClient(mlflow_server.uri)
    run_id = ml.get_model_version(model_name, version).run_id
    state = catalog_state(c, bucket)
    products = ingest.fetch_products(c, bucket)
    trained = list(products["sku"])  # stand-in: every listed SKU was a training class
    ml.log_dict(run_id, training_record(state.images, set(products["sku"]), trained, state.fingerprint),
                CATALOG_STATE_ARTIFACT)
    ml.set_tag(run_id, "catalog.fingerprint", state.fingerprint)
    cfg = automation.training_config_hash()
    ml.set_tag(run_id, "train.config_hash", cfg)
    resources = {"s3": _s3(s3, bucket), "mlflow": MlflowResource(tracking_uri=mlflow_server.uri,
                                                                 model_name=model_name, experiment=model_name)}
    schedule = automation.nightly_schedule(dg.define_asset_job("main"))

    def tick():
        return schedule.evaluate_tick(dg.build_schedule_context(
            resources=resources, scheduled_execution_time=datetime.datetime(2026, 11, 22, 2)))

    assert "unchanged since champion" in tick().skip_message

    # a packshot-only launch (listed) and a new SKU with 3 images (listed): only the latter is trainable
    img = next((demo_dir / "catalog" / "images").rglob("00.jpg")).read_bytes()
    c.put_object(Bucket=bucket, Key="catalog/images/launch-1/0.jpg", Body=img + b"\0")
    for i in range(3):
        c.put_object(Bucket=bucket, Key=f"catalog/images/rich-1/{i}.jpg", Body=img + bytes([i + 1]))
    rows = products.iloc[:2].assign(sku=["launch-1", "rich-1"])
    import pandas as pd

    c.put_object(Bucket=bucket, Key="catalog/products.csv",
                 Body=pd.concat([products, rows]).to_csv(index=False).encode())
    monkeypatch.setenv("SKULENS_RETRAIN_MIN_CHANGED_SKUS", "2")
    skipped = tick()
    assert skipped.skip_message == (f"1 trainable SKU new or changed since champion v{version} (retrain threshold 2): "
                                    "index_update keeps them recognizable; nothing to retrain")
    monkeypatch.delenv("SKULENS_RETRAIN_MIN_CHANGED_SKUS")
    (req,) = tick().run_requests
    assert req.tags["skulens/retrain_reason"].startswith(f"1 trainable SKU new or changed since champion v{version}")

    # a challenger trained on this catalog and config was kept out (a tie): retraining would repeat it
    now = catalog_state(c, bucket).fingerprint
    ml.create_run(experiment_id(ml, model_name), run_name="train-tie", tags={
        "skulens.promotion_decision": "kept-champion", "skulens.promotion_decision_reason": "top1 tie",
        "catalog.fingerprint": now, "train.config_hash": cfg, "eval.champion_version": version})
    again = tick()
    assert "would repeat it" in again.skip_message and "top1 tie" in again.skip_message
    with dg.build_resources(resources) as res:  # `skulens run` applies the same rule
        assert automation.unchanged_since_champion(res.s3, res.mlflow) == again.skip_message

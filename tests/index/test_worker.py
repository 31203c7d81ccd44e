"""The warm index worker (skulens.index.worker) on real S3 + MLflow: new SKU -> delta -> recognizable,
delisted SKU removed, the index_update run as a backstop finds nothing to do, a race with a run
publishes one consistent chain, an S3 error in one cycle is survived."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from assets.index_update import index_update
from resources import LocalStateResource
from resources.mlflow import MlflowResource
from skulens.catalog import importer
from skulens.index.publish import chain_of, read_pointer
from skulens.index.worker import IndexWorker
from skulens.registry.store import ModelStore
from tests.pipelines.test_automation import _register_champion, _s3


def _new_sku(src, sku="brand-new", seed=0):
    from skulens.catalog.demo import Product, _jpeg_bytes, render_packshot

    d = src / "images" / sku
    d.mkdir(parents=True)
    p = Product(sku=sku, name="New", category="snacks", shape="can", brand="NEWBRAND",
                primary=(10, 200, 120 + seed), secondary=(250, 20, 200), pattern="dots", logo="star", size="1 l")
    for v in range(2):
        (d / f"{v}.jpg").write_bytes(_jpeg_bytes(render_packshot(p, view=v), 92))
    (src / "products.csv").write_text((src / "products.csv").read_text() + f"{sku},New,snacks,NEWBRAND,1 l\n")
    return d


@pytest.fixture
def setup(s3, mlflow_server, demo_dir, tmp_path, monkeypatch):
    from skulens.index import publish

    monkeypatch.setattr(publish, "MAX_DELTA_RATIO", 10.0)  # the demo index is tiny: no compaction
    bucket = s3.new_bucket("wrk")
    model_name = f"m-{bucket}"
    _register_champion(mlflow_server.uri, model_name, tmp_path)
    src = tmp_path / "cat"
    shutil.copytree(demo_dir / "catalog", src)
    importer.import_catalog(s3.client(), bucket, src, progress=False).raise_for_failures()
    resources = {"s3": _s3(s3, bucket), "state": LocalStateResource(home=str(tmp_path / "state")),
                 "mlflow": MlflowResource(tracking_uri=mlflow_server.uri, model_name=model_name)}
    assert index_update.execute_in_process(resources=resources).success  # the pipeline's first full build
    store = ModelStore(tmp_path / "models", mlflow_server.uri, model_name)
    worker = IndexWorker(s3.client(), bucket, store, tmp_path / "worker", interval_s=0.1)
    return bucket, model_name, src, resources, worker


def test_worker_publishes_new_sku_as_delta_and_removes_delisted_run_finds_nothing(s3, mlflow_server, setup, tmp_path):
    bucket, model_name, src, resources, worker = setup
    first = worker.cycle()  # full listing at start: the catalog agrees with the index
    assert first is not None and not first.published
    assert worker.cycle() is None  # nothing changed: no update at all

    new_dir = _new_sku(src)
    importer.import_catalog(s3.client(), bucket, src, progress=False).raise_for_failures()  # writes an upload note
    done = worker.cycle()
    assert done.published and done.outcome["mode"] == "delta"
    assert done.report.changed_skus == ["brand-new"] and done.report.removed_skus == []
    assert len(chain_of(read_pointer(s3.client(), bucket))[1]) == 1

    from skulens.serving.recognize import Recognizer

    rec = Recognizer.from_services(mlflow_server.uri, model_name, s3.client(), bucket, cache_dir=tmp_path / "rc")
    assert rec.index_version == done.published
    assert rec.recognize([str(new_dir / "0.jpg")], k=3)[0]["sku"] == "brand-new"

    # the daemon's backstop run for the same upload: catalog and index agree, nothing published, recorded
    res = index_update.execute_in_process(resources=resources)
    assert res.success and res.output_for_node("update_sku_index")["published"] is None
    assert read_pointer(s3.client(), bucket)["version"] == done.published

    # a SKU delisted in products.csv (its images stay): removed by the worker (products.csv ETag changed)
    delisted = "demo-003"
    (src / "products.csv").write_text("".join(ln for ln in (src / "products.csv").read_text().splitlines(True)
                                              if not ln.startswith(f"{delisted},")))
    importer.import_catalog(s3.client(), bucket, src, progress=False).raise_for_failures()
    gone = worker.cycle()
    assert gone.published and gone.report.removed_skus == [delisted] and gone.report.changed_skus == []
    rec.maybe_reload(force=True)
    assert delisted not in rec.index.sku_list and "brand-new" in rec.index.sku_list
    assert worker.cycle() is None


def test_worker_and_run_racing_publish_one_chain(s3, setup, tmp_path):
    """The run reads the pointer, the worker publishes the same change meanwhile, the run's CAS fails, it
    rebases on the worker's version and finds nothing left to do."""
    from skulens.index.update import update_from_catalog

    bucket, model_name, src, resources, worker = setup
    worker.cycle()
    before = read_pointer(s3.client(), bucket)
    _new_sku(src, "racer")
    importer.import_catalog(s3.client(), bucket, src, progress=False).raise_for_failures()
    raced = {}

    def champion():  # the run's champion: while the run is between its pointer read and its CAS
        if not raced:
            raced["worker"] = worker.cycle()
        return worker.champion()

    run = update_from_catalog(s3.client(), bucket, champion, tmp_path / "run-cat", tmp_path / "run-norm",
                              cache_dir=tmp_path / "run-idx", reason="race")
    assert raced["worker"].published
    assert not run.outcome["published"] and run.outcome["conflicts"] == [raced["worker"].published]
    after = read_pointer(s3.client(), bucket)
    assert after["version"] == raced["worker"].published and after["previous"] == before["version"]
    assert len(chain_of(after)[1]) == len(chain_of(before)[1]) + 1  # one delta, not two
    res = index_update.execute_in_process(resources=resources)
    assert res.output_for_node("update_sku_index")["published"] is None


def test_worker_loop_survives_an_s3_error(s3, setup):
    from skulens.catalog.s3 import make_client
    from skulens.ops.services import free_port

    bucket, model_name, src, resources, worker = setup
    good = worker.client
    worker.client = make_client(f"http://127.0.0.1:{free_port()}", s3.access_key, s3.secret_key,
                                max_attempts=1, connect_timeout=0.5, read_timeout=0.5)  # nothing listens there
    worker.max_backoff_s = 0.2
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,), kwargs={"warm": False}, daemon=True)
    t.start()
    try:
        deadline = time.time() + 30
        while worker.stats.failures < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert worker.stats.failures >= 2 and t.is_alive() and "Error" in worker.stats.last_error
        worker.client = good
        _new_sku(src, "after-error")
        importer.import_catalog(s3.client(), bucket, src, progress=False).raise_for_failures()
        deadline = time.time() + 120
        while time.time() < deadline and "after-error" not in read_pointer(s3.client(), bucket).get("version", "") \
                and worker.stats.published < 1:
            time.sleep(0.1)
        assert worker.stats.published >= 1
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    from skulens.index.publish import load_current

    assert "after-error" in load_current(s3.client(), bucket)[0].sku_list

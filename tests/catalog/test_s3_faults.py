"""S3 failing under ingest and index publishing, injected by a proxy in front of the real SeaweedFS:
throttling, 5xx, timeouts, cut-off downloads and a publisher killed mid-publish. Retried with backoff,
a clear error after the retries, and the next run completes with nothing duplicated or lost."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from botocore.exceptions import ClientError

from skulens.catalog import contract, ingest
from skulens.catalog.s3 import make_client
from skulens.index import publish as P
from skulens.index.sku_index import SkuIndex
from tests import imagegen as g
from tests.faults import Fault, FaultProxy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def proxy(s3):
    u = urlparse(s3.endpoint)
    with FaultProxy(u.hostname, u.port) as p:
        yield p


def _client(endpoint, s3, **kw):
    kw.setdefault("max_attempts", 4)
    kw.setdefault("read_timeout", 2.0)
    kw.setdefault("connect_timeout", 2.0)
    return make_client(endpoint, s3.access_key, s3.secret_key, **kw)


@pytest.fixture
def catalog_bucket(s3, tmp_path):
    """A bucket with 12 catalog images (4 SKUs x 3) written straight to S3; returns (bucket, {key: md5})."""
    bucket = s3.new_bucket("flt")
    client = s3.client()
    objects = {}
    for i in range(12):
        data = g.jpeg_bytes(g.product_image(64, 64, seed=i))
        key = f"{contract.CATALOG_IMAGES_PREFIX}S{i // 3}/{i}.jpg"
        client.put_object(Bucket=bucket, Key=key, Body=data)
        objects[key] = hashlib.md5(data).hexdigest()
    return bucket, objects


def _local_md5s(dest: Path, manifest) -> dict:
    return {k: hashlib.md5(Path(p).read_bytes()).hexdigest() for k, p in zip(manifest["key"], manifest["path"])}


def _no_part_files(dest: Path) -> bool:
    return not [p for p in dest.rglob("*") if ".part" in p.name]


@pytest.mark.slow
def test_ingest_rides_out_throttling_5xx_and_timeouts(s3, proxy, catalog_bucket, tmp_path):
    bucket, objects = catalog_bucket
    proxy.add(
        Fault(method="GET", path=r"list-type=2", status=503, times=1),  # the listing is throttled once
        Fault(method="GET", path=r"/S0/", status=503, times=3),  # SlowDown on SKU S0's downloads
        Fault(method="GET", path=r"/S1/", status=500, times=2),  # InternalError
        Fault(method="GET", path=r"/S2/6\.jpg$", delay=3.0, times=1),  # longer than the 2 s read timeout
        Fault(method="GET", path=r"/S3/9\.jpg$", reset=True, times=1),  # connection dropped
    )
    dest = tmp_path / "cache"
    res = ingest.sync_images(_client(proxy.endpoint, s3), bucket, contract.CATALOG_IMAGES_PREFIX, dest, workers=4)
    assert not res.failed and len(res.added) == 12
    assert [f.hits for f in proxy.faults] == [1, 3, 2, 1, 1]  # every fault was hit, and retried past
    assert _local_md5s(dest, res.manifest) == objects
    assert res.manifest["key"].is_unique and _no_part_files(dest)


def test_ingest_that_keeps_failing_reports_the_file_and_the_next_run_fetches_only_it(s3, proxy, catalog_bucket,
                                                                                      tmp_path):
    bucket, objects = catalog_bucket
    bad, cut = f"{contract.CATALOG_IMAGES_PREFIX}S1/4.jpg", f"{contract.CATALOG_IMAGES_PREFIX}S2/7.jpg"
    proxy.add(Fault(method="GET", path=r"/S1/4\.jpg$", status=500, times=None),  # down for good
              Fault(method="GET", path=r"/S2/7\.jpg$", truncate=True, times=None))  # always cut off mid-body
    dest = tmp_path / "cache"
    res = ingest.sync_images(_client(proxy.endpoint, s3, max_attempts=3), bucket, contract.CATALOG_IMAGES_PREFIX,
                             dest, workers=4)
    failed = dict(res.failed)
    assert set(failed) == {bad, cut}
    assert "InternalError" in failed[bad] and "max retries: 3" in failed[bad]  # says why, after 1 + 3 retries
    assert proxy.count("GET", r"/S1/4\.jpg$") == 4
    assert set(res.manifest["key"]) == set(objects) - {bad, cut}  # not recorded as present ...
    assert not (dest / "S1" / "4.jpg").exists() and not (dest / "S2" / "7.jpg").exists()  # ... nor half there
    assert _no_part_files(dest)

    proxy.clear()  # S3 is healthy again: the next run downloads exactly the two that failed
    again = ingest.sync_images(_client(proxy.endpoint, s3), bucket, contract.CATALOG_IMAGES_PREFIX, dest)
    assert sorted(again.added) == sorted([bad, cut]) and again.unchanged == 10 and not again.failed
    assert _local_md5s(dest, again.manifest) == objects and again.manifest["key"].is_unique
    assert {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]} == set(objects)  # S3 untouched


def test_ingest_with_s3_down_fails_with_a_clear_error(s3, proxy, catalog_bucket, tmp_path):
    bucket, _ = catalog_bucket
    proxy.upstream_down = True
    t0 = time.perf_counter()
    with pytest.raises(Exception) as err:
        ingest.sync_images(_client(proxy.endpoint, s3, max_attempts=2), bucket, contract.CATALOG_IMAGES_PREFIX,
                           tmp_path / "cache")
    assert time.perf_counter() - t0 < 30
    msg = str(err.value)
    assert proxy.endpoint in msg or "ListObjectsV2" in msg, msg


def _index(skus, seed=0):
    rng = np.random.default_rng(seed)
    return SkuIndex(rng.normal(size=(len(skus), 8)), list(skus), [f"catalog/images/{s}/0.jpg" for s in skus],
                    model_version="1")


def test_publish_retries_5xx_and_a_persistent_failure_leaves_the_old_version_in_place(s3, proxy):
    prefix = f"pf-{uuid.uuid4().hex[:8]}"
    client = _client(proxy.endpoint, s3)
    v1 = P.publish_index(client, s3.bucket, _index(["a"]), prefix=prefix)
    proxy.add(Fault(method="PUT", path=r"/versions/.*\.npz$", status=503, times=2),
              Fault(method="GET", path=r"/versions/.*\.npz$", status=500, times=1),  # the verify read
              Fault(method="PUT", path=r"/CURRENT\.json$", status=500, times=1))
    v2 = P.publish_index(client, s3.bucket, _index(["a", "b"]), prefix=prefix)
    assert len(proxy.injected()) == 4 and P.read_pointer(s3.client(), s3.bucket, prefix)["version"] == v2

    proxy.clear()
    proxy.add(Fault(method="PUT", path=r"/CURRENT\.json$", status=500, times=None))  # the swap never succeeds
    with pytest.raises(ClientError, match="InternalError.*max retries"):
        P.publish_index(_client(proxy.endpoint, s3, max_attempts=2), s3.bucket, _index(["a", "b", "c"]),
                        prefix=prefix)
    idx, ptr = P.load_current(s3.client(), s3.bucket, prefix)  # readers keep v2, complete and verified
    assert ptr["version"] == v2 and idx.sku_list == ["a", "b"]
    proxy.clear()
    v4 = P.publish_index(client, s3.bucket, _index(["a", "b", "c"]), prefix=prefix)
    assert P.read_pointer(s3.client(), s3.bucket, prefix)["previous"] == v2
    versions = [v["version"] for v in P.list_versions(s3.client(), s3.bucket, prefix)]
    assert versions[0] == v1 and v2 in versions and versions[-1] == v4 and len(versions) == 4  # failed try: history


PUBLISHER = textwrap.dedent("""
    import sys, numpy as np
    from skulens.catalog.s3 import make_client
    from skulens.index.publish import publish_index
    from skulens.index.sku_index import SkuIndex
    endpoint, bucket, prefix, key, secret = sys.argv[1:6]
    rng = np.random.default_rng(1)
    idx = SkuIndex(rng.normal(size=(3, 8)), ["a", "b", "k"], [f"catalog/images/{s}/0.jpg" for s in "abk"],
                   model_version="1")
    publish_index(make_client(endpoint, key, secret, max_attempts=1, read_timeout=120), bucket, idx, prefix=prefix)
""")


@pytest.mark.parametrize("stage", [r"/versions/.*\.npz$", r"/versions/.*\.json$", r"/CURRENT\.json$"],
                         ids=["uploading-the-index", "writing-the-manifest", "swapping-the-pointer"])
def test_publisher_killed_mid_publish_leaves_readers_on_the_old_version(s3, proxy, stage):
    prefix = f"pk-{uuid.uuid4().hex[:8]}"
    v1 = P.publish_index(s3.client(), s3.bucket, _index(["a", "b"]), prefix=prefix)
    proxy.add(Fault(method="PUT", path=stage, delay=20.0, reset=True))  # the request stalls at this stage
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, proxy.endpoint, s3.bucket, prefix, s3.access_key,
                             s3.secret_key], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while proxy.faults[0].hits == 0:  # until its request is stalled at the stage
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the publisher never reached the stage"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # killed while its request is in flight
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    idx, ptr = P.load_current(s3.client(), s3.bucket, prefix)
    assert ptr["version"] == v1 and idx.sku_list == ["a", "b"]  # readers: the old, complete version
    # the next publisher starts from v1 and lands normally
    proxy.clear()
    v2 = P.publish_index(s3.client(), s3.bucket, _index(["a", "b", "c"]), prefix=prefix)
    assert P.read_pointer(s3.client(), s3.bucket, prefix)["previous"] == v1 and v2 != v1


def test_a_failed_download_never_removes_a_sku_from_the_index(s3, proxy, catalog_bucket, tmp_path):
    """index_update after an ingest where one SKU's files could not be fetched: that SKU keeps its rows
    (deferred, retried next time) while the rest of the delta is applied."""
    from skulens.index.update import _empty_index, update_index
    from skulens.model.factory import ModelSpec, create_encoder

    bucket, objects = catalog_bucket
    enc = create_encoder(ModelSpec(name="tiny-test"))
    dest = tmp_path / "cache"
    first = ingest.sync_images(s3.client(), bucket, contract.CATALOG_IMAGES_PREFIX, dest)
    index, _ = update_index(enc, _empty_index(enc.embed_dim, "1"), first.manifest, tmp_path / "w", "1")
    assert index.sku_list == ["S0", "S1", "S2", "S3"]

    # S1's files are re-uploaded (new bytes) and a new SKU S4 arrives, but S1 cannot be downloaded now
    client = s3.client()
    for i in (3, 4):
        client.put_object(Bucket=bucket, Key=f"{contract.CATALOG_IMAGES_PREFIX}S1/{i}.jpg",
                          Body=g.jpeg_bytes(g.product_image(64, 64, seed=100 + i)))
    client.put_object(Bucket=bucket, Key=f"{contract.CATALOG_IMAGES_PREFIX}S4/0.jpg",
                      Body=g.jpeg_bytes(g.product_image(64, 64, seed=200)))
    proxy.add(Fault(method="GET", path=r"/S1/", status=500, times=None))
    sync = ingest.sync_images(_client(proxy.endpoint, s3, max_attempts=1), bucket, contract.CATALOG_IMAGES_PREFIX,
                              dest)
    assert {k for k, _ in sync.failed} == {f"{contract.CATALOG_IMAGES_PREFIX}S1/{i}.jpg" for i in (3, 4)}
    new, report = update_index(enc, index, sync.manifest, tmp_path / "w", "1", failed_keys=[k for k, _ in sync.failed])
    assert report.deferred_skus == ["S1"] and report.changed_skus == ["S4"] and not report.removed_skus
    assert new.sku_list == ["S0", "S1", "S2", "S3", "S4"]
    s1 = new.skus == "S1"
    assert np.array_equal(new.vectors[s1], index.vectors[index.skus == "S1"])  # untouched, not half-updated

    proxy.clear()  # S3 is back: the next update picks S1's new images up
    sync = ingest.sync_images(_client(proxy.endpoint, s3), bucket, contract.CATALOG_IMAGES_PREFIX, dest)
    newer, report = update_index(enc, new, sync.manifest, tmp_path / "w", "1")
    assert report.changed_skus == ["S1"] and not report.deferred_skus and int((newer.skus == "S1").sum()) == 3


def test_catalog_images_asset_stops_on_failed_downloads_and_the_next_run_completes(s3, proxy, catalog_bucket,
                                                                                     tmp_path):
    """Through Dagster: a download that still fails after the retries fails `catalog_images` with one line
    (a partial mirror would silently drop images from training and the index); the next run fetches the
    missing file only."""
    import dagster as dg

    from assets import ingest as ingest_assets
    from resources import LocalStateResource, S3Resource

    bucket, objects = catalog_bucket

    def run(endpoint):
        (tmp_path / "dagster").mkdir(exist_ok=True)
        with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
            res = {"s3": S3Resource(endpoint_url=endpoint, bucket=bucket, max_attempts=1,
                                    access_key_id=dg.EnvVar("SKULENS_S3_ACCESS_KEY_ID"),
                                    secret_access_key=dg.EnvVar("SKULENS_S3_SECRET_ACCESS_KEY")),
                   "state": LocalStateResource(home=str(tmp_path / "home"))}
            return dg.materialize([ingest_assets.catalog_images], resources=res, instance=inst, raise_on_error=False)

    proxy.add(Fault(method="GET", path=r"/S3/10\.jpg$", status=500, times=None))
    first = run(proxy.endpoint)
    assert not first.success
    failure = next(e for e in first.all_events if e.event_type_value == "STEP_FAILURE")
    desc = failure.step_failure_data.user_failure_data.description
    assert desc.startswith("1 catalog image download(s) failed after retries") and "S3/10.jpg" in desc
    assert "the 11 that downloaded are kept" in desc

    proxy.clear()
    second = run(proxy.endpoint)
    assert second.success
    mat = second.asset_materializations_for_node("catalog_images")[0].metadata
    assert mat["added"].value == 1 and mat["unchanged"].value == 11 and mat["failed"].value == 0
    assert len(second.output_for_node("catalog_images")) == 12


def test_import_into_a_store_that_cannot_write_stops_fast_and_the_next_run_completes(s3, proxy, tmp_path):
    """A store that answers every image PUT with InternalError (what SeaweedFS answers when its disk is
    full) stops the import after ``stop_after`` failures in a row instead of retrying every file; the
    report says what was not attempted, nothing is deleted, and a run against the healed store sends only
    what is missing."""
    from skulens.catalog import importer

    bucket = s3.new_bucket("full")
    src = tmp_path / "catalog"
    (src / "images").mkdir(parents=True)
    (src / "products.csv").write_text("sku,name\n" + "".join(f"S{i},p{i}\n" for i in range(20)))
    for i in range(60):
        d = src / "images" / f"S{i // 3}"
        d.mkdir(exist_ok=True)
        (d / f"{i}.jpg").write_bytes(g.jpeg_bytes(g.product_image(48, 48, seed=i)))
    proxy.add(Fault(method="PUT", path=r"/catalog/images/", status=500, times=None))
    client = _client(proxy.endpoint, s3, max_attempts=2)
    report = importer.import_catalog(client, bucket, src, workers=4, progress=False)
    assert report.stopped and "InternalError" in report.stopped
    # the ones the 4 workers had already started when it stopped fail too
    assert importer.STOP_AFTER_FAILURES <= len(report.failed) <= importer.STOP_AFTER_FAILURES + 4
    assert len(report.failed) + len(report.not_attempted) == 60 and report.uploaded == [contract.PRODUCTS_KEY]
    # each file that was tried cost one request + the client's 2 retries; the rest were never sent
    assert proxy.count("PUT", r"/catalog/images/") == 3 * len(report.failed)
    with pytest.raises(importer.ImportFailed, match="not attempted"):
        report.raise_for_failures()

    proxy.clear()
    again = importer.import_catalog(client, bucket, src, workers=4, progress=False)
    assert not again.failed and not again.stopped and len(again.uploaded) == 60
    assert contract.PRODUCTS_KEY in again.unchanged  # written by the first run, which only lost images


def test_only_store_side_failures_count_towards_stopping():
    from botocore.exceptions import ClientError, EndpointConnectionError

    from skulens.catalog.importer import store_side

    def err(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert store_side(err("InternalError", 500)) and store_side(err("ServiceUnavailable", 503))
    assert store_side(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not store_side(err("AccessDenied", 403)) and not store_side(err("InvalidDigest", 400))
    assert not store_side(ValueError("bad file"))


def test_the_cli_points_at_a_full_disk_of_the_embedded_store(tmp_path, monkeypatch):
    from skulens.ops.cli import _store_hint
    from skulens.ops.settings import Settings

    monkeypatch.delenv("SKULENS_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("SKULENS_HOME", str(tmp_path))
    s = Settings.from_env()
    assert _store_hint(s) == ""  # no embedded store here
    (tmp_path / "s3").mkdir()
    s.log_dir.mkdir(parents=True, exist_ok=True)
    (s.log_dir / "s3.log").write_text("W1206 write /x/skulens_1.dat: no space left on device\n")
    hint = _store_hint(s)
    assert str(tmp_path / "s3") in hint and "MB free" in hint and "no space left on device" in hint
    monkeypatch.setenv("SKULENS_S3_ENDPOINT", f"http://{s.host}:{s.s3_port}")  # as `skulens env` exports it
    assert _store_hint(s) == hint
    monkeypatch.setenv("SKULENS_S3_ENDPOINT", "http://s3.example:9000")
    assert _store_hint(s) == ""  # an external store: nothing local to point at


@pytest.mark.slow
def test_a_demo_load_that_fails_halfway_is_resumed_not_taken_for_the_whole_catalog(s3, proxy, tmp_path):
    """`skulens run`'s demo load on a store that fails image writes: a clear error, and the next run (the
    bucket now holds part of the catalog) finishes the load instead of training on the partial catalog."""
    import dataclasses

    import click

    from skulens.catalog.s3 import list_objects
    from skulens.ops.cli import DEMO_LOADING, load_demo
    from skulens.ops.settings import Settings

    s = dataclasses.replace(Settings(home=tmp_path), bucket=s3.new_bucket("demo"))
    client = _client(proxy.endpoint, s3, max_attempts=1)
    proxy.add(Fault(method="PUT", path=r"/catalog/images/demo-01", status=500, times=None))
    with pytest.raises(click.ClickException, match="loading the demo catalog failed.*run again"):
        load_demo(client, s)
    marker = tmp_path / "demo" / DEMO_LOADING
    keys = {o.key for o in list_objects(client, s.bucket, "catalog/")}
    assert marker.exists() and keys and not any("/demo-01" in k for k in keys)  # partial, and remembered

    proxy.clear()
    assert load_demo(client, s) is True and not marker.exists()
    from skulens.catalog.importer import ImportReport, plan_catalog

    planned = {i.key for i in plan_catalog(tmp_path / "demo" / "catalog", ImportReport())}
    keys = {o.key for o in list_objects(client, s.bucket, "catalog/")}
    assert keys == planned and any("/demo-01" in k for k in keys)  # the whole catalog, once
    assert load_demo(client, s) is False  # loaded: a later run leaves the bucket alone

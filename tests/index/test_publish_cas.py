"""Compare-and-swap publishing on the real S3 (SeaweedFS conditional writes): the pointer moves only
from the version a publisher started from, racing publishers all land on top of each other, a lost
answer is not mistaken for a lost race, and a store that ignores conditional writes is refused."""

from __future__ import annotations

import threading
import uuid
from urllib.parse import urlparse

import numpy as np
import pytest

from skulens.catalog.s3 import make_client
from skulens.index import publish as P
from skulens.index.sku_index import SkuIndex
from tests.faults import Fault, FaultProxy


def _index(skus, dim=8, seed=0, model_version="1"):
    rng = np.random.default_rng(seed)
    keys = [f"catalog/images/{s}/0.jpg" for s in skus]
    return SkuIndex(rng.normal(size=(len(skus), dim)), list(skus), keys, model_version=model_version)


def _add(index: SkuIndex | None, sku: str, seed: int) -> SkuIndex:
    row = _index([sku], seed=seed)
    if index is None:
        return row
    return index.with_updates(row.vectors, [sku], [f"catalog/images/{sku}/0.jpg"])


@pytest.fixture
def prefix():
    return f"cas-{uuid.uuid4().hex[:8]}"


def test_pointer_moves_only_from_the_version_the_publisher_started_from(s3, prefix):
    client = s3.client()
    v1 = P.publish_index(client, s3.bucket, _index(["a"]), prefix=prefix, base=None)
    p1 = P.read_pointer(client, s3.bucket, prefix)
    with pytest.raises(P.PublishConflict, match="moved while publishing"):  # "first version", but there is one
        P.publish_index(client, s3.bucket, _index(["b"]), prefix=prefix, base=None)
    v2 = P.publish_index(client, s3.bucket, _index(["a", "c"]), prefix=prefix, base=p1)
    with pytest.raises(P.PublishConflict) as err:  # built on v1, but v2 is in place now
        P.publish_index(client, s3.bucket, _index(["a", "d"]), prefix=prefix, base=p1)
    assert err.value.base == v1 and err.value.current["version"] == v2
    now = P.read_pointer(client, s3.bucket, prefix)
    assert now["version"] == v2 and now["previous"] == v1
    # the losers' uploads stay as unreferenced history: nothing deleted, nothing overwritten
    assert len(P.list_versions(client, s3.bucket, prefix)) == 4


def test_two_publishers_at_once_both_land_on_top_of_each_other(s3, prefix):
    """Publishers add one SKU each, all started from the same (empty) state at the same moment. The
    losers rebase onto the winner's version, so the final index has every SKU and the versions form one
    chain (each names the one it replaced)."""
    n = 4
    barrier = threading.Barrier(n)
    results, errors = {}, []

    def publisher(i):
        client = s3.client()

        def make(base):
            if base.attempt == 0:
                barrier.wait(timeout=30)  # everyone has read the same base before anyone publishes
            return _add(base.index, f"sku{i}", seed=i)

        try:
            results[i] = P.publish_with_retry(client, s3.bucket, make, prefix=prefix, attempts=n + 2, backoff=0.05)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors, errors
    assert all(r["published"] for r in results.values())
    assert sum(len(r["conflicts"]) for r in results.values()) >= n - 1  # every loser noticed
    client = s3.client()
    final, pointer = P.load_current(client, s3.bucket, prefix)
    assert sorted(final.sku_list) == [f"sku{i}" for i in range(n)]
    # one chain: following `previous` from the pointer visits every published version once
    published = {r["version"] for r in results.values()}
    chain, ver = [], pointer["version"]
    while ver:
        chain.append(ver)
        manifest = P.read_manifest(client, s3.bucket, ver, prefix)
        ver = manifest["previous"]
    assert set(chain) == published and len(chain) == n


def test_a_retried_pointer_put_whose_first_try_landed_is_not_a_conflict(s3, prefix):
    """The pointer PUT reaches S3 but its answer is lost (500 after forwarding): botocore retries, the
    retry's If-Match fails against our own write, and publishing recognises that as success."""
    u = urlparse(s3.endpoint)
    with FaultProxy(u.hostname, u.port) as proxy:
        client = make_client(proxy.endpoint, s3.access_key, s3.secret_key, max_attempts=3)
        P.publish_index(client, s3.bucket, _index(["a"]), prefix=prefix)
        proxy.add(Fault(method="PUT", path=rf"/{prefix}/CURRENT\.json$", status=500, after=True))
        v2 = P.publish_index(client, s3.bucket, _index(["a", "b"]), prefix=prefix)
        assert proxy.injected() and proxy.count("PUT", rf"/{prefix}/CURRENT\.json$") == 3  # v1, v2 + retry
    assert P.read_pointer(s3.client(), s3.bucket, prefix)["version"] == v2


def test_a_store_that_ignores_conditional_writes_is_refused(s3, prefix):
    """Simulated with the proxy answering the probe's wrong-If-Match PUT with 200, as such a store would."""
    u = urlparse(s3.endpoint)
    with FaultProxy(u.hostname, u.port) as proxy:
        proxy.add(Fault(method="PUT", path=r"\.cas-probe$", status=200, body=b"", skip=1))
        client = make_client(proxy.endpoint, s3.access_key, s3.secret_key, max_attempts=1)
        with pytest.raises(P.ConditionalWritesUnsupported, match="ignores If-Match"):
            P.publish_index(client, s3.bucket, _index(["a"]), prefix=prefix)
    assert P.read_pointer(s3.client(), s3.bucket, prefix) is None  # nothing published


def test_full_build_that_lost_the_race_keeps_the_winners_uploads(s3, prefix, tmp_path):
    """The nightly build starts from v1; while it embeds, the sensor's update publishes a new SKU. The
    build's compare-and-swap fails, it rebases (fresh catalog delta on top of the build) and publishes
    an index with both its own SKUs and the new one; with a newer champion in place it publishes nothing."""
    from skulens.index import build, update
    from skulens.model.factory import ModelSpec, create_encoder
    from tests import imagegen as g

    enc = create_encoder(ModelSpec(name="tiny-test"))
    rows = []
    for i, sku in enumerate(("s1", "s2", "s3")):
        # distinct fixed seeds: hash(str) changes per process, and two equal seeds made two SKUs' images identical
        p = g.write_jpeg(tmp_path / "cat" / sku / "0.jpg", 96, 96, seed=11 + i)
        rows.append(g.manifest_row(sku, p, key=f"catalog/images/{sku}/0.jpg"))
    snapshot = g.make_manifest(rows[:2])
    now = g.make_manifest(rows)
    client = s3.client()
    start = P.read_pointer(client, s3.bucket, prefix)  # nothing yet
    built, _ = update.update_index(enc, update._empty_index(enc.embed_dim, "1"), snapshot, tmp_path / "w", "1")
    # meanwhile the sensor's update publishes s3 (and the catalog it saw)
    P.publish_index(client, s3.bucket, update.update_index(enc, update._empty_index(enc.embed_dim, "1"), now,
                                                           tmp_path / "w", "1")[0], prefix=prefix)
    out = build.publish_if_changed(
        client, s3.bucket, built, prefix=prefix, start=start,
        rebase=lambda b, base: update.rebase_build(enc, b, base, now, tmp_path / "w", champion_version="1"))
    assert out["published"] and len(out["conflicts"]) == 1
    final, _ = P.load_current(client, s3.bucket, prefix)
    assert final.sku_list == ["s1", "s2", "s3"]

    # a build with model 1 after model 2 became champion and published: the build steps back
    P.publish_index(client, s3.bucket, update.update_index(enc, update._empty_index(enc.embed_dim, "2"), now,
                                                           tmp_path / "w", "2")[0], prefix=prefix)
    out = build.publish_if_changed(
        client, s3.bucket, built, prefix=prefix, start=None,  # it began before model 2 published
        rebase=lambda b, base: update.rebase_build(enc, b, base, now, tmp_path / "w", champion_version="2"))
    assert not out["published"] and P.load_current(client, s3.bucket, prefix)[0].model_version == "2"

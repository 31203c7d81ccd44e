"""The catalog listing spread over sensor ticks (``scan_step``), against a real SeaweedFS."""

from __future__ import annotations

import itertools

from skulens.catalog import importer
from skulens.catalog.state import catalog_state, scan_step, set_fingerprint


def _scan_all(client, bucket, page_size, budget_s=0.0):
    scan, steps = None, 0
    while True:
        scan, done = scan_step(client, bucket, scan, budget_s, page_size=page_size)
        steps += 1
        if done is not None:
            assert scan == {}
            return done, steps
        assert set(scan) == {"after", "sum", "n", "products_etag", "pages"}  # small, JSON-able


def test_a_listing_split_over_calls_ends_with_the_whole_catalogs_fingerprint(s3, demo_dir):
    bucket = s3.new_bucket("scan")
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    c = s3.client()
    c.put_object(Bucket=bucket, Key="catalog/README.txt", Body=b"not an image key")  # ignored, as in catalog_state
    c.put_object(Bucket=bucket, Key="catalog/images/", Body=b"")  # a folder marker: ignored
    state = catalog_state(c, bucket)
    n = len(state.images)
    assert n > 20 and state.products_etag
    whole, steps = _scan_all(c, bucket, page_size=1000, budget_s=60)
    assert steps == 1 and whole["images"] == n and whole["fingerprint"] == state.set_fingerprint
    paged, steps = _scan_all(c, bucket, page_size=7)  # budget 0: one page a call
    assert steps >= n // 7 and paged["fingerprint"] == whole["fingerprint"] and paged["images"] == n
    # order-free: the same pairs in any order give the same fingerprint; any change gives another
    pairs = list(state.images.items())
    assert set_fingerprint(reversed(pairs), state.products_etag) == state.set_fingerprint
    assert set_fingerprint(pairs[1:], state.products_etag) != state.set_fingerprint
    assert set_fingerprint(pairs, "other-etag") != state.set_fingerprint
    assert set_fingerprint([(pairs[0][0], "x"), *pairs[1:]], state.products_etag) != state.set_fingerprint

    # a change ahead of a running scan is in it; one behind it shows in the next scan
    scan, done = scan_step(c, bucket, None, 0.0, page_size=7)
    assert done is None
    img = next((demo_dir / "catalog" / "images").rglob("00.jpg")).read_bytes()
    c.put_object(Bucket=bucket, Key="catalog/images/zzz-new/a.jpg", Body=img)  # sorts after every listed key
    for _ in itertools.count():
        scan, done = scan_step(c, bucket, scan, 0.0, page_size=7)
        if done is not None:
            break
    assert done["images"] == n + 1 and done["fingerprint"] == catalog_state(c, bucket).set_fingerprint
    # products.csv changes the fingerprint too
    c.put_object(Bucket=bucket, Key="catalog/products.csv",
                 Body=c.get_object(Bucket=bucket, Key="catalog/products.csv")["Body"].read() + b"\n")
    again, _ = _scan_all(c, bucket, page_size=1000, budget_s=60)
    assert again["images"] == n + 1 and again["fingerprint"] != done["fingerprint"]
    assert again["fingerprint"] == catalog_state(c, bucket).set_fingerprint

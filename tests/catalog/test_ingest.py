"""Incremental ingest against the real local S3, through Dagster's `materialize`."""

from __future__ import annotations

import dagster as dg
import pytest

from assets import ingest as ingest_assets
from resources import LocalStateResource, S3Resource
from skulens.catalog import importer


def _resources(s3, bucket, home):
    return {
        "s3": S3Resource(endpoint_url=s3.endpoint, bucket=bucket, access_key_id=dg.EnvVar("SKULENS_S3_ACCESS_KEY_ID"),
                         secret_access_key=dg.EnvVar("SKULENS_S3_SECRET_ACCESS_KEY")),
        "state": LocalStateResource(home=str(home)),
    }


def _materialize(assets, s3, bucket, home, instance):
    result = dg.materialize(assets, resources=_resources(s3, bucket, home), instance=instance)
    assert result.success
    return result


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def test_ingest_downloads_only_the_delta(s3, demo_dir, tmp_path, instance):
    bucket = s3.new_bucket("ing")
    client = s3.client()
    importer.import_catalog(client, bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    n_images = sum(1 for p in (demo_dir / "catalog" / "images").rglob("*") if p.is_file())

    r1 = _materialize([ingest_assets.catalog_images], s3, bucket, tmp_path, instance)
    m1 = r1.asset_materializations_for_node("catalog_images")[0].metadata
    assert m1["added"].value == n_images and m1["unchanged"].value == 0
    manifest = r1.output_for_node("catalog_images")
    assert list(manifest.columns) == ["sku", "key", "etag", "bytes", "path"] and len(manifest) == n_images
    stats_before = {row.key: (__import__("os").stat(row.path).st_ino, __import__("os").stat(row.path).st_mtime_ns)
                    for row in manifest.itertuples()}

    # add one, change one, delete one (deleting from S3 is the user's act here, never the pipeline's)
    keys = sorted(manifest["key"])
    changed, deleted = keys[0], keys[1]
    client.put_object(Bucket=bucket, Key=changed, Body=b"new-bytes" * 200)
    client.delete_object(Bucket=bucket, Key=deleted)
    client.put_object(Bucket=bucket, Key="catalog/images/brand-new/x.jpg", Body=b"img" * 500)
    client.put_object(Bucket=bucket, Key="catalog/images/bad sku/x.jpg", Body=b"img")  # unsafe sku id
    client.put_object(Bucket=bucket, Key="catalog/images/sku-1/nested/x.jpg", Body=b"img")  # not the layout

    r2 = _materialize([ingest_assets.catalog_images], s3, bucket, tmp_path, instance)
    m2 = r2.asset_materializations_for_node("catalog_images")[0].metadata
    assert (m2["added"].value, m2["changed"].value, m2["removed"].value) == (1, 1, 1)
    assert m2["unchanged"].value == n_images - 2
    assert m2["rejected"].value == 2
    assert m2["bytes_downloaded"].value == len(b"new-bytes" * 200) + len(b"img" * 500)
    manifest2 = r2.output_for_node("catalog_images")
    assert deleted not in set(manifest2["key"]) and "catalog/images/brand-new/x.jpg" in set(manifest2["key"])
    # untouched files were not rewritten
    for row in manifest2.itertuples():
        if row.key in stats_before and row.key != changed:
            st = __import__("os").stat(row.path)
            assert (st.st_ino, st.st_mtime_ns) == stats_before[row.key]
    assert open(manifest2.set_index("key").loc[changed, "path"], "rb").read() == b"new-bytes" * 200
    # nothing was deleted from S3 by the pipeline
    assert client.head_object(Bucket=bucket, Key=keys[2])


def test_products_and_shelf_assets(s3, demo_dir, tmp_path, instance):
    bucket = s3.new_bucket("shelf")
    client = s3.client()
    importer.import_catalog(client, bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    importer.import_shelf(client, bucket, demo_dir / "shelf", progress=False).raise_for_failures()
    result = _materialize([ingest_assets.catalog_products, ingest_assets.shelf_crops], s3, bucket, tmp_path, instance)
    products = result.output_for_node("catalog_products")
    assert {"sku", "name", "category", "brand"} <= set(products.columns)
    crops = result.output_for_node("shelf_crops")
    assert set(crops["source"]) == {"crop", "photo"}
    assert set(crops["sku"]) <= set(products["sku"])
    from PIL import Image

    cut = crops[crops["source"] == "photo"].iloc[0]
    with Image.open(cut.path) as im:
        assert im.width >= 8 and im.height >= 8


def test_missing_products_csv_is_a_clear_error(s3, tmp_path, instance):
    bucket = s3.new_bucket("empty")
    with pytest.raises(Exception, match="products.csv not found"):
        dg.materialize([ingest_assets.catalog_products], resources=_resources(s3, bucket, tmp_path), instance=instance)

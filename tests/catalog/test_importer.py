"""Import CLI round trip against the real local S3: only changes are uploaded; unsafe names are rejected."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skulens.catalog import contract, importer
from skulens.catalog.notes import NOTES_PREFIX, read_note
from skulens.catalog.s3 import list_objects

SKULENS = str(Path(sys.executable).parent / "skulens")


def _cli(s3, bucket, *args, check=True):
    env = dict(os.environ, SKULENS_S3_ENDPOINT=s3.endpoint, SKULENS_BUCKET=bucket,
               SKULENS_HOME=str(s3.settings.home))
    proc = subprocess.run([SKULENS, *args], env=env, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"skulens {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("bad", ["..", "../etc", "a b", "a/b", "", ".hidden", "x" * 200, "sku\x07", "ü"])
def test_unsafe_sku_ids_rejected(bad):
    with pytest.raises(contract.CatalogError):
        contract.validate_sku(bad)


@pytest.mark.parametrize("bad", ["/abs/x.jpg", "../x.jpg", "a/../b.jpg", "a//b.jpg", "a/./b.jpg",
                                 "a/b\nc.jpg", "a/\x00.jpg", "C:/x.jpg", "a/ b.jpg"])
def test_unsafe_keys_rejected(bad):
    with pytest.raises(contract.CatalogError):
        contract.validate_relative_key(bad)


def test_upc_sku_ids_keep_leading_zeros():
    df = contract.read_products(b"sku,name\n016000126121,Chex Mix\n")
    assert df.loc[0, "sku"] == "016000126121"


def test_import_catalog_round_trip_uploads_only_changes(s3, demo_dir, tmp_path):
    bucket = s3.new_bucket("imp")
    src = tmp_path / "catalog"
    shutil.copytree(demo_dir / "catalog", src)
    n_files = sum(1 for p in src.rglob("*") if p.is_file())

    out = _cli(s3, bucket, "import", "catalog", str(src))
    assert f"{n_files} uploaded" in out.stdout
    keys = {o.key for o in list_objects(s3.client(), bucket, "catalog/")}
    assert contract.PRODUCTS_KEY in keys and len(keys) == n_files

    out = _cli(s3, bucket, "import", "catalog", str(src))  # nothing changed
    assert "0 uploaded" in out.stdout and f"{n_files} unchanged" in out.stdout

    some = sorted((src / "images").rglob("*.jpg"))[3]
    some.write_bytes(some.read_bytes() + b"\0")  # same name, new content
    new_dir = src / "images" / "new-sku-1"
    new_dir.mkdir()
    shutil.copy(some, new_dir / "a.jpg")
    out = _cli(s3, bucket, "import", "catalog", str(src))
    assert "2 uploaded" in out.stdout and f"{n_files - 1} unchanged" in out.stdout
    body = s3.client().get_object(Bucket=bucket, Key=f"catalog/images/{some.parent.name}/{some.name}")["Body"].read()
    assert body == some.read_bytes()


def test_import_rejects_unsafe_names_and_uploads_the_rest(s3, tmp_path):
    bucket = s3.new_bucket("rej")
    src = tmp_path / "cat"
    (src / "images" / "good-1").mkdir(parents=True)
    (src / "images" / "good-1" / "a.jpg").write_bytes(b"x" * 10)
    (src / "images" / "bad sku").mkdir()
    (src / "images" / "bad sku" / "a.jpg").write_bytes(b"x")
    (src / "images" / "good-1" / "bell\x07.jpg").write_bytes(b"x")
    (src / "images" / "good-1" / "nested").mkdir()
    (src / "images" / "good-1" / "nested" / "deep.jpg").write_bytes(b"x")
    (src / "products.csv").write_text("sku,name\ngood-1,Good\n")
    out = _cli(s3, bucket, "import", "catalog", str(src), check=False)
    assert out.returncode == 3  # rejects are not a silent success
    assert "rejected" in out.stderr and "bad sku" in out.stderr and "control" in out.stderr
    assert "3 rejected" in out.stdout and "3 file(s) rejected and not uploaded" in out.stderr
    keys = {o.key for o in list_objects(s3.client(), bucket, "")}
    notes = {k for k in keys if k.startswith(NOTES_PREFIX)}
    assert keys - notes == {"catalog/products.csv", "catalog/images/good-1/a.jpg"}  # the rest went in
    assert len(notes) == 1 and read_note(s3.client(), bucket, notes.pop()) == ["good-1"]  # the index worker's note
    again = _cli(s3, bucket, "import", "catalog", str(src), "--allow-rejects")  # accepted on purpose: exit 0
    assert "3 rejected" in again.stdout and "0 uploaded" in again.stdout


def test_import_refuses_broken_products_csv(s3, tmp_path):
    bucket = s3.new_bucket("csv")
    src = tmp_path / "cat"
    (src / "images").mkdir(parents=True)
    (src / "products.csv").write_text("sku,name\nA,x\nA,y\n")
    out = _cli(s3, bucket, "import", "catalog", str(src), check=False)
    assert out.returncode != 0 and "duplicate sku ids" in out.stderr
    assert not list(list_objects(s3.client(), bucket, ""))


def test_import_shelf_crops_and_photos(s3, demo_dir):
    bucket = s3.new_bucket("shelf")
    report = importer.import_shelf(s3.client(), bucket, demo_dir / "shelf", progress=False).raise_for_failures()
    keys = {o.key for o in list_objects(s3.client(), bucket, "shelf/")}
    assert contract.SHELF_BOXES_KEY in keys
    assert any(k.startswith(contract.SHELF_PHOTOS_PREFIX) for k in keys)
    assert any(k.startswith(contract.SHELF_CROPS_PREFIX) for k in keys)
    assert len(report.uploaded) == len(keys) and not report.failed


def test_shelf_photos_need_boxes(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.jpg").write_bytes(b"x")
    with pytest.raises(contract.CatalogError, match="both photos/ and boxes.csv"):
        importer.plan_shelf(tmp_path, importer.ImportReport())


def test_demo_catalog_is_deterministic(tmp_path):
    from skulens.catalog.demo import write_demo

    write_demo(tmp_path / "a", n_skus=4, images_per_sku=2, crops_per_sku=1, photos=1)
    write_demo(tmp_path / "b", n_skus=4, images_per_sku=2, crops_per_sku=1, photos=1)
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    fb = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert fa == fb and len(fa) > 10
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in fa)

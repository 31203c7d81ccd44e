"""Great Expectations suite over the cleaning tables: passes on a good catalog, fails on broken inputs."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from skulens.data import clean as C
from skulens.data.expectations import validate_catalog
from tests import imagegen as g

CFG = C.CleanConfig(workers=1)


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    rows = []
    for s, sku in enumerate(["P1", "P2", "P3"]):
        for i in range(4):
            rows.append(g.manifest_row(sku, g.write_jpeg(root / sku / f"{i}.jpg", 240, 200, seed=10 * s + i)))
    rows.append(g.manifest_row("P1", g.write_html_as_jpg(root / "P1" / "err.jpg")))
    products = pd.DataFrame({"sku": ["P1", "P2", "P3"], "name": ["a", "b", "c"], "category": ["x", "x", "y"]})
    result = C.clean_catalog(g.make_manifest(rows), products, tmp_path_factory.mktemp("clean"), CFG)
    assert result.stats["files_dropped"] == 1
    return result, products


def _by_key(report):
    return {(r.table, r.name, r.column): r for r in report.results}


def test_good_catalog_passes_and_renders_data_docs(cleaned, tmp_path):
    result, products = cleaned
    rep = validate_catalog(result.images, products, CFG, docs_dir=tmp_path / "gx_docs", run_name="run-1")
    assert rep.success, rep.to_metadata()["failed"]
    res = _by_key(rep)
    assert len(rep.results) == 11
    assert res[("images", "expect_column_mean_to_be_between", "dropped")].observed == pytest.approx(1 / 13)
    assert res[("kept_per_sku", "expect_column_min_to_be_between", "kept_images")].observed == 4
    assert res[("products", "expect_column_values_to_be_unique", "sku")].observed == "0 unexpected of 3"
    # Data Docs: a real HTML index that links the validation results of each suite
    assert rep.docs_path is not None and rep.docs_path.name == "index.html" and rep.docs_path.is_file()
    assert rep.docs_path.is_relative_to(tmp_path / "gx_docs")
    html = rep.docs_path.read_text()
    for suite in ("skulens_products", "skulens_images", "skulens_kept_images", "skulens_kept_per_sku"):
        assert suite in html
        pages = list((rep.docs_path.parent / "validations" / suite).rglob("*.html"))
        assert len(pages) == 1 and "run-1" in str(pages[0])
    md = rep.to_metadata()
    assert md["success"] is True and md["docs_path"] == str(rep.docs_path)
    # a second run into the same project works (assets/suites are reused, results accumulate)
    rep2 = validate_catalog(result.images, products, CFG, docs_dir=tmp_path / "gx_docs")
    assert rep2.success and rep2.import_seconds == 0.0


def test_the_html_report_is_self_contained_and_flags_failures(cleaned):
    """The report the data-quality check writes opens offline: inline style, no script, nothing fetched."""
    import re

    result, products = cleaned
    bad = pd.concat([products, products.iloc[:1]], ignore_index=True)  # a duplicate SKU id
    rep = validate_catalog(result.images, bad, CFG)
    html = rep.to_html("t")
    assert not re.search(r"<script|<link|@import|src=|https?://", html)
    assert html.count("<tr class='bad'>") == len(rep.failed()) >= 1
    assert all(r.name in html for r in rep.results) and "expectation(s) failed" in html


def test_duplicate_or_null_sku_in_products_fails(cleaned):
    result, products = cleaned
    broken = pd.concat([products, pd.DataFrame({"sku": ["P2", None], "name": ["dup", "null"]})], ignore_index=True)
    rep = validate_catalog(result.images, broken, CFG)
    assert not rep.success and rep.docs_path is None
    res = _by_key(rep)
    uniq = res[("products", "expect_column_values_to_be_unique", "sku")]
    assert not uniq.success and uniq.unexpected == ["P2", "P2"]
    assert not res[("products", "expect_column_values_to_not_be_null", "sku")].success
    assert {(r.table, r.name) for r in rep.failed()} == {
        ("products", "expect_column_values_to_be_unique"), ("products", "expect_column_values_to_not_be_null")}


def test_image_table_violations_fail(cleaned):
    result, products = cleaned
    images = result.images.copy()
    kept = images.index[images["status"] == "kept"]
    images.loc[kept[0], "sku"] = "NOT_IN_CATALOG"  # kept image with an unknown SKU
    images.loc[kept[1], "format"] = "PPM"  # format outside the allowed set
    images.loc[kept[2], "width"] = 5  # too narrow
    images.loc[kept[4:8], "status"] = "dropped"  # dropped share 5/13 > 0.2, and a SKU left with 1 kept image
    # one usable image is enough to be indexed (min_index_images 1); require 2 here to see the expectation fail
    rep = validate_catalog(images, products, dataclasses.replace(CFG, min_index_images=2), max_dropped_share=0.2)
    assert not rep.success
    failed = {(r.table, r.name, r.column) for r in rep.failed()}
    assert failed == {
        ("kept_images", "expect_column_values_to_be_in_set", "sku"),
        ("kept_images", "expect_column_values_to_be_in_set", "format"),
        ("kept_images", "expect_column_values_to_be_between", "width"),
        ("images", "expect_column_mean_to_be_between", "dropped"),
        ("kept_per_sku", "expect_column_min_to_be_between", "kept_images"),
    }
    res = _by_key(rep)
    assert res[("kept_images", "expect_column_values_to_be_in_set", "sku")].unexpected == ["NOT_IN_CATALOG"]
    assert res[("images", "expect_column_mean_to_be_between", "dropped")].observed == pytest.approx(5 / 13)
    assert res[("kept_per_sku", "expect_column_min_to_be_between", "kept_images")].observed == 1

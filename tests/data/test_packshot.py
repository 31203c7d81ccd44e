"""Packshot one-shot (issue 9 item 4), without services: products.csv's optional ``packshot`` column (or a
``packshot.<ext>`` file) is validated and carried through cleaning; a bad or missing packshot is reported
and falls back, never a crash; the RetailKLIP gallery and the thumbnails use the packshot; a SKU with only
a packshot is evaluated but never a training class."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import pytest

from skulens.catalog import contract, importer
from skulens.data import balance as bal
from skulens.data.clean import CleanConfig, clean_catalog
from skulens.index.build import catalog_frame, reference_rows, thumbnails
from skulens.index.rules import indexable
from tests import imagegen as g

P = contract.CATALOG_IMAGES_PREFIX
CFG = CleanConfig(workers=1)


def _img(seed: int) -> bytes:
    return g.jpeg_bytes(g.product_image(64, 64, seed=seed))


def test_packshot_names_parses_and_validates():
    products = pd.DataFrame({
        "sku": ["A", "B", "C", "D", "E", "F", "G", "H", "I"],
        "packshot": ["front.jpg", "B/front.png", "catalog/images/C/x.webp", "", "../../etc/x.jpg", "notes.txt",
                     "a/b.jpg", "%2e%2e%2fx.jpg", "bell\x07.jpg"],
    })
    names, problems = contract.packshot_names(products)
    assert names == {"A": "front.jpg", "B": "front.png", "C": "x.webp"}
    # a path, not an image, a path into another folder, a percent-encoded '../', a control character
    assert [p[0] for p in problems] == ["E", "F", "G", "H", "I"]
    assert contract.packshot_names(products.drop(columns="packshot")) == ({}, [])
    assert contract.packshot_names(None) == ({}, [])
    # read_products keeps the column (stripped); no column, no change
    df = contract.read_products(b"sku,name,packshot\nA,Apple, front.jpg \nB,Pear,\n")
    assert list(df["packshot"]) == ["front.jpg", ""]
    assert "packshot" not in contract.read_products(b"sku,name\nA,Apple\n").columns
    assert contract.is_packshot_convention("PackShot.PNG") and not contract.is_packshot_convention("packshot2.jpg")


@pytest.fixture
def cleaned(tmp_path):
    """A catalog with every packshot case; returns (CleanResult, {sku: {name: path}})."""
    root = tmp_path / "cat"
    files: dict[tuple[str, str], bytes] = {}
    for i in range(3):
        files[("RICH", f"{i}.jpg")] = _img(i)
    files[("RICH", "z-front.jpg")] = _img(3)  # named: last by path, still the packshot
    files[("LAUNCH", "a-store.jpg")] = _img(10)  # a launch: one store photo + its packshot (2 images: index role)
    files[("LAUNCH", "shot.jpg")] = _img(11)
    for i in range(3):
        files[("MISSING", f"{i}.jpg")] = _img(20 + i)  # names a file that was never uploaded
    files[("BROKEN", "0.jpg")] = _img(30)
    files[("BROKEN", "1.jpg")] = _img(31)
    files[("BROKEN", "bad.jpg")] = _img(32)[:-300]  # the named packshot is a truncated upload: dropped
    files[("CONV", "0.jpg")] = _img(40)
    files[("CONV", "PackShot.jpg")] = _img(41)  # no cell: the file-name convention
    files[("BADCELL", "0.jpg")] = _img(50)  # an unsafe cell
    same = _img(60)
    files[("DUP", "0.jpg")] = same  # byte-identical to the packshot, earlier by key: this copy goes
    files[("DUP", "front.jpg")] = same
    files[("DUP", "1.jpg")] = _img(61)
    rows = [g.manifest_row(s, g.write(root / s / n, d), key=f"{P}{s}/{n}") for (s, n), d in sorted(files.items())]
    products = pd.DataFrame({
        "sku": ["RICH", "LAUNCH", "MISSING", "BROKEN", "CONV", "BADCELL", "DUP"],
        "name": ["r", "l", "m", "b", "c", "x", "d"],
        "category": ["c"] * 7,
        "packshot": ["z-front.jpg", "shot.jpg", "nope.jpg", "bad.jpg", "", "../up.jpg", "front.jpg"],
    })
    res = clean_catalog(g.make_manifest(rows), products, tmp_path / "norm", CFG)
    return res, products


def test_clean_marks_the_packshot_and_records_every_fallback(cleaned, tmp_path):
    res, _ = cleaned
    kept = res.kept
    assert kept["packshot"].dtype == bool
    shots = dict(zip(kept.loc[kept["packshot"], "sku"], kept.loc[kept["packshot"], "key"]))
    assert shots == {"RICH": f"{P}RICH/z-front.jpg", "LAUNCH": f"{P}LAUNCH/shot.jpg",
                     "CONV": f"{P}CONV/PackShot.jpg", "DUP": f"{P}DUP/front.jpg"}
    assert kept.groupby("sku")["packshot"].sum().max() == 1  # at most one per SKU
    # the packshot's copy of a within-SKU duplicate is the one kept
    why = dict(zip(res.dropped_files["key"], res.dropped_files["reason"]))
    assert why[f"{P}DUP/0.jpg"] == "DUPLICATE_IN_SKU" and f"{P}DUP/front.jpg" in set(kept["key"])
    assert why[f"{P}BROKEN/bad.jpg"] in ("TRUNCATED", "CORRUPT")
    # a launch (packshot + one more) is indexed, never trained on
    roles = res.sku_roles.set_index("sku")["role"]
    assert roles["LAUNCH"] == "index" and roles["RICH"] == "train" and roles["MISSING"] == "train"
    # every named packshot is accounted for
    rep = res.packshots.set_index("sku")
    assert rep.loc["RICH", "status"] == "used" and rep.loc["RICH", "key"] == f"{P}RICH/z-front.jpg"
    assert rep.loc["MISSING", "status"] == "missing" and "nope.jpg" in rep.loc["MISSING", "detail"]
    assert rep.loc["MISSING", "key"] == "" and "first image" in rep.loc["MISSING", "detail"]
    assert rep.loc["BROKEN", "status"] == "dropped" and rep.loc["BROKEN", "reason"] in ("TRUNCATED", "CORRUPT")
    assert rep.loc["BADCELL", "status"] == "invalid" and rep.loc["BADCELL", "source"] == "products.csv"
    assert rep.loc["CONV", "source"] == "file name" and rep.loc["CONV", "status"] == "used"
    assert res.stats["skus_with_packshot"] == 4 and res.stats["packshot_problems"] == 3
    # nothing is lost: every manifest row is in the images table, kept or dropped with a reason
    assert len(res.images) == 18 and set(res.images["status"]) == {"kept", "dropped"}
    assert (res.images.loc[res.images["status"] == "dropped", "reason"] != "").all()
    paths = res.write_csv(tmp_path / "reports")
    assert len(pd.read_csv(paths["packshots"])) == len(res.packshots)


def test_no_packshot_column_changes_nothing(tmp_path):
    rows = [g.manifest_row("S", g.write(tmp_path / "S" / f"{i}.jpg", _img(i)), key=f"{P}S/{i}.jpg") for i in range(3)]
    res = clean_catalog(g.make_manifest(rows), pd.DataFrame({"sku": ["S"]}), tmp_path / "n", CFG)
    assert not res.kept["packshot"].any() and res.packshots.empty and res.stats["packshot_problems"] == 0
    assert list(reference_rows(catalog_frame(res.kept))["key"]) == [f"{P}S/0.jpg"]  # the current rule


def test_training_frame_never_holds_a_packshot_only_sku(cleaned):
    res, _ = cleaned
    train_src = bal.training_classes(res.kept)
    assert "LAUNCH" in set(res.kept["sku"]) and "LAUNCH" not in set(train_src["sku"])
    train, val = bal.split_validation(train_src, per_sku=1, seed=0)
    balanced = bal.balance(train, 6, seed=0)
    for df in (train, val, balanced):
        assert "LAUNCH" not in set(df["sku"])
    assert set(balanced["sku"]) == {"RICH", "MISSING"}  # DUP is left with 2 distinct images: index-only too


@pytest.fixture(scope="module")
def tiny_encoder():
    torch = pytest.importorskip("torch")
    from skulens.model import ModelSpec, create_encoder

    torch.manual_seed(0)
    return create_encoder(ModelSpec(name="tiny-test"), device="cpu").eval()


def test_retailklip_gallery_and_thumbnails_use_the_packshot(cleaned, tiny_encoder):
    from skulens.evaluation.retrieval import retailklip_gallery
    from skulens.model.embed import embed_images

    res, _ = cleaned
    catalog = indexable(res)
    assert catalog["packshot"].sum() == 4
    gal = retailklip_gallery(tiny_encoder, catalog, n_aug=2, seed=0, image_col="clean_path", key_col="key")
    base = {s: k for s, k in zip(gal.skus, gal.keys) if "#aug" not in k}
    assert base == {"RICH": f"{P}RICH/z-front.jpg", "LAUNCH": f"{P}LAUNCH/shot.jpg", "CONV": f"{P}CONV/PackShot.jpg",
                    "DUP": f"{P}DUP/front.jpg", "MISSING": f"{P}MISSING/0.jpg", "BROKEN": f"{P}BROKEN/0.jpg",
                    "BADCELL": f"{P}BADCELL/0.jpg"}  # the packshot, else the first image by path
    assert gal.meta["packshot_skus"] == 4 and len(gal) == 7 * 3
    row = list(gal.keys).index(f"{P}LAUNCH/shot.jpg")
    path = catalog.loc[catalog["key"] == f"{P}LAUNCH/shot.jpg", "clean_path"].item()
    np.testing.assert_allclose(gal.vectors[row], embed_images(tiny_encoder, [path])[0], atol=1e-5)
    thumbs = thumbnails(catalog)
    assert Path(thumbs["RICH"]).name == "z-front.jpg" and Path(thumbs["MISSING"]).name == "0.jpg"
    # the gallery does not depend on catalog order, and a catalog without the column keeps the old rule
    again = retailklip_gallery(tiny_encoder, catalog.iloc[::-1], n_aug=2, seed=0, image_col="clean_path")
    assert list(again.keys) == list(gal.keys)
    old = retailklip_gallery(tiny_encoder, catalog.drop(columns="packshot"), n_aug=0, image_col="clean_path")
    assert sorted(old.keys)[:2] == [f"{P}BADCELL/0.jpg", f"{P}BROKEN/0.jpg"] and f"{P}RICH/0.jpg" in set(old.keys)


def test_packshot_only_sku_is_evaluated_in_both_galleries(cleaned, tiny_encoder, tmp_path):
    """Shelf crops of a SKU with only its packshot are scored (catalog and RetailKLIP galleries) and counted
    in the sparse split."""
    from skulens.evaluation.compare import evaluate_model

    res, products = cleaned
    catalog = indexable(res)
    crops = []
    for sku, seed in (("LAUNCH", 11), ("LAUNCH", 10), ("RICH", 3)):
        p = g.write(tmp_path / "shelf" / sku / f"{seed}.jpg", g.jpeg_bytes(g.product_image(48, 64, seed=seed)))
        crops.append({"sku": sku, "key": f"shelf/crops/{sku}/{seed}.jpg", "etag": str(seed), "bytes": 1,
                      "path": str(p), "source": "crop"})
    out = evaluate_model(tiny_encoder, pd.DataFrame(crops), catalog, products, k=3, n_aug=1,
                         sparse_below=3, sparse_views=1)
    for gallery in ("catalog", "retailklip"):
        rep = out["reports"][gallery]
        assert rep.n == 3 and rep.n_unknown == 0
        assert rep.per_sku.set_index("sku").loc["LAUNCH", "n"] == 2
        m = out["metrics"][gallery]
        assert m["n_sparse"] == 2 and m["n_rich"] == 1  # the launch's crops are in the sparse split
    assert "LAUNCH" in out["catalog_index"].sku_list


def test_import_warns_about_unusable_packshots_and_uploads_anyway(tmp_path):
    src = tmp_path / "src"
    g.write(src / "images" / "A" / "front.jpg", _img(1))
    g.write(src / "images" / "B" / "0.jpg", _img(2))
    g.write(src / "images" / "C" / "0.jpg", _img(3))
    (src / "products.csv").write_text("sku,name,packshot\nA,Apple,front.jpg\nB,Pear,gone.jpg\nC,Fig,../x.jpg\n")
    report = importer.ImportReport()
    items = importer.plan_catalog(src, report)
    assert contract.PRODUCTS_KEY in {i.key for i in items} and len(items) == 4
    assert len(report.warnings) == 2
    assert "B" in report.warnings[1] and "gone.jpg" in report.warnings[1]
    assert report.warnings[0].startswith("packshot of C:")
    assert "2 warning(s)" in report.summary()

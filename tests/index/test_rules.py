"""One indexable rule: the full build (sku_index) and index_update put the same catalog images into the
index, through catalog changes (delisting and relisting via products.csv, a redesign, a cross-SKU copy
going away), with the tiny tower and no services."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import pytest

from skulens.data.clean import CleanConfig
from skulens.index import build, rules, update
from tests import imagegen as g

torch = pytest.importorskip("torch")

PREFIX = "catalog/images/"
SPARSE = {"below": 3, "views": 1, "seed": 0}  # one view per sparse image: the rule is exercised, the test stays fast
CFG = CleanConfig(workers=1)  # the params.yaml thresholds (the CleanConfig defaults), in process


@pytest.fixture(scope="module")
def encoder():
    from skulens.model.factory import ModelSpec, create_encoder

    torch.manual_seed(0)
    return create_encoder(ModelSpec(name="tiny-test"), device="cpu").eval()


class Catalog:
    """A local stand-in for the bucket: files under ``root/<sku>/<name>`` and the products table."""

    def __init__(self, root: Path):
        self.root, self.files, self.products = root, {}, set()

    def put(self, sku: str, name: str, data: bytes) -> None:
        self.files[(sku, name)] = g.write(self.root / sku / name, data)

    def delete(self, sku: str, name: str | None = None) -> None:
        for k in [k for k in self.files if k[0] == sku and (name is None or k[1] == name)]:
            self.files.pop(k).unlink()

    def manifest(self) -> pd.DataFrame:
        return g.make_manifest([g.manifest_row(s, p, key=f"{PREFIX}{s}/{n}")
                                for (s, n), p in sorted(self.files.items())])

    def products_table(self) -> pd.DataFrame:
        skus = sorted(self.products)
        return pd.DataFrame({"sku": skus, "name": skus, "category": ["c"] * len(skus)})


def _img(seed: int) -> bytes:
    return g.jpeg_bytes(g.product_image(64, 64, seed=seed))


def _full_build(encoder, cat: Catalog, work: Path):
    """What sku_index does: clean the whole catalog against products.csv, then build_full_index."""
    cleaned = rules.check_images(cat.manifest(), cat.products_table(), work / "full-clean", CFG)
    store = SimpleNamespace(model_name="m", champion=lambda: SimpleNamespace(version="1", uri="runs:/r/e.pt"),
                            complete=lambda ref: SimpleNamespace(sha256="0" * 64),
                            engine=lambda ref, backend=None, device="cpu": encoder)
    index, _ = build.build_full_index(store, cleaned, sparse_below=SPARSE["below"], sparse_views=SPARSE["views"],
                                      aug_seed=SPARSE["seed"])
    return index


def _rows(index) -> dict:
    return {(str(s), str(k)): v for s, k, v in zip(index.skus, index.keys, index.vectors)}


def _assert_same(full, incremental) -> None:
    a, b = _rows(full), _rows(incremental)
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=str(k))


def test_full_build_and_index_update_index_the_same_images(encoder, tmp_path):
    cat = Catalog(tmp_path / "cat")
    for i in range(4):
        cat.put("RICH", f"{i}.jpg", _img(i))  # a training SKU
    cat.put("PACK", "0.jpg", _img(10))  # packshot-only: index role, with shelf-like views
    cat.put("NOTLISTED", "0.jpg", _img(20))  # images, but not in products.csv: UNKNOWN_SKU
    cat.put("NOTLISTED", "1.jpg", _img(21))
    cat.put("BROKEN", "0.jpg", _img(30))
    cat.put("BROKEN", "1.jpg", _img(31))
    cat.put("BROKEN", "2.jpg", _img(32)[:-400])  # truncated upload: dropped, the SKU keeps 2 images
    for i in range(3):
        cat.put("DELIST", f"{i}.jpg", _img(40 + i))
    twin = _img(50)  # the same bytes under two SKUs: every copy dropped (DUPLICATE_ACROSS_SKUS)
    cat.put("TWIN-A", "0.jpg", twin)
    cat.put("TWIN-A", "1.jpg", _img(51))
    cat.put("TWIN-B", "0.jpg", twin)
    cat.put("TWIN-B", "1.jpg", _img(52))
    cat.put("ONLYBAD", "0.jpg", b"")  # nothing usable: the SKU is not indexed
    cat.products = {"RICH", "PACK", "BROKEN", "DELIST", "TWIN-A", "TWIN-B", "ONLYBAD", "NOIMAGES"}

    full = _full_build(encoder, cat, tmp_path)
    start = update._empty_index(encoder.embed_dim, "1")
    start.meta["sparse"] = dict(SPARSE)
    inc, rep = update.update_index(encoder, start, cat.manifest(), tmp_path / "upd", "1",
                                   products=cat.products_table(), clean_config=CFG)
    _assert_same(full, inc)
    assert full.sku_list == ["BROKEN", "DELIST", "PACK", "RICH", "TWIN-A", "TWIN-B"]
    keys = set(full.keys)
    assert f"{PREFIX}PACK/0.jpg#aug1" in keys and f"{PREFIX}BROKEN/2.jpg" not in keys
    assert f"{PREFIX}TWIN-A/0.jpg" not in keys and f"{PREFIX}TWIN-B/0.jpg" not in keys
    for idx in (full, inc):  # both record the rule the next update applies
        assert idx.meta[rules.UNLISTED_META] == ["NOTLISTED"]
        assert set(idx.meta[rules.DUPLICATES_META]) == {f"{PREFIX}TWIN-A/0.jpg", f"{PREFIX}TWIN-B/0.jpg"}
        assert idx.meta[rules.RULE_META] == rules.rule_of(CFG)
    why = dict(zip(rep.dropped_files["key"], rep.dropped_files["reason"]))
    assert why[f"{PREFIX}NOTLISTED/0.jpg"] == "UNKNOWN_SKU" and why[f"{PREFIX}BROKEN/2.jpg"] in ("TRUNCATED", "CORRUPT")

    # day 2: DELIST leaves products.csv (its images stay in S3), NOTLISTED enters it, RICH is redesigned
    # (old images deleted, a new look uploaded), TWIN-A's copy of the shared image is deleted (TWIN-B's
    # copy becomes a good image), and the build's index is updated
    cat.products = (cat.products - {"DELIST"}) | {"NOTLISTED"}
    cat.delete("RICH")
    for i in range(3):
        cat.put("RICH", f"new-{i}.jpg", _img(100 + i))
    cat.delete("TWIN-A", "0.jpg")
    inc2, rep2 = update.update_index(encoder, full, cat.manifest(), tmp_path / "upd", "1",
                                     products=cat.products_table())
    _assert_same(_full_build(encoder, cat, tmp_path), inc2)
    assert rep2.delisted_skus == ["DELIST"] and "DELIST" in rep2.removed_skus and "DELIST" not in inc2.sku_list
    assert "DELIST" not in rep2.changed_skus  # removed without re-checking its unchanged images
    assert {"NOTLISTED", "RICH", "TWIN-A", "TWIN-B"} <= set(rep2.changed_skus)
    assert "PACK" not in rep2.changed_skus and "BROKEN" not in rep2.changed_skus  # untouched SKUs stay as they are
    # the redesigned SKU is recognized by its new look only, the same day
    assert sorted(inc2.keys[inc2.skus == "RICH"]) == [f"{PREFIX}RICH/new-{i}.jpg" for i in range(3)]
    assert f"{PREFIX}TWIN-B/0.jpg" in set(inc2.keys) and inc2.meta[rules.DUPLICATES_META] == {}
    assert inc2.meta[rules.UNLISTED_META] == ["DELIST"]

    # day 3: DELIST comes back to products.csv; a new SKU uploads a copy of one of PACK's images
    cat.products |= {"DELIST", "COPYCAT"}
    cat.put("COPYCAT", "0.jpg", (tmp_path / "cat" / "PACK" / "0.jpg").read_bytes())
    cat.put("COPYCAT", "1.jpg", _img(60))
    inc3, rep3 = update.update_index(encoder, inc2, cat.manifest(), tmp_path / "upd", "1",
                                     products=cat.products_table())
    _assert_same(_full_build(encoder, cat, tmp_path), inc3)
    assert {"DELIST", "COPYCAT", "PACK"} <= set(rep3.changed_skus)  # PACK re-checked with its copy
    assert "PACK" not in inc3.sku_list and "DELIST" in inc3.sku_list  # PACK's only image is a cross-SKU copy now


def test_redesigned_sku_has_only_its_new_images_after_one_update(encoder, tmp_path):
    """A redesign: the SKU's old images are deleted from S3 and a new look is uploaded (new keys, and one
    old key overwritten with new bytes). One update leaves exactly the new images' rows, embedded from the
    new files."""
    from skulens.model.embed import embed_images

    cat = Catalog(tmp_path / "cat")
    for i in range(3):
        cat.put("SKU1", f"old-{i}.jpg", _img(i))
        cat.put("SKU2", f"{i}.jpg", _img(10 + i))
    cat.products = {"SKU1", "SKU2"}
    start = update._empty_index(encoder.embed_dim, "1")
    v1, _ = update.update_index(encoder, start, cat.manifest(), tmp_path / "w", "1", products=cat.products_table())
    assert sorted(v1.keys[v1.skus == "SKU1"]) == [f"{PREFIX}SKU1/old-{i}.jpg" for i in range(3)]

    cat.delete("SKU1")
    cat.put("SKU1", "old-0.jpg", _img(200))  # same key, new bytes
    for i in range(2):
        cat.put("SKU1", f"new-{i}.jpg", _img(100 + i))
    v2, rep = update.update_index(encoder, v1, cat.manifest(), tmp_path / "w", "1", products=cat.products_table())
    assert rep.changed_skus == ["SKU1"] and rep.removed_skus == []
    rows = v2.skus == "SKU1"
    assert sorted(v2.keys[rows]) == [f"{PREFIX}SKU1/new-0.jpg", f"{PREFIX}SKU1/new-1.jpg", f"{PREFIX}SKU1/old-0.jpg"]
    order = np.argsort(v2.keys[rows])
    want = embed_images(encoder, [cat.files[("SKU1", n)] for n in ("new-0.jpg", "new-1.jpg", "old-0.jpg")])
    np.testing.assert_allclose(v2.vectors[rows][order], want, atol=1e-5)
    np.testing.assert_array_equal(v2.vectors[v2.skus == "SKU2"], v1.vectors[v1.skus == "SKU2"])  # untouched


def test_index_delta_products_membership():
    """Pure delta rules: delisting removes an indexed SKU whose images did not change; relisting re-checks
    a SKU recorded as unlisted; an index without the record re-checks the listed SKUs it lacks; equal
    ETags link SKUs only through files that can be duplicates (indexed or recorded copies)."""
    k = {s: f"{PREFIX}{s}/0.jpg" for s in ("a", "b", "c", "d")}
    cur = {k["a"]: "e1", k["b"]: "e2", k["c"]: "e3", k["d"]: "e4"}
    d = update.index_delta(cur, dict(cur), listed={"a", "c", "d"}, indexed_skus={"a", "b", "c"}, unlisted=["d"])
    assert d.removed_skus == d.delisted_skus == ["b"] and d.changed_skus == ["d"] and d.unlisted_skus == ["b"]
    d = update.index_delta(cur, dict(cur), listed={"a", "b", "c", "d"}, indexed_skus={"a", "b", "c"}, unlisted=None)
    assert d.changed_skus == ["d"] and not d.removed_skus
    d = update.index_delta(cur, dict(cur), listed=None, indexed_skus={"a", "b", "c"}, unlisted=["d"])
    assert d.empty and d.unlisted_skus == []  # no products table: no membership rule
    d = update.index_delta(cur, dict(cur), deferred={"b"}, listed={"a"}, indexed_skus={"a", "b"})
    assert "b" not in d.removed_skus  # a deferred SKU is left as indexed
    # a new file with the bytes of c's indexed image links c; the same bytes as d's broken file link nothing
    new = {**cur, f"{PREFIX}e/0.jpg": "e3", f"{PREFIX}f/0.jpg": "e4"}
    d = update.index_delta(new, dict(cur), linking={"e1", "e2", "e3"})
    assert d.changed_skus == ["c", "e", "f"]

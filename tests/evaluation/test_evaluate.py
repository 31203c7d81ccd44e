"""Evaluation metrics, confusions, plots, RetailKLIP gallery and embed_images on a tiny real model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skulens.evaluation.plots import plot_confusions, plot_per_sku
from skulens.evaluation.retrieval import EvalReport, evaluate, retailklip_gallery
from skulens.index.sku_index import SkuIndex
from skulens.model.augment import perspective_coeffs, shelf_augment

PRODUCTS = pd.DataFrame({
    "sku": ["A", "B", "C", "D"],
    "name": ["Cola 0.5l", "Cola Zero 0.5l", "Orange juice 1l", "Apple juice 1l"],
    "category": ["soda", "soda", "juice", "juice"],
})


def _basis_index():
    """Four SKUs on orthogonal axes (two gallery rows each)."""
    eye = np.eye(4, dtype=np.float32)
    vecs = np.concatenate([eye, eye + 0.05 * np.roll(eye, 1, axis=1)])
    skus = ["A", "B", "C", "D"] * 2
    return SkuIndex(vecs, skus, [f"k{i}" for i in range(8)], model_version="1")


def _query(main: int, second: int | None = None, w: float = 0.3):
    v = np.zeros(4, np.float32)
    v[main] = 1.0
    if second is not None:
        v[second] = w
    return v


def test_evaluate_metrics_confusions_and_categories():
    idx = _basis_index()
    # A x3 correct; B x2: one correct, one confused with A (same category); C x2 confused with D
    # (same category) and with A (other category); D x1 correct with A in its top-2.
    q = np.stack([_query(0), _query(0), _query(0),
                  _query(1), _query(0, 1, 0.9),
                  _query(3, 2, 0.5), _query(0, 2, 0.2),
                  _query(3, 0, 0.5)])
    true = ["A", "A", "A", "B", "B", "C", "C", "D"]
    rep = evaluate(q, true, idx, products=PRODUCTS, k=2)
    assert isinstance(rep, EvalReport)
    assert rep.n == 8 and rep.k == 2
    assert rep.top1 == pytest.approx(5 / 8)
    # in top-2: all A, both B (A,B), C: (D,C) yes / (A,C) yes, D yes
    assert rep.top5 == pytest.approx(8 / 8)
    per = rep.per_sku.set_index("sku")
    assert per.loc["A", "n"] == 3 and per.loc["A", "top1"] == 1.0
    assert per.loc["B", "top1"] == 0.5 and per.loc["C", "top1"] == 0.0
    assert per.loc["C", "name"] == "Orange juice 1l" and per.loc["C", "category"] == "juice"
    assert rep.per_sku.iloc[0]["sku"] == "C"  # worst first
    conf = rep.confusions
    assert set(map(tuple, conf[["true", "predicted"]].values)) == {("B", "A"), ("C", "D"), ("C", "A")}
    assert conf["count"].sum() == 3
    assert conf.set_index(["true", "predicted"]).loc[("B", "A"), "predicted_name"] == "Cola 0.5l"
    # category: only C->A crosses categories
    assert rep.category_acc == pytest.approx(7 / 8)
    cat = rep.per_category.set_index("category")
    assert cat.loc["juice", "n"] == 3 and cat.loc["juice", "category_acc"] == pytest.approx(2 / 3)
    m = rep.metrics()
    assert m["top1"] == rep.top1 and m["top2"] == rep.top5 and m["category_acc"] == rep.category_acc
    assert "top1" in rep.summary()


def test_unknown_skus_count_as_misses_and_no_products():
    idx = _basis_index()
    rep = evaluate(np.stack([_query(0), _query(1)]), ["A", "Z"], idx)
    assert rep.top1 == 0.5 and rep.n_unknown == 1 and rep.category_acc is None and rep.per_category is None
    assert list(rep.confusions[["true", "predicted"]].iloc[0]) == ["Z", "B"]
    with pytest.raises(ValueError):
        evaluate(np.stack([_query(0)]), ["A", "B"], idx)


def test_plots_write_pngs(tmp_path):
    idx = _basis_index()
    q = np.stack([_query(0), _query(0, 1, 0.9), _query(3, 2, 0.5), _query(2)])
    rep = evaluate(q, ["A", "B", "C", "C"], idx, products=PRODUCTS)
    thumbs = {}
    for i, s in enumerate("ABC"):
        p = tmp_path / f"{s}.png"
        Image.new("RGB", (40, 60), (60 * i, 100, 200)).save(p)
        thumbs[s] = str(p)
    out1 = plot_per_sku(rep, tmp_path / "per_sku.png")
    out2 = plot_confusions(rep, thumbs, tmp_path / "conf.png")  # D has no thumbnail: grey box
    for out in (out1, out2):
        with Image.open(out) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
    # no confusions at all still gives a picture
    perfect = evaluate(np.eye(4, dtype=np.float32), list("ABCD"), idx)
    with Image.open(plot_confusions(perfect, {}, tmp_path / "none.png")) as im:
        assert im.format == "PNG"


# ------------------------------------------------------------------------ with a tiny real model
@pytest.fixture(scope="module")
def tiny_encoder():
    import torch

    from skulens.model import ModelSpec, create_encoder

    torch.manual_seed(0)
    return create_encoder(ModelSpec(name="tiny-test"), device="cpu")


def _product_image(i: int, size=(80, 120)) -> Image.Image:
    """A synthetic 'packshot': distinct colour blocks and stripes per product."""
    rng = np.random.default_rng(i)
    arr = np.full((size[1], size[0], 3), 245, np.uint8)
    arr[10:-10, 8:-8] = rng.integers(0, 255, 3)
    for r in range(15, size[1] - 15, 12 + i % 5):
        arr[r:r + 4, 12:-12] = rng.integers(0, 255, 3)
    return Image.fromarray(arr, "RGB")


def test_embed_images_normalised_batch_invariant_and_mode_restored(tiny_encoder, tmp_path):
    from skulens.model.embed import embed_images

    imgs = [_product_image(i) for i in range(5)]
    p = tmp_path / "x.png"
    imgs[0].save(p)
    rgba = imgs[1].convert("RGBA")
    gray = imgs[2].convert("L")
    tiny_encoder.train()
    a = embed_images(tiny_encoder, [str(p), rgba, gray, imgs[3], imgs[4]], batch_size=2)
    assert tiny_encoder.training  # caller's mode restored
    tiny_encoder.eval()
    b = embed_images(tiny_encoder, [imgs[0], imgs[1], imgs[2].convert("L").convert("RGB"), imgs[3], imgs[4]],
                     batch_size=5)
    assert a.dtype == np.float32 and a.shape == (5, tiny_encoder.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)  # path == PIL, batch size does not matter (eval mode)
    assert embed_images(tiny_encoder, []).shape == (0, tiny_encoder.embed_dim)


def test_retailklip_gallery_deterministic(tiny_encoder, tmp_path):
    rows = []
    for i in range(3):
        for j in range(2):  # two images per SKU: only the first (by path) is used
            p = tmp_path / f"sku{i}_{j}.png"
            _product_image(i * 10 + j).save(p)
            rows.append({"sku": f"sku{i}", "path": str(p), "key": f"catalog/images/sku{i}/{j}.png"})
    df = pd.DataFrame(rows)
    g1 = retailklip_gallery(tiny_encoder, df, n_aug=3, seed=7, model_version="5")
    assert len(g1) == 3 * 4 and g1.model_version == "5" and g1.meta["variant"] == "retailklip"
    assert sorted(set(g1.skus)) == ["sku0", "sku1", "sku2"]
    assert list(g1.keys[:4]) == ["catalog/images/sku0/0.png"] + [f"catalog/images/sku0/0.png#aug{i}" for i in (1, 2, 3)]
    g2 = retailklip_gallery(tiny_encoder, df.iloc[::-1], n_aug=3, seed=7)  # order does not matter
    np.testing.assert_allclose(g1.vectors, g2.vectors, atol=1e-6)
    g3 = retailklip_gallery(tiny_encoder, df, n_aug=3, seed=8)
    assert not np.allclose(g1.vectors[1:4], g3.vectors[1:4])
    np.testing.assert_allclose(g1.vectors[0], g3.vectors[0], atol=1e-6)  # the clean image is unchanged
    # the clean catalog image retrieves its own SKU
    from skulens.model.embed import embed_images

    q = embed_images(tiny_encoder, [str(tmp_path / "sku1_0.png")])
    assert g1.search(q, k=1)[0][0][0] == "sku1"


def test_shelf_augment_is_mild_and_seeded():
    img = _product_image(3)
    a = shelf_augment(img, np.random.default_rng(1))
    b = shelf_augment(img, np.random.default_rng(1))
    assert a.mode == "RGB" and 0.8 * 80 <= a.size[0] <= 80 and 0.8 * 120 <= a.size[1] <= 120  # loose crop box
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    diff = np.abs(np.asarray(a.resize(img.size), np.float32) - np.asarray(img, np.float32)).mean()
    assert 1.0 < diff < 80.0


def test_perspective_coeffs_maps_output_corners_to_input_corners():
    dst = [(0, 0), (100, 0), (100, 60), (0, 60)]  # output corners
    src = [(7.5, 3.0), (91.0, 9.0), (96.0, 55.5), (2.0, 50.0)]  # input corners they must sample
    a, b, c, d, e, f, g, h = perspective_coeffs(dst, src)
    for (x, y), (u, v) in zip(dst, src):
        den = g * x + h * y + 1
        assert (a * x + b * y + c) / den == pytest.approx(u, abs=1e-9)
        assert (d * x + e * y + f) / den == pytest.approx(v, abs=1e-9)
    # the rectangle onto itself is the identity
    np.testing.assert_allclose(perspective_coeffs(dst, dst), [1, 0, 0, 0, 1, 0, 0, 0], atol=1e-12)


def test_shelf_augment_strength_zero_is_identity():
    img = _product_image(4)
    for src in (img, img.convert("L"), img.convert("RGBA")):
        out = shelf_augment(src, np.random.default_rng(3), strength=0)
        assert out.mode == "RGB" and out.size == src.size
        np.testing.assert_array_equal(np.asarray(out), np.asarray(src.convert("RGB")))
    # weaker strength distorts less than the default; negative strength is rejected
    weak = shelf_augment(img, np.random.default_rng(5), strength=0.3)
    full = shelf_augment(img, np.random.default_rng(5))
    ref = np.asarray(img, np.float32)
    d_weak = np.abs(np.asarray(weak.resize(img.size), np.float32) - ref).mean()
    d_full = np.abs(np.asarray(full.resize(img.size), np.float32) - ref).mean()
    assert 0 < d_weak < d_full
    with pytest.raises(ValueError):
        shelf_augment(img, np.random.default_rng(0), strength=-1)

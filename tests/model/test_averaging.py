"""Weight EMA, best-epoch selection and early stopping in fine-tuning."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

torch = pytest.importorskip("torch")

from skulens.data.balance import split_validation
from skulens.model import load_encoder
from skulens.model.averaging import BestWeights, WeightEMA
from skulens.model.train import shelf_views, train
from tests.model.test_train import _cfg, _one_thread, catalog  # noqa: F401 - fixtures


def _module():
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    torch.nn.init.constant_(m[0].weight, 1.0)
    return m


def test_ema_warms_up_then_averages_and_copies_integer_buffers():
    m = _module()
    ema = WeightEMA(m, decay=0.9)
    with torch.no_grad():
        m[0].weight.fill_(3.0)
    m[1].num_batches_tracked.fill_(7)
    ema.update(m)  # first update: d = min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow["0.weight"], torch.full((2, 3), d * 1.0 + (1 - d) * 3.0))
    assert int(ema.shadow["1.num_batches_tracked"]) == 7
    for _ in range(200):
        ema.update(m)
    assert torch.allclose(ema.shadow["0.weight"], torch.full((2, 3), 3.0), atol=1e-6)
    assert ema.updates == 201 and min(0.9, 202 / 211) == 0.9


def test_ema_applied_swaps_weights_in_and_back():
    m = _module()
    ema = WeightEMA(m, decay=0.5)
    with torch.no_grad():
        m[0].weight.fill_(5.0)
    with ema.applied(m):
        assert float(m[0].weight.detach()[0, 0]) == 1.0
    assert float(m[0].weight.detach()[0, 0]) == 5.0
    st = ema.state_dict()
    other = WeightEMA(_module(), decay=0.5)
    other.load_state_dict(st)
    assert other.updates == 0 and torch.equal(other.shadow["0.weight"], ema.shadow["0.weight"])
    with pytest.raises(ValueError):
        WeightEMA(m, decay=1.0)


def test_best_weights_keeps_the_later_epoch_on_ties_and_ignores_missing_accuracy():
    b = BestWeights()
    assert not b.offer(1, None, {"w": torch.zeros(1)})
    assert not b.offer(1, float("nan"), {"w": torch.zeros(1)})
    assert b.offer(1, 0.5, {"w": torch.ones(1)})
    assert not b.offer(2, 0.4, {"w": torch.full((1,), 2.0)})
    assert b.offer(3, 0.5, {"w": torch.full((1,), 3.0)})  # tie: the more trained weights
    assert b.epoch == 3 and float(b.state["w"]) == 3.0
    assert b.improved == 1 and b.epochs_since(5) == 4  # a tie is not an improvement
    c = BestWeights()
    c.load_state_dict(b.state_dict())
    assert c.epoch == 3 and c.acc == 0.5 and c.improved == 1


def test_shelf_views_are_seeded_per_file(catalog):  # noqa: F811
    paths = catalog["clean_path"].tolist()[:3]
    a, b, c = shelf_views(paths, 0), shelf_views(paths, 0), shelf_views(paths, 1)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert [im.tobytes() for im in a] != [im.tobytes() for im in c]


def test_shelf_views_cap_large_images(tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (900, 600), (200, 30, 30)).save(big)
    # shelf_augment keeps 80-100 % of each side of what it is given
    (view,) = shelf_views([str(big)], 0, max_short_side=100)
    assert 80 <= view.size[1] <= 100 and 120 <= view.size[0] <= 150  # shrunk to 150 x 100 first
    (full,) = shelf_views([str(big)], 0, max_short_side=600)  # not larger than the cap: full size
    assert full.size[0] >= 720 and full.size[1] >= 480


def test_keep_best_saves_the_best_epochs_weights(catalog, tmp_path):  # noqa: F811
    tr, val = split_validation(catalog, per_sku=2, seed=0)
    res = train(tr, val, "tiny-test", _cfg(epochs=3, keep_best=True), tmp_path / "a", progress=False, device="cpu")
    trained = [h for h in res.history if h["epoch"] > 0]
    accs = [h["val_acc"] for h in trained]
    best_epoch = max(i + 1 for i, a in enumerate(accs) if a == max(accs))  # latest epoch on ties
    assert res.extra["best_epoch"] == best_epoch
    assert res.extra["saved_weights"] == f"best (epoch {best_epoch})"
    # the saved encoder is the one that scored best: its validation accuracy, recomputed, is the best one
    from skulens.model.embed import embed_images
    from skulens.model.train import _nn_top1

    enc = load_encoder(res.encoder_path)
    enc.spec = res.spec  # validated at the training size
    from skulens.model.factory import _eval_transform_for

    enc.preprocess = _eval_transform_for(res.spec)
    gal = tr.drop_duplicates("clean_path")
    g = embed_images(enc, gal["clean_path"].tolist())
    q = embed_images(enc, shelf_views(val["clean_path"].tolist(), 0))
    assert _nn_top1(g, gal["sku"].tolist(), q, val["sku"].tolist()) == pytest.approx(res.extra["best_val_acc"])


def test_ema_is_what_is_validated_and_saved(catalog, tmp_path):  # noqa: F811
    tr, val = split_validation(catalog, per_sku=2, seed=0)
    plain = train(tr, val, "tiny-test", _cfg(epochs=2, keep_best=False), tmp_path / "p", progress=False,
                  device="cpu")
    avg = train(tr, val, "tiny-test", _cfg(epochs=2, keep_best=False, ema_decay=0.9), tmp_path / "e",
                progress=False, device="cpu")
    assert avg.extra["saved_weights"] == "ema" and avg.steps == plain.steps
    a = load_encoder(plain.encoder_path).model.state_dict()
    b = load_encoder(avg.encoder_path).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("keep_best", [True, False])  # early stopping does not need keep_best
def test_early_stop_ends_training_and_a_resume_does_not_continue(catalog, tmp_path, keep_best):  # noqa: F811
    tr, val = split_validation(catalog, per_sku=2, seed=0)
    # base_lr 0: the tower never changes, so validation accuracy never improves after epoch 1
    cfg = _cfg(epochs=6, keep_best=keep_best, early_stop_patience=1, base_lr=0.0, arcface_lr=0.0)
    res = train(tr, val, "tiny-test", cfg, tmp_path / "s", progress=False, device="cpu")
    trained = [h for h in res.history if h["epoch"] > 0]
    assert res.extra["stopped_early"] and len(trained) < 6
    assert res.extra["saved_weights"].startswith("best") if keep_best else res.extra["saved_weights"] == "last"
    again = train(tr, val, "tiny-test", cfg, tmp_path / "s", progress=False, device="cpu")
    assert again.steps == res.steps and len([h for h in again.history if h["epoch"] > 0]) == len(trained)
    assert again.extra["decode_cache_s"] is None  # nothing left to train: no image decoded again


def test_val_every_validates_every_nth_epoch_and_the_last(catalog, tmp_path):  # noqa: F811
    tr, val = split_validation(catalog, per_sku=2, seed=0)
    res = train(tr, val, "tiny-test", _cfg(epochs=3, val_every=2), tmp_path, progress=False, device="cpu")
    assert [h["val_acc"] is not None for h in res.history if h["epoch"] > 0] == [False, True, True]


def test_summary_val_acc_is_the_saved_weights_one():
    from types import SimpleNamespace

    from skulens.model.training_run import saved_val_acc

    def res(saved, best=None):
        return SimpleNamespace(val_acc=[0.5, None, 0.7, 0.6], extra={"saved_weights": saved, "best_val_acc": best})

    assert saved_val_acc(res("best (epoch 3)", 0.7)) == 0.7  # not the last epoch's 0.6
    assert saved_val_acc(res("last")) == 0.6 and saved_val_acc(res("ema")) == 0.6
    assert saved_val_acc(res("last, WiSE-FT alpha 0.5")) is None  # the mix was never validated
    assert saved_val_acc(SimpleNamespace(val_acc=[None], extra={})) is None


def test_shelf_views_do_not_depend_on_where_the_data_lives(tmp_path):
    """A clone in another folder validates on the same views (the seed is the SKU folder + file name)."""
    import shutil

    import numpy as np
    from PIL import Image

    src = tmp_path / "a" / "clean" / "sku1"
    src.mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(src / "img.png")
    dst = tmp_path / "elsewhere" / "deeper" / "clean" / "sku1"
    shutil.copytree(src, dst)
    (va,), (vb,) = shelf_views([str(src / "img.png")], 0), shelf_views([str(dst / "img.png")], 0)
    assert np.array_equal(np.asarray(va), np.asarray(vb))

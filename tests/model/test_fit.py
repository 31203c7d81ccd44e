"""How an image is fitted to the square input (ModelSpec.fit): centre crop, squash, pad. The numpy
preprocess (engines) equals the torch one (encoders, training) for each, a model's fit travels in its spec
(a centre-crop spec's dict is unchanged), every embedding path uses it, and the launchpad checks it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from skulens.model import ModelSpec, create_encoder, save_encoder  # noqa: E402
from skulens.model import engine as eng  # noqa: E402
from skulens.model.embed import embed_images  # noqa: E402
from skulens.model.transform import eval_transform, eval_transform_np, fit_square  # noqa: E402

from .test_engine import AVAILABLE, _images  # noqa: E402


def _tall(w=30, h=90) -> Image.Image:
    """Three bands top to bottom: red, green, blue. A centre crop keeps the green one only."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 3, :, 0] = 255
    a[h // 3: 2 * h // 3, :, 1] = 255
    a[2 * h // 3:, :, 2] = 255
    return Image.fromarray(a)


def test_squash_and_pad_keep_the_whole_image_and_crop_does_not():
    im = _tall()
    crop = np.asarray(eval_transform_np(48, crop_pct=1.0, output="uint8")(im)).astype(int)[2:-2]  # (edges: bicubic)
    assert crop[..., 1].mean() > 250 and crop[..., 0].max() < 5 and crop[..., 2].max() < 5  # green only
    sq = np.asarray(fit_square(im, 48, "squash")).astype(int)
    assert sq.shape == (48, 48, 3) and sq[2, :, 0].min() > 250 and sq[-3, :, 2].min() > 250  # red top, blue bottom
    pad = np.asarray(fit_square(im, 48, "pad", fill=(128, 128, 128))).astype(int)
    assert pad.shape == (48, 48, 3) and (pad[:, :4] == 128).all() and (pad[:, -4:] == 128).all()  # side bars
    assert pad[2, 24, 0] > 250 and pad[-3, 24, 2] > 250  # all three bands, aspect kept
    assert fit_square(Image.new("RGB", (48, 48)), 48, "pad").size == (48, 48)
    with pytest.raises(ValueError, match="fit"):
        fit_square(im, 48, "stretch")


@pytest.mark.parametrize("fit", ["squash", "pad"])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_numpy_preprocess_equals_torch_for_each_fit(tmp_path, fit, mode):
    from skulens.data.images import load_rgb

    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    tv = eval_transform(64, mean, std, "bicubic", 0.875, fit=fit)
    npt = eval_transform_np(64, mean, std, "bicubic", 0.875, mode=mode, fit=fit)
    for im in [load_rgb(i) for i in _images(tmp_path)] + [_tall(), _tall(300, 20)]:
        a, b = tv(im).numpy(), npt(im)
        assert b.shape == a.shape == (3, 64, 64)
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    if fit == "pad":  # the padding is the mean colour: zero after normalisation
        assert np.abs(npt(_tall(10, 90))[:, :, :3]).max() < 0.02


def test_spec_round_trip_and_centre_crop_dict_unchanged():
    assert "fit" not in ModelSpec(name="tiny-test").to_dict()
    d = ModelSpec(name="tiny-test", fit="pad").to_dict()
    assert d["fit"] == "pad" and ModelSpec.from_dict(d).fit == "pad"
    assert ModelSpec.from_dict({"name": "tiny-test"}).fit == "crop"  # specs stored before fit existed
    with pytest.raises(ValueError, match="fit"):
        ModelSpec(name="tiny-test", fit="stretch")


@pytest.mark.parametrize("fit", ["squash", "pad"])
def test_the_engine_and_the_saved_model_use_the_specs_fit(tmp_path, fit):
    torch.manual_seed(0)
    enc = create_encoder(ModelSpec(name="tiny-test", fit=fit, scales=(48,)), device="cpu")
    path = save_encoder(enc, tmp_path / "m" / "encoder.pt")
    from skulens.model.io import load_encoder

    back = load_encoder(path)
    assert back.spec.fit == fit and "FitSquare" in repr(back.preprocess)
    e = eng.load_engine(path, AVAILABLE[0] if AVAILABLE else "torch", preprocess="exact")
    assert e.preprocess.fit == fit
    imgs = _images(tmp_path) + [_tall()]
    ref, got = embed_images(enc, imgs, batch_size=4), embed_images(e, imgs, batch_size=4)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    crop = create_encoder(ModelSpec(name="tiny-test", scales=(48,)), device="cpu")
    crop.load_state_dict(enc.state_dict())
    assert not np.allclose(embed_images(crop, [_tall()]), ref[-1:], atol=1e-3)  # the fit changes what is seen


def test_launchpad_fit_knob():
    from assets.training import TrainSettings

    assert TrainSettings().spec()["fit"] == "pad" and TrainSettings().train_config()["fit_augment"] is False
    assert "fit" not in TrainSettings(fit="crop").spec()
    assert ModelSpec.from_dict(TrainSettings(fit="pad").spec()).fit == "pad"
    with pytest.raises(Exception, match="fit"):
        TrainSettings(fit="stretch")


def test_training_views_start_from_the_fitted_whole_image():
    enc = create_encoder(ModelSpec(name="tiny-test", fit="pad"), device="cpu")
    tf = enc.train_transform(1.0, fit=True)
    first = tf.transforms[1]
    assert repr(first) == "FitSquareOwnSize(fit=pad)"
    sq = np.asarray(first(_tall(30, 90))).astype(int)
    assert sq.shape == (90, 90, 3) and sq[3, 45, 0] > 250 and sq[-4, 45, 2] > 250 and (sq[:, :20] == 128).all()
    assert enc.train_transform(1.0)(_tall()).shape == tf(_tall()).shape == (3, 64, 64)
    assert "FitSquare" not in repr(enc.train_transform(1.0, fit=False))
    squash = create_encoder(ModelSpec(name="tiny-test", fit="squash"), device="cpu").train_transform(1.0, fit=True)
    assert np.asarray(squash.transforms[1](_tall(30, 90))).shape == (30, 30, 3)
    crop = create_encoder(ModelSpec(name="tiny-test"), device="cpu").train_transform(1.0, fit=True)
    assert "FitSquare" not in repr(crop)  # centre-crop models: the crop works on the raw image, as before

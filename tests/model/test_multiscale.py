"""Multi-scale inference (``ModelSpec.scales`` / the ``eval_scales`` knob): the fixed resampling matrix is
PIL's resize, an encoder in eval mode sums the unit-norm features of each scale while training sees one
scale, the spec round-trips (and single-scale specs keep their old dict), every compiled backend
reproduces it, and the saved encoder of a training run carries the scales."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from skulens.model import ModelSpec, create_encoder, save_encoder  # noqa: E402
from skulens.model import engine as eng  # noqa: E402
from skulens.model.factory import resample_matrix  # noqa: E402
from skulens.model.io import load_encoder  # noqa: E402

AVAILABLE = [b for b in eng.BACKENDS if importlib.util.find_spec(b) is not None]


@pytest.mark.parametrize("size_in,size_out,interp", [(224, 128, "bicubic"), (64, 40, "bilinear"), (40, 64, "bicubic")])
def test_resample_matrix_is_pils_resize(size_in, size_out, interp):
    img = np.random.default_rng(0).random((size_in, size_in)).astype(np.float32)
    mode = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interp]
    ref = np.asarray(Image.fromarray(img, mode="F").resize((size_out, size_out), mode))
    a = resample_matrix(size_in, size_out, interp)
    assert tuple(a.shape) == (size_out, size_in)
    np.testing.assert_allclose((a @ torch.from_numpy(img) @ a.T).numpy(), ref, atol=1e-5)


def test_spec_round_trip_and_single_scale_dict_unchanged():
    plain = ModelSpec(name="tiny-test")
    assert "scales" not in plain.to_dict() and ModelSpec.from_dict(plain.to_dict()).scales == ()
    ms = ModelSpec(name="tiny-test", scales=[48, 40, 48])
    assert ms.scales == (40, 48) and ms.to_dict()["scales"] == [40, 48]
    assert ModelSpec.from_dict(ms.to_dict()) == ms
    with pytest.raises(ValueError, match="scales"):
        ModelSpec(name="tiny-test", scales=(8,))


def test_eval_sums_unit_features_of_each_scale_and_training_sees_one():
    torch.manual_seed(0)
    enc = create_encoder(ModelSpec(name="tiny-test", scales=(40,)), device="cpu").eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        single = enc._tower(x)
        small = enc._tower(resample_matrix(64, 40, "bicubic") @ x @ resample_matrix(64, 40, "bicubic").T)
        got = enc(x)
    want = torch.nn.functional.normalize(single, dim=-1) + torch.nn.functional.normalize(small, dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.nn.functional.normalize(got, dim=-1),
                              torch.nn.functional.normalize(single, dim=-1), atol=1e-3)
    enc.train()
    torch.testing.assert_close(enc(x), enc._tower(x))  # the training loss sees the plain tower


@pytest.mark.parametrize("backend", AVAILABLE)
def test_every_backend_reproduces_the_multi_scale_encoder(tmp_path, backend):
    torch.manual_seed(0)
    enc = create_encoder(ModelSpec(name="tiny-test", scales=(40,)), device="cpu")
    path = save_encoder(enc, tmp_path / "encoder.pt")
    e = eng.load_engine(path, backend)
    assert e.backend == backend and e.parity["ok"] and e.spec.scales == (40,)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.inference_mode():
        ref = enc.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(e.run(x), ref, atol=1e-4)


def test_training_run_saves_the_scales_on_the_trained_weights(tmp_path):
    from skulens.model.training_run import _restore_eval_size

    torch.manual_seed(0)
    enc = create_encoder(ModelSpec(name="tiny-test"), device="cpu")
    enc.spec = dataclasses.replace(enc.spec, image_size=32)  # as trained at a smaller size
    path = save_encoder(enc, tmp_path / "encoder.pt")
    spec = ModelSpec(name="tiny-test", scales=(40,))
    out = _restore_eval_size(path, spec)
    back = load_encoder(path)
    assert out["scales"] == [40] and back.spec.scales == (40,) and back.spec.image_size == 64
    for k, v in enc.state_dict().items():  # the weights are the trained ones, untouched
        torch.testing.assert_close(back.state_dict()[k], v)


def test_fixed_size_towers_refuse_scales_and_the_launchpad_leaves_them_single_scale():
    from assets.training import TrainSettings

    with pytest.raises(ValueError, match="CNN tower"):
        create_encoder(ModelSpec(name="tiny-vit-test", scales=(48,)), device="cpu")
    assert ModelSpec.from_dict(TrainSettings().spec()).scales == (128,)  # the default: the training size
    assert ModelSpec.from_dict(TrainSettings(model="tiny-vit-test").spec()).scales == ()
    assert ModelSpec.from_dict(TrainSettings(eval_scales=[]).spec()).scales == ()


@pytest.mark.parametrize("name", ["tiny-test", "tiny-vit-test", "efficientnet-lite0", "efficientnet-lite1"])
def test_the_name_predicate_agrees_with_the_built_tower(name):
    """``size_agnostic`` (the launchpad's rule, from the name alone) says yes exactly where the built tower
    accepts extra scales and runs at another input size."""
    import torch

    from skulens.model.factory import size_agnostic

    spec = ModelSpec(name=name, scales=(48,))
    if not size_agnostic(name):
        with pytest.raises(ValueError, match="CNN tower"):
            create_encoder(spec, device="cpu", load_weights=False)
        return
    enc = create_encoder(spec, device="cpu", load_weights=False)
    with torch.no_grad():
        out = enc(torch.zeros(1, 3, 96, 96))
    assert out.shape == (1, enc.spec.embed_dim)

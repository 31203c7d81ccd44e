"""Recipe levers: m-per-class batches and sub-center ArcFace."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from skulens.data.balance import split_validation
from skulens.model.loss import create_arcface, init_from_prototypes
from skulens.model.train import m_per_class_order, train
from tests.model.test_train import _cfg, _one_thread, catalog  # noqa: F401 - fixtures


def test_m_per_class_batches_hold_m_rows_of_each_sku_and_are_seeded():
    labels = np.repeat(np.arange(10), 6)
    order = m_per_class_order(labels, m=4, batch_size=16, length=48, seed=3)
    assert len(order) == 48
    for b in range(3):
        lab = labels[order[b * 16:(b + 1) * 16]]
        _, counts = np.unique(lab, return_counts=True)
        assert len(counts) == 4 and set(counts) == {4}
    assert order == m_per_class_order(labels, 4, 16, 48, seed=3)
    assert order != m_per_class_order(labels, 4, 16, 48, seed=4)
    with pytest.raises(ValueError, match="divide"):
        m_per_class_order(labels, 3, 16, 48, 0)
    with pytest.raises(ValueError, match="SKUs"):
        m_per_class_order(np.repeat(np.arange(2), 6), 4, 16, 48, 0)


def test_sub_center_arcface_starts_every_centre_near_its_prototype():
    torch.manual_seed(0)
    loss = create_arcface(5, 8, sub_centers=3)
    emb = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    labels = torch.arange(20) % 5
    init_from_prototypes(loss, emb, labels)
    w = torch.nn.functional.normalize(loss.W.detach(), dim=0).view(8, 5, 3)
    protos = torch.nn.functional.normalize(torch.stack([emb[labels == c].mean(0) for c in range(5)]), dim=1)
    cos = torch.einsum("dcs,cd->cs", w, protos)
    assert (cos > 0.98).all() and (cos < 1 - 1e-6).any()  # near the prototype, not all identical
    with pytest.raises(ValueError):
        create_arcface(5, 8, sub_centers=0)


def test_training_with_sub_centres_and_m_per_class(catalog, tmp_path):  # noqa: F811
    tr, val = split_validation(catalog, per_sku=2, seed=0)
    res = train(tr, val, "tiny-test", _cfg(epochs=2, sub_centers=2, m_per_class=4), tmp_path, progress=False,
                device="cpu")
    losses = [h["train_loss"] for h in res.history if h["epoch"] > 0]
    assert res.steps == 2 * res.extra["steps_per_epoch"] and all(np.isfinite(losses))
    again = train(tr, val, "tiny-test", _cfg(epochs=2, sub_centers=2, m_per_class=4), tmp_path / "b",
                  progress=False, device="cpu")
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in res.history]


def test_wise_ft_interpolates_between_start_and_fine_tuned_weights(catalog, tmp_path):  # noqa: F811
    from skulens.model import create_encoder, load_encoder

    tr, val = split_validation(catalog, per_sku=2, seed=0)
    kw = {"epochs": 1, "keep_best": False}
    ft = load_encoder(train(tr, val, "tiny-test", _cfg(**kw), tmp_path / "ft", progress=False,
                            device="cpu").encoder_path).model.state_dict()
    half = train(tr, val, "tiny-test", _cfg(wise_alpha=0.5, **kw), tmp_path / "h", progress=False, device="cpu")
    assert "WiSE-FT alpha 0.5" in half.extra["saved_weights"]
    mixed = load_encoder(half.encoder_path).model.state_dict()
    torch.manual_seed(0)  # train() seeds with cfg.seed before building the model: the same start weights
    start = create_encoder("tiny-test").model.state_dict()
    for k, v in mixed.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.5 * ft[k] + 0.5 * start[k], atol=1e-6), k
    with pytest.raises(ValueError):
        train(tr, val, "tiny-test", _cfg(wise_alpha=1.5), tmp_path / "bad", progress=False, device="cpu")


@pytest.mark.parametrize("model", ["tiny-test", "tiny-vit-test"])  # a CNN tower and a ViT (open_clip)
def test_frozen_blocks_do_not_move_and_the_rest_trains(catalog, tmp_path, model):  # noqa: F811
    from skulens.model import create_encoder, load_encoder
    from skulens.model.lr import block_ids
    from skulens.model.train import freeze_blocks

    tr, val = split_validation(catalog, per_sku=2, seed=0)
    res = train(tr, val, model, _cfg(epochs=1, freeze_blocks=2), tmp_path, progress=False, device="cpu")
    assert res.extra["frozen_tensors"] > 0
    torch.manual_seed(0)
    start = create_encoder(model)
    ids, top = block_ids(start.model)
    after = load_encoder(res.encoder_path).model.state_dict()
    before = start.model.state_dict()
    moved = {name: not torch.equal(before[name], after[name]) for name, _ in start.model.named_parameters()}
    assert not any(m for name, m in moved.items() if ids[name] < 2)
    assert any(m for name, m in moved.items() if ids[name] >= 2)
    enc = create_encoder(model)
    with pytest.warns(UserWarning, match="top block trains"):
        freeze_blocks(enc, top + 5)
    assert not any(p.requires_grad for name, p in enc.model.named_parameters() if ids[name] < top)
    assert all(p.requires_grad for name, p in enc.model.named_parameters() if ids[name] == top)


def test_launchpad_rejects_m_per_class_that_does_not_divide_the_batch():
    from pydantic import ValidationError

    from assets.training import TrainSettings

    assert TrainSettings(m_per_class=4, batch_size=32).m_per_class == 4
    for bad in ({"m_per_class": 5}, {"m_per_class": 0}, {"m_per_class": 8, "batch_size": 12}):
        with pytest.raises(ValidationError, match="m_per_class"):
            TrainSettings(**bad)


@pytest.mark.parametrize("kind", ["bn", "mlp"])
def test_projector_trains_the_loss_on_a_head_that_the_saved_encoder_does_not_have(catalog, tmp_path, kind):  # noqa: F811
    from skulens.model import create_encoder, load_encoder

    tr, val = split_validation(catalog, per_sku=2, seed=0)
    res = train(tr, val, "tiny-test", _cfg(epochs=2, projector=kind, projector_dim=16), tmp_path / "a",
                progress=False, device="cpu")
    losses = [h["train_loss"] for h in res.history if h["epoch"] > 0]
    assert all(np.isfinite(losses)) and res.extra["projector"] == kind
    enc = load_encoder(res.encoder_path)
    # the saved encoder is the plain tower: same parameter names and shapes as a fresh one
    fresh = create_encoder("tiny-test").model.state_dict()
    assert {k: tuple(v.shape) for k, v in enc.model.state_dict().items()} == {k: tuple(v.shape) for k, v in fresh.items()}
    ck = torch.load(res.checkpoint_path, map_location="cpu", weights_only=True)
    assert ck["projector"] is not None  # a resumed run continues the head too
    if kind == "mlp":
        assert ck["arcface"]["W"].shape[0] == 16  # the loss works on the head's outputs
    # deterministic, and the head changes what the tower learns
    again = train(tr, val, "tiny-test", _cfg(epochs=2, projector=kind, projector_dim=16), tmp_path / "b",
                  progress=False, device="cpu")
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in res.history]
    plain = train(tr, val, "tiny-test", _cfg(epochs=2), tmp_path / "c", progress=False, device="cpu")
    assert [h["train_loss"] for h in plain.history if h["epoch"] > 0] != losses


def test_projector_resumes_to_the_same_weights(catalog, tmp_path):  # noqa: F811
    """Killed at the first step of epoch 2, then resumed: the head comes back from the checkpoint, so the
    losses and final weights equal an uninterrupted run's."""
    from skulens.model import load_encoder

    tr, val = split_validation(catalog, per_sku=1, seed=0)
    cfg = _cfg(epochs=2, projector="mlp", num_workers=0)
    full = train(tr, val, "tiny-test", cfg, tmp_path / "full", progress=False, device="cpu")

    class Killed(Exception):
        pass

    def killer(kind, step, metrics):
        if kind == "step" and step == full.extra["steps_per_epoch"] + 1:
            raise Killed

    with pytest.raises(Killed):
        train(tr, val, "tiny-test", cfg, tmp_path / "run", log_fn=killer, progress=False, device="cpu")
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and ck["projector"] is not None
    res = train(tr, val, "tiny-test", cfg, tmp_path / "run", progress=False, device="cpu")
    assert res.resumed_from_step == full.extra["steps_per_epoch"]
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in full.history]
    a = load_encoder(full.encoder_path).model.state_dict()
    b = load_encoder(res.encoder_path).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_project_prototypes_sets_batchnorm_statistics_from_the_features():
    from skulens.model.projector import create_projector, project_prototypes, projector_out_dim

    head = create_projector("mlp", 8, 4, seed=0)
    assert projector_out_dim(head, 8) == 4 and projector_out_dim(None, 8) == 8
    assert projector_out_dim(create_projector("bn", 8), 8) == 8
    assert create_projector("none", 8) is None
    x = torch.randn(50, 8) * 3 + 1
    out = project_prototypes(head, x)
    assert out.shape == (50, 4) and head.training
    bn = head[1]
    assert torch.allclose(bn.running_mean, head[0](x).mean(0).detach(), atol=1e-5)
    assert bn.momentum == 0.1  # restored
    # the same seed builds the same head, and building it leaves the global RNG alone
    state = torch.random.get_rng_state()
    h2 = create_projector("mlp", 8, 4, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(h2[0].weight, create_projector("mlp", 8, 4, seed=0)[0].weight)
    with pytest.raises(ValueError, match="unknown projector"):
        create_projector("mlp3", 8)


def test_projector_refuses_batches_of_one(catalog, tmp_path):  # noqa: F811
    tr, val = split_validation(catalog, per_sku=2, seed=0)
    with pytest.raises(ValueError, match="batches of at least 2"):
        train(tr, val, "tiny-test", _cfg(epochs=1, batch_size=1, projector="bn"), tmp_path, progress=False,
              device="cpu")


def test_launchpad_rejects_an_unknown_projector():
    from pydantic import ValidationError

    from assets.training import TrainSettings

    with pytest.raises(ValidationError, match="projector"):
        TrainSettings(projector="linear")
    assert TrainSettings(projector="mlp").train_config()["projector"] == "mlp"
    assert TrainSettings().train_config()["projector"] == "bn"  # the default: chosen on GroZi dev, README


def test_metric_losses_pull_same_sku_pairs_together_and_need_positive_pairs():
    from skulens.model.loss import METRIC_LOSSES, create_metric_loss

    assert create_metric_loss("none") is None
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)  # 4 SKUs x 4 images, as m_per_class=4 batches are
    centres = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    tight = centres[labels] + 0.05 * torch.randn(16, 16)  # each SKU's images near its centre
    loose = torch.randn(16, 16)  # no structure
    for kind in METRIC_LOSSES[1:]:
        fn = create_metric_loss(kind)
        assert float(fn(tight, labels)) < float(fn(loose, labels)), kind
        assert float(fn(loose, torch.arange(16))) == 0.0  # no positive pair in the batch: nothing to learn
    with pytest.raises(ValueError, match="metric_loss"):
        create_metric_loss("contrastive-ish")


@pytest.mark.parametrize("kind", ["multi_similarity", "triplet"])
def test_training_with_a_metric_loss_before_the_neck(catalog, tmp_path, kind):  # noqa: F811
    tr, val = split_validation(catalog, per_sku=2, seed=0)
    cfg = dict(epochs=2, m_per_class=4, projector="bn", metric_loss=kind)
    res = train(tr, val, "tiny-test", _cfg(**cfg), tmp_path / "a", progress=False, device="cpu")
    losses = [h["train_loss"] for h in res.history if h["epoch"] > 0]
    assert res.steps == 2 * res.extra["steps_per_epoch"] and all(np.isfinite(losses))
    again = train(tr, val, "tiny-test", _cfg(**cfg), tmp_path / "b", progress=False, device="cpu")
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in res.history]  # deterministic
    plain = train(tr, val, "tiny-test", _cfg(epochs=2, m_per_class=4, projector="bn"), tmp_path / "c",
                  progress=False, device="cpu")
    assert [h["train_loss"] for h in plain.history if h["epoch"] > 0] != losses  # the loss takes part
    with pytest.raises(ValueError, match="m_per_class"):
        train(tr, val, "tiny-test", _cfg(epochs=1, metric_loss=kind), tmp_path / "d", progress=False, device="cpu")


def test_launchpad_metric_loss_knob_and_the_config_hash_of_runs_without_it():
    from pydantic import ValidationError

    from assets.training import TrainSettings
    from skulens.catalog.state import config_hash

    default = TrainSettings().train_config()
    assert (default["metric_loss"], default["metric_loss_weight"], default["m_per_class"]) == ("triplet", 30.0, 4)
    off = TrainSettings(metric_loss="none").train_config()
    assert "metric_loss" not in off and "metric_loss_weight" not in off  # unset, the config is as before the knob
    assert config_hash(off) != config_hash(default)
    with pytest.raises(ValidationError, match="m_per_class"):
        TrainSettings(m_per_class=None)  # the default triplet loss needs several images per SKU in a batch
    assert TrainSettings(m_per_class=None, metric_loss="none").m_per_class is None
    with pytest.raises(ValidationError, match="metric_loss"):
        TrainSettings(metric_loss="arcface")


def test_m_per_class_on_a_catalog_with_too_few_skus_shuffles_and_says_so(catalog, tmp_path):  # noqa: F811
    """6 SKUs cannot fill a batch of 32 with 4 images each: the run trains on shuffled batches (every batch holds
    several images of each SKU anyway), warns, and records it, instead of failing minutes into a nightly run."""
    tr, val = split_validation(catalog, per_sku=2, seed=0)
    cfg = _cfg(epochs=1, batch_size=32, m_per_class=4, projector="bn", metric_loss="triplet", metric_loss_weight=30.0)
    with pytest.warns(UserWarning, match=r"m_per_class=4: 6 SKUs cannot fill batches of 32"):
        res = train(tr, val, "tiny-test", cfg, tmp_path, progress=False, device="cpu")
    assert res.extra["m_per_class"] is None and res.extra["metric_loss"] == "triplet"
    assert all(np.isfinite(h["train_loss"]) for h in res.history if h["epoch"] > 0)
    ok = train(tr, val, "tiny-test", _cfg(epochs=1, m_per_class=4), tmp_path / "b", progress=False, device="cpu")
    assert ok.extra["m_per_class"] == 4  # 6 SKUs x 4 >= 16

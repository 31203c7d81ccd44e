"""Training throughput next to the model-only figure, in one run (issue 10, item 2).

Prints, at the same image size and batch:

* model-only forward + backward images/s on synthetic tensors: the tower + ArcFace loss + the training's
  own optimiser step (AdamW groups of :func:`skulens.model.train.build_optimizer`, gradient clipping,
  frozen BatchNorm statistics), eager (contiguous NCHW) and ``channels_last``;
* the real training loop (:func:`skulens.model.train.train`) on real images: a balanced frame of GroZi-120
  crops (copies augmented, as the job's ``balanced_dataset`` does), its ``images_per_s`` and its ratio to
  the model-only ``channels_last`` figure (target >= 0.90), for each training configuration asked for.

The other processes on the machine share the cores: compare the ratios printed in one run, not absolute
figures across runs. The measuring functions are importable (``bench/bench_speed.py`` uses them)::

    from bench.bench_train import model_only_images_per_s, grozi_training_frame, training_images_per_s

Usage::

    .venv/bin/python bench/bench_train.py [--image-size 128] [--batch 32] [--images 320] [--epochs 2]
        [--steps 10] [--workers 0 1] [--baseline] [--device cpu|cuda] [--amp off|bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads are slow on a shared box

GROZI = Path("/work/shared/datasets/grozi120")


def model_only_images_per_s(model: str = "efficientnet-lite0", image_size: int = 128, batch_size: int = 32,
                            steps: int = 10, warmup: int = 2, channels_last: bool = False, n_classes: int = 32,
                            device: str = "cpu", amp: str = "off", freeze_bn: bool = True,
                            grad_clip: float | None = 1.0) -> float:
    """Images/s of the training step alone on synthetic tensors: forward (tower), ArcFace loss, backward,
    gradient clipping and the AdamW step of :func:`skulens.model.train.build_optimizer`, with the training
    loop's optimiser settings (:class:`TrainConfig` defaults: fused AdamW where torch supports it).
    No data loading, no logging. ``steps`` timed after ``warmup`` untimed steps."""
    import torch

    from skulens.model.factory import ModelSpec, create_encoder
    from skulens.model.loss import create_arcface
    from skulens.model.train import TrainConfig, _resolve_amp, _set_train_mode, build_optimizer

    dev = torch.device(device)
    torch.manual_seed(0)
    enc = create_encoder(ModelSpec(name=model, image_size=image_size), device=str(dev))
    loss_fn = create_arcface(n_classes, enc.embed_dim).to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    enc.to(memory_format=fmt)
    cfg = TrainConfig()
    opt = build_optimizer(enc, loss_fn, cfg)
    amp_dtype, _ = _resolve_amp(amp, dev)
    _set_train_mode(enc, freeze_bn)
    loss_fn.train()
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev).contiguous(memory_format=fmt)
    y = torch.arange(batch_size, device=dev) % n_classes
    params = [p for g in opt.param_groups for p in g["params"]]

    def step():
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            feats = enc(x)
        loss = loss_fn(feats.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def grozi_training_frame(n_images: int = 320, per_sku: int = 10, originals: int = 4, data: Path = GROZI,
                         seed: int = 0):
    """A balanced training frame of ``n_images`` rows from GroZi-120: ``n_images // per_sku`` products, the
    first ``originals`` frames of each, balanced to ``per_sku`` rows (the copies, here 60 %, are augmented, the
    originals take the eval transform, as in the job). Columns ``sku``, ``clean_path``, ``augment``, ``copy``."""
    import re

    import pandas as pd

    from skulens.data.balance import balance

    rows = []
    skus = sorted(p.name for p in (data / "images").iterdir() if p.is_dir())
    n_skus = max(2, n_images // per_sku)
    for sku in skus[:: max(1, len(skus) // n_skus)][:n_skus]:
        frames = sorted((data / "images" / sku).glob("video*.jpg"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
        for p in frames[: max(2, originals)]:
            rows.append({"sku": sku, "clean_path": str(p), "key": f"{sku}/{p.name}"})
    return balance(pd.DataFrame(rows), per_sku, seed=seed)


def training_images_per_s(frame, image_size: int = 128, batch_size: int = 32, epochs: int = 2,
                          model: str = "efficientnet-lite0", device: str = "cpu", out_dir=None, **cfg_kw) -> dict:
    """Run :func:`skulens.model.train.train` on ``frame`` (no validation set, random ArcFace init: nothing
    but the training loop) and return ``{"images_per_s", "seconds", "steps", "extra"}``; ``images_per_s`` is
    the loop's own figure (data + forward + backward + optimiser, every trained epoch). ``cfg_kw`` go to
    :class:`TrainConfig` (e.g. ``num_workers=1``, ``channels_last=False``)."""
    from skulens.model.factory import ModelSpec
    from skulens.model.train import TrainConfig, train

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, image_size=image_size, val_before=False,
                      arcface_init="random", checkpoint_every_s=None,
                      **{k: v for k, v in cfg_kw.items() if k in known})
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        t0 = time.perf_counter()
        res = train(frame, None, ModelSpec(name=model), cfg, out_dir or tmp, progress=False, device=device,
                    resume=False)
        wall = time.perf_counter() - t0
    per_epoch = [h.get("images_per_s") for h in res.history if h.get("epoch", 0) > 0]
    wait = sum(h.get("data_wait_s") or 0.0 for h in res.history if h.get("epoch", 0) > 0)
    secs = sum(h.get("seconds") or 0.0 for h in res.history if h.get("epoch", 0) > 0)
    return {"images_per_s": float(res.images_per_s), "per_epoch": per_epoch, "wall_s": wall, "steps": res.steps,
            "data_wait_share": wait / secs if secs else None,
            "extra": {k: v for k, v in res.extra.items() if isinstance(v, (int, float, str, bool))}}


def accuracy_check(n_skus: int = 32, originals: int = 4, per_sku: int = 10, val_per_sku: int = 4,
                   image_size: int = 128, batch_size: int = 32, epochs: int = 2, data: Path = GROZI,
                   configs: dict | None = None) -> dict:
    """Validation top-1 (1-NN of held-out GroZi frames against the training frames, the training's own
    validation) after training the same frame with each ``configs`` entry (TrainConfig overrides; default:
    every speed lever off vs the defaults). Training frames are each product's first ``originals`` frames, the
    validation frames its last ``val_per_sku``. Returns ``{name: {"val_acc_before", "val_acc", "images_per_s"}}``."""
    import re

    import pandas as pd

    from skulens.data.balance import balance
    from skulens.model.factory import ModelSpec
    from skulens.model.train import TrainConfig, train

    configs = configs or {"levers off": {"num_workers": 0, "channels_last": False, "decode_cache": False,
                                         "fused_optimizer": False}, "defaults": {}}
    skus = sorted(p.name for p in (data / "images").iterdir() if p.is_dir())
    tr, va = [], []
    for sku in skus[:: max(1, len(skus) // n_skus)][:n_skus]:
        frames = sorted((data / "images" / sku).glob("video*.jpg"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
        tr += [{"sku": sku, "clean_path": str(p)} for p in frames[:originals]]
        va += [{"sku": sku, "clean_path": str(p)} for p in frames[-val_per_sku:]]
    frame = balance(pd.DataFrame(tr), per_sku, seed=0)
    out = {}
    for name, kw in configs.items():
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, image_size=image_size, checkpoint_every_s=None, **kw)
        with tempfile.TemporaryDirectory(prefix="bench-train-acc-") as tmp:
            res = train(frame, pd.DataFrame(va), ModelSpec(name="efficientnet-lite0"), cfg, tmp, progress=False,
                        device="cpu", resume=False)
        out[name] = {"val_acc_before": res.val_acc_before, "val_acc": res.val_acc[-1],
                     "images_per_s": res.images_per_s}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=320, help="rows of the balanced GroZi training frame")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed model-only steps")
    ap.add_argument("--workers", type=int, nargs="*", default=None,
                    help="DataLoader worker counts to run the loop with (default: the TrainConfig default only)")
    ap.add_argument("--baseline", action="store_true",
                    help="also run the loop with every speed lever off (the loop before issue 10)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", help="off | bf16 (CUDA: bf16 is the training default)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    ap.add_argument("--accuracy", action="store_true",
                    help="also train a GroZi frame with the speed levers off and at the defaults and print both "
                         "validation top-1 figures (a few minutes)")
    a = ap.parse_args(argv)

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}, "
          f"{a.model} @ {a.image_size} px, batch {a.batch}", flush=True)
    out: dict = {"image_size": a.image_size, "batch": a.batch, "model": a.model, "device": a.device}
    common = {"model": a.model, "image_size": a.image_size, "batch_size": a.batch, "device": a.device, "amp": a.amp}
    out["model_only_eager"] = model_only_images_per_s(steps=a.steps, channels_last=False, **common)
    print(f"model-only fwd+bwd, eager          {out['model_only_eager']:7.1f} images/s", flush=True)
    out["model_only_channels_last"] = ref = model_only_images_per_s(steps=a.steps, channels_last=True, **common)
    print(f"model-only fwd+bwd, channels_last  {ref:7.1f} images/s", flush=True)

    frame = grozi_training_frame(a.images)
    print(f"training frame: {len(frame)} rows, {frame['sku'].nunique()} SKUs, {int(frame['augment'].sum())} augmented",
          flush=True)
    runs = []
    if a.baseline:
        runs.append(("baseline (no levers)", {"num_workers": 0, "channels_last": False, "decode_cache": False,
                                              "fused_optimizer": False}))
    for w in (a.workers if a.workers is not None else [None]):
        runs.append((f"training loop (workers={'default' if w is None else w})",
                     {} if w is None else {"num_workers": w}))
    out["loops"] = []
    for name, kw in runs:
        r = training_images_per_s(frame, a.image_size, a.batch, a.epochs, model=a.model, device=a.device,
                                  amp=a.amp, **kw)
        # the machine is shared: the reference is measured again right after each loop, ratios use the mean
        after = model_only_images_per_s(steps=a.steps, channels_last=True, **common)
        around = (ref + after) / 2
        ref = after
        r.update(name=name, config=kw, model_only_channels_last=around, ratio=r["images_per_s"] / around,
                 ratio_last_epoch=r["per_epoch"][-1] / around)
        out["loops"].append(r)
        cache = r["extra"].get("decode_cache_s")
        print(f"{name:34s} {r['images_per_s']:7.1f} images/s  ratio {r['ratio']:.2f} (last epoch "
              f"{r['ratio_last_epoch']:.2f}) of channels_last model-only {around:.1f} measured around it "
              f"(per epoch {', '.join(f'{v:.1f}' for v in r['per_epoch'])}; waiting for data "
              f"{100 * (r['data_wait_share'] or 0):.0f}% of the time; {r['steps']} steps, wall {r['wall_s']:.0f}s"
              + (f", decode cache {cache:.1f}s" if cache is not None else "") + ")", flush=True)
    if a.accuracy:
        out["accuracy"] = acc = accuracy_check(image_size=a.image_size, batch_size=a.batch, epochs=a.epochs)
        for name, r in acc.items():
            print(f"accuracy, {name:12s} val top-1 {r['val_acc_before']:.3f} -> {r['val_acc']:.3f} "
                  f"({r['images_per_s']:.1f} images/s)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())

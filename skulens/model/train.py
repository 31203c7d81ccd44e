"""RetailKLIP fine-tuning of an image tower with ArcFace (Srivastava, VISAPP 2024).

* Data: breadth/depth balanced (:func:`skulens.data.balance.balance`): every SKU, ``depth`` rows each;
  oversampled copies (``augment=True``) get the shelf-condition augmentation, originals the eval
  transform (``augment_originals=True`` augments everything). Balancing happens once: a frame that
  is already balanced (it has the ``augment`` and ``copy`` columns that ``balance`` writes, as the
  ``balanced_dataset`` asset's frame does) is trained on as it is; only a plain catalog frame is
  balanced here. (Balancing a balanced frame again made every row an "original" and switched the
  augmentation off for the whole ``main`` job.)
* Model: the encoder's image tower; ArcFace (pytorch-metric-learning) on its unnormalised features.
* Optimiser: AdamW; tower groups with block-wise LR decay (top block ``base_lr``, each earlier block
  x ``lr_decay``), ArcFace's ``W`` in its own group at ``arcface_lr``. Linear warmup then cosine.
* AMP on CUDA (bf16 where supported, else fp16 with a GradScaler); CPU works, with a warning.
* ArcFace class centres start at the class-mean embeddings of the start model (``arcface_init=
  "prototypes"``) instead of random vectors, whose early gradients damage the pretrained tower
  (GroZi-120, k=1 top-1: 0.539 before, 0.741 after with prototypes, 0.643 with random centres).
* ``projector`` (``none`` | ``bn`` | ``mlp``): a head between the tower and ArcFace, trained with them and
  dropped at the end (:mod:`skulens.model.projector`); the saved encoder is the tower alone. The launchpad
  default ``bn`` (a BNNeck) raised GroZi never-seen top-1 at k=1 from 0.812 to 0.845 (README, recipe).
* BatchNorm running statistics are frozen by default (``freeze_bn``): small fine-tuning batches
  would otherwise overwrite the pretrained statistics (affine parameters still train); unfrozen, the
  same GroZi run ends below no fine-tuning (0.500).
* CPU: on a busy machine set ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported (spinning OpenMP
  threads made training 4x and the transforms 10-50x slower on a shared 2-core box).
* A checkpoint (model, ArcFace, optimiser, scheduler, scaler, epoch, step, RNG states, history) is
  written atomically after every epoch to ``out_dir/checkpoint.pt``, and inside an epoch every
  ``checkpoint_every_steps`` steps and at least every ``checkpoint_every_s`` seconds (then with the
  position in the epoch and the epoch's running loss); ``train(..., resume=True)`` in the same
  ``out_dir`` continues from it, mid-epoch at the next batch. Batch order depends only on
  ``(seed, epoch)`` and each sample's augmentation only on ``(seed, epoch, index)``, so a resumed run
  takes the same steps as an uninterrupted one (bit-identical on CPU), wherever it was killed.
* Speed (:class:`TrainConfig` knobs, none of them in the resume fingerprint): ``channels_last`` model and
  batches (NHWC: oneDNN's fast convolution layout on CPU, tensor cores on CUDA; the saved encoder is
  converted back to the usual layout); ``decode_cache``: every training file decoded once, at training size
  (:class:`skulens.model.train_data.DecodedCache`, a uint8 memmap in ``out_dir``, kept for a resumed run
  and deleted at the end), so epochs only augment;
  one DataLoader for the whole run with ``num_workers`` persistent worker processes (``prefetch_factor``
  batches each ahead) fed ``(epoch, index)`` pairs; fused AdamW (``fused_optimizer``). Worker count and
  cache change nothing that is trained (bit-identical weights on CPU); ``channels_last`` and the fused
  optimiser change rounding only. ``result.extra`` records what was used and the cache's build time.
* Validation: top-1 of 1-NN of the validation images against the L2-normalised embeddings of the
  (unaugmented) training images, after every epoch (and before training when ``val_before``).

No mlflow / dagster here: metrics go to ``log_fn(kind, step, metrics)`` with ``kind`` ``"step"``
(loss, lr, arcface_lr), ``"epoch"`` (epoch, train_loss, val_acc, images_per_s, seconds, data_wait_s: how long the training step
waited for batches) or
``"checkpoint"`` (epoch, epoch_step: a checkpoint at ``step`` was just written; everything logged so
far is in it, so a logger that buffers can persist what it has not sent yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skulens.data.balance import balance, label_map, suggest_depth
from skulens.model.averaging import BestWeights, WeightEMA
from skulens.model.embed import embed_images
from skulens.model.factory import ModelSpec, _eval_transform_for, create_encoder
from skulens.model.io import save_encoder
from skulens.model.train_data import (
    BalancedDataset,
    DecodedCache,
    EpochBatches,
    cache_short_side,
    sample_seed,
    split_eval_transform,
)

__all__ = ["CHECKPOINT_NAME", "ENCODER_NAME", "TrainConfig", "TrainResult", "build_optimizer", "train"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
ENCODER_NAME = "encoder.pt"
LogFn = Callable[[str, int, dict], None]
#: TrainConfig fields that change speed, not what is trained: left out of the resume fingerprint
SPEED_KNOBS = ("num_workers", "embed_batch_size", "checkpoint_every_steps", "checkpoint_every_s", "channels_last",
               "decode_cache", "decode_cache_scale", "fused_optimizer", "prefetch_factor")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    base_lr: float = 2e-4  # top block of the tower
    lr_decay: float = 0.7  # per block towards the input
    arcface_lr: float = 5e-3  # ArcFace class centres (random init: much higher)
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # None: 5 % of the steps
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of each group's peak LR
    margin: float = 28.6  # ArcFace angular margin, degrees (pytorch-metric-learning)
    scale: float = 64.0  # ArcFace scale
    depth: int | None = None  # images per SKU after balancing; None: suggest_depth(train_df)
    seed: int = 0
    num_workers: int | None = None  # DataLoader workers (persistent); None: 1 on CPU (0 on 1 core), min(8, cores) on CUDA
    amp: str = "auto"  # auto | bf16 | fp16 | off
    image_size: int | None = None  # override the spec's image size (CNN towers, or ViT via open_clip)
    max_steps: int | None = None  # stop after this many optimiser steps (schedule spans them)
    augment_strength: float = 1.0  # 0..1, see models.transform.train_transform
    augment_originals: bool = False  # also augment the non-copied images
    fit_augment: bool = False  # augmented views start from the whole image fitted as the spec's fit (squash/pad)
    arcface_init: str = "prototypes"  # "prototypes" (class-mean embeddings of the start model) | "random"
    freeze_bn: bool = True  # keep BatchNorm running stats at their pretrained values
    grad_clip: float | None = 1.0
    val_before: bool = True  # validation accuracy before the first step (epoch 0)
    # model selection and averaging
    sub_centers: int = 1  # > 1: sub-center ArcFace (several centres per SKU)
    projector: str = "none"  # training-only head before ArcFace: none | bn | mlp (skulens.model.projector)
    projector_dim: int | None = None  # "mlp": its output size (None: the tower's feature size)
    projector_lr: float = 1e-3  # the head's learning rate (it starts random)
    m_per_class: int | None = None  # batches of m images from each of batch_size / m SKUs (PML MPerClassSampler)
    metric_loss: str = "none"  # + a pair loss on the tower's features: none | multi_similarity | triplet (needs m_per_class)
    metric_loss_weight: float = 1.0  # its weight next to ArcFace
    freeze_blocks: int = 0  # blocks from the input kept frozen (no gradient: a shorter, cheaper backward pass)
    wise_alpha: float = 1.0  # WiSE-FT: save alpha * fine-tuned + (1 - alpha) * start weights (1 = off)
    ema_decay: float | None = None  # exponential moving average of the weights (validated and saved); None: off
    keep_best: bool = False  # save the weights of the epoch with the best validation accuracy (latest on ties)
    early_stop_patience: int | None = None  # stop after this many epochs without a better validation accuracy
    val_every: int = 2  # validate after every n-th epoch and after the last (1: every epoch)
    val_augment: bool = True  # validation queries get a seeded shelf-like augmentation (catalog -> shelf gap)
    embed_batch_size: int = 64
    checkpoint_every_steps: int | None = None  # also checkpoint inside an epoch every this many steps
    checkpoint_every_s: float | None = 300.0  # ... and at least this often (seconds; None: epoch ends only)
    # speed levers (not part of the resume fingerprint: a run may resume with other values)
    channels_last: bool = True  # NHWC model weights and batches (CNN towers: 1.4x on CPU)
    decode_cache: bool = True  # decode every training file once, at training size (train_data.DecodedCache)
    decode_cache_scale: float = 1.5  # augmented images cached with shorter side image_size x this
    fused_optimizer: bool | None = None  # fused AdamW; None: where torch supports it on the device
    prefetch_factor: int = 2  # batches each DataLoader worker prepares ahead

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    encoder_path: Path
    checkpoint_path: Path
    history: list  # one dict per epoch (epoch 0 = before training, if val_before)
    steps: int
    val_acc: list  # per trained epoch (None where there was no validation set)
    val_acc_before: float | None
    images_per_s: float  # training throughput (forward + backward + data), trained epochs only
    labels: dict  # sku -> ArcFace label
    spec: ModelSpec
    config: TrainConfig
    device: str
    resumed_from_step: int = 0
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- data


_sample_seed = sample_seed
_BalancedDataset = BalancedDataset  # the name tests and older callers use


def is_balanced(frame: pd.DataFrame) -> bool:
    """True for a frame written by :func:`skulens.data.balance.balance` (it carries ``augment`` and ``copy``)."""
    return {"augment", "copy"} <= set(frame.columns)


def training_frame(train_df: pd.DataFrame, depth: int | None, seed: int) -> tuple[pd.DataFrame, int]:
    """``(balanced frame, depth)``: ``train_df`` as it is when it is already balanced, else
    :func:`skulens.data.balance.balance` of it at ``depth`` (``None``: :func:`suggest_depth`)."""
    if is_balanced(train_df):
        frame = train_df.reset_index(drop=True).copy()
        frame["augment"] = frame["augment"].astype(bool)
        labels = label_map(frame["sku"])
        frame["label"] = frame["sku"].astype(str).map(labels).astype(int)
        per_sku = frame.groupby("sku").size()
        if depth and int(per_sku.max()) != int(depth):
            log.warning("train(): the frame is already balanced at %d rows per SKU; depth=%s ignored",
                        int(per_sku.max()), depth)
        return frame, int(per_sku.max())
    depth = int(depth or suggest_depth(train_df))
    return balance(train_df, depth, seed=seed), depth


def shelf_views(paths: Sequence[str], seed: int, max_short_side: int | None = None) -> list:
    """One shelf-like view (:func:`skulens.model.augment.shelf_augment`) of each image, seeded per file
    (its SKU folder and name), so a validation query looks like a shelf crop and the same run always sees
    the same views, wherever the data folder lives.
    The views stay in memory for the whole run: ``max_short_side`` first shrinks larger images (aspect kept)
    so that a catalog of camera photos does not hold every validation image at full resolution."""
    import zlib

    from PIL import Image

    from skulens.data.images import load_rgb
    from skulens.model.augment import shelf_augment

    def load(p):
        img = load_rgb(p)
        if max_short_side and min(img.size) > max_short_side:
            r = max_short_side / min(img.size)
            img = img.resize((max(1, round(img.width * r)), max(1, round(img.height * r))), Image.Resampling.BICUBIC)
        return img

    def key(p) -> int:  # the SKU folder and file name, not the absolute path: the same views in any checkout
        return zlib.crc32("/".join(Path(str(p)).parts[-2:]).encode())

    return [shelf_augment(load(p), np.random.default_rng([int(seed), key(p)])) for p in paths]


def freeze_blocks(encoder, n: int) -> int:
    """Stop gradients to the tower's first ``n`` blocks (:func:`skulens.model.lr.block_ids`: block 0 is the stem).
    Block-wise LR decay already gives them the smallest steps; frozen, the backward pass ends above them,
    which saves most of its cost at the high-resolution end of a CNN. The top block always trains: a tower
    with fewer blocks gets fewer frozen (with a warning). Returns how many tensors were frozen."""
    from skulens.model.lr import block_ids

    if n <= 0:
        return 0
    tower = getattr(encoder, "model", encoder)
    ids, top = block_ids(tower)
    if n > top:
        warnings.warn(f"freeze_blocks={n}: the tower has blocks 0..{top}; freezing {top} (the top block trains)",
                      stacklevel=2)
        n = top
    count = 0
    for name, p in tower.named_parameters():
        if ids[name] < n:
            p.requires_grad_(False)
            count += 1
    return count


def m_per_class_order(labels: np.ndarray, m: int, batch_size: int, length: int, seed: int) -> list[int]:
    """Row order for one epoch from pytorch-metric-learning's ``MPerClassSampler``: every batch holds
    ``m`` rows of each of ``batch_size / m`` SKUs. Seeded by ``seed`` alone (the sampler draws from PML's
    module-level ``NUMPY_RANDOM``, which is swapped for a seeded one while it runs), so a resumed run
    takes the same batches."""
    from pytorch_metric_learning.samplers import MPerClassSampler
    from pytorch_metric_learning.utils import common_functions as c_f

    if batch_size % m:
        raise ValueError(f"m_per_class={m} must divide batch_size={batch_size}")
    if m * len(np.unique(labels)) < batch_size:
        raise ValueError(f"m_per_class={m} x {len(np.unique(labels))} SKUs < batch_size={batch_size}")
    saved = c_f.NUMPY_RANDOM
    c_f.NUMPY_RANDOM = np.random.RandomState(seed % (2**32))
    try:
        order = list(iter(MPerClassSampler(labels, m, batch_size=batch_size, length_before_new_iter=length)))
    finally:
        c_f.NUMPY_RANDOM = saved
    return [int(i) for i in order]


def _nn_top1(
    gallery: np.ndarray, gallery_skus: Sequence[str], query: np.ndarray, query_skus: Sequence[str]
) -> float:
    if len(query) == 0 or len(gallery) == 0:
        return float("nan")
    nn_idx = np.argmax(query @ gallery.T, axis=1)
    pred = np.asarray(gallery_skus, dtype=object)[nn_idx]
    return float(np.mean(pred == np.asarray(query_skus, dtype=object)))


# ------------------------------------------------------------------------------------ training


def _resolve_device(device) -> Any:
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        warnings.warn(
            "skulens.model.train: no CUDA GPU found, fine-tuning on the CPU. This works but is slow; "
            "use a smaller image_size / fewer epochs or a GPU machine.",
            RuntimeWarning,
            stacklevel=3,
        )
        log.warning("no CUDA GPU found: training on the CPU (slow)")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but CUDA is not available")
    return device


def _resolve_amp(amp, device) -> tuple[Any, bool]:
    """(autocast dtype or None, use GradScaler)."""
    import torch

    amp = str(amp).lower() if amp not in (None, False) else "off"
    if amp in ("off", "none", "false", "fp32", "no"):
        return None, False
    if device.type != "cuda":
        if amp == "auto":
            return None, False
        if amp == "bf16":
            return torch.bfloat16, False
        raise ValueError(f"amp={amp!r} needs a CUDA device (CPU supports 'bf16' or 'off')")
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "bf16":
        return torch.bfloat16, False
    if amp == "fp16":
        return torch.float16, True
    raise ValueError(f"unknown amp mode {amp!r}")


def _set_train_mode(encoder, freeze_bn: bool) -> None:
    from torch import nn

    encoder.train()
    if freeze_bn:
        for m in encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _lr_lambda(total: int, warmup: int, floor: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        t = min(max(t, 0.0), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def _fingerprint(
    cfg: TrainConfig, spec: ModelSpec, train_df: pd.DataFrame, val_df: pd.DataFrame | None
) -> str:
    c = cfg.to_dict()
    for k in SPEED_KNOBS:
        c.pop(k, None)

    def rows(df):
        if df is None or len(df) == 0:
            return []
        return sorted(zip(df["sku"].astype(str), df["clean_path"].astype(str)))

    blob = json.dumps(
        {"cfg": c, "spec": spec.to_dict(), "train": rows(train_df), "val": rows(val_df)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _rng_state() -> dict:
    import torch

    st = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.asarray(np.random.get_state()[1], dtype=np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import torch

    torch.set_rng_state(st["torch"])
    v = st["python"]
    random.setstate((v[0], tuple(v[1]), v[2]))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _plain(v):
    """JSON/weights_only-safe scalars for history entries."""
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _fused_ok(params) -> bool:
    """torch's fused AdamW handles these parameters (floating point, all on one CUDA or CPU device)."""

    devs = {p.device for p in params}
    if len(devs) != 1 or not all(p.is_floating_point() for p in params):
        return False
    dev = next(iter(devs))
    if dev.type not in ("cuda", "cpu"):
        return False
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return dev.type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: fused on CUDA only
        return dev.type == "cuda"


def build_optimizer(encoder, loss_fn, cfg: TrainConfig, head=None):
    """AdamW over the tower's block-wise decayed groups plus the ArcFace group (named "arcface") and, with
    a projection ``head``, its group (named "projector").

    ``cfg.fused_optimizer``: True uses torch's fused AdamW kernel, False the default (foreach), None fused
    where torch supports it on the parameters' device (CPU and CUDA in torch >= 2.4)."""
    import torch

    from skulens.model.loss import arcface_param_group
    from skulens.model.lr import block_param_groups, module_param_group

    groups = block_param_groups(encoder, cfg.base_lr, cfg.lr_decay, cfg.weight_decay)
    groups.append(arcface_param_group(loss_fn, cfg.arcface_lr))
    if head is not None:
        groups.append(module_param_group(head, "projector", cfg.projector_lr, cfg.weight_decay))
    params = [p for g in groups for p in g["params"]]
    fused = cfg.fused_optimizer
    if fused is None:
        fused = _fused_ok(params)
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(0.9, 0.999), **kw)


def train(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame | None,
    spec: ModelSpec | str | Any,
    cfg: TrainConfig | None = None,
    out_dir: str | os.PathLike = "train_out",
    log_fn: LogFn | None = None,
    progress: bool = True,
    device: Any = None,
    resume: bool = True,
) -> TrainResult:
    """Fine-tune ``spec``'s image tower on ``train_df`` (columns ``sku``, ``clean_path``) with ArcFace.

    ``spec`` is a :class:`ModelSpec`, a model name, or an existing Encoder (continued; not modified).
    Writes ``out_dir/checkpoint.pt`` after every epoch and ``out_dir/encoder.pt`` (see
    :func:`skulens.model.io.save_encoder`) at the end. With ``resume=True`` a checkpoint of the same
    data/config/spec in ``out_dir`` is continued; a mismatching one is ignored (warning) and replaced.
    ``val_df`` may be None or empty (no validation). Exceptions raised by ``log_fn`` propagate.
    """
    import copy

    import torch

    from skulens.model.factory import _encoder_class
    from skulens.model.loss import create_arcface, create_metric_loss, init_from_prototypes
    from skulens.model.projector import create_projector, project_prototypes, projector_out_dim

    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME
    enc_path = out_dir / ENCODER_NAME
    dev = _resolve_device(device)
    amp_dtype, use_scaler = _resolve_amp(cfg.amp, dev)
    if cfg.num_workers is None:  # CPU: one worker augments while the main process's threads run the model
        cores = os.cpu_count() or 1
        cfg = dataclasses.replace(cfg, num_workers=min(8, cores) if dev.type == "cuda" else min(1, cores - 1))

    if train_df is None or len(train_df) == 0:
        raise ValueError("train_df is empty")
    train_df = train_df.reset_index(drop=True)
    val_df = None if val_df is None or len(val_df) == 0 else val_df.reset_index(drop=True)
    labels = label_map(train_df["sku"])
    if len(labels) < 2:
        raise ValueError("need at least 2 SKUs to train")
    bal, depth = training_frame(train_df, cfg.depth, cfg.seed)
    cfg = dataclasses.replace(cfg, depth=depth)

    # --- model
    torch.manual_seed(cfg.seed)
    Encoder = _encoder_class()
    start_weights = ""
    if isinstance(spec, Encoder):
        encoder = copy.deepcopy(spec).to(dev)
        h = hashlib.sha256()
        for k, v in encoder.model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        start_weights = h.hexdigest()  # continuing from given weights: part of the resume fingerprint
        if cfg.image_size and cfg.image_size != encoder.spec.image_size:
            encoder.spec = dataclasses.replace(encoder.spec, image_size=int(cfg.image_size))
            encoder.preprocess = _eval_transform_for(encoder.spec)
    else:
        if isinstance(spec, str):
            spec = ModelSpec(name=spec)
        if cfg.image_size:
            spec = dataclasses.replace(spec, image_size=int(cfg.image_size))
        encoder = create_encoder(spec, device=str(dev))
    spec = encoder.spec
    if not 0.0 <= float(cfg.wise_alpha) <= 1.0:
        raise ValueError(f"wise_alpha must be in [0, 1], got {cfg.wise_alpha}")
    # the start weights, for WiSE-FT (a resumed run builds the same start model before loading its checkpoint)
    start_state = ({k: v.detach().to("cpu", copy=True) for k, v in encoder.model.state_dict().items()}
                   if cfg.wise_alpha < 1.0 else None)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    encoder.to(memory_format=fmt)

    # --- data
    train_tf = encoder.train_transform(cfg.augment_strength, fit=cfg.fit_augment)
    dataset = _BalancedDataset(bal, train_tf, encoder.preprocess, cfg.seed, cfg.augment_originals)
    n = len(dataset)
    bs = int(cfg.batch_size)
    steps_per_epoch = n // bs if n >= bs else 1
    total_steps = steps_per_epoch * int(cfg.epochs)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, int(cfg.max_steps))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total_steps))
    warmup = min(int(warmup), max(0, total_steps - 1))

    frozen = freeze_blocks(encoder, cfg.freeze_blocks)
    # --- loss, optimiser, schedule
    if cfg.projector != "none" and min(bs, n) < 2:  # BatchNorm needs two rows to normalise a batch
        raise ValueError(f"projector {cfg.projector!r} needs batches of at least 2 images (batch_size={bs}); "
                         "use projector 'none' for batches of one")
    head = create_projector(cfg.projector, encoder.embed_dim, cfg.projector_dim, cfg.seed)
    if head is not None:
        head = head.to(dev)
    loss_fn = create_arcface(len(labels), projector_out_dim(head, encoder.embed_dim), cfg.margin, cfg.scale,
                             cfg.sub_centers).to(dev)
    metric_fn = create_metric_loss(cfg.metric_loss)
    if metric_fn is not None and not (cfg.m_per_class and cfg.m_per_class >= 2):
        raise ValueError(f"metric_loss {cfg.metric_loss!r} needs batches with several images per SKU: set "
                         f"m_per_class (e.g. 4)")
    # m-per-class batches need batch_size / m SKUs; a smaller catalog (a few SKUs: every batch holds several
    # images of each anyway) is shuffled as usual, and the run says so
    n_classes = int(bal["label"].nunique())
    m_per_class = int(cfg.m_per_class) if cfg.m_per_class else None
    if m_per_class and m_per_class * n_classes < bs:
        warnings.warn(f"m_per_class={m_per_class}: {n_classes} SKUs cannot fill batches of {bs} with {m_per_class} "
                      f"images each; batches are shuffled as usual")
        m_per_class = None
    optimizer = build_optimizer(encoder, loss_fn, cfg, head)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, warmup, cfg.min_lr_ratio)
    )
    ema = WeightEMA(encoder.model, cfg.ema_decay) if cfg.ema_decay else None
    best = BestWeights()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    top_idx = max(
        (i for i, g in enumerate(optimizer.param_groups) if g["name"] not in ("arcface", "projector")),
        key=lambda i: optimizer.param_groups[i]["lr_scale"],
    )
    arc_idx = next(i for i, g in enumerate(optimizer.param_groups) if g["name"] == "arcface")

    fp = _fingerprint(cfg, spec, train_df, val_df) + start_weights
    start_epoch, step, history = 0, 0, []
    train_images, train_seconds = 0, 0.0
    resumed_from = 0
    # inside an epoch: (batches done, the epoch's losses, images, seconds, RNG state) of a mid-epoch checkpoint
    mid: tuple | None = None
    resumed_mid = 0
    for stale in out_dir.glob(f".{CHECKPOINT_NAME}.tmp*"):  # a process killed while writing one
        stale.unlink(missing_ok=True)
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("fingerprint") != fp:
            warnings.warn(f"{ckpt_path}: checkpoint is for other data/config/model; starting afresh")
        else:
            encoder.model.load_state_dict(ck["model"])
            loss_fn.load_state_dict(ck["arcface"])
            if head is not None:
                head.load_state_dict(ck["projector"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            _set_rng_state(ck["rng"])
            start_epoch, step, history = int(ck["epoch"]), int(ck["step"]), list(ck["history"])
            if ema is not None and ck.get("ema"):
                ema.load_state_dict(ck["ema"])
            best.load_state_dict(ck.get("best"))
            train_images, train_seconds = int(ck["train_images"]), float(ck["train_seconds"])
            resumed_from = step
            if int(ck.get("epoch_step") or 0) > 0:
                mid = (int(ck["epoch_step"]), [float(v) for v in ck["epoch_losses"]], int(ck["epoch_seen"]),
                       float(ck["epoch_seconds"]), ck["rng"])
            resumed_mid = mid[0] if mid else 0
            log.info("resumed from %s at epoch %d%s, step %d", ckpt_path, start_epoch,
                     f" (batch {mid[0]} of {steps_per_epoch})" if mid else "", step)

    # validation gallery / ArcFace prototypes: every distinct training image once (not the copies)
    distinct = train_df.drop_duplicates("clean_path")
    gallery_paths = distinct["clean_path"].astype(str).tolist()
    gallery_skus = distinct["sku"].astype(str).tolist()

    embed_kw = {
        "device": dev,
        "batch_size": cfg.embed_batch_size,
        "num_workers": cfg.num_workers,
        "amp_dtype": amp_dtype,
    }

    val_queries: list = val_df["clean_path"].astype(str).tolist() if val_df is not None else []
    if val_df is not None and cfg.val_augment:  # a catalog image vs its own SKU's others is too easy a query
        val_queries = shelf_views(val_queries, cfg.seed, max_short_side=max(512, 4 * int(spec.image_size)))

    def validate(gallery: np.ndarray | None = None) -> float | None:
        if val_df is None:
            return None
        g = gallery if gallery is not None else embed_images(encoder, gallery_paths, **embed_kw)
        q = embed_images(encoder, val_queries, **embed_kw)
        return _nn_top1(g, gallery_skus, q, val_df["sku"].astype(str).tolist())

    def emit(kind: str, at: int, metrics: dict) -> None:
        if log_fn is not None:
            log_fn(kind, at, {k: _plain(v) for k, v in metrics.items()})

    fresh = start_epoch == 0 and step == 0
    start_gallery = None
    if fresh and cfg.arcface_init == "prototypes":
        start_gallery = embed_images(encoder, gallery_paths, **embed_kw)
        init_from_prototypes(loss_fn, project_prototypes(head, start_gallery), [labels[s] for s in gallery_skus])
    elif cfg.arcface_init not in ("prototypes", "random"):
        raise ValueError(f"unknown arcface_init {cfg.arcface_init!r}")
    val_before = None
    if fresh and cfg.val_before and val_df is not None:
        val_before = validate(start_gallery)
        history.append({"epoch": 0, "step": 0, "val_acc": val_before})
        emit("epoch", 0, {"epoch": 0, "val_acc": val_before})
    elif history and history[0].get("epoch") == 0:
        val_before = history[0].get("val_acc")

    bar = None
    stopped = bool(history and history[-1].get("early_stop"))  # a resumed run that already stopped early
    if progress and step < total_steps and not stopped:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="fine-tune", unit="step", dynamic_ncols=True)

    def checkpoint(epochs_done: int, epoch_step: int = 0, losses=(), seen: int = 0, secs: float = 0.0) -> None:
        """``epochs_done`` complete epochs plus ``epoch_step`` batches of the next one (with its running
        loss list, images and seconds so far): everything a resumed run needs to take the same steps."""
        _atomic_save(
            {
                "format": "skulens-train-checkpoint/1",
                "fingerprint": fp,
                "spec": spec.to_dict(),
                "labels": labels,
                "epoch": epochs_done,
                "step": step,
                "total_steps": total_steps,
                "epoch_step": int(epoch_step),
                "epoch_losses": [float(v) for v in losses],
                "epoch_seen": int(seen),
                "epoch_seconds": float(secs),
                "model": encoder.model.state_dict(),
                "arcface": loss_fn.state_dict(),
                "projector": head.state_dict() if head is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
                "history": history,
                "ema": ema.state_dict() if ema is not None else None,
                "best": best.state_dict(),
                "train_images": train_images,
                "train_seconds": train_seconds,
            },
            ckpt_path,
        )

    every_steps = int(cfg.checkpoint_every_steps or 0)
    every_s = float(cfg.checkpoint_every_s or 0.0)
    last_ckpt = time.monotonic()
    epoch = start_epoch
    cache = None
    if cfg.decode_cache and epoch < cfg.epochs and step < total_steps and not stopped:  # something left to train
        aug_paths, plain_paths = dataset.cache_paths()
        pixels = split_eval_transform(encoder.preprocess)[0]
        cache = DecodedCache.build(out_dir, aug_paths, plain_paths if pixels is not None else [],
                                   cache_short_side(spec.image_size, cfg.decode_cache_scale), spec.interpolation,
                                   pixels=pixels)
        dataset.use_cache(cache)
    # one DataLoader for every epoch: its workers (persistent) keep the dataset; the batch sampler hands them
    # (epoch, index) pairs. Its own generator: drawing the loader's seed leaves the global RNG alone.
    sampler = EpochBatches()
    workers = int(cfg.num_workers or 0)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=max(1, int(cfg.prefetch_factor)) if workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        while epoch < cfg.epochs and step < total_steps and not (history and history[-1].get("early_stop")):
            dataset.epoch = epoch
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            if m_per_class:
                perm = m_per_class_order(bal["label"].to_numpy(), m_per_class, bs, steps_per_epoch * bs,
                                         cfg.seed * 1_000_003 + epoch)
            else:
                perm = torch.randperm(n, generator=gen).tolist()
            batches = [perm[i * bs : (i + 1) * bs] for i in range(steps_per_epoch)]
            skip, losses, seen, prior_secs, mid_rng = mid if mid else (0, [], 0, 0.0, None)
            mid = None
            sampler.set(epoch, batches[skip:])
            _set_train_mode(encoder, cfg.freeze_bn)
            loss_fn.train()
            if head is not None:
                head.train()
            t0 = time.perf_counter()
            batch_iter = iter(loader)
            if mid_rng is not None:  # after the iterator drew its seed, as it did at this epoch's start
                _set_rng_state(mid_rng)
            epoch_step = skip
            wait, tw = 0.0, time.perf_counter()  # time the model waited for batches (this process's run of the epoch)
            for x, y in batch_iter:
                wait += time.perf_counter() - tw
                if step >= total_steps:
                    break
                x = x.to(dev, non_blocking=True, memory_format=fmt)
                y = y.to(dev, non_blocking=True)
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    tower_feats = feats = encoder(x)
                    if head is not None:  # training only: the saved encoder never has it
                        feats = head(feats)
                loss = loss_fn(feats.float(), y)
                if metric_fn is not None:  # on the features the index holds (before the head)
                    loss = loss + cfg.metric_loss_weight * metric_fn(tower_feats.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(clip_params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update(encoder.model)
                step += 1
                epoch_step += 1
                seen += x.shape[0]
                lv = float(loss.detach())
                losses.append(lv)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{lv:.3f}")
                emit(
                    "step",
                    step,
                    {
                        "loss": lv,
                        "lr": optimizer.param_groups[top_idx]["lr"],
                        "arcface_lr": optimizer.param_groups[arc_idx]["lr"],
                    },
                )
                due = (every_steps and step % every_steps == 0) or (every_s and time.monotonic() - last_ckpt >= every_s)
                if due and epoch_step < len(batches) and step < total_steps:  # the epoch's end writes its own
                    checkpoint(epoch, epoch_step, losses, seen, prior_secs + time.perf_counter() - t0)
                    last_ckpt = time.monotonic()
                    emit("checkpoint", step, {"epoch": epoch, "epoch_step": epoch_step})
                tw = time.perf_counter()
            secs = prior_secs + time.perf_counter() - t0
            train_images += seen
            train_seconds += secs
            epoch += 1
            acc = None
            if epoch >= cfg.epochs or step >= total_steps or epoch % max(1, int(cfg.val_every)) == 0:
                with ema.applied(encoder.model) if ema is not None else contextlib.nullcontext():
                    acc = validate()  # the weights that would be saved: the average when there is one
                    if cfg.keep_best or cfg.early_stop_patience:  # early stopping needs the best epoch too
                        best.offer(epoch, acc, encoder.model.state_dict() if cfg.keep_best else None)
            patience = cfg.early_stop_patience
            stop = bool(patience and best.improved is not None and best.epochs_since(epoch) >= patience
                        and epoch < cfg.epochs)
            rec = {
                "epoch": epoch,
                "step": step,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "val_acc": acc,
                "seconds": secs,
                "images_per_s": seen / secs if secs > 0 else float("nan"),
                "data_wait_s": wait,
                "lr": optimizer.param_groups[top_idx]["lr"],
                "best_epoch": best.epoch,
                "early_stop": stop,
            }
            history.append(rec)
            checkpoint(epoch)
            last_ckpt = time.monotonic()
            emit("epoch", step, rec)
            emit("checkpoint", step, {"epoch": epoch, "epoch_step": 0})
            if stop:
                log.info("early stop after epoch %d: no better validation accuracy since epoch %d", epoch, best.improved)
    finally:
        if bar is not None:
            bar.close()
        it = getattr(loader, "_iterator", None)  # persistent workers: stop them now, not at garbage collection
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    cache_mb = round(cache.nbytes / 1e6, 1) if cache is not None else None
    saved = "last"
    if cfg.keep_best and best.state is not None:
        encoder.model.load_state_dict(best.state)
        saved = f"best (epoch {best.epoch})"
    elif ema is not None:
        encoder.model.load_state_dict(ema.shadow)
        saved = "ema"
    if start_state is not None:  # WiSE-FT (Wortsman et al., CVPR 2022): keeps more of what the start model knew
        a = float(cfg.wise_alpha)
        mixed = {k: (a * v.detach().cpu() + (1 - a) * start_state[k]).to(v.dtype) if v.is_floating_point() else v
                 for k, v in encoder.model.state_dict().items()}
        encoder.model.load_state_dict(mixed)
        saved += f", WiSE-FT alpha {a}"
    encoder.eval()
    encoder.to(memory_format=torch.contiguous_format)  # the saved encoder in the usual layout
    save_encoder(encoder, enc_path)
    if cache is not None:  # finished: only a resumed run would have read it again
        cache.remove()
    trained = [h for h in history if h.get("epoch", 0) > 0]
    return TrainResult(
        encoder_path=enc_path,
        checkpoint_path=ckpt_path,
        history=history,
        steps=step,
        val_acc=[h.get("val_acc") for h in trained],
        val_acc_before=val_before,
        images_per_s=(train_images / train_seconds) if train_seconds > 0 else float("nan"),
        labels=labels,
        spec=spec,
        config=cfg,
        device=str(dev),
        resumed_from_step=resumed_from,
        extra={
            "resumed_from_epoch_step": resumed_mid,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "warmup_steps": warmup,
            "balanced_rows": n,
            "depth": depth,
            "augmented_rows": dataset.augmented_rows(),
            "num_workers": workers,
            "channels_last": bool(cfg.channels_last),
            "fused_optimizer": bool(optimizer.defaults.get("fused")),
            "torch_threads": torch.get_num_threads(),
            "decode_cache_s": cache.seconds if cache is not None else None,
            "decode_cache_reused": cache.reused if cache is not None else None,
            "decode_cache_mb": cache_mb,
            "saved_weights": saved,
            "projector": cfg.projector,
            "m_per_class": m_per_class,  # None where the catalog has too few SKUs for it (shuffled batches)
            "metric_loss": cfg.metric_loss,
            "frozen_tensors": frozen,
            "best_epoch": best.epoch,
            "best_val_acc": best.acc,
            "ema_decay": cfg.ema_decay,
            "stopped_early": bool(trained and trained[-1].get("early_stop")),
        },
    )

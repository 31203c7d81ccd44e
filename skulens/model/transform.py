"""Image transforms: the eval (index/query) transform and the shelf-condition train augmentation.

Both take a PIL image and return a normalised ``(3, H, W)`` float tensor. torchvision is imported
inside the builders. All randomness goes through torch's global RNG, so a caller that seeds torch
per sample (as :mod:`skulens.model.train` does) gets reproducible augmentations.

Colour is kept almost intact on purpose (hue jitter <= 0.02, no grayscale): sibling products often
differ only by colour (flavours, variants).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

__all__ = ["MAX_HUE", "eval_transform", "train_transform"]

MAX_HUE = 0.02


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[name]


class _ToRGB:
    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


class _RandomDownscale:
    """Shelf crops are small and soft: with probability ``p`` resize to a random fraction
    ``[min_scale, 1)`` of the size and back up (bilinear), losing detail like a far-away crop."""

    def __init__(self, p: float = 0.3, min_scale: float = 0.35):
        self.p, self.min_scale = p, min_scale

    def __call__(self, img: Image.Image) -> Image.Image:
        import torch

        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return img
        s = self.min_scale + (1.0 - self.min_scale) * torch.rand(()).item()
        w, h = img.size
        small = img.resize((max(8, int(w * s)), max(8, int(h * s))), Image.BILINEAR)
        return small.resize((w, h), Image.BILINEAR)

    def __repr__(self) -> str:
        return f"RandomDownscale(p={self.p}, min_scale={self.min_scale})"


def eval_transform(
    image_size: int = 224,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
):
    """Resize the short side to ``image_size / crop_pct``, centre-crop ``image_size``, normalise."""
    from torchvision import transforms as T

    resize = round(image_size / float(crop_pct))
    return T.Compose(
        [
            _ToRGB(),
            T.Resize(resize, interpolation=_interp(interpolation)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(tuple(mean), tuple(std)),
        ]
    )


def train_transform(
    image_size: int = 224,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bicubic",
    strength: float = 1.0,
    hue: float = MAX_HUE,
):
    """Shelf-condition augmentation. ``strength`` (0..1, 1 = default) scales every component.

    random resized crop (scale 1-0.6s .. 1) -> perspective (0.35s, p=0.5) -> brightness/contrast/
    saturation jitter (0.4s/0.4s/0.15s, hue <= 0.02, p=0.8) -> down-and-up scaling (p=0.3s) ->
    Gaussian blur (p=0.3s) -> tensor/normalise -> RandomErasing occlusion (p=0.4s, 2-20 % area).
    No horizontal flip (packaging text is not mirror-symmetric) and no grayscale.
    """
    from torchvision import transforms as T

    if not 0 <= hue <= MAX_HUE:
        raise ValueError(f"hue jitter must be in [0, {MAX_HUE}]: products often differ only by colour")
    s = max(0.0, float(strength))
    ops = [_ToRGB()]
    min_scale = max(0.05, 1.0 - 0.6 * s)
    ops.append(
        T.RandomResizedCrop(
            image_size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3), interpolation=_interp(interpolation)
        )
    )
    if s > 0:
        ops += [
            T.RandomPerspective(distortion_scale=min(0.9, 0.35 * s), p=0.5),
            T.RandomApply(
                [T.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.15 * s, hue=hue)], p=0.8
            ),
            _RandomDownscale(p=min(1.0, 0.3 * s)),
            T.RandomApply([T.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=min(1.0, 0.3 * s)),
        ]
    ops += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    if s > 0:
        ops.append(T.RandomErasing(p=min(1.0, 0.4 * s), scale=(0.02, 0.2), ratio=(0.3, 3.3), value=0))
    return T.Compose(ops)

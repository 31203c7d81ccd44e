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

__all__ = ["DEFAULT_PREPROCESS", "ENV_PREPROCESS", "MAX_HUE", "PREPROCESS_MODES", "EvalTransformNP", "eval_transform",
           "eval_transform_np", "FITS", "fit_square", "preprocess_setting", "train_transform"]

MAX_HUE = 0.02
#: ways to fit an image to the model's square input (ModelSpec.fit): centre crop, squash, pad (fit_square)
FITS = ("crop", "squash", "pad")


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[name]


def _pil_resample(name: str) -> int:
    """PIL's resampling filter for an interpolation name (the spec's ``interpolation``)."""
    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[name]


class _ToRGB:
    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def fit_square(img: Image.Image, size: int, fit: str, resample: int = Image.BICUBIC,
               fill: Sequence[int] = (128, 128, 128)) -> Image.Image:
    """The whole of ``img`` (RGB) in a ``size x size`` image: ``"squash"`` resizes it to the square (aspect
    not kept); ``"pad"`` resizes its long side to ``size`` and centres it on ``fill`` (the model's mean
    colour: zero after normalisation). Product crops are often 3:1 or 1:3; a centre crop keeps a third."""
    w, h = img.size
    if fit == "squash":
        return img if (w, h) == (size, size) else img.resize((size, size), resample)
    if fit != "pad":
        raise ValueError(f"fit {fit!r}: 'squash' or 'pad' ('crop' is the resize + centre crop)")
    k = size / max(w, h)
    nw, nh = min(size, max(1, round(w * k))), min(size, max(1, round(h * k)))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    if (nw, nh) == (size, size):
        return img
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in fill))
    canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """The 8-bit colour that normalises to zero (padding for ``fit="pad"``)."""
    return tuple(int(round(255 * float(m))) for m in mean)


class _FitSquare:
    def __init__(self, size: int, fit: str, resample: int, fill: Sequence[int]):
        self.size, self.fit, self.resample, self.fill = int(size), fit, resample, tuple(fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        return fit_square(img, self.size, self.fit, self.resample, self.fill)

    def __repr__(self) -> str:
        return f"FitSquare(size={self.size}, fit={self.fit})"


class _FitSquareOwnSize:
    """:func:`fit_square` at the image's own scale (squash: to its short side, pad: to its long side), so the
    random crop that follows works on the whole product, as evaluation with that fit sees it."""

    def __init__(self, fit: str, resample: int, fill: Sequence[int]):
        self.fit, self.resample, self.fill = fit, resample, tuple(fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        return fit_square(img, min(w, h) if self.fit == "squash" else max(w, h), self.fit, self.resample, self.fill)

    def __repr__(self) -> str:
        return f"FitSquareOwnSize(fit={self.fit})"


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
    fit: str = "crop",
):
    """``fit="crop"``: resize the short side to ``image_size / crop_pct``, centre-crop ``image_size``;
    ``"squash"`` / ``"pad"``: the whole image in the square (:func:`fit_square`); then normalise."""
    from torchvision import transforms as T

    if fit == "crop":
        resize = round(image_size / float(crop_pct))
        geometry = [T.Resize(resize, interpolation=_interp(interpolation)), T.CenterCrop(image_size)]
    else:
        geometry = [_FitSquare(image_size, fit, _pil_resample(interpolation), mean_fill(mean))]
    return T.Compose([_ToRGB(), *geometry, T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


#: preprocessing modes of the numpy eval transform (``$SKULENS_PREPROCESS``): ``exact`` reproduces
#: torchvision's pixels; ``fast`` resizes the source region straight into the centre-crop box (one
#: resize instead of resize + crop) and lets large JPEGs decode at reduced scale (``Image.draft``)
PREPROCESS_MODES = ("exact", "fast")
#: the environment variable that sets the preprocessing mode of compiled engines
ENV_PREPROCESS = "SKULENS_PREPROCESS"
#: the default mode (bench/bench_embed.py measures both; see README "Inference engine")
DEFAULT_PREPROCESS = "fast"


def preprocess_setting(value: str | None = None) -> str:
    """``value``, else ``$SKULENS_PREPROCESS``, else :data:`DEFAULT_PREPROCESS`; checked."""
    import os

    m = (value or os.environ.get(ENV_PREPROCESS) or DEFAULT_PREPROCESS).strip().lower()
    if m not in PREPROCESS_MODES:
        raise ValueError(f"preprocess mode {m!r}: one of {', '.join(PREPROCESS_MODES)} ({ENV_PREPROCESS})")
    return m


class EvalTransformNP:
    """The eval transform without torch: PIL -> numpy. Picklable (plain attributes), so it can run in
    worker processes.

    ``output="float"`` (default): float32 ``(3, S, S)``, normalised, equal to :func:`eval_transform`
    in ``exact`` mode (same PIL resize call, same centre-crop rounding, same normalisation) to float
    rounding. ``output="uint8"``: the 8-bit RGB pixels ``(S, S, 3)`` before normalisation (a compiled
    engine converts and normalises inside its graph; :meth:`normalize` does it in numpy).

    ``mode="exact"``: resize the short side to ``S / crop_pct`` then centre-crop, as torchvision.
    ``mode="fast"``: (1) one bicubic resize of the source region that the centre crop keeps straight
    to ``S x S`` (``Image.resize(box=...)``: the same scale and sampling centres, so only rounding
    differs, about half the work on GroZi crops); (2) ``draft``: a JPEG whose short side is at least 4x
    the resize target decodes at 1/2, 1/4 or 1/8 scale in the DCT (``Image.draft``), keeping at least
    twice the target before the bicubic resize; several times faster on large packshots, pixels not
    identical to a full decode. ``draft`` can also be set on its own."""

    def __init__(self, image_size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), interpolation: str = "bicubic",
                 crop_pct: float = 0.875, draft: bool | None = None, mode: str = "exact",
                 output: str = "float", fit: str = "crop"):
        import numpy as np

        if mode not in PREPROCESS_MODES:
            raise ValueError(f"preprocess mode {mode!r}: one of {', '.join(PREPROCESS_MODES)}")
        if output not in ("float", "uint8"):
            raise ValueError(f"output {output!r}: 'float' or 'uint8'")
        if fit not in FITS:
            raise ValueError(f"fit {fit!r}: one of {', '.join(FITS)}")
        self.image_size = int(image_size)
        self.fit = fit
        self.fill = mean_fill(mean)
        # the short side's resize target ("squash" / "pad": the whole image goes to image_size at most)
        self.resize = round(self.image_size / float(crop_pct)) if fit == "crop" else self.image_size
        self.resample = _pil_resample(interpolation)
        # (x / 255 - mean) / std == x * scale + shift, per channel
        std_a = np.asarray(std, dtype=np.float32)
        self.scale = (1.0 / (255.0 * std_a)).astype(np.float32).reshape(1, 1, 3)
        self.shift = (-np.asarray(mean, dtype=np.float32) / std_a).astype(np.float32).reshape(1, 1, 3)
        self.mode = mode
        self.output = output
        self.draft = (mode == "fast") if draft is None else bool(draft)

    def _resized_size(self, w: int, h: int) -> tuple[int, int]:
        # torchvision.transforms.functional._compute_resized_output_size for an int size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def draft_size(self, w: int, h: int) -> tuple[int, int] | None:
        """The size to ask ``Image.draft`` for (a JPEG of ``w x h``), or None when no DCT downscale
        keeps at least twice the resize target on the short side (or ``draft`` is off)."""
        if not self.draft or min(w, h) < 4 * self.resize:
            return None
        k = 2 * self.resize / min(w, h)
        return max(1, int(w * k + 0.999)), max(1, int(h * k + 0.999))

    def pil(self, img: Image.Image) -> Image.Image:
        """Resize + centre crop (the PIL part), RGB in, RGB ``S x S`` out."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        if self.fit != "crop":  # one resize of the whole image, the same in both modes
            return fit_square(img, self.image_size, self.fit, self.resample, self.fill)
        w, h = img.size
        nw, nh = self._resized_size(w, h)
        s = self.image_size
        if self.mode == "fast" and nw >= s and nh >= s:
            top = int(round((nh - s) / 2.0))
            left = int(round((nw - s) / 2.0))
            sx, sy = w / nw, h / nh  # the crop box in source pixels: same scale, same sampling centres
            return img.resize((s, s), self.resample, box=(left * sx, top * sy, (left + s) * sx, (top + s) * sy))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), self.resample)
        if nw < s or nh < s:  # torchvision pads with zeros before cropping
            pad = Image.new("RGB", (max(nw, s), max(nh, s)))
            pad.paste(img, ((max(nw, s) - nw) // 2, (max(nh, s) - nh) // 2))
            img, nw, nh = pad, max(nw, s), max(nh, s)
        top = int(round((nh - s) / 2.0))
        left = int(round((nw - s) / 2.0))
        return img.crop((left, top, left + s, top + s))

    def pixels(self, img: Image.Image):
        """uint8 ``(S, S, 3)``: the resized, cropped RGB pixels."""
        import numpy as np

        return np.asarray(self.pil(img), dtype=np.uint8)

    def normalize(self, pixels):
        """uint8 ``(..., S, S, 3)`` -> float32 ``(..., 3, S, S)``, normalised (what the model takes)."""
        import numpy as np

        a = np.asarray(pixels, dtype=np.float32) * self.scale + self.shift
        return np.ascontiguousarray(np.moveaxis(a, -1, -3))

    def __call__(self, img: Image.Image):
        if self.output == "uint8":
            return self.pixels(img)
        return self.normalize(self.pixels(img))

    def __repr__(self) -> str:
        return (f"EvalTransformNP(size={self.image_size}, fit={self.fit}, resize={self.resize}, mode={self.mode}, "
                f"draft={self.draft}, output={self.output})")


def eval_transform_np(
    image_size: int = 224,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    draft: bool | None = None,
    mode: str = "exact",
    output: str = "float",
    fit: str = "crop",
) -> EvalTransformNP:
    """:func:`eval_transform` in numpy + PIL only (no torch import): see :class:`EvalTransformNP`."""
    return EvalTransformNP(image_size, mean, std, interpolation, crop_pct, draft, mode, output, fit)


def train_transform(
    image_size: int = 224,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bicubic",
    strength: float = 1.0,
    hue: float = MAX_HUE,
    fit: str = "crop",
):
    """Shelf-condition augmentation. ``strength`` (0..1, 1 = default) scales every component. ``fit``
    ``"squash"`` / ``"pad"``: the image is first fitted to a square at its own scale (:func:`fit_square`),
    so the random crop covers up to the whole product (a 1:3 bottle included), as evaluation with that fit
    sees it; ``"crop"``: the crop works on the raw image.

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
    if fit != "crop":
        ops.append(_FitSquareOwnSize(fit, _pil_resample(interpolation), mean_fill(mean)))
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

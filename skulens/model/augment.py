"""Shelf-like augmentation of clean catalog images (PIL/numpy only, no heavy imports).

:func:`shelf_augment` simulates what a shelf crop looks like compared to a packshot: a loose or
tight crop box, slight perspective (camera not square to the shelf) and rotation with a
shelf-coloured margin, lighting and white-balance shifts, and low resolution / blur. It is
deterministic given a ``numpy.random.Generator`` and never flips (text and logos matter).

Used by the RetailKLIP gallery (:func:`skulens.evaluation.retrieval.retailklip_gallery`) to add shelf-like
views of each catalog image to the index, and meant for the extra index views of sparse SKUs.
Model *training* does not use it: it uses the torchvision pipeline
:func:`skulens.model.transform.train_transform`, seeded through torch. The demo generator's
:func:`skulens.catalog.demo.shelfify` is a data *simulator* (it fabricates shelf crops, with occlusion and
noise) built on the same :func:`perspective_coeffs` helper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

Point = tuple[float, float]


def perspective_coeffs(dst: Sequence[Point], src: Sequence[Point]) -> list[float]:
    """The 8 coefficients of PIL's ``Image.Transform.PERSPECTIVE`` mapping output corners to input.

    ``dst``: 4 points in the *output* image; ``src``: the 4 points of the *input* image they must
    sample from (same order). PIL applies ``(a, b, c, d, e, f, g, h)`` to every output pixel
    ``(x, y)`` as ``x_in = (a x + b y + c) / (g x + h y + 1)``, ``y_in = (d x + e y + f) / (g x + h y + 1)``,
    so ``perspective_coeffs(dst, src)`` sends each ``dst[i]`` to ``src[i]``. E.g. with ``dst`` the
    image rectangle and ``src`` a jittered quad inside it, the quad is stretched to fill the output.
    """
    a = []
    b = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b.extend([u, v])
    if len(b) != 8:
        raise ValueError(f"perspective_coeffs needs 4 point pairs, got {len(b) // 2}")
    return np.linalg.solve(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).tolist()


def _range(lo: float, hi: float, identity: float, strength: float) -> tuple[float, float]:
    """``(lo, hi)`` pulled towards ``identity`` by ``strength`` (exactly ``(lo, hi)`` at 1.0)."""
    if strength == 1.0:
        return lo, hi
    return identity + strength * (lo - identity), identity + strength * (hi - identity)


def shelf_augment(img: Image.Image, rng: np.random.Generator, strength: float = 1.0) -> Image.Image:
    """Mild, deterministic (given ``rng``) shelf-like distortion of a clean catalog image.

    Simulates what a shelf crop looks like compared to a packshot: loose/tight crop box, slight
    rotation and perspective, lighting and white-balance shifts, low resolution / blur, and a
    shelf-coloured margin. Keeps the product recognisable (no flips: text and logos matter).

    ``strength`` scales every distortion range towards the identity (and the blur probability);
    1.0 is the default, 0 returns the image unchanged apart from RGB conversion, > 1 exaggerates.
    The same random numbers are drawn in the same order whatever the strength.
    """
    s = float(strength)
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    img = img.convert("RGB")
    w, h = img.size
    # 1. crop box jitter: keep 80-100% of each side, random offset
    lo, hi = _range(0.8, 1.0, 1.0, s)
    sx, sy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    cw, ch = max(1, min(w, int(w * sx))), max(1, min(h, int(h * sy)))
    x0, y0 = int(rng.uniform(0, w - cw + 1e-9)), int(rng.uniform(0, h - ch + 1e-9))
    if (cw, ch) != (w, h):
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
    # 2. small perspective (camera not facing the shelf squarely) + rotation, shelf-grey fill
    fill = tuple(int(v) for v in rng.integers(60, 200, size=3))
    w, h = img.size
    d = 0.06 * s
    src = [(rng.uniform(0, d) * w, rng.uniform(0, d) * h), (w - rng.uniform(0, d) * w, rng.uniform(0, d) * h),
           (w - rng.uniform(0, d) * w, h - rng.uniform(0, d) * h), (rng.uniform(0, d) * w, h - rng.uniform(0, d) * h)]
    dst = [(0, 0), (w, 0), (w, h), (0, h)]
    if s != 0:
        img = img.transform((w, h), Image.Transform.PERSPECTIVE, perspective_coeffs(dst, src),
                            resample=Image.Resampling.BILINEAR, fillcolor=fill)
    lo, hi = _range(-6, 6, 0.0, s)
    angle = float(rng.uniform(lo, hi))
    if angle != 0:
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=fill)
    # 3. lighting: brightness / contrast / saturation and a white-balance cast
    for enhancer, (lo, hi) in ((ImageEnhance.Brightness, (0.7, 1.2)), (ImageEnhance.Contrast, (0.75, 1.15)),
                               (ImageEnhance.Color, (0.85, 1.15))):
        factor = float(rng.uniform(*_range(lo, hi, 1.0, s)))
        if factor != 1.0:
            img = enhancer(img).enhance(factor)
    lo, hi = _range(0.95, 1.05, 1.0, s)
    cast = rng.uniform(lo, hi, size=3)  # mild: sibling SKUs often differ only by colour
    if s != 0:
        arr = np.clip(np.asarray(img, dtype=np.float32) * cast[None, None, :], 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
    # 4. resolution: shelf crops are small; downscale then upscale, sometimes blur
    lo, hi = _range(0.35, 1.0, 1.0, s)
    scale = float(rng.uniform(lo, hi))
    if scale < 1.0:
        small = (max(8, int(w * scale)), max(8, int(h * scale)))
        img = img.resize(small, Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
    if rng.random() < 0.3 * s:
        lo, hi = _range(0.3, 1.2, 0.0, s)
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(lo, hi))))
    return img

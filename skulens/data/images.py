"""The one way skulens turns an image file (or a decoded PIL image) into 8-bit RGB pixels.

Cleaning (the normalised PNG copies), training, evaluation, the index, ``recognize`` and ``serve`` all
decode through :func:`load_rgb`, so every path sees the same pixels for the same file:

* EXIF orientation applied (phone photos), and the tag dropped so a second pass is a no-op;
* 16-bit and 32-bit grey scaled to 8 bits (not clipped);
* transparency (RGBA, LA, PA, palette with a transparent index) composited on white: a product
  cut-out on a white page, not on black;
* any other mode (CMYK, L, P, YCbCr, ...) converted to RGB.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageLike", "load_rgb", "to_rgb"]

ImageLike = str | os.PathLike | Image.Image

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image -> upright 8-bit RGB (see the module docstring). May return ``img`` itself."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr8 = ((arr.astype(np.uint32) * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8)
        else:
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr8)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_rgb(image: ImageLike) -> Image.Image:
    """Open a path (fully decoded, file closed) or take a PIL image, and return it as RGB (:func:`to_rgb`)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    with Image.open(image) as f:
        f.load()
        out = to_rgb(f)
        return f.copy() if out is f else out

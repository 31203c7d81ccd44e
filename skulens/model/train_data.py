"""Training data: the balanced dataset, its decoded-image cache and its batch order.

* :class:`DecodedCache`: every distinct training file decoded once (:func:`skulens.data.images.load_rgb`)
  into one uint8 file (read back as a ``numpy.memmap``: DataLoader workers share its pages, nothing is
  pickled per worker), at training size, so later batches and epochs only augment:

  - rows that take the shelf augmentation read the image with its shorter side reduced to
    ``ceil(image_size * scale)`` (bicubic, as the eval resize; never enlarged). ``RandomResizedCrop`` draws
    its box as a fraction of the area, so the augmentation's geometry is unchanged; only the source
    resolution of a large image is capped (at ``scale=1.5`` the smallest crop, 40 % of the area, is still
    about the training size);
  - rows that take the eval transform read the eval crop itself (resize + centre crop, uint8), so their
    tensors are bit-identical to ``eval_tf(load_rgb(path))``; only ``ToTensor`` and ``Normalize`` run
    per sample.

  The file is keyed by the files (path, size, mtime) and the sizes, kept in ``out_dir`` while training runs
  (a resumed run reuses it), replaced when the key changes and deleted when training finishes.
* :class:`BalancedDataset`: map-style dataset over the balanced frame; the augmentation of sample ``i``
  in epoch ``e`` is seeded from ``(seed, e, i)`` only. Indices may be ``(epoch, i)`` pairs, so persistent
  DataLoader workers (which keep their own copy of the dataset) need no per-epoch state.
* :class:`EpochBatches`: the batch sampler of a persistent DataLoader; :meth:`EpochBatches.set` gives it
  the next epoch's batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from skulens.data.images import load_rgb

__all__ = ["BalancedDataset", "DecodedCache", "EpochBatches", "sample_seed", "split_eval_transform"]

log = logging.getLogger(__name__)

CACHE_DIR = "decoded-cache"


def sample_seed(seed: int, epoch: int, index: int) -> int:
    h = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def split_eval_transform(tf):
    """``(pixels, tensor)`` of an eval transform that ends in ``ToTensor, Normalize`` (skulens' and
    open_clip's do): ``pixels`` (PIL -> PIL: resize, crop) and ``tensor`` (PIL or HWC uint8 array ->
    normalised tensor), with ``tensor(pixels(img)) == tf(img)``. ``(None, None)`` for any other transform."""
    from torchvision import transforms as T

    ops = getattr(tf, "transforms", None)
    if not isinstance(tf, T.Compose) or not ops or len(ops) < 2:
        return None, None
    if not (isinstance(ops[-2], T.ToTensor) and isinstance(ops[-1], T.Normalize)):
        return None, None
    return T.Compose(list(ops[:-2])), T.Compose(list(ops[-2:]))


def _file_key(path: str) -> list:
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


class DecodedCache:
    """Decoded uint8 RGB pixels of the training files, at training size (see the module docstring).

    ``aug[path]`` -> ``(offset, h, w)`` of the image the augmentation reads, ``crop[path]`` -> the same for
    the eval crop. Open it with :meth:`build` (builds or reuses the file in ``root``)."""

    def __init__(self, file: Path, aug: dict, crop: dict, seconds: float = 0.0, reused: bool = False):
        self.file = Path(file)
        self.aug, self.crop = aug, crop
        self.seconds, self.reused = seconds, reused
        self._mm = None

    # the memmap is opened lazily in each process (workers get the path, not the pages)
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_mm"] = None
        return d

    @property
    def nbytes(self) -> int:
        return self.file.stat().st_size if self.file.exists() else 0

    def remove(self) -> None:
        """Delete the cache files (a finished training run: only a resumed run would read them again)."""
        self._mm = None
        self.file.unlink(missing_ok=True)
        self.file.with_suffix(".json").unlink(missing_ok=True)

    def _array(self, entry) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.file, dtype=np.uint8, mode="r")
        off, h, w = entry
        return self._mm[off : off + h * w * 3].reshape(h, w, 3)

    def aug_image(self, path: str):
        from PIL import Image

        return Image.fromarray(np.array(self._array(self.aug[path])), "RGB")

    def crop_array(self, path: str) -> np.ndarray:
        return np.array(self._array(self.crop[path]))  # writable copy (torch.from_numpy)

    @classmethod
    def build(cls, root: str | os.PathLike, aug_paths: Sequence[str], crop_paths: Sequence[str], short_side: int,
              interpolation: str, pixels=None, threads: int | None = None) -> DecodedCache:
        """Decode ``aug_paths`` (shorter side capped at ``short_side``) and ``crop_paths`` (through ``pixels``,
        the eval transform's resize + crop) once, into ``root/decoded-cache/<key>.u8``; reuse that file when
        it exists for the same files and sizes. ``threads`` decode in parallel (PIL releases the GIL)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        aug_paths = sorted(set(map(str, aug_paths)))
        crop_paths = sorted(set(map(str, crop_paths))) if pixels is not None else []
        key = hashlib.sha256(json.dumps({
            "format": 1, "short_side": int(short_side), "interpolation": interpolation,
            "pixels": repr(pixels), "aug": [_file_key(p) for p in aug_paths],
            "crop": [_file_key(p) for p in crop_paths]}).encode()).hexdigest()[:24]
        d = Path(root) / CACHE_DIR
        d.mkdir(parents=True, exist_ok=True)
        data, index = d / f"{key}.u8", d / f"{key}.json"
        if data.exists() and index.exists():
            try:
                ix = json.loads(index.read_text())
                return cls(data, {p: tuple(v) for p, v in ix["aug"].items()},
                           {p: tuple(v) for p, v in ix["crop"].items()}, reused=True)
            except (OSError, ValueError, KeyError):
                pass
        for old in d.iterdir():  # another data set / size: one cache per out_dir
            if old.name.split(".")[0] != key:
                old.unlink(missing_ok=True)
        interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}.get(
            interpolation, InterpolationMode.BICUBIC)

        def decode(job):
            kind, path = job
            img = load_rgb(path)
            if kind == "crop":
                img = pixels(img)
            elif min(img.size) > short_side:
                img = F.resize(img, short_side, interpolation=interp)
            a = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
            return kind, path, np.ascontiguousarray(a)

        t0 = time.perf_counter()
        jobs = [("aug", p) for p in aug_paths] + [("crop", p) for p in crop_paths]
        out = {"aug": {}, "crop": {}}
        tmp = data.with_name(f".{data.name}.tmp{os.getpid()}")
        off = 0
        n_threads = max(1, int(threads if threads is not None else min(4, os.cpu_count() or 1)))
        try:
            with open(tmp, "wb") as f, ThreadPoolExecutor(n_threads) as pool:
                for kind, path, a in pool.map(decode, jobs):
                    f.write(a.tobytes())
                    out[kind][path] = (off, int(a.shape[0]), int(a.shape[1]))
                    off += a.nbytes
            os.replace(tmp, data)
        except BaseException:  # an unreadable image or an interrupt: no half-written cache left in out_dir
            tmp.unlink(missing_ok=True)
            raise
        itmp = index.with_name(f".{index.name}.tmp{os.getpid()}")
        itmp.write_text(json.dumps(out))
        os.replace(itmp, index)
        secs = time.perf_counter() - t0
        log.info("decoded %d training images once into %s (%.1f MB) in %.1fs", len(jobs), data, off / 1e6, secs)
        return cls(data, out["aug"], out["crop"], seconds=secs)


class BalancedDataset:
    """Map-style dataset over the balanced frame; augmentation seeded per (seed, epoch, index).

    An index is ``i`` (epoch :attr:`epoch`) or ``(epoch, i)``. With a :class:`DecodedCache` the pixels come
    from it (decoded once), else each sample decodes its file."""

    def __init__(self, frame: pd.DataFrame, train_tf, eval_tf, seed: int, augment_originals: bool,
                 cache: DecodedCache | None = None):
        self.paths = frame["clean_path"].astype(str).tolist()
        self.labels = frame["label"].astype(int).tolist()
        self.augment = frame["augment"].astype(bool).tolist()
        self.train_tf, self.eval_tf = train_tf, eval_tf
        self.seed, self.augment_originals = seed, augment_originals
        self.epoch = 0
        self.cache, self._eval_tensor = None, None
        if cache is not None:
            self.use_cache(cache)

    def use_cache(self, cache: DecodedCache) -> None:
        """Read pixels from ``cache`` from now on (before the DataLoader's workers start)."""
        self.cache = cache
        self._eval_tensor = split_eval_transform(self.eval_tf)[1]

    def __len__(self) -> int:
        return len(self.paths)

    def uses_augmentation(self, i: int) -> bool:
        return bool(self.augment[i] or self.augment_originals)

    def augmented_rows(self) -> int:
        """How many rows go through the train (shelf) augmentation rather than the eval transform."""
        return sum(self.uses_augmentation(i) for i in range(len(self)))

    def cache_paths(self) -> tuple[list[str], list[str]]:
        """(files some row augments, files some row takes through the eval transform)."""
        aug = {p for i, p in enumerate(self.paths) if self.uses_augmentation(i)}
        plain = {p for i, p in enumerate(self.paths) if not self.uses_augmentation(i)}
        return sorted(aug), sorted(plain)

    def __getitem__(self, item):
        import torch

        epoch, i = item if isinstance(item, tuple) else (self.epoch, item)
        path, cache = self.paths[i], self.cache
        if self.uses_augmentation(i):
            img = cache.aug_image(path) if cache is not None and path in cache.aug else load_rgb(path)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, i))
                x = self.train_tf(img)
        elif cache is not None and self._eval_tensor is not None and path in cache.crop:
            x = self._eval_tensor(cache.crop_array(path))  # deterministic: no RNG
        else:
            with torch.random.fork_rng(devices=[]):  # the eval transform draws nothing; kept for custom ones
                torch.manual_seed(sample_seed(self.seed, epoch, i))
                x = self.eval_tf(load_rgb(path))
        return x, self.labels[i]


class EpochBatches:
    """Batch sampler whose batches are set per epoch: lists of ``(epoch, index)``."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def set(self, epoch: int, batches: Sequence[Sequence[int]]) -> None:
        self.batches = [[(int(epoch), int(i)) for i in b] for b in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def cache_short_side(image_size: int, scale: float) -> int:
    """The shorter side the augmented images are cached at: ``ceil(image_size * scale)``, >= image_size."""
    return max(int(image_size), int(math.ceil(float(image_size) * float(scale))))

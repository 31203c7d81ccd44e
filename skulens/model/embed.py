"""Embed product images with an encoder: L2-normalised float32 vectors, eval mode, no autograd.

``encoder`` is either a ``skulens.model`` Encoder (an ``nn.Module`` with ``.preprocess``: PIL -> tensor
eval transform, and ``forward(x) -> (B, D)``; training's validation uses this) or a compiled
:class:`skulens.model.engine.InferenceEngine` (``.preprocess``: PIL -> numpy, ``.run(batch)``; every
inference path uses this, and then no torch is imported here). Images are file paths or PIL images;
every image is converted to RGB before preprocessing (grayscale, palette, RGBA and CMYK photos all
occur in real catalogs).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from skulens.data.images import ImageLike, load_rgb, to_rgb

__all__ = ["ImageLike", "embed_images", "is_engine", "l2_normalize", "load_rgb"]


def is_engine(encoder) -> bool:
    """Is ``encoder`` a compiled inference engine (``.run`` on numpy batches) rather than a torch module?"""
    return callable(getattr(encoder, "run", None)) and hasattr(encoder, "backend")


def _load_for(image: ImageLike, preprocess) -> "Image.Image":  # noqa: F821 - PIL, via load_rgb
    """:func:`load_rgb`, letting a JPEG file decode at reduced size (``Image.draft``) when the numpy
    preprocess allows it (``preprocess.draft``: on in its ``fast`` mode) and the file is large enough
    (``preprocess.draft_size``)."""
    draft_size = getattr(preprocess, "draft_size", None)
    if draft_size is None or isinstance(image, Image.Image) or not getattr(preprocess, "draft", False):
        return load_rgb(image)
    with Image.open(image) as f:
        if f.format == "JPEG":
            size = draft_size(*f.size)
            if size is not None:
                f.draft("RGB", size)
        f.load()
        out = to_rgb(f)
        return f.copy() if out is f else out


def _decode_threads() -> int | None:
    """``$SKULENS_DECODE_THREADS`` if set, else None (adaptive: see :func:`_embed_engine`)."""
    raw = os.environ.get("SKULENS_DECODE_THREADS")
    return max(1, int(raw)) if raw else None


def _max_decode_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _output_of(pre, image) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of ``pre``'s output: from its attributes (the numpy eval transform), else by trying."""
    size, output = getattr(pre, "image_size", None), getattr(pre, "output", None)
    if size and output == "uint8":
        return (size, size, 3), np.dtype(np.uint8)
    if size and output == "float":
        return (3, size, size), np.dtype(np.float32)
    a = np.asarray(pre(_load_for(image, pre)))
    return a.shape, a.dtype


def _embed_engine(engine, images: list, batch_size: int, progress: bool, threads: int | None,
                  prefetch: int = 2) -> np.ndarray:
    """Decode + preprocess in a thread pool (PIL releases the GIL in decode and resize) while the
    engine runs the previous batch; up to ``prefetch`` batches are prepared ahead, the threads writing
    each image's pixels straight into the batch array (uint8 NHWC for an engine: a quarter of the
    bytes of float32, and the normalisation runs inside the compiled graph).

    Each batch is cut into ``k`` slices, one task each. ``threads`` (or ``$SKULENS_DECODE_THREADS``)
    fixes ``k``; by default ``k`` adapts between 1 and min(4, cores): it grows by one when the engine
    had to wait for a batch (decoding is the bottleneck: large packshots) and shrinks by one after two
    batches that were ready in time. On 2 cores with small JPEGs one decoding thread costs less CPU
    per image than two (bench/bench_embed.py), and every cycle it saves goes to inference."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    pre = engine.preprocess
    n = len(images)
    starts = list(range(0, n, batch_size))
    fixed = threads or _decode_threads()
    k_max = fixed or _max_decode_threads()
    k = fixed or 1
    ready_streak = 0
    probe = None

    def work(buf, offset, chunk):
        for j, im in enumerate(chunk):
            buf[offset + j] = pre(_load_for(im, pre))

    out = np.empty((n, engine.embed_dim), dtype=np.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc=f"embed ({engine.backend})", unit="batch")
    with ThreadPoolExecutor(max_workers=k_max, thread_name_prefix="skulens-decode") as pool:
        pending: deque = deque()

        def submit(i):
            nonlocal probe
            chunk = images[starts[i]:starts[i] + batch_size]
            if probe is None:  # the shape and dtype of one preprocessed image
                probe = _output_of(pre, chunk[0])
            buf = np.empty((len(chunk), *probe[0]), probe[1])
            step = -(-len(chunk) // k)
            pending.append((starts[i], buf, [pool.submit(work, buf, o, chunk[o:o + step])
                                             for o in range(0, len(chunk), step)]))

        nxt = 0
        while nxt < len(starts) and nxt < prefetch + 1:
            submit(nxt)
            nxt += 1
        try:
            while pending:
                start, batch, futs = pending.popleft()
                waited = not all(f.done() for f in futs)
                t0 = time.perf_counter()
                for f in futs:
                    f.result()
                if not fixed and nxt > prefetch + 1:  # past the first batches (which nobody can have ready)
                    if waited and time.perf_counter() - t0 > 1e-3:
                        k, ready_streak = min(k_max, k + 1), 0
                    else:
                        ready_streak += 1
                        if ready_streak >= 2 and k > 1:
                            k, ready_streak = k - 1, 0
                if nxt < len(starts):  # keep the decoders busy while the engine runs this batch
                    submit(nxt)
                    nxt += 1
                feats = engine.run(batch)
                out[start:start + len(batch)] = feats
                if bar is not None:
                    bar.update(1)
        finally:
            for _, _, futs in pending:
                for f in futs:
                    f.cancel()
            if bar is not None:
                bar.close()
    return l2_normalize(out)


class _ImageDataset:
    """Map-style dataset for torch's DataLoader (picklable for worker processes)."""

    def __init__(self, images: Sequence[ImageLike], preprocess: Callable):
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.preprocess(load_rgb(self.images[i]))


def _batches(images: Sequence[ImageLike], preprocess: Callable, batch_size: int) -> Iterable:
    import torch

    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        yield torch.stack([preprocess(load_rgb(im)) for im in chunk])


def _encoder_device(encoder):
    import torch

    for p in encoder.parameters():
        return p.device
    return torch.device("cpu")


def _embed_dim(encoder) -> int | None:
    d = getattr(encoder, "embed_dim", None)
    if d is None and getattr(encoder, "spec", None) is not None:
        d = getattr(encoder.spec, "embed_dim", None)
    return int(d) if d else None


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation, float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


def embed_images(
    encoder,
    images: Sequence[ImageLike],
    batch_size: int = 64,
    device=None,
    progress: bool = False,
    num_workers: int = 0,
    amp_dtype=None,
) -> np.ndarray:
    """Embed ``images`` (paths or PIL images) -> float32 array (N, D), each row L2-normalised.

    Runs the encoder in eval mode under ``torch.inference_mode`` and restores its previous
    train/eval mode afterwards. ``device`` defaults to the encoder's current device; the encoder is
    moved there if needed. ``num_workers > 0`` decodes images in DataLoader worker processes.
    ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the forward pass under autocast; the output is float32.
    This is the one embedding loop: training's validation and prototypes, evaluation, the index,
    ``index_update``, ``recognize`` and ``serve`` all call it.

    With an engine (:mod:`skulens.model.engine`) decoding and preprocessing run in threads
    (``num_workers`` of them, else ``$SKULENS_DECODE_THREADS``, else 1 to min(4, cores), adapting), overlapping
    inference; ``device`` and ``amp_dtype`` are the engine's business and ignored; torch is not imported.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    images = list(images)
    if is_engine(encoder):
        if not images:
            return np.zeros((0, encoder.embed_dim), dtype=np.float32)
        return _embed_engine(encoder, images, batch_size, progress, num_workers or None)
    import torch

    preprocess = getattr(encoder, "preprocess", None)
    if preprocess is None:
        raise TypeError("encoder has no .preprocess transform (PIL -> tensor)")
    dev = torch.device(device) if device is not None else _encoder_device(encoder)
    if not images:
        return np.zeros((0, _embed_dim(encoder) or 0), dtype=np.float32)

    if _encoder_device(encoder) != dev:
        encoder.to(dev)

    if num_workers and num_workers > 0:
        loader = torch.utils.data.DataLoader(
            _ImageDataset(images, preprocess), batch_size=batch_size, shuffle=False,
            num_workers=num_workers, pin_memory=dev.type == "cuda",
        )
    else:
        loader = _batches(images, preprocess, batch_size)

    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, total=(len(images) + batch_size - 1) // batch_size, desc="embed", unit="batch")

    was_training = encoder.training
    encoder.eval()
    out: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for batch in loader:
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    feats = encoder(batch.to(dev, non_blocking=True))
                feats = torch.nn.functional.normalize(feats.float(), dim=-1)
                out.append(feats.cpu().numpy())
    finally:
        encoder.train(was_training)
    return np.ascontiguousarray(np.concatenate(out, axis=0), dtype=np.float32)








# ====================================================================== inputs
def resolve_device(preferred: str | None = None) -> str:
    """``preferred`` if given, else ``cuda`` when available, else ``cpu``."""
    if preferred:
        return str(preferred)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class EmbeddingCache:
    """Catalog embeddings per (encoder file sha256, catalog fingerprint) as ``.npy`` files, so that the
    index build reuses what the evaluation computed with the same weights (and a re-run skips work).
    Files are written atomically; a damaged or mismatching file is ignored."""

    def __init__(self, root: str | os.PathLike, keep: int = 8):
        self.root = Path(root)
        self.keep = keep  # newest files kept; older ones are removed (local cache only)

    def _path(self, encoder_sha: str, catalog_fp: str) -> Path:
        return self.root / f"{encoder_sha[:20]}-{catalog_fp[:20]}.npy"

    def get(self, encoder_sha: str | None, catalog_fp: str, n: int):
        import numpy as np

        if not encoder_sha:
            return None
        p = self._path(encoder_sha, catalog_fp)
        try:
            v = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return v if v.ndim == 2 and v.shape[0] == n and np.isfinite(v).all() else None

    def put(self, encoder_sha: str | None, catalog_fp: str, vectors) -> None:
        import numpy as np

        if not encoder_sha:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        p = self._path(encoder_sha, catalog_fp)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(vectors, dtype=np.float32))
        os.replace(tmp, p)
        files = sorted(self.root.glob("*.npy"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
        for old in files[self.keep:]:
            old.unlink(missing_ok=True)

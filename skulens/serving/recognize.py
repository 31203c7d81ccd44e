"""Recognise shelf crops: embed with the encoder, search the SKU index, return names and versions.

:class:`Recognizer` holds one immutable state (encoder, index, products, versions) and swaps it as
a whole when the published index changes, so a request never mixes an index with a model that did
not build it. The change check is a HEAD of ``index/CURRENT.json`` (its ETag), at most once per
``reload_interval_s``; when the new index was built by another model version, that version's
encoder is loaded before the swap.

Models come from :class:`skulens.registry.store.ModelStore`: the index names the model that built it
(version and sha256), so a model used once before loads from the local cache with the MLflow server
down; only a model that is not cached needs the registry, and then the store fails within seconds
with one clear line (:class:`skulens.registry.store.ModelUnavailable`) instead of retrying for minutes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from skulens.index.publish import advance, load_current, pointer_etag, read_pointer
from skulens.index.sku_index import SkuIndex
from skulens.model.embed import ImageLike, embed_images, is_engine, l2_normalize, load_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _State:
    encoder: object
    index: SkuIndex
    names: dict
    model_version: str | None
    index_version: str | None
    etag: str | None = None
    pointer: dict | None = None  # the pointer the index was loaded from (base + deltas): reloads apply only new deltas
    products_etag: str | None = None


@dataclass(frozen=True)
class Prepared:
    """One image preprocessed ahead of :meth:`Recognizer.recognize` (see :meth:`Recognizer.prepare`):
    ``array`` is ``encoder.preprocess(image)`` for the engine of that moment."""

    image: object
    array: np.ndarray
    encoder: object


@dataclass
class _Source:
    client: object
    bucket: str
    prefix: str
    cache_dir: Path
    store: object | None  # skulens.registry.store.ModelStore, or None (a fixed encoder, no registry)
    products_key: str | None
    device: str


def _names(products: pd.DataFrame | None) -> dict:
    if products is None or "name" not in products.columns:
        return {}
    return dict(zip(products["sku"].astype(str), products["name"].fillna("").astype(str)))


def _read_products(client, bucket: str, key: str | None) -> pd.DataFrame | None:
    if not key:
        return None
    from botocore.exceptions import ClientError

    from skulens.catalog.contract import read_products

    try:
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return read_products(data)


class Recognizer:
    """``recognize(images, k)`` -> one result per image::

        {"sku", "name", "score", "topk": [{"sku", "name", "score"}, ...],
         "model_version", "index_version"}
    """

    def __init__(
        self,
        encoder,
        index: SkuIndex,
        products: pd.DataFrame | None = None,
        model_version: str | None = None,
        index_version: str | None = None,
        reload_interval_s: float = 1.0,
        batch_size: int = 32,
        _source: _Source | None = None,
        _etag: str | None = None,
        _pointer: dict | None = None,
    ):
        mv = model_version if model_version is not None else index.model_version
        if index.model_version is not None and mv is not None and str(mv) != str(index.model_version):
            raise ValueError(f"index was built by model {index.model_version}, encoder is {mv}")
        dim = getattr(encoder, "embed_dim", None)
        if dim is not None and len(index) and int(dim) != index.embed_dim:
            raise ValueError(f"encoder dim {dim} != index dim {index.embed_dim}")
        encoder.eval()
        self._state = _State(encoder, index, _names(products), None if mv is None else str(mv),
                             index_version or index.meta.get("version"), _etag, _pointer)
        self._source = _source
        self.reload_interval_s = float(reload_interval_s)
        self.batch_size = int(batch_size)
        self._last_check = time.monotonic()
        self._reload_lock = threading.Lock()

    # ------------------------------------------------------------------ construction from services
    @classmethod
    def from_services(
        cls,
        tracking_uri: str,
        model_name: str,
        s3_client,
        bucket: str,
        cache_dir: str | os.PathLike | None = None,
        prefix: str = "index",
        products_key: str | None = "catalog/products.csv",
        device: str = "cpu",
        reload_interval_s: float = 1.0,
        store=None,
    ) -> Recognizer:
        """Load the published index (``CURRENT.json``) and the encoder version that built it
        (the ``champion`` if the index records no model version) through ``store`` (default: a
        :class:`~skulens.registry.store.ModelStore` on ``tracking_uri`` caching in ``cache_dir/models``)."""
        from skulens.registry.store import ModelStore

        cache_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="skulens-rec-"))
        store = store if store is not None else ModelStore(cache_dir / "models", tracking_uri, model_name)
        src = _Source(s3_client, bucket, prefix, cache_dir, store, products_key, device)
        etag = pointer_etag(s3_client, bucket, prefix)
        index, pointer = load_current(s3_client, bucket, prefix, cache_dir / "index")
        encoder, mv = cls._encoder_for(src, index)
        products = _read_products(s3_client, bucket, products_key)
        return cls(encoder, index, products, model_version=mv, index_version=pointer["version"],
                   reload_interval_s=reload_interval_s, _source=src, _etag=pointer.get("etag") or etag,
                   _pointer=pointer)

    @classmethod
    def from_s3(
        cls,
        encoder,
        s3_client,
        bucket: str,
        prefix: str = "index",
        cache_dir: str | os.PathLike | None = None,
        products_key: str | None = "catalog/products.csv",
        model_version: str | None = None,
        reload_interval_s: float = 1.0,
    ) -> Recognizer:
        """Serve a given encoder with the published index; no registry. Reloads follow new index
        versions built by the same model version only (others are refused and logged)."""
        cache_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="skulens-rec-"))
        src = _Source(s3_client, bucket, prefix, cache_dir, None, products_key, "cpu")
        etag = pointer_etag(s3_client, bucket, prefix)
        index, pointer = load_current(s3_client, bucket, prefix, cache_dir / "index")
        products = _read_products(s3_client, bucket, products_key)
        return cls(encoder, index, products, model_version=model_version, index_version=pointer["version"],
                   reload_interval_s=reload_interval_s, _source=src, _etag=pointer.get("etag") or etag,
                   _pointer=pointer)

    @staticmethod
    def _encoder_for(src: _Source, index: SkuIndex):
        """The encoder that built ``index``: by the version and sha256 its meta records (cache
        first), or the champion for an index that records no version."""
        store = src.store
        if store is None:
            raise RuntimeError("no model registry configured")
        if index.model_version is None:
            ref = store.champion(offline_ok=True)
            if ref is None:
                raise LookupError(f"registered model {store.model_name!r} has no 'champion' alias")
        else:
            ref = store.version(index.model_version, sha256=index.meta.get("model_sha256"))
        return store.engine(ref, device=src.device), ref.version  # compiled backend (skulens.model.engine)

    # ------------------------------------------------------------------ properties
    @property
    def model_version(self) -> str | None:
        return self._state.model_version

    @property
    def index_version(self) -> str | None:
        return self._state.index_version

    @property
    def index(self) -> SkuIndex:
        return self._state.index

    @property
    def encoder(self):
        return self._state.encoder

    # ------------------------------------------------------------------ reload
    def maybe_reload(self, force: bool = False) -> bool:
        """Swap to the newly published index (and its model) if ``CURRENT.json`` changed.

        Checks at most once per ``reload_interval_s`` (unless ``force``) with a HEAD request. Never
        raises on a failed reload: it logs and keeps serving the current state. Returns True if the
        state was swapped.
        """
        src = self._source
        if src is None:
            return False
        now = time.monotonic()
        if not force and now - self._last_check < self.reload_interval_s:
            return False
        if not self._reload_lock.acquire(blocking=force):
            return False  # another thread is checking/reloading
        try:
            self._last_check = time.monotonic()
            state = self._state
            try:
                etag = pointer_etag(src.client, src.bucket, src.prefix)
                if etag is None or etag == state.etag:
                    return False
                pointer = read_pointer(src.client, src.bucket, src.prefix)
                if pointer is None:
                    return False
                if pointer["version"] == state.index_version:
                    self._state = _replace(state, etag=pointer.get("etag") or etag, pointer=pointer)
                    return False
                # the same chain: only the deltas this state lacks (small); else the whole index
                index, how = advance(src.client, src.bucket, state.pointer, state.index, pointer,
                                     src.cache_dir / "index")
                encoder, mv = state.encoder, state.model_version
                if index.model_version is not None and str(index.model_version) != state.model_version:
                    encoder, mv = self._encoder_for(src, index)
                    encoder.eval()
                if len(index) and int(getattr(encoder, "embed_dim", index.embed_dim)) != index.embed_dim:
                    raise ValueError(f"encoder dim {encoder.embed_dim} != index dim {index.embed_dim}")
                names, p_etag = state.names, _products_etag(src)
                if p_etag is None or p_etag != state.products_etag:  # products.csv re-read only when it changed
                    products = _read_products(src.client, src.bucket, src.products_key)
                    names = _names(products) if products is not None else state.names
                self._state = _State(encoder, index, names, mv, pointer["version"], pointer.get("etag") or etag,
                                     pointer, p_etag)
                log.info("reloaded index %s (model %s, %d rows; %s, %d delta(s))", pointer["version"], mv,
                         len(index), how["mode"], how.get("deltas", 0))
                return True
            except Exception as e:  # noqa: BLE001 - keep serving the old, consistent state
                log.warning("index reload failed, keeping %s: %s", state.index_version, e)
                return False
        finally:
            self._reload_lock.release()

    # ------------------------------------------------------------------ recognition
    def embed(self, images: Sequence[ImageLike]) -> np.ndarray:
        return embed_images(self._state.encoder, images, batch_size=self.batch_size)

    def prepare(self, image: ImageLike):
        """Preprocess one image for the current encoder ahead of :meth:`recognize` (``serve`` does it in
        its decoding threads, overlapping inference): a :class:`Prepared` when the encoder is a compiled
        engine, else the image unchanged. Thread-safe; ``recognize`` takes either."""
        enc = self._state.encoder
        if not is_engine(enc):
            return image
        return Prepared(image, enc.preprocess(load_rgb(image)), enc)

    def _embed_prepared(self, encoder, images: list) -> np.ndarray:
        if all(isinstance(im, Prepared) and im.encoder is encoder for im in images):
            bs = self.batch_size
            return l2_normalize(np.concatenate([encoder.run(np.stack([im.array for im in images[i:i + bs]]))
                                                for i in range(0, len(images), bs)]))
        # prepared for another encoder (a reload in between): from the images
        images = [im.image if isinstance(im, Prepared) else im for im in images]
        return embed_images(encoder, images, batch_size=self.batch_size)

    def recognize(self, images: Sequence[ImageLike] | ImageLike, k: int = 5) -> list[dict]:
        """Top-``k`` SKUs for each image (paths, PIL images or :meth:`prepare` results; a single image
        is accepted too)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        state = self._state  # one consistent snapshot for the whole call
        if not images:
            return []
        if any(isinstance(im, Prepared) for im in images):
            vecs = self._embed_prepared(state.encoder, list(images))
        else:
            vecs = embed_images(state.encoder, images, batch_size=self.batch_size)
        hits = state.index.search(vecs, k=k)
        out = []
        for h in hits:
            topk = [{"sku": s, "name": state.names.get(s, ""), "score": round(float(sc), 6)} for s, sc in h]
            best = topk[0] if topk else {"sku": None, "name": "", "score": None}
            out.append({**best, "topk": topk, "model_version": state.model_version,
                        "index_version": state.index_version})
        return out


def _products_etag(src: _Source) -> str | None:
    if not src.products_key:
        return None
    try:
        return src.client.head_object(Bucket=src.bucket, Key=src.products_key)["ETag"].strip('"')
    except Exception:  # noqa: BLE001 - absent or unreadable: read it as before
        return None


def _replace(state: _State, **kw) -> _State:
    from dataclasses import replace

    return replace(state, **kw)


def measure_latency(recognizer: Recognizer, images: Sequence[ImageLike], k: int = 5,
                    repeats: int = 3, warmup: int = 1) -> dict:
    """Per-crop latency of ``recognize`` one crop at a time (ms): p50, p90, mean over all calls."""
    for im in list(images)[:warmup]:
        recognizer.recognize([im], k=k)
    times = []
    for _ in range(repeats):
        for im in images:
            t0 = time.perf_counter()
            recognizer.recognize([im], k=k)
            times.append((time.perf_counter() - t0) * 1000)
    t = np.asarray(times)
    return {"n": int(t.size), "p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "mean_ms": float(t.mean())}

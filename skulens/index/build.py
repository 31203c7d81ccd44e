"""Build the SKU index from the cleaned catalog: one vector per catalog image, plus shelf-like
augmented views for sparse SKUs (fewer than ``SPARSE_BELOW`` images), and publish it when it changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd

from skulens.index.publish import _UNSET
from skulens.index.sku_index import SkuIndex
from skulens.model.embed import EmbeddingCache

#: SKUs with fewer catalog images than this get shelf-like views in the index (RetailKLIP 4.2) ...
SPARSE_BELOW = 3
#: ... this many per image (0 = none)
SPARSE_VIEWS = 8


def catalog_frame(kept: pd.DataFrame) -> pd.DataFrame:
    """Cleaned catalog images (sku, key, clean_path, packshot), sorted by sku then path; only existing files.
    ``packshot`` (bool) marks the SKU's reference image (:mod:`skulens.catalog.contract`; all False when
    ``kept`` has no such column)."""
    df = kept[["sku", "key", "clean_path"]].copy()
    df["sku"] = df["sku"].astype(str)
    df["clean_path"] = df["clean_path"].astype(str)
    df["packshot"] = packshot_mask(kept)
    df = df[df["clean_path"].map(lambda p: Path(p).is_file()).astype(bool)]  # bool: an empty mask selects rows too
    return df.sort_values(["sku", "clean_path"], kind="stable").reset_index(drop=True)


def packshot_mask(df: pd.DataFrame, col: str = "packshot"):
    """``df[col]`` as a boolean numpy array (True, 1, "true", "yes" are true); all False without the column."""
    import numpy as np

    if col not in df.columns:
        return np.zeros(len(df), dtype=bool)
    v = df[col]
    if v.dtype == bool:
        return v.to_numpy()
    return v.map(lambda x: str(x).strip().lower() in ("true", "1", "1.0", "yes")).to_numpy(dtype=bool)


def reference_rows(catalog: pd.DataFrame, path_col: str = "clean_path") -> pd.DataFrame:
    """One row per SKU: its packshot (``packshot`` column) when it has one, else its first image by
    ``path_col``. Sorted by SKU."""
    df = catalog.copy()
    df["sku"] = df["sku"].astype(str)
    df[path_col] = df[path_col].astype(str)
    df["_not_packshot"] = ~packshot_mask(df)
    df = df.sort_values(["sku", "_not_packshot", path_col], kind="stable")
    return df.drop_duplicates("sku", keep="first").drop(columns="_not_packshot").reset_index(drop=True)


def thumbnails(catalog: pd.DataFrame) -> dict[str, str]:
    """sku -> its packshot, else its first cleaned catalog image (for the confusion plot)."""
    first = reference_rows(catalog)
    return dict(zip(first["sku"], first["clean_path"]))


# ====================================================================== evaluation
def catalog_fingerprint(catalog: pd.DataFrame) -> str:
    """sha256 over the cleaned images (sku, key, file, size, mtime): a key for cached embeddings."""
    h = hashlib.sha256()
    for sku, key, path in zip(catalog["sku"], catalog["key"].astype(str), catalog["clean_path"]):
        st = os.stat(path)
        h.update(f"{sku}\t{key}\t{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def sparse_rows(catalog: pd.DataFrame, below: int) -> pd.DataFrame:
    """The catalog rows of SKUs with fewer than ``below`` images (sparse SKUs, e.g. packshot-only)."""
    if below <= 0 or len(catalog) == 0:
        return catalog.iloc[:0]
    counts = catalog.groupby("sku")["sku"].transform("size")
    return catalog[counts < below]


#: the sparse-SKU rule of an index that records none (the IndexSettings defaults)
DEFAULT_SPARSE_RULE = {"below": SPARSE_BELOW, "views": SPARSE_VIEWS, "seed": 0}


def view_labels(rows: pd.DataFrame, views: int) -> tuple[list[str], list[str]]:
    """``(skus, keys)`` of the view rows of ``rows``, in :func:`view_vectors` order (keys ``<key>#aug<i>``)."""
    skus = [s for s in rows["sku"].astype(str) for _ in range(views)]
    keys = [f"{k}#aug{i}" for k in rows["key"].astype(str) for i in range(1, views + 1)]
    return skus, keys


def view_vectors(encoder, rows: pd.DataFrame, views: int, seed: int = 0, batch_size: int = 64,
                 chunk: int = 16):
    """``views`` shelf-like augmentations (:func:`skulens.model.augment.shelf_augment`) of each row's image,
    embedded, in :func:`view_labels` order. Seeded per (seed, key), so a SKU's views do not depend on
    the rest of the catalog (the full build and ``index_update`` agree)."""
    import zlib

    import numpy as np

    from skulens.data.images import load_rgb
    from skulens.model.augment import shelf_augment
    from skulens.model.embed import embed_images

    vecs = []
    items = list(zip(rows["key"].astype(str), rows["clean_path"].astype(str)))
    for start in range(0, len(items), chunk):  # a few images at a time: packshots can be large
        imgs = []
        for key, path in items[start:start + chunk]:
            base = load_rgb(path)
            rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
            imgs += [shelf_augment(base, rng) for _ in range(views)]
        vecs.append(embed_images(encoder, imgs, batch_size=batch_size))
    dim = int(getattr(encoder, "embed_dim", 0) or (vecs[0].shape[1] if vecs else 0))
    return np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)


def embedding_key(encoder_sha: str | None, encoder) -> str | None:
    """The :class:`EmbeddingCache` key of vectors computed by ``encoder`` from the file ``encoder_sha``:
    the sha256 itself for PyTorch with exact preprocessing, else a hash of (sha256, backend, precision,
    and the preprocessing mode unless ``exact``), so that vectors from different backends or
    preprocessing modes (equal only to a tolerance) are never mixed in one index."""
    backend = getattr(encoder, "backend", None)
    mode = getattr(encoder, "preprocess_mode", None) or "exact"  # fast preprocessing: other pixels
    if not encoder_sha or (backend in (None, "torch") and mode == "exact"):
        return encoder_sha
    precision = (getattr(encoder, "parity", None) or {}).get("precision", "f32")
    return hashlib.sha256(f"{encoder_sha}|{backend}|{precision}"
                          f"{'' if mode == 'exact' else '|' + mode}".encode()).hexdigest()


def catalog_index(encoder, catalog: pd.DataFrame, model_version: str | None = None, batch_size: int = 64,
                  meta: dict | None = None, cache: EmbeddingCache | None = None,
                  encoder_sha: str | None = None, sparse_below: int = 0, sparse_views: int = 0,
                  aug_seed: int = 0) -> SkuIndex:
    """An index of every cleaned catalog image embedded with ``encoder`` (through ``cache`` when the
    encoder's file hash is known), plus ``sparse_views`` shelf-like views of every image of the SKUs
    with fewer than ``sparse_below`` images. The rule is stored in the index meta (``sparse``) so
    that ``index_update`` applies the same one."""
    import numpy as np

    from skulens.model.embed import embed_images

    encoder_sha = embedding_key(encoder_sha, encoder)
    fp = catalog_fingerprint(catalog) if cache is not None and encoder_sha else None
    vecs = cache.get(encoder_sha, fp, len(catalog)) if fp else None
    if vecs is None:
        vecs = embed_images(encoder, catalog["clean_path"].tolist(), batch_size=batch_size)
        if fp:
            cache.put(encoder_sha, fp, vecs)
    skus, keys = catalog["sku"].tolist(), catalog["key"].astype(str).tolist()
    rows = sparse_rows(catalog, sparse_below) if sparse_views > 0 else catalog.iloc[:0]
    if len(rows):
        vfp = (hashlib.sha256(f"{fp}|views|{sparse_below}|{sparse_views}|{aug_seed}".encode()).hexdigest()
               if fp else None)
        n_views = len(rows) * sparse_views
        v = cache.get(encoder_sha, vfp, n_views) if vfp else None
        if v is None:
            v = view_vectors(encoder, rows, sparse_views, aug_seed, batch_size)
            if vfp:
                cache.put(encoder_sha, vfp, v)
        vskus, vkeys = view_labels(rows, sparse_views)
        vecs, skus, keys = np.concatenate([vecs, v]), skus + vskus, keys + vkeys
    m = dict(meta or {})
    m["sparse"] = {"below": int(sparse_below), "views": int(sparse_views), "seed": int(aug_seed),
                   "skus": int(rows["sku"].nunique()) if len(rows) else 0}
    m.setdefault("inference_backend", str(getattr(encoder, "backend", None) or "torch"))
    m.setdefault("inference_preprocess", str(getattr(encoder, "preprocess_mode", None) or "exact"))
    return SkuIndex(vecs, skus, keys, model_version=model_version, meta=m)


# ====================================================================== index
def build_champion_index(
    store,
    catalog: pd.DataFrame,
    device: str = "cpu",
    batch_size: int = 64,
    meta: dict | None = None,
    sources: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    sparse_below: int = SPARSE_BELOW,
    sparse_views: int = SPARSE_VIEWS,
    aug_seed: int = 0,
    backend: str | None = None,
) -> tuple[SkuIndex, str]:
    """Embed every cleaned catalog image with the current ``champion`` of ``store`` (a
    :class:`skulens.registry.store.ModelStore`), compiled by :meth:`~skulens.registry.store.ModelStore.engine`
    (``backend``; None: the store's default): ``(index, version)``; the index meta records the backend
    (``inference_backend``). The index meta names the model by
    version, sha256 and URI, so readers load it from their cache without the registry.

    ``sources`` ({catalog key: etag} of every file the cleaning looked at, kept or dropped) is stored
    in the index meta so that the incremental index update (:mod:`skulens.index.update`) only embeds
    SKUs that changed after this build."""
    from skulens.index.update import SOURCES_META

    if len(catalog) == 0:
        raise ValueError("the cleaned catalog has no images to index")
    ref = store.champion()
    if ref is None:
        raise LookupError(f"registered model {store.model_name!r} has no 'champion' alias")
    sha = store.complete(ref).sha256  # the cache names the file by its checked sha256: no re-hash
    encoder = store.engine(ref, backend=backend, device=device)
    version = ref.version
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    index = catalog_index(encoder, catalog, model_version=version, batch_size=batch_size,
                          cache=cache, encoder_sha=sha if cache is not None else None,
                          sparse_below=sparse_below, sparse_views=sparse_views, aug_seed=aug_seed,
                          meta={"model_name": store.model_name, "model_sha256": sha, "model_uri": ref.uri,
                                "source": "catalog", **(meta or {}),
                                **({SOURCES_META: dict(sources)} if sources is not None else {})})
    return index, version


def build_full_index(store, cleaned, meta: dict | None = None, **kw) -> tuple[SkuIndex, str]:
    """The full build (``sku_index``): the indexable images of ``cleaned`` (a
    :class:`skulens.data.clean.CleanResult` of the whole catalog; :func:`skulens.index.rules.indexable`)
    embedded with the champion (:func:`build_champion_index`, ``kw``). The meta records every file looked
    at (``sources``) and the rule (:func:`skulens.index.rules.build_meta`: thresholds, SKUs products.csv
    does not list, cross-SKU duplicates), which ``index_update`` applies to the SKUs that change later."""
    from skulens.index import rules

    return build_champion_index(store, rules.indexable(cleaned), sources=rules.sources_of(cleaned),
                                meta={**rules.build_meta(cleaned), **(meta or {})}, **kw)


def publish_if_changed(client, bucket: str, index: SkuIndex, prefix: str = "index", start=_UNSET, rebase=None,
                       cache_dir: str | os.PathLike | None = None, attempts: int = 5) -> dict:
    """Publish a full build atomically and by compare-and-swap (:func:`skulens.index.publish.publish_with_retry`)
    unless the pointer already names an index with the same content (same vectors, SKUs, keys and
    model version). Returns the pointer plus ``published`` (bool), ``attempts``, ``conflicts``.

    ``start`` is the pointer read before the build began (``None``: nothing was published; default:
    the pointer now). When another
    publisher (the catalog sensor's ``index_update``) moved it meanwhile, ``rebase(index, base)``
    returns the build brought up to date on top of the winner (:func:`skulens.index.update.rebase_build`),
    or ``None`` to publish nothing (the winner is newer); without ``rebase`` the build is not
    published over a winner it has not seen and :class:`skulens.index.publish.PublishConflict` is raised."""
    from skulens.index.publish import PublishConflict, publish_with_retry

    def make(base):
        if base.attempt == 0:
            return index
        if rebase is None:
            raise PublishConflict(f"another publisher moved the index to {base.version} during this build",
                                  current=base.pointer)
        return rebase(index, base)

    return publish_with_retry(client, bucket, make, prefix=prefix, start=start,
                              cache_dir=cache_dir, attempts=attempts)

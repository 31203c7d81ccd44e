"""SKU embedding index: exact cosine search aggregated by SKU, .npz persistence, atomic S3 publishing.

Storage layout under ``<prefix>/`` (default ``index/``) in the bucket::

    index/versions/<version>.npz    immutable index files, never overwritten, never deleted (history)
    index/versions/<version>.json   manifest written next to each file (same content as the pointer)
    index/CURRENT.json              small pointer {version, key, model_version, count, sha256, ...}

Publishing writes and verifies the version object first and only then replaces the pointer with a
single PUT. A PUT replaces an S3 object atomically, so a reader sees either the old or the new
pointer, and every pointer names a complete, verified, immutable object: a reader never sees a
half-written index. Readers verify the sha256 named in the pointer before using a download.

The .npz file holds only plain arrays (no pickle): ``vectors`` float32 (N, D), ``skus`` and ``keys``
as unicode arrays, and ``meta`` as a JSON string.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


class IndexIntegrityError(RuntimeError):
    """A downloaded or published index does not match its recorded size/sha256."""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32, copy=False)


def _str_array(values: Iterable) -> np.ndarray:
    arr = np.asarray([str(v) for v in values], dtype=np.str_)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        arr = np.zeros(0, dtype="<U1")
    return arr


@dataclass
class SkuIndex:
    """Exact nearest-neighbour index over L2-normalised embeddings, one row per gallery image.

    Rows are stored grouped by SKU (stable sort on construction; ``vectors``, ``skus`` and ``keys``
    stay aligned), so the per-SKU max is one ``np.maximum.reduceat`` over the similarity matrix.

    ``search`` aggregates rows by SKU (a SKU's score is its best row's cosine similarity), so a SKU
    with many gallery images counts once.
    """

    vectors: np.ndarray
    skus: np.ndarray
    keys: np.ndarray
    model_version: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        v = np.asarray(self.vectors, dtype=np.float32)
        if v.ndim != 2:
            raise ValueError(f"vectors must be 2-D (N, D), got shape {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("vectors contain NaN or inf")
        norms = np.linalg.norm(v, axis=1)
        off = np.abs(norms - 1.0) > 1e-4  # re-normalise only rows that need it: loads are bit-exact
        if off.any():
            v = v.copy()
            v[off] = _normalize(v[off])
        self.vectors = np.ascontiguousarray(v)
        self.skus = _str_array(self.skus)
        self.keys = _str_array(self.keys) if self.keys is not None else _str_array([""] * len(self.skus))
        n = self.vectors.shape[0]
        if len(self.skus) != n or len(self.keys) != n:
            raise ValueError(f"vectors ({n}), skus ({len(self.skus)}) and keys ({len(self.keys)}) differ in length")
        if n > 1 and not np.all(self.skus[:-1] <= self.skus[1:]):
            # rows are kept grouped by SKU (stable sort) so search needs no gather per query
            order = np.argsort(self.skus, kind="stable")
            self.vectors = np.ascontiguousarray(self.vectors[order])
            self.skus, self.keys = self.skus[order], self.keys[order]
        if self.model_version is not None:
            self.model_version = str(self.model_version)
        meta = dict(self.meta or {})
        meta.setdefault("created_at", _iso(_utcnow()))
        meta["embed_dim"] = int(self.vectors.shape[1])
        meta["count"] = int(n)
        meta["n_skus"] = len(np.unique(self.skus)) if n else 0
        meta["model_version"] = self.model_version
        meta["format_version"] = FORMAT_VERSION
        self.meta = meta
        self._groups = None

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def sku_list(self) -> list[str]:
        """Distinct SKUs, sorted."""
        return self._grouping()[0].tolist()

    def content_hash(self) -> str:
        """sha256 over vectors, skus, keys and model version (independent of file timestamps)."""
        h = hashlib.sha256()
        h.update(str(self.vectors.shape).encode())
        h.update(self.vectors.tobytes())
        for arr in (self.skus, self.keys):
            h.update("\x1f".join(arr.tolist()).encode("utf-8"))
            h.update(b"\x1e")
        h.update(str(self.model_version).encode())
        return h.hexdigest()

    def _grouping(self):
        """(unique skus, group start offsets); rows are stored sorted by SKU."""
        if self._groups is None:
            uniq, starts = np.unique(self.skus, return_index=True)
            self._groups = (uniq, starts)
        return self._groups

    # ------------------------------------------------------------------ search
    def sku_scores(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best cosine similarity per SKU: (sku names (S,), scores (Q, S))."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.shape[1] != self.embed_dim:
            raise ValueError(f"query dim {q.shape[1]} != index dim {self.embed_dim}")
        q = _normalize(q)
        uniq, starts = self._grouping()
        if len(self) == 0:
            return uniq, np.zeros((q.shape[0], 0), dtype=np.float32)
        sims = q @ self.vectors.T                               # (Q, N), columns grouped by SKU
        return uniq, np.maximum.reduceat(sims, starts, axis=1)  # (Q, S) max over each SKU's rows

    def search(self, queries: np.ndarray, k: int = 5, chunk: int = 1024) -> list[list[tuple[str, float]]]:
        """Top-``k`` SKUs per query as ``[(sku, score), ...]`` sorted by descending cosine similarity.

        ``queries`` is (Q, D) or (D,); they are L2-normalised here. Queries are processed in chunks
        of ``chunk`` rows to bound memory (Q x N similarities per chunk).
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        results: list[list[tuple[str, float]]] = []
        for start in range(0, q.shape[0], chunk):
            uniq, scores = self.sku_scores(q[start:start + chunk])
            s = scores.shape[1]
            if s == 0:
                results.extend([] for _ in range(scores.shape[0]))
                continue
            kk = min(k, s)
            if kk < s:
                top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            else:
                top = np.broadcast_to(np.arange(s), (scores.shape[0], s))
            top_scores = np.take_along_axis(scores, top, axis=1)
            # sort by score desc, ties broken by SKU name for determinism
            ordr = np.lexsort((top, -top_scores), axis=1)
            top = np.take_along_axis(top, ordr, axis=1)
            top_scores = np.take_along_axis(top_scores, ordr, axis=1)
            for row_i, row_s in zip(top, top_scores):
                results.append([(str(uniq[i]), float(sc)) for i, sc in zip(row_i, row_s)])
        return results

    # ------------------------------------------------------------------ updates
    def with_updates(
        self,
        new_vectors: np.ndarray | None = None,
        new_skus: Sequence[str] = (),
        new_keys: Sequence[str] | None = None,
        remove_skus: Iterable[str] = (),
        model_version: str | None = None,
    ) -> SkuIndex:
        """New index: all rows of SKUs in ``new_skus`` are replaced by the new rows, SKUs in
        ``remove_skus`` are dropped, every other row is kept unchanged. ``self`` is not modified.

        The new vectors must come from the same model as this index (``model_version``, if given,
        must match).
        """
        if model_version is not None and self.model_version is not None and str(model_version) != self.model_version:
            raise ValueError(
                f"new vectors come from model {model_version}, index from {self.model_version}: rebuild instead"
            )
        new_skus = _str_array(new_skus)
        if new_vectors is None:
            new_vectors = np.zeros((0, self.embed_dim), dtype=np.float32)
        new_vectors = np.asarray(new_vectors, dtype=np.float32).reshape(len(new_skus), -1) \
            if len(new_skus) else np.zeros((0, self.embed_dim), dtype=np.float32)
        if new_vectors.shape[1] != self.embed_dim:
            raise ValueError(f"new vectors dim {new_vectors.shape[1]} != index dim {self.embed_dim}")
        new_keys = _str_array(new_keys) if new_keys is not None else _str_array([""] * len(new_skus))
        if len(new_keys) != len(new_skus):
            raise ValueError("new_keys and new_skus differ in length")
        drop = set(new_skus.tolist()) | {str(s) for s in remove_skus}
        keep = ~np.isin(self.skus, list(drop)) if drop else np.ones(len(self), dtype=bool)
        meta = {k: v for k, v in self.meta.items() if k not in ("created_at", "count", "n_skus", "embed_dim")}
        meta["parent_content_hash"] = self.content_hash()
        meta["updated_skus"] = len(set(new_skus.tolist()))
        meta["removed_skus"] = len({str(s) for s in remove_skus} - set(new_skus.tolist()))
        return SkuIndex(
            vectors=np.concatenate([self.vectors[keep], new_vectors], axis=0),
            skus=np.concatenate([self.skus[keep], new_skus]).astype(np.str_),
            keys=np.concatenate([self.keys[keep], new_keys]).astype(np.str_),
            model_version=self.model_version if model_version is None else str(model_version),
            meta=meta,
        )

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            vectors=self.vectors,
            skus=self.skus,
            keys=self.keys,
            meta=np.asarray(json.dumps(self.meta, sort_keys=True)),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SkuIndex:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls._from_npz(z)

    @classmethod
    def _from_npz(cls, z) -> SkuIndex:
        missing = {"vectors", "skus", "keys", "meta"} - set(z.files)
        if missing:
            raise ValueError(f"not a skulens index file (missing {sorted(missing)})")
        meta = json.loads(str(z["meta"]))
        if int(meta.get("format_version", 1)) > FORMAT_VERSION:
            raise ValueError(f"index format {meta['format_version']} is newer than this code ({FORMAT_VERSION})")
        return cls(
            vectors=z["vectors"], skus=z["skus"], keys=z["keys"],
            model_version=meta.get("model_version"), meta=meta,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the .npz atomically (temp file in the same folder, then rename). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_bytes()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SkuIndex:
        with np.load(path, allow_pickle=False) as z:
            return cls._from_npz(z)

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
as unicode arrays, ``meta`` as a JSON string and (format 2) ``ids`` int64, each row's stable id. An
index with at least ``AnnConfig.threshold`` rows also stores its ANN structure (see
:mod:`skulens.index.ann`): ``ann_index`` (uint8, ``faiss.serialize_index``) and ``ann_tombstones``
(int64), with its parameters in ``meta["ann"]``. Format-1 files (no ids, no ANN) still load: ids are
0..N-1 and the ANN structure is built on first use.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from skulens.index.ann import SEARCH_KNOBS, AnnConfig, AnnIndex

FORMAT_VERSION = 2

log = logging.getLogger(__name__)


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


def _row_norms(v: np.ndarray, chunk: int = 16_384) -> np.ndarray:
    out = np.empty(v.shape[0], dtype=np.float64)
    for s in range(0, v.shape[0], chunk):
        blk = v[s:s + chunk].astype(np.float64)
        out[s:s + chunk] = np.sqrt(np.einsum("ij,ij->i", blk, blk))
    return out


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

    Each row has a stable int64 id (``ids``; default 0..N-1, kept by :meth:`with_updates`, new rows
    get fresh ids). From ``ann.threshold`` rows on (:class:`~skulens.index.ann.AnnConfig`, default
    50,000; ``SKULENS_ANN_*`` environment variables override it), ``search`` asks a FAISS structure
    keyed by those ids for candidate rows, re-scores them exactly and aggregates per SKU; below it,
    search is exact. :meth:`search_exact` and :meth:`sku_scores` are always exact.
    """

    vectors: np.ndarray
    skus: np.ndarray
    keys: np.ndarray
    model_version: str | None = None
    meta: dict = field(default_factory=dict)
    ids: np.ndarray | None = None
    ann: AnnConfig | dict | None = None

    def __post_init__(self):
        v = np.asarray(self.vectors, dtype=np.float32)
        if v.ndim != 2:
            raise ValueError(f"vectors must be 2-D (N, D), got shape {v.shape}")
        norms = _row_norms(v)  # chunked: no (N, D) temporaries for a multi-GB index
        if not np.all(np.isfinite(norms)):  # a NaN or inf anywhere in a row makes its norm NaN/inf
            raise ValueError("vectors contain NaN or inf")
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
        self.ids = np.arange(n, dtype=np.int64) if self.ids is None else np.asarray(self.ids, dtype=np.int64).reshape(-1)
        if len(self.ids) != n:
            raise ValueError(f"ids ({len(self.ids)}) and vectors ({n}) differ in length")
        if n > 1 and len(np.unique(self.ids)) != n:
            raise ValueError("row ids must be unique")
        if n > 1 and not np.all(self.skus[:-1] <= self.skus[1:]):
            # rows are kept grouped by SKU (stable sort) so search needs no gather per query
            order = np.argsort(self.skus, kind="stable")
            self.vectors = np.ascontiguousarray(self.vectors[order])
            self.skus, self.keys, self.ids = self.skus[order], self.keys[order], self.ids[order]
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
        if not isinstance(self.ann, AnnConfig):  # an explicit AnnConfig is used as given
            self.ann = AnnConfig.resolve(self.ann if self.ann is not None else (meta.get("ann") or {}).get("config"))
        self._groups = None
        self._ann: AnnIndex | None = None
        self._ann_lock = threading.Lock()
        self._id_table = None   # id -> row (-1: none) for dense ids, else
        self._id_order = None   # (sorted ids, row of each) for id -> row lookups
        self._row_group = None  # SKU group number of each row

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
        if self.vectors.size:  # same bytes as tobytes(), without a multi-GB copy
            h.update(memoryview(np.ascontiguousarray(self.vectors)).cast("B"))
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

        ``queries`` is (Q, D) or (D,); they are L2-normalised here. At or above the ANN threshold the
        candidate rows come from the ANN structure (built on first use if the index has none) and
        are re-scored exactly, so scores are exact cosines and only the candidate set is
        approximate; below it this is :meth:`search_exact`.
        """
        if not self.uses_ann:
            return self.search_exact(queries, k=k, chunk=chunk)
        if k < 1:
            raise ValueError("k must be >= 1")
        q = self._prep_queries(queries)
        ann = self.ensure_ann()
        return [r for s in range(0, q.shape[0], chunk) for r in self._search_ann(ann, q[s:s + chunk], k)]

    def search_exact(self, queries: np.ndarray, k: int = 5, chunk: int = 1024) -> list[list[tuple[str, float]]]:
        """Exact top-``k`` SKUs (brute force over every row), whatever the index size. Queries are
        processed in chunks of ``chunk`` rows to bound memory (Q x N similarities per chunk)."""
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

    # ------------------------------------------------------------------ ANN
    @property
    def uses_ann(self) -> bool:
        """Whether ``search`` goes through the ANN structure (kind not 'exact', size >= threshold)."""
        return self.ann.kind != "exact" and len(self) >= self.ann.threshold

    @property
    def ann_index(self) -> AnnIndex | None:
        """The ANN structure if one is built or loaded (None below the threshold or before first use)."""
        return self._ann

    def ensure_ann(self) -> AnnIndex | None:
        """Build the ANN structure now if this index uses one and has none (thread-safe)."""
        if not self.uses_ann:
            return None
        if self._ann is None:
            with self._ann_lock:
                if self._ann is None:
                    import time

                    t0 = time.perf_counter()
                    self._ann = AnnIndex.build(self.vectors, self.ids, self.ann)
                    log.info("built %s ANN structure over %d rows in %.1f s", self.ann.kind, len(self),
                             time.perf_counter() - t0)
        return self._ann

    def _prep_queries(self, queries) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.shape[1] != self.embed_dim:
            raise ValueError(f"query dim {q.shape[1]} != index dim {self.embed_dim}")
        return _normalize(q)

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of ``ids`` (-1 for ids not in this index).

        Ids are handed out densely (``next_id``), so a table indexed by id (int32, 4 bytes per id up to
        the largest) answers a lookup with one gather: 0.2 ms less per ANN query at 800k rows than a
        binary search over the sorted ids, which remains the way for sparse ids (largest id above
        4 x rows) and negative ones."""
        if self._id_table is None and self._id_order is None:
            n = len(self.ids)
            if n and int(self.ids.min()) >= 0 and int(self.ids.max()) < 4 * n + 1024 and n < 2**31:
                table = np.full(int(self.ids.max()) + 1, -1, dtype=np.int32)
                table[self.ids] = np.arange(n, dtype=np.int32)
                self._id_table = table
            else:
                order = np.argsort(self.ids, kind="stable")
                self._id_order = (self.ids[order], order)
        ids = np.asarray(ids, dtype=np.int64)
        if self._id_table is not None:
            ok = (ids >= 0) & (ids < len(self._id_table))
            return np.where(ok, self._id_table[np.where(ok, ids, 0)], -1).astype(np.int64, copy=False)
        sorted_ids, order = self._id_order
        if not len(sorted_ids):
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(sorted_ids, ids)
        pos_c = np.minimum(pos, len(sorted_ids) - 1)
        ok = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == ids)
        return np.where(ok, order[pos_c], -1)

    def _groups_of_rows(self) -> np.ndarray:
        if self._row_group is None:
            uniq, starts = self._grouping()
            self._row_group = np.repeat(np.arange(len(uniq), dtype=np.int64), np.diff(np.append(starts, len(self))))
        return self._row_group

    def _aggregate(self, q: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Exact per-SKU best scores over candidate ``rows``: top ``k`` SKUs (ties by SKU name)."""
        uniq, _ = self._grouping()
        sc = self.vectors[rows] @ q
        g = self._groups_of_rows()[rows]
        order = np.lexsort((g, -sc))
        _, first = np.unique(g[order], return_index=True)
        pick = order[np.sort(first)][:k]
        return [(str(uniq[g[i]]), float(sc[i])) for i in pick]

    def _search_ann(self, ann: AnnIndex, q: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        n_skus = len(self._grouping()[0])
        kk, n = min(k, n_skus), len(self)
        fetch = min(n, max(self.ann.candidates, kk * self.ann.rows_per_sku))
        out: list = [None] * q.shape[0]
        todo = np.arange(q.shape[0])
        while todo.size:
            cand = ann.search(q[todo], fetch)
            again = []
            for qi, ids in zip(todo, cand):
                rows = self._rows_of(ids[ids >= 0])
                res = self._aggregate(q[qi], rows[rows >= 0], kk)
                if len(res) < kk and fetch < ann.ntotal:
                    again.append(qi)
                else:
                    out[qi] = res
            todo, fetch = np.asarray(again, dtype=np.int64), fetch * 4
            if todo.size and fetch >= n // 4:  # too wide for the graph: exact for these few queries
                for qi, res in zip(todo, self.search_exact(q[todo], k=kk)):
                    out[qi] = res
                break
        return out

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
        meta = {k: v for k, v in self.meta.items() if k not in ("created_at", "count", "n_skus", "embed_dim", "ann")}
        meta["parent_content_hash"] = self.content_hash()
        meta["updated_skus"] = len(set(new_skus.tolist()))
        meta["removed_skus"] = len({str(s) for s in remove_skus} - set(new_skus.tolist()))
        next_id = int(self.ids.max()) + 1 if len(self) else 0
        next_id = max(next_id, int(self.meta.get("next_id", 0)))  # ids of removed rows are never reused:
        if self._ann is not None:  # a reused id would match an HNSW tombstone and be hidden
            next_id = max(next_id, self._ann.next_id)
        fresh = np.arange(next_id, next_id + len(new_skus), dtype=np.int64)
        meta["next_id"] = next_id + len(new_skus)
        out = SkuIndex(
            vectors=np.concatenate([self.vectors[keep], new_vectors], axis=0),
            skus=np.concatenate([self.skus[keep], new_skus]).astype(np.str_),
            keys=np.concatenate([self.keys[keep], new_keys]).astype(np.str_),
            model_version=self.model_version if model_version is None else str(model_version),
            meta=meta,
            ids=np.concatenate([self.ids[keep], fresh]),
            ann=self.ann,
        )
        if self._ann is not None and out.uses_ann:
            # incremental: the parent's structure (copied) minus the dropped rows' ids plus the new rows
            # the new rows as stored (normalised by __post_init__, exactly as before this layer existed)
            out._ann = self._ann.updated(out.vectors[out._rows_of(fresh)], fresh, self.ids[~keep])
            if out._ann is None:
                log.info("ANN tombstones above %.0f%%: the updated index rebuilds its structure on first use",
                         100 * self.ann.max_tombstone_share)
        return out

    # ------------------------------------------------------------------ persistence
    def _arrays(self) -> dict:
        """The arrays of the .npz file; builds the ANN structure first when the index uses one, so a
        published index is served without rebuilding it."""
        meta = dict(self.meta)
        arrays = {"vectors": self.vectors, "skus": self.skus, "keys": self.keys, "ids": self.ids}
        ann = self.ensure_ann()
        if ann is not None:
            arrays["ann_index"] = ann.serialize()
            arrays["ann_tombstones"] = ann.tombstones
            meta["ann"] = ann.describe()
        else:
            meta.pop("ann", None)
            meta["ann_config"] = self.ann.to_dict()  # used when the index grows past the threshold
        arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
        return arrays

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, ann: AnnConfig | None = None) -> SkuIndex:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls._from_npz(z, ann)

    @classmethod
    def _from_npz(cls, z, ann: AnnConfig | None = None) -> SkuIndex:
        missing = {"vectors", "skus", "keys", "meta"} - set(z.files)
        if missing:
            raise ValueError(f"not a skulens index file (missing {sorted(missing)})")
        meta = json.loads(str(z["meta"]))
        if int(meta.get("format_version", 1)) > FORMAT_VERSION:
            raise ValueError(f"index format {meta['format_version']} is newer than this code ({FORMAT_VERSION})")
        info = meta.pop("ann", None)
        cfg = meta.pop("ann_config", None)
        if ann is None:
            # build-time knobs and the threshold come from the file; search-time knobs from this code's
            # defaults and SKULENS_ANN_* (so a re-tuned default applies to indexes already published)
            stored = {k: v for k, v in ((info or {}).get("config") or cfg or {}).items() if k not in SEARCH_KNOBS}
            ann = AnnConfig.resolve(stored)
        index = cls(
            vectors=z["vectors"], skus=z["skus"], keys=z["keys"],
            model_version=meta.get("model_version"), meta=meta,
            ids=z["ids"] if "ids" in z.files else None, ann=ann,
        )
        if index.uses_ann and "ann_index" in z.files and info:
            index._attach_loaded_ann(z["ann_index"], info, z["ann_tombstones"] if "ann_tombstones" in z.files else None)
        elif index.uses_ann:
            log.warning("index file has no ANN structure: it is built on first search (%d rows)", len(index))
        return index

    def _attach_loaded_ann(self, blob: np.ndarray, info: dict, tombstones) -> None:
        """Use a stored ANN structure if it holds exactly this index's ids; otherwise warn and leave
        it to be rebuilt on first search."""
        try:
            ann = AnnIndex.deserialize(blob, info, tombstones, config=self.ann)
            if ann.config.kind != self.ann.kind or ann.dim != self.embed_dim:
                raise ValueError(f"stored {ann.config.kind} (dim {ann.dim}), wanted {self.ann.kind} "
                                 f"(dim {self.embed_dim})")
            if ann.ntotal - ann.tombstones.size != len(self):
                raise ValueError(f"stored structure holds {ann.ntotal - ann.tombstones.size} live rows, index {len(self)}")
            if not np.array_equal(ann.live_ids(), np.sort(self.ids)):
                raise ValueError("stored structure's ids differ from the index rows' ids")
        except Exception as e:  # noqa: BLE001 - any unreadable/stale structure means a rebuild
            log.warning("stored ANN structure not used (%s): it is rebuilt on first search", e)
            return
        self._ann = ann

    def save(self, path: str | os.PathLike) -> Path:
        """Write the .npz atomically (temp file in the same folder, then rename). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = self._arrays()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # streamed to the file: no second in-memory copy of a large index
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, ann: AnnConfig | None = None) -> SkuIndex:
        with np.load(path, allow_pickle=False) as z:
            return cls._from_npz(z, ann)

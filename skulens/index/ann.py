"""Approximate nearest-neighbour layer of the SKU index (FAISS, lazy-imported).

:class:`AnnIndex` wraps one FAISS structure over the index rows, addressed by stable int64 row ids
(``SkuIndex.ids``), never by row position, so the rows of an :class:`~skulens.index.sku_index.SkuIndex`
can be re-sorted by SKU without invalidating the structure. It only proposes candidate rows: the SKU
index re-scores them exactly (float32 cosine) and aggregates per SKU, so the scores it returns are
the exact ones and only the candidate set is approximate.

Two structures, chosen by :class:`AnnConfig` ``kind``:

``hnsw``  ``IndexIDMap2(IndexHNSWSQ)`` (graph over fp16 / int8 codes; ``storage="flat"`` keeps float32).
          Adding is native; HNSW cannot delete, so removed ids become *tombstones* that the search
          skips through an ``IDSelector`` (the graph still routes through them) until they exceed
          ``max_tombstone_share`` of the structure, when the caller rebuilds.
``ivf``   ``IndexIVFScalarQuantizer`` (k-means coarse quantizer, fp16 / int8 codes): adds and
          removes ids natively (``remove_ids``), builds much faster than HNSW, answers slower.
``ivfpq`` ``IndexIVFPQFastScan``: k-means coarse quantizer plus 4-bit product-quantizer codes of the
          residuals (``pq_m`` sub-quantizers, ``pq_m / 2`` bytes a row) scanned with SIMD lookup
          tables. A single query scans a quarter of the lists in about a millisecond; the codes are
          only good enough to rank candidates, so it returns ``pq_candidates`` rows (default 256)
          that the SKU index re-scores exactly. Adds and removes ids natively, builds in seconds
          after a k-means on ``train_sample`` rows.

The structure is serialised with ``faiss.serialize_index`` into a uint8 array that the SKU index
stores in its ``.npz`` file, so loading an index does not rebuild it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

KINDS = ("hnsw", "ivf", "ivfpq", "exact")
SEARCH_KNOBS = ("ef_search", "nprobe", "candidates", "rows_per_sku", "max_tombstone_share", "pq_nprobe",
                "pq_candidates", "search_threads")
SINGLE_THREAD_BELOW = 8  # searches of fewer queries than this are "few": see AnnIndex.search
FEW_QUERY_IMPLEM = 14    # IndexIVFFastScan's implementation that splits one query's lists across threads
STORAGES = ("fp16", "sq8", "flat")

_ENV = {  # AnnConfig field -> environment variable that overrides it (serving-time tuning)
    "kind": "SKULENS_ANN_KIND",
    "threshold": "SKULENS_ANN_THRESHOLD",
    "storage": "SKULENS_ANN_STORAGE",
    "ef_search": "SKULENS_ANN_EF_SEARCH",
    "nprobe": "SKULENS_ANN_NPROBE",
    "candidates": "SKULENS_ANN_CANDIDATES",
    "pq_nprobe": "SKULENS_ANN_PQ_NPROBE",
    "pq_candidates": "SKULENS_ANN_PQ_CANDIDATES",
    "search_threads": "SKULENS_ANN_SEARCH_THREADS",
}


@dataclass(frozen=True)
class AnnConfig:
    """Knobs of the ANN layer.

    ``threshold``: the ANN structure is used when the index has at least this many rows (vectors);
    below it exact numpy search is both exact and fast enough (about 12 ms a query at 50k x 1280 on
    2 cores). ``kind="exact"`` never builds one.
    ``candidates`` / ``rows_per_sku``: rows fetched per query = max(candidates, k * rows_per_sku),
    widened 4x until k distinct SKUs are found.
    Build knobs (``hnsw_m``, ``ef_construction``, ``ivf_nlist``, ``storage``) apply to a new
    structure; search knobs (``ef_search``, ``nprobe``, ``candidates``) apply at once.
    """

    kind: str = "ivfpq"           # bench_index 100k: recall@1 0.997 synthetic, 0.994 real-in-scale, CPU p99 1.4 ms
    threshold: int = 50_000
    storage: str = "fp16"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 256          # bench_index at 100k rows: recall@1 0.99 real-in-scale / 0.965 synthetic stress set
    ivf_nlist: int = 0            # 0: auto (about 2 * sqrt(n), a power of two, 64..4096)
    nprobe: int = 32
    candidates: int = 64
    rows_per_sku: int = 8
    max_tombstone_share: float = 0.2
    train_sample: int = 65_536    # IVF k-means training rows (fp16/sq8 training uses at most this)
    pq_m: int = 256               # ivfpq: 4-bit sub-quantizers (a divisor of the dim; 1280 / 256 = 5 dims each)
    pq_nprobe: int = 0            # ivfpq: lists scanned per query; 0: auto, a quarter of nlist
    pq_candidates: int = 256      # ivfpq: rows returned for exact re-scoring (at least)
    search_threads: int = 0       # ivfpq, fewer than 8 queries: threads scanning one query's lists; 0: min(2, cores)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ann kind must be one of {KINDS}, got {self.kind!r}")
        if self.storage not in STORAGES:
            raise ValueError(f"ann storage must be one of {STORAGES}, got {self.storage!r}")
        if self.threshold < 1 or self.candidates < 1 or self.rows_per_sku < 1:
            raise ValueError("ann threshold, candidates and rows_per_sku must be >= 1")
        if self.search_threads < 0:
            raise ValueError(f"ann search_threads must be >= 0 (0: automatic), got {self.search_threads}")
        if not 0.0 <= self.max_tombstone_share < 1.0:
            raise ValueError("max_tombstone_share must be in [0, 1)")

    @classmethod
    def resolve(cls, base: AnnConfig | dict | None = None, env: bool = True, **overrides) -> AnnConfig:
        """Defaults <- ``base`` (a config or the dict stored in an index file) <- SKULENS_ANN_* env
        variables <- ``overrides``. Unknown keys in ``base`` are ignored (files from newer code)."""
        names = {f.name: f.type for f in fields(cls)}
        vals: dict = {}
        if isinstance(base, AnnConfig):
            vals.update(asdict(base))
        elif isinstance(base, dict):
            vals.update({k: v for k, v in base.items() if k in names})
        if env:
            for name, var in _ENV.items():
                raw = os.environ.get(var)
                if raw not in (None, ""):
                    vals[name] = raw
        vals.update({k: v for k, v in overrides.items() if v is not None})
        defaults = cls()
        for k, v in list(vals.items()):  # coerce env strings / JSON numbers to the field's type
            vals[k] = type(getattr(defaults, k))(v)
        return replace(defaults, **vals)

    def to_dict(self) -> dict:
        return asdict(self)


def _faiss():
    import faiss  # lazy: only indexes above the threshold need it

    return faiss


def _qtype(faiss, storage: str):
    return {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}[storage]


@functools.cache
def _usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's), asked once."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def auto_nlist(n: int) -> int:
    return int(min(4096, max(64, 2 ** round(np.log2(max(2.0 * np.sqrt(max(n, 1)), 1.0))))))


def auto_nlist_pq(n: int) -> int:
    """ivfpq lists: about 3 * sqrt(n) as a power of two, 16..2048, and at least 39 rows a list
    (1024 at 100k rows, 2048 at 800k)."""
    want = 2 ** round(np.log2(max(3.0 * np.sqrt(max(n, 1)), 1.0)))
    return int(max(16, min(2048, want, 2 ** int(np.log2(max(n // 39, 16))))))


def pq_subquantizers(dim: int, want: int) -> int:
    """The largest divisor of ``dim`` not above ``want`` (PQ splits the vector into equal parts)."""
    return max(m for m in range(1, min(dim, max(1, want)) + 1) if dim % m == 0)


class AnnIndex:
    """One FAISS structure over (vector, id) pairs plus the set of tombstoned ids (HNSW only).

    Not modified after construction except by :meth:`updated`, which works on a copy, so an
    :class:`AnnIndex` can be shared by readers (FAISS searches are thread-safe).
    """

    def __init__(self, index, config: AnnConfig, dim: int, tombstones: np.ndarray | None = None):
        self.index = index
        self.config = config
        self.dim = int(dim)
        self.tombstones = np.unique(np.asarray(tombstones if tombstones is not None else [], dtype=np.int64))
        self._sel = None  # IDSelector over the tombstones (kept alive with the search params)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, config: AnnConfig, chunk: int = 65_536) -> AnnIndex:
        """Build over L2-normalised float32 ``vectors`` with int64 ``ids`` (inner product = cosine)."""
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        n, d = vectors.shape
        rng = np.random.default_rng(0)
        sample = vectors[np.sort(rng.choice(n, size=min(n, config.train_sample), replace=False))] if n else vectors
        if config.kind == "hnsw":
            if config.storage == "flat":
                inner = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            else:
                inner = faiss.IndexHNSWSQ(d, _qtype(faiss, config.storage), config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = config.ef_construction
            inner.hnsw.efSearch = config.ef_search
            if not inner.is_trained:
                inner.train(sample)
            index = faiss.IndexIDMap2(inner)
        elif config.kind == "ivf":
            nlist = config.ivf_nlist or auto_nlist(n)
            quantizer = faiss.IndexFlatIP(d)
            if config.storage == "flat":
                index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, _qtype(faiss, config.storage),
                                                      faiss.METRIC_INNER_PRODUCT)
            index.cp.niter = 10
            index.cp.max_points_per_centroid = max(1, config.train_sample // nlist)
            index.own_fields = True
            quantizer.this.disown()  # the IVF index owns (and serialises) its quantizer
            index.train(sample)
            index.nprobe = config.nprobe
        elif config.kind == "ivfpq":
            nlist = config.ivf_nlist or auto_nlist_pq(n)
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFPQFastScan(quantizer, d, nlist, pq_subquantizers(d, config.pq_m), 4,
                                             faiss.METRIC_INNER_PRODUCT)
            index.by_residual = True  # codes of (row - its list's centroid): measured better recall
            index.cp.niter = 10
            index.cp.max_points_per_centroid = max(1, config.train_sample // nlist)
            index.own_fields = True
            quantizer.this.disown()
            index.train(sample)
        else:
            raise ValueError(f"cannot build an ANN structure of kind {config.kind!r}")
        for s in range(0, n, chunk):
            index.add_with_ids(vectors[s:s + chunk], ids[s:s + chunk])
        return cls(index, config, d)

    # ------------------------------------------------------------------ queries
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def stored_ids(self) -> np.ndarray:
        """All ids held by the structure (tombstoned ones included), sorted."""
        faiss = _faiss()
        if self.config.kind == "hnsw":
            return np.sort(faiss.vector_to_array(self.index.id_map).astype(np.int64))
        inv = self.index.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(li), inv.list_size(li)).copy()
                 for li in range(self.index.nlist) if inv.list_size(li)]
        return np.sort(np.concatenate(parts).astype(np.int64)) if parts else np.zeros(0, np.int64)

    @property
    def next_id(self) -> int:
        """One above every id the structure holds or tombstones (new rows must not reuse them)."""
        stored = self.stored_ids()
        top = max(int(stored[-1]) if stored.size else -1, int(self.tombstones[-1]) if self.tombstones.size else -1)
        return top + 1

    def live_ids(self) -> np.ndarray:
        ids = self.stored_ids()
        return ids[~np.isin(ids, self.tombstones)] if self.tombstones.size else ids

    def _params(self, n: int):
        faiss = _faiss()
        if self.config.kind == "hnsw":
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(int(self.config.ef_search), int(n))
            if self.tombstones.size:
                if self._sel is None:
                    batch = faiss.IDSelectorBatch(self.tombstones)
                    self._sel = (batch, faiss.IDSelectorNot(batch))
                p.sel = self._sel[1]
            return p
        p = faiss.SearchParametersIVF()
        p.nprobe = int(self.config.nprobe) if self.config.kind == "ivf" else self.pq_nprobe
        return p

    @property
    def pq_nprobe(self) -> int:
        nlist = int(self.index.nlist)
        return int(min(nlist, self.config.pq_nprobe or max(1, nlist // 4)))

    @property
    def few_query_threads(self) -> int:
        """OpenMP threads for a search of fewer than ``SINGLE_THREAD_BELOW`` queries: ``search_threads``
        (0: min(2, usable cores)) for ``ivfpq``, 1 for the other kinds."""
        if self.config.kind != "ivfpq":
            return 1
        return int(self.config.search_threads) or min(2, _usable_cores())

    def search(self, queries: np.ndarray, n: int) -> np.ndarray:
        """Ids of up to ``n`` approximate nearest rows per query, (Q, n) int64, -1 where fewer.

        Many queries (``SINGLE_THREAD_BELOW`` or more) run on FAISS's default threads, parallel over the
        queries. Fewer run on :attr:`few_query_threads`: one for HNSW and IVF-SQ (a parallel region per
        query costs more than it gains; on a busy 2-core machine spinning threads made HNSW single queries
        ~10x slower, 1.2 -> 17 ms), and for ``ivfpq`` FAISS's fast-scan implementation 14, which splits
        one query's lists across the threads: at 800k rows, 512 of 2,048 lists, p50 / p99 2.7 / 3.4 ms on
        2 threads against 4.8 / 5.7 ms on one, the same results; also faster with another process busy
        on one of the two cores (4.1 / 7.1 against 4.4 / 8.6 ms). For batches it is slower (638 against
        923 queries/s at 32), so it is chosen per call. Both return the same candidates up to ties with the
        last one's 4-bit PQ score (which of the tied rows makes the cut), and the SKU index re-scores them
        exactly; recall@1 was the same to the query at 800k. ``implem`` is a field of the shared index, so
        a concurrent caller may run the other implementation.
        ``omp_set_num_threads`` sets the calling thread's value only, so concurrent callers keep theirs."""
        faiss = _faiss()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.config.kind == "ivfpq":  # PQ codes only rank candidates: return many for exact re-scoring
            n = max(n, int(self.config.pq_candidates))
        n = int(max(1, min(n, self.ntotal)))
        few = q.shape[0] < SINGLE_THREAD_BELOW
        threads = self.few_query_threads if few else 0
        if self.config.kind == "ivfpq":
            self.index.implem = FEW_QUERY_IMPLEM if threads > 1 else 0
        if not few:
            _, ids = self.index.search(q, n, params=self._params(n))
            return ids
        prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
        try:
            _, ids = self.index.search(q, n, params=self._params(n))
        finally:
            faiss.omp_set_num_threads(prev)
        return ids

    # ------------------------------------------------------------------ updates
    def updated(self, add_vectors: np.ndarray, add_ids: np.ndarray, remove_ids: np.ndarray) -> AnnIndex | None:
        """A copy with ``remove_ids`` removed (IVF) or tombstoned (HNSW) and the new rows added, or
        None when HNSW tombstones would exceed ``max_tombstone_share`` (rebuild instead)."""
        faiss = _faiss()
        remove_ids = np.unique(np.asarray(remove_ids, dtype=np.int64))
        add_vectors = np.ascontiguousarray(add_vectors, dtype=np.float32).reshape(-1, self.dim)
        add_ids = np.ascontiguousarray(add_ids, dtype=np.int64)
        tomb = self.tombstones
        if self.config.kind == "hnsw":
            tomb = np.union1d(tomb, remove_ids)
            total = self.ntotal + len(add_ids)
            if total and len(tomb) / total > self.config.max_tombstone_share:
                return None
        index = faiss.clone_index(self.index)
        if self.config.kind in ("ivf", "ivfpq") and remove_ids.size:
            index.remove_ids(faiss.IDSelectorBatch(remove_ids))
        if len(add_ids):
            index.add_with_ids(add_vectors, add_ids)
        return AnnIndex(index, self.config, self.dim, tomb)

    # ------------------------------------------------------------------ persistence
    def serialize(self) -> np.ndarray:
        return _faiss().serialize_index(self.index)

    def describe(self) -> dict:
        """Parameters stored in the index file's meta next to the serialised structure."""
        d = {"config": self.config.to_dict(), "ntotal": self.ntotal, "tombstones": int(self.tombstones.size),
             "dim": self.dim}
        if self.config.kind in ("ivf", "ivfpq"):
            d["nlist"] = int(self.index.nlist)
        if self.config.kind == "ivfpq":
            d["pq_m"] = int(self.index.M)
        return d

    @classmethod
    def deserialize(cls, blob: np.ndarray, info: dict, tombstones: np.ndarray | None = None,
                    config: AnnConfig | None = None) -> AnnIndex:
        faiss = _faiss()
        index = faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))
        stored = AnnConfig.resolve(info.get("config"), env=False)
        # build-time knobs come from the file; search-time knobs may be overridden by ``config``
        if config is not None:
            stored = replace(stored, **{k: getattr(config, k) for k in (*SEARCH_KNOBS, "threshold")})
        return cls(index, stored, int(info["dim"]), tombstones)

    def nbytes(self) -> int:
        """Approximate memory of the structure (codes + graph / lists + id map), bytes."""
        faiss = _faiss()
        if self.config.kind == "hnsw":
            inner = faiss.downcast_index(self.index.index)
            code = inner.storage.sa_code_size() if hasattr(inner.storage, "sa_code_size") else self.dim * 4
            graph = inner.hnsw.neighbors.size() * 4 + inner.hnsw.offsets.size() * 8 + inner.hnsw.levels.size() * 4
            return int(self.ntotal * code + graph + self.ntotal * 8 * 2)
        return int(self.ntotal * (self.index.code_size + 8) + self.index.nlist * self.dim * 4)

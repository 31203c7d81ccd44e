"""The warm update worker: new catalog SKUs recognizable within seconds (``skulens index-worker``).

A fresh Dagster run pays seconds of fixed cost before it does anything (queue, launch, imports, the
champion and the index loaded from nothing). This long-lived process keeps all of that warm and runs
the very same update as the ``index_update`` job (:func:`skulens.index.update.update_from_catalog`:
same ingest, same indexable rules, the same delta publish by compare-and-swap) as soon as the catalog
changes:

* every ``interval_s`` (default 1 s) a cheap change check: the upload notes of the last moments
  (:mod:`skulens.catalog.notes`, written by ``skulens import catalog``; a ``StartAfter`` listing of a few
  keys) and the ETag of products.csv (a HEAD). A full listing of ``catalog/`` (the sensor's fingerprint)
  runs at start and every ``full_every_s`` (60 s), for uploads made without a note: it takes seconds at
  10k SKUs (30k keys listed in ~8 s on SeaweedFS on a busy 2-core machine), too slow for every second;
* a note -> its SKUs are re-listed (one small listing each) and the update runs scoped to them
  (:func:`skulens.index.update.index_delta` ``scope``: the other SKUs stay as indexed); a new products.csv
  or a full listing that differs -> the update over the whole catalog. The update is the ``index_update``
  job's (:func:`skulens.index.update.update_from_catalog`); its first ingest is fed by the listing held
  in memory (no second listing). The champion engine
  (:meth:`skulens.registry.store.ModelStore.engine`, compiled once, memoised per process: reloaded only
  when the alias names another version), the head index (the publisher's memo) and the S3/MLflow
  clients stay in memory between updates;
* the pointer is followed every cycle (a HEAD; new deltas of other publishers applied), so an update
  starts from the head without loading it.

The daemon's catalog sensor and its ``index_update`` run stay as the audited backstop: when the worker
got there first the run finds the catalog and the index agree and publishes nothing. The worker applies
changes only to an index built by the champion: a first build, or a new champion (a full rebuild), is
left to the pipeline (``sku_index`` / the champion sensor's run). A failed cycle is logged and retried
with a backoff (``interval_s`` doubling up to ``max_backoff_s``); publishing is all-or-nothing (the
pointer moves last, by CAS), so a failure never leaves a half-published index.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from skulens.catalog import contract

log = logging.getLogger("skulens.index.worker")


@dataclass(frozen=True)
class CatalogSignal:
    """One listing of ``catalog/``: the fingerprint of :func:`skulens.catalog.state.catalog_state` and the
    objects under ``catalog/images/`` (for the ingest)."""

    fingerprint: str
    images: list  # skulens.catalog.s3.S3Object under catalog/images/
    products_etag: str | None
    seconds: float


def catalog_signal(client, bucket: str) -> CatalogSignal:
    """The catalog's change signal: one paginated listing of ``catalog/`` (1,000 keys a request)."""
    from skulens.catalog.s3 import list_objects
    from skulens.catalog.state import fingerprint

    t0 = time.perf_counter()
    images, pairs, products_etag = [], [], None
    for obj in list_objects(client, bucket, "catalog/"):
        if obj.key == contract.PRODUCTS_KEY:
            products_etag = obj.etag
        elif obj.key.startswith(contract.CATALOG_IMAGES_PREFIX):
            images.append(obj)
            try:  # the sensor's rule: keys that break the contract are not part of the fingerprint
                contract.parse_image_key(obj.key, contract.CATALOG_IMAGES_PREFIX)
            except contract.CatalogError:
                continue
            pairs.append((obj.key, obj.etag))
    return CatalogSignal(fingerprint(pairs, extra=products_etag or ""), images, products_etag,
                         time.perf_counter() - t0)


@dataclass
class WorkerStats:
    cycles: int = 0
    updates: int = 0
    published: int = 0
    failures: int = 0
    deferred: int = 0
    last_error: str | None = None
    last_listing_s: float | None = None
    last_result: dict = field(default_factory=dict)


class IndexWorker:
    """The warm update loop (see the module docstring). ``store``: a
    :class:`skulens.registry.store.ModelStore` (the champion); ``work_dir``: the worker's own ingest cache
    (``catalog/``) and normalised files (``normalised/``), not shared with Dagster runs; ``index_cache``:
    verified index files (shared: files are immutable and written atomically)."""

    def __init__(self, client, bucket: str, store, work_dir: str | Path, index_cache: str | Path | None = None,
                 prefix: str = "index", interval_s: float = 1.0, batch_size: int = 64, clean_config=None,
                 max_backoff_s: float = 30.0, full_every_s: float = 60.0, notes_window_s: float = 120.0):
        self.client, self.bucket, self.store, self.prefix = client, bucket, store, prefix
        self.work_dir = Path(work_dir)
        self.index_cache = Path(index_cache) if index_cache is not None else self.work_dir / "index"
        self.interval_s = float(interval_s)
        self.batch_size = int(batch_size)
        self.clean_config = clean_config
        self.max_backoff_s = float(max_backoff_s)
        self.stats = WorkerStats()
        self._done_fingerprint: str | None = None  # the catalog state the index was last brought up to
        self._deferred: tuple | None = None  # (fingerprint, pointer etag) a cycle left to the pipeline
        self._pointer_etag: str | None = None
        self._pointer: dict | None = None
        self._failures = 0
        self.full_every_s = float(full_every_s)  # a full listing of catalog/ this often (uploads without a note)
        self.notes_window_s = float(notes_window_s)
        self._listing: dict | None = None  # key -> S3Object of catalog/images/, as last listed
        self._listing_fp: str | None = None
        self._full_at = 0.0
        self._products: str | None = None
        self._seen_notes: dict = {}
        self._pending_notes: set = set()
        self._retry, self._retry_scope = None, None  # an update that did not finish: done again
        self._snap_thread: threading.Thread | None = None  # the periodic full listing, in the background
        self._snap = None
        self._relisted: dict = {}  # sku -> when its prefix was last re-listed (after a note)

    # ------------------------------------------------------------------ warm state
    def champion(self):
        """``(engine, version, meta)`` of the champion, as the ``index_update`` op's: the alias is asked each
        update (one MLflow call); the engine is memoised per version (compiled once, cached on disk)."""
        ref = self.store.champion()
        if ref is None:
            raise LookupError(f"no champion for registered model {self.store.model_name!r} yet: run the main job first")
        ref = self.store.complete(ref)
        engine = self.store.engine(ref)
        return engine, ref.version, {"model_name": self.store.model_name, "model_uri": ref.uri,
                                     "model_sha256": ref.sha256, "inference_backend": getattr(engine, "backend", "torch")}

    def follow(self) -> dict | None:
        """Stay on the head: a HEAD of the pointer; when it moved, the index held in memory (the publisher's
        memo) is advanced by the new deltas (or loaded, for a new full version). Returns the pointer."""
        from skulens.index.publish import Base, pointer_etag, read_pointer

        etag = pointer_etag(self.client, self.bucket, self.prefix)
        if etag is None:
            self._pointer, self._pointer_etag = None, None
            return None
        if etag != self._pointer_etag or self._pointer is None:
            pointer = read_pointer(self.client, self.bucket, self.prefix)
            if pointer is not None:
                base = Base(self.client, self.bucket, pointer, 0, self.index_cache, prefix=self.prefix)
                index = base.index  # memo -> advanced by the missing deltas -> full load; remembered
                log.info("following index %s (%d rows; %s)", pointer["version"], len(index), base.load)
            self._pointer, self._pointer_etag = pointer, etag
        return self._pointer

    def warm(self) -> None:
        """Load the champion engine (one forward pass) and the head index before the first change."""
        import numpy as np

        t0 = time.perf_counter()
        engine, version, _ = self.champion()
        size = int(getattr(engine, "image_size", 0) or 0)
        if hasattr(engine, "run") and size:
            engine.run(np.zeros((1, 3, size, size), np.float32))
        self.follow()
        log.info("warm: champion v%s (%s), index %s in %.1fs", version, getattr(engine, "backend", "torch"),
                 (self._pointer or {}).get("version"), time.perf_counter() - t0)

    # ------------------------------------------------------------------ change signal
    def _products_etag(self) -> str | None:
        from botocore.exceptions import ClientError

        from skulens.catalog.s3 import normalize_etag

        try:  # normalised as the full listing's (catalog_signal), so the two compare equal
            return normalize_etag(self.client.head_object(Bucket=self.bucket, Key=contract.PRODUCTS_KEY)["ETag"])
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _relist_skus(self, skus) -> None:
        from skulens.catalog.s3 import list_objects

        for sku in skus:
            pre = f"{contract.CATALOG_IMAGES_PREFIX}{sku}/"
            for k in [k for k in self._listing if k.startswith(pre)]:
                del self._listing[k]
            for obj in list_objects(self.client, self.bucket, pre):
                self._listing[obj.key] = obj
            self._relisted[sku] = time.monotonic()

    def changes(self):
        """What to update: ``(scope, why)``: ``scope`` None for the whole catalog (after a full listing or a
        new products.csv), a set of SKUs named by new upload notes (re-listed), or ``False`` for nothing."""
        from skulens.catalog.notes import read_note, recent_notes

        if self._listing is None:  # the first listing: inline
            return self._apply_snapshot(self._snapshot())
        if self._snap_thread is None and time.monotonic() - self._full_at >= self.full_every_s:
            self._snap_thread = threading.Thread(target=self._snapshot_bg, name="skulens-catalog-listing", daemon=True)
            self._snap_thread.start()  # the periodic full listing runs beside the 1 s checks
        if self._snap_thread is not None and not self._snap_thread.is_alive():
            snap, self._snap, self._snap_thread = self._snap, None, None
            if isinstance(snap, BaseException):
                self._full_at = time.monotonic()
                raise snap
            return self._apply_snapshot(snap)
        notes = [k for k in recent_notes(self.client, self.bucket, self.notes_window_s) if k not in self._seen_notes]
        products = self._products_etag()
        if not notes and products == self._products and not self._retry:
            return False, "unchanged"
        skus = sorted({s for k in notes for s in read_note(self.client, self.bucket, k)})
        self._relist_skus(skus)
        self._pending_notes = set(notes)
        self._listing_fp = None
        if products != self._products or self._retry == "all":
            why = "products.csv changed" if products != self._products else "retry"
            self._products = products
            return None, why
        scope = set(skus) | (self._retry_scope or set())
        return scope, f"upload notes: {len(scope)} SKU(s)"

    def _snapshot(self):
        from skulens.catalog.notes import recent_notes

        t0 = time.monotonic()
        notes = recent_notes(self.client, self.bucket, self.notes_window_s)  # before: none slips between
        return t0, notes, catalog_signal(self.client, self.bucket)

    def _snapshot_bg(self) -> None:
        try:
            self._snap = self._snapshot()
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which logs and retries
            self._snap = e

    def _apply_snapshot(self, snap):
        t0, notes, sig = snap
        listing = {o.key: o for o in sig.images}
        fresher = {s for s, t in self._relisted.items() if t >= t0}  # re-listed after the snapshot began
        if fresher and self._listing is not None:
            pre = tuple(f"{contract.CATALOG_IMAGES_PREFIX}{s}/" for s in fresher)
            listing = {k: o for k, o in listing.items() if not k.startswith(pre)}
            listing.update({k: o for k, o in self._listing.items() if k.startswith(pre)})
        self._listing, self._full_at = listing, time.monotonic()
        self._products = sig.products_etag if not fresher else self._products
        self._seen(notes)  # covered by this listing (listed before it)
        self._pending_notes = set()
        self.stats.last_listing_s = round(sig.seconds, 3)
        self._relisted = {s: t for s, t in self._relisted.items() if t >= t0}
        if sig.fingerprint == self._done_fingerprint and not fresher:
            return False, "unchanged"
        self._listing_fp = None if fresher else sig.fingerprint
        return None, f"catalog {sig.fingerprint[:12]} (full listing {sig.seconds:.2f}s)"

    # ------------------------------------------------------------------ one cycle
    def cycle(self):
        """One check; runs the update when the catalog changed. Returns the
        :class:`skulens.index.update.CatalogUpdate`, or None (unchanged, or left to the pipeline)."""
        from skulens.index.update import update_from_catalog

        self.stats.cycles += 1
        pointer = self.follow()
        scope, why = self.changes()
        if scope is False:
            return None
        if scope is not None and not scope:  # notes that named nothing
            self._seen(self._pending_notes)
            return None
        champion = self.champion()
        if pointer is None or str(pointer.get("model_version")) != str(champion[1]):
            self.stats.deferred += 1
            self._seen(self._pending_notes)
            self._done_fingerprint = self._listing_fp
            log.info("index %s is built by model v%s, champion is v%s: the full (re)build is the pipeline's "
                     "(sku_index / the champion sensor's index_update run); not updating it here",
                     (pointer or {}).get("version"), (pointer or {}).get("model_version"), champion[1])
            return None
        listing = list(self._listing.values())
        if scope is not None:  # plus the SKUs sharing an ETag with them (cross-SKU copies are judged together)
            pre = tuple(f"{contract.CATALOG_IMAGES_PREFIX}{s}/" for s in scope)
            etags = {o.etag for k, o in self._listing.items() if k.startswith(pre)}
            scope = set(scope) | {k.split("/")[2] for k, o in self._listing.items() if o.etag in etags}
            pre = tuple(f"{contract.CATALOG_IMAGES_PREFIX}{s}/" for s in scope)
            listing = [o for k, o in self._listing.items() if k.startswith(pre)]
        t0 = time.perf_counter()
        self.stats.updates += 1
        self._retry, self._retry_scope = ("all" if scope is None else "scope"), scope
        done = update_from_catalog(
            self.client, self.bucket, lambda: champion, self.work_dir / "catalog", self.work_dir / "normalised",
            cache_dir=self.index_cache, prefix=self.prefix, batch_size=self.batch_size,
            reason=f"index-worker: {why}", clean_config=self.clean_config, listing=listing,
            scope=scope,
            on_failed_download=lambda k, e: log.warning("download failed for %s: %s; retried next cycle", k, e))
        self._seen(self._pending_notes)
        if done.failed_downloads:  # their SKUs stay as indexed: the same update is tried again next cycle
            self._retry_scope = scope
        else:
            self._retry, self._retry_scope = None, None
            self._done_fingerprint = self._listing_fp
        if done.published:
            self.stats.published += 1
        self.stats.last_result = {"published": done.published, "mode": done.outcome.get("mode"), "why": why,
                                  "changed_skus": len(done.report.changed_skus),
                                  "removed_skus": len(done.report.removed_skus), "seconds": done.seconds,
                                  "cycle_s": round(time.perf_counter() - t0, 3)}
        log.info("%s: %s", why, done.summary())
        return done

    def _seen(self, notes) -> None:
        now = time.monotonic()
        for k in notes:
            self._seen_notes[k] = now
        for k in [k for k, t in self._seen_notes.items() if now - t > 2 * self.notes_window_s]:
            del self._seen_notes[k]

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event | None = None, warm: bool = True) -> None:
        """Cycle every ``interval_s`` until ``stop`` is set; a failing cycle is logged and retried after a
        growing pause (``interval_s`` x 2^failures, at most ``max_backoff_s``), never raised."""
        stop = stop or threading.Event()
        if warm:
            try:
                self.warm()
            except Exception as e:  # noqa: BLE001 - the loop retries; e.g. no champion yet
                log.warning("warm-up failed (%s: %s); retrying in the loop", type(e).__name__, e)
        while not stop.is_set():
            t0 = time.monotonic()
            pause = self.interval_s
            try:
                self.cycle()
                self._failures = 0
            except Exception as e:  # noqa: BLE001 - never crash-loop: log, back off, retry
                self._failures += 1
                self.stats.failures += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                pause = min(self.max_backoff_s, self.interval_s * 2 ** min(self._failures, 16))
                log.warning("update cycle failed (%d in a row): %s: %s; retrying in %.0fs", self._failures,
                            type(e).__name__, e, pause, exc_info=self._failures == 1)
            stop.wait(max(0.05, pause - (time.monotonic() - t0)))
        log.info("index worker stopped after %d cycles (%d updates, %d published, %d failures)",
                 self.stats.cycles, self.stats.updates, self.stats.published, self.stats.failures)


def default_clean_config():
    """The cleaning thresholds of params.yaml ``clean:`` (as the pipeline's CleanSettings), else the defaults."""
    from dataclasses import fields

    from skulens.data import layout
    from skulens.data.clean import CleanConfig

    root = Path(__file__).resolve().parents[2]
    try:
        params = dict(layout.read_params(root, "clean"))
    except Exception:  # noqa: BLE001 - no params.yaml here (an installed package): the defaults
        params = {}
    known = {f.name for f in fields(CleanConfig)}
    return CleanConfig(**{k: v for k, v in params.items() if k in known})


def worker_from_settings(settings, interval_s: float = 1.0, batch_size: int = 64) -> IndexWorker:
    """The worker of ``skulens index-worker`` / the ``index-worker`` service, on the same bucket, registry and
    model cache as the pipeline (``$SKULENS_HOME``)."""
    from skulens.catalog.s3 import client_for
    from skulens.model.engine import backend_setting
    from skulens.registry.store import ModelStore

    store = ModelStore(settings.cache_dir / "models", settings.mlflow_uri, settings.model_name,
                       inference_backend=backend_setting(None))
    # few retries, short connects: a store that is down fails a cycle in seconds (the loop retries it)
    client = client_for(settings, max_attempts=3, connect_timeout=2.0, read_timeout=60.0)
    return IndexWorker(client, settings.bucket, store, settings.home / "cache" / "index-worker",
                       index_cache=settings.home / "cache" / "index", interval_s=interval_s, batch_size=batch_size,
                       clean_config=default_clean_config())

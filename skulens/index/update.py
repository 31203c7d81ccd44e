"""The incremental index update: the delta between the catalog and what the published index was
built from, and embedding only new or changed SKUs with the champion (deleted ones dropped)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from skulens.catalog import contract

SOURCES_META = "sources"  # index meta: {image key: etag} of every catalog file the index has processed


@dataclass
class IndexDelta:
    changed_skus: list[str] = field(default_factory=list)  # SKUs to re-check: new/changed/removed image, relisted,
    #                                                        or sharing an ETag with one of those (cross-SKU copies)
    removed_skus: list[str] = field(default_factory=list)  # SKUs with no image left, or no longer in products.csv
    delisted_skus: list[str] = field(default_factory=list)  # of removed_skus: images unchanged, SKU left products.csv
    unlisted_skus: list[str] = field(default_factory=list)  # catalog SKUs products.csv does not list (after the update)

    @property
    def empty(self) -> bool:
        return not self.changed_skus and not self.removed_skus


def _sku_of(key: str) -> str:
    return contract.parse_image_key(key, contract.CATALOG_IMAGES_PREFIX).sku


def _etag_partners(current: dict, indexed: dict, seeds: set, sku_of, linking: set) -> set:
    """``seeds`` plus the SKUs linked to them through an ETag in ``linking`` (equal ETags: equal bytes, a
    cross-SKU duplicate, which the cleaning rule judges on all copies together), transitively. Old ETags
    of the seeds count too: a SKU whose copy was dropped as a duplicate is re-checked when the other copy
    goes away. ``linking`` holds the ETags of files that can take part in a duplicate (indexed images and
    recorded cross-SKU duplicates), so broken uploads with equal bytes (empty files, one error page) link
    nothing."""
    group = set(seeds)
    if not linking:
        return group
    by_etag: dict[str, set] = {}
    etags_of: dict[str, set] = {}
    for k, e in current.items():
        if e in linking:
            s = sku_of(k)
            by_etag.setdefault(e, set()).add(s)
            etags_of.setdefault(s, set()).add(e)
    todo = [e for k, e in indexed.items() if e in linking and sku_of(k) in seeds]
    todo += [e for s in seeds for e in etags_of.get(s, ())]
    seen: set = set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for s in by_etag.get(e, ()):
            if s not in group:
                group.add(s)
                todo.extend(etags_of.get(s, ()))
    return group


def index_delta(current: dict, indexed: dict, deferred: set | frozenset = frozenset(),
                listed: set | None = None, indexed_skus=(), unlisted: set | list | None = None,
                linking: set | frozenset = frozenset(), scope: set | None = None) -> IndexDelta:
    """Compare catalog images (key -> etag) with the index's sources (key -> etag), per SKU. SKUs in
    ``deferred`` (a download of theirs failed: their catalog state is unknown) are left out.

    ``listed``: the SKUs of products.csv (None: no membership rule). A SKU of the index
    (``indexed_skus``) that products.csv no longer lists is removed although its images did not change;
    a SKU the index recorded as unlisted (``unlisted``, the index meta's) that products.csv lists now is
    re-checked. An index that recorded no ``unlisted`` set re-checks every listed catalog SKU it lacks.
    SKUs sharing an ETag in ``linking`` with a re-checked SKU are re-checked with it (see
    :func:`_etag_partners`), as the full build sees every copy of a cross-SKU duplicate together.
    ``scope``: only these SKUs are looked at (None: all); the others stay as indexed (the warm worker's
    update of the SKUs an upload note named, on a listing that may be older for the rest)."""
    deferred = set(deferred)
    sku_cache: dict[str, str] = {}

    def sku_of(k):
        s = sku_cache.get(k)
        if s is None:
            s = sku_cache[k] = _sku_of(k)
        return s

    def is_listed(s):
        return listed is None or s in listed

    now_skus = {sku_of(k) for k in current}
    touched = {sku_of(k) for k, e in current.items() if indexed.get(k) != e}
    touched |= {sku_of(k) for k in indexed if k not in current}
    indexed_skus = {str(s) for s in indexed_skus}
    if listed is not None:
        before = set(unlisted) if unlisted is not None else now_skus - indexed_skus
        touched |= {s for s in now_skus & before if is_listed(s)}
    touched -= deferred
    if scope is not None:
        touched &= set(scope)
    if touched:
        touched = _etag_partners(current, indexed, touched, sku_of, set(linking)) - deferred
    delisted = {s for s in indexed_skus & now_skus if not is_listed(s)} - touched - deferred
    if scope is not None:
        touched &= set(scope)
        delisted &= set(scope)
    removed = {s for s in touched if s not in now_skus} | delisted
    after = {s for s in now_skus if not is_listed(s)} - deferred
    after |= set(unlisted or ()) & deferred
    if scope is not None:  # out of scope: as recorded (the catalog rows given may be the scope's only)
        after = (after & set(scope)) | (set(unlisted or ()) - set(scope))
    return IndexDelta(changed_skus=sorted(touched & now_skus), removed_skus=sorted(removed),
                      delisted_skus=sorted(delisted), unlisted_skus=sorted(after))


@dataclass
class UpdateReport:
    changed_skus: list[str]
    removed_skus: list[str]
    embedded_images: int
    dropped_files: pd.DataFrame
    seconds: dict
    deferred_skus: list[str] = field(default_factory=list)  # a download failed: left as indexed, retried next time
    delisted_skus: list[str] = field(default_factory=list)  # removed: no longer in products.csv


def update_index(encoder, index, manifest: pd.DataFrame, work_dir: Path, model_version: str | None,
                 batch_size: int = 64, failed_keys=(), products: pd.DataFrame | None = None,
                 clean_config=None, scope=None):
    """Embed only the SKUs whose images changed since ``index`` was built; drop deleted SKUs.

    ``manifest``: the ingest manifest (sku, key, etag, bytes, path) of the whole catalog. Which images are
    indexed is the full build's rule (:mod:`skulens.index.rules`): the changed SKUs' files are checked with
    the cleaning rules against ``products`` (products.csv; None: no membership check), with the thresholds
    the index recorded (meta ``clean``; else ``clean_config``, default the CleanConfig defaults = params.yaml),
    so a corrupt upload is dropped and reported, never indexed, and an image of a SKU missing from
    products.csv is not indexed; a SKU that leaves products.csv leaves the index. A single good image is
    enough for a SKU to be recognizable (RetailKLIP: one image per product).
    Sparse SKUs get the same shelf-like views as in the full build: the rule is read from the index
    meta (``sparse``: below, views, seed), written by :func:`skulens.index.build.catalog_index`
    (an index that records none gets ``DEFAULT_SPARSE_RULE``, which the update then records).
    ``failed_keys``: catalog keys whose download failed (ingest's ``failed``): their SKUs keep their
    index rows and sources as they are (a transient S3 error never removes a SKU) and are looked at
    again by the next update (``UpdateReport.deferred_skus``).
    ``scope``: look only at these SKUs (see :func:`index_delta`); the others keep rows and sources as indexed.
    Returns (new index, UpdateReport).
    """
    import numpy as np

    from skulens.index import rules
    from skulens.index.build import DEFAULT_SPARSE_RULE, sparse_rows, view_labels, view_vectors
    from skulens.model.embed import embed_images

    t0 = time.perf_counter()
    indexed = dict(index.meta.get(SOURCES_META, {}))
    current = dict(zip(manifest["key"], manifest["etag"]))
    deferred = set()
    for key in failed_keys:
        try:
            deferred.add(_sku_of(key))
        except contract.CatalogError:
            pass
    listed = rules.listed_skus(products)
    dups = dict(index.meta.get(rules.DUPLICATES_META) or {})
    linking = {indexed[k] for k in set(index.keys.tolist()) if k in indexed} | set(dups.values())
    delta = index_delta(current, indexed, deferred, listed=listed, indexed_skus=index.sku_list,
                        unlisted=index.meta.get(rules.UNLISTED_META), linking=linking, scope=scope)
    cfg = rules.config_from_rule(index.meta.get(rules.RULE_META), clean_config)
    rows = manifest[manifest["sku"].isin(delta.changed_skus)]
    if products is not None:  # membership of the checked SKUs is all the check needs from products.csv
        products = products[products["sku"].astype(str).str.strip().isin(delta.changed_skus)]
    t1 = time.perf_counter()
    cleaned = rules.check_images(rows, products, Path(work_dir), cfg)
    t2 = time.perf_counter()
    kept = rules.indexable(cleaned)
    vectors = embed_images(encoder, kept["clean_path"].tolist(), batch_size=batch_size) if len(kept) else None
    skus, keys = kept["sku"].tolist(), kept["key"].astype(str).tolist()
    rule = dict(index.meta.get("sparse") or DEFAULT_SPARSE_RULE)
    views = int(rule.get("views", 0))
    sparse = sparse_rows(kept, int(rule.get("below", 0))) if views > 0 and len(kept) else kept.iloc[:0]
    if len(sparse):
        vs, vk = view_labels(sparse, views)
        v = view_vectors(encoder, sparse, views, int(rule.get("seed", 0)), batch_size)
        vectors, skus, keys = np.concatenate([vectors, v]), skus + vs, keys + vk
    t3 = time.perf_counter()
    gone = sorted(set(delta.removed_skus) | (set(delta.changed_skus) - set(kept["sku"])))
    new = index.with_updates(vectors, skus, keys, remove_skus=gone, model_version=model_version)
    changed = set(delta.changed_skus)
    # unchanged files of untouched SKUs stay as they were (SKU from the manifest: no re-parsing of keys)
    sku_of = dict(zip(manifest["key"], manifest["sku"]))
    out_of_scope = (lambda k: _sku_of(k) not in scope) if scope is not None else (lambda k: False)
    sources = {k: e for k, e in indexed.items()
               if (current.get(k) == e and sku_of[k] not in changed) or _sku_of(k) in deferred or
               (out_of_scope(k) and _sku_of(k) not in changed)}
    # every file looked at counts as seen (dropped ones too), so a bad upload is not retried until it changes
    sources.update(dict(zip(rows["key"], rows["etag"])))
    new.meta[SOURCES_META] = sources
    new.meta.setdefault("sparse", rule)
    new.meta[rules.RULE_META] = rules.rule_of(cfg)
    new.meta[rules.UNLISTED_META] = delta.unlisted_skus
    dups = {k: e for k, e in dups.items()
            if (current.get(k) == e and sku_of[k] not in changed) or (out_of_scope(k) and _sku_of(k) not in changed)}
    dups.update(rules.duplicates_of(cleaned))
    new.meta[rules.DUPLICATES_META] = dups
    report = UpdateReport(changed_skus=delta.changed_skus, removed_skus=gone, embedded_images=len(kept),
                          dropped_files=cleaned.dropped_files, deferred_skus=sorted(deferred),
                          delisted_skus=delta.delisted_skus,
                          seconds={"delta": round(t1 - t0, 3), "check": round(t2 - t1, 3),
                                   "embed": round(t3 - t2, 3), "total": round(time.perf_counter() - t0, 3)})
    return new, report


def _empty_index(dim: int, model_version: str | None):
    import numpy as np

    from skulens.index.sku_index import SkuIndex

    return SkuIndex(np.zeros((0, int(dim)), np.float32), np.array([], dtype=str), np.array([], dtype=str),
                    model_version=model_version, meta={SOURCES_META: {}})


def publish_update(client, bucket: str, champion, manifest: pd.DataFrame, work_dir: Path, resync=None,
                   prefix: str = "index", cache_dir=None, batch_size: int = 64, reason: str = "manual",
                   attempts: int = 5, failed_keys=(), products: pd.DataFrame | None = None, clean_config=None,
                   deltas: bool = True, scope=None):
    """The catalog sensor's update, published by compare-and-swap: ``(outcome, report)``.

    ``champion()`` returns ``(encoder, model_version, model_meta)``; it is asked again on every attempt,
    so a race lost to a rebuild with a newer champion continues with that one. Each attempt starts
    from the version in place (the winner's, after a lost race) and embeds only what differs between
    it and the catalog: ``manifest``, ``failed_keys`` and ``products`` (see :func:`update_index`) on the first
    attempt, ``resync() -> (manifest, failed_keys[, products])`` (a fresh incremental ingest) after a lost
    race, so uploads the winner already saw are not taken back out. When the index uses
    another model than the champion it is rebuilt from nothing with the champion (``clean_config``: the
    thresholds then, default the CleanConfig defaults). ``outcome`` is
    :func:`skulens.index.publish.publish_with_retry`'s (``published`` False: catalog and index agree).
    ``deltas`` (default): the change is published as a small delta on the current chain (``mode`` "delta"),
    compacted into a full version by the chain rule (:func:`skulens.index.publish.chain_allows`)."""
    from skulens.index.publish import publish_with_retry

    reports: list[UpdateReport] = []

    def make(base):
        encoder, version, meta = champion()
        rows, failed, prods = manifest, failed_keys, products
        if base.attempt > 0 and resync is not None:
            got = resync()
            rows, failed = got[0], got[1]
            prods = got[2] if len(got) > 2 else products
        start = base.index
        if start is None or str(start.model_version) != str(version):
            if scope is not None:  # a scoped update never rebuilds: the full rebuild is the pipeline's
                reports.append(UpdateReport([], [], 0, pd.DataFrame(), {}))
                return None
            start = _empty_index(encoder.embed_dim, version)
        start.meta.update(meta or {})
        new, report = update_index(encoder, start, rows, work_dir, version, batch_size=batch_size,
                                   failed_keys=failed, products=prods, clean_config=clean_config, scope=scope)
        reports.append(report)
        if not report.changed_skus and not report.removed_skus and base.pointer is not None:
            return None
        new.meta["update"] = {"reason": reason, "changed_skus": len(report.changed_skus),
                              "removed_skus": len(report.removed_skus), "base": base.version}
        return new

    outcome = publish_with_retry(client, bucket, make, prefix=prefix, cache_dir=cache_dir, attempts=attempts,
                                 deltas=deltas)
    return outcome, reports[-1]


def rebase_build(encoder, built, base, manifest: pd.DataFrame, work_dir: Path, champion_version: str | None,
                 batch_size: int = 64, products: pd.DataFrame | None = None):
    """A full build that lost the race to ``base`` (another publisher's version), brought up to the
    catalog now: ``built`` plus the SKUs that changed since its snapshot (``manifest``: a fresh
    ingest, ``products``: products.csv now), embedded with the build's model, by the build's rule (recorded
    in its meta). ``None`` (publish nothing) when the winner uses another model and the champion is no
    longer the build's: the winner is the newer index."""
    winner_model = str((base.pointer or {}).get("model_version"))
    if winner_model != str(built.model_version) and str(champion_version) != str(built.model_version):
        return None
    new, _ = update_index(encoder, built, manifest, work_dir, built.model_version, batch_size=batch_size,
                          products=products)
    return new


@dataclass
class CatalogUpdate:
    """What :func:`update_from_catalog` did: ``outcome`` (:func:`skulens.index.publish.publish_with_retry`'s;
    ``published`` False: catalog and index agree), ``report`` (:class:`UpdateReport` of the last attempt),
    ``failed_downloads`` ((key, error) of the first ingest) and ``seconds`` (ingest, delta, check, embed,
    publish, total)."""

    outcome: dict
    report: UpdateReport
    failed_downloads: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def published(self) -> str | None:
        return self.outcome.get("version") if self.outcome.get("published") else None

    @property
    def published_as(self) -> str | None:
        if not self.outcome.get("published"):
            return None
        mode = str(self.outcome.get("mode"))
        return mode + (f" (compacted: {self.outcome['compacted']})" if self.outcome.get("compacted") else "")

    def summary(self) -> str:
        """One log line."""
        r, o = self.report, self.outcome
        if not o.get("published"):
            return "catalog and index agree: nothing to publish"
        return (f"published index {o['version']}: {len(r.changed_skus)} SKU(s) checked ({r.embedded_images} images "
                f"embedded), {len(r.removed_skus)} removed"
                + (f" ({len(r.delisted_skus)} no longer in products.csv)" if r.delisted_skus else "")
                + f"; published as {self.published_as}, base index loaded by {o.get('base_load')}; {self.seconds}"
                + (f"; redone on top of {o['rebased_on']} after {len(o['conflicts'])} race(s) lost"
                   if o.get("conflicts") else ""))


def _scoped_ingest(client, bucket: str, dest: Path, scope, objects=None):
    """The catalog files of the SKUs in ``scope`` only (listed per SKU unless ``objects`` are given),
    downloaded into ``dest/<sku>/<file>``: a :class:`skulens.catalog.ingest.SyncResult` whose manifest
    holds just those SKUs (for an update scoped to them)."""
    from skulens.catalog import ingest
    from skulens.catalog.s3 import list_objects

    scope = {str(x) for x in scope}
    if objects is None:
        objects = [o for sku in sorted(scope)
                   for o in list_objects(client, bucket, f"{contract.CATALOG_IMAGES_PREFIX}{sku}/")]
    res = ingest.SyncResult(manifest=ingest.empty_manifest())
    rows = []
    for obj in objects:
        try:
            ik = contract.parse_image_key(obj.key, contract.CATALOG_IMAGES_PREFIX)
        except contract.CatalogError as exc:
            res.rejected.append((obj.key, str(exc)))
            continue
        if ik.sku not in scope:
            continue
        local = Path(dest) / ik.sku / ik.filename
        try:
            etag, size = ingest.download_object(client, bucket, obj.key, local)
        except Exception as exc:  # noqa: BLE001 - reported, its SKU deferred (as the full ingest)
            res.failed.append((obj.key, f"{type(exc).__name__}: {exc}"))
            continue
        rows.append((ik.sku, obj.key, etag, size, str(local)))
        res.added.append(obj.key)
    if rows:
        res.manifest = pd.DataFrame(rows, columns=ingest.MANIFEST_COLUMNS).sort_values("key", ignore_index=True)
        res.manifest["bytes"] = res.manifest["bytes"].astype("int64")
    return res


def update_from_catalog(client, bucket: str, champion, catalog_dir: Path, work_dir: Path,
                        cache_dir: Path | None = None, prefix: str = "index", batch_size: int = 64,
                        reason: str = "manual", clean_config=None, deltas: bool = True, listing=None,
                        on_failed_download=None, scope=None) -> CatalogUpdate:
    """The catalog sensor's index update, end to end, shared by the ``index_update`` job and the warm
    update worker (:mod:`skulens.index.worker`): an incremental ingest of ``catalog/images/`` into
    ``catalog_dir`` and products.csv, then :func:`publish_update` (only new/changed SKUs embedded with
    ``champion()``, deleted or delisted SKUs dropped, the indexable rules of :mod:`skulens.index.rules`,
    published as a delta by compare-and-swap, redone on the winner's version after a lost race).

    ``listing``: the S3 objects under ``catalog/images/`` as the caller just listed them (the worker's
    change check), so the first ingest does not list again; a resync after a lost race lists afresh.
    ``on_failed_download(key, error)``: called for each download of the first ingest that failed (its SKU
    stays as indexed until the next update). Raises :class:`skulens.catalog.contract.CatalogError` when
    products.csv is missing or unreadable (the index is left as it is). ``scope``: only these SKUs (see
    :func:`index_delta`), and only their files are ingested (``listing`` then needs to hold only theirs;
    the SKUs sharing an ETag with them belong in the scope: the cleaning rule judges copies together);
    None: the whole catalog, as the job."""
    from skulens.catalog import ingest

    t0 = time.perf_counter()

    def resync(objects=None):
        if scope is not None:  # only the scope's files (the mirror's state is left to the full ingests)
            return _scoped_ingest(client, bucket, Path(catalog_dir), scope, objects)
        return ingest.sync_images(client, bucket, contract.CATALOG_IMAGES_PREFIX, Path(catalog_dir),
                                  objects=objects)

    sync = resync(listing)
    products = ingest.fetch_products(client, bucket)  # the full build's membership rule
    t_ingest = time.perf_counter() - t0

    def fresh():
        again = resync()
        return again.manifest, [k for k, _ in again.failed], ingest.fetch_products(client, bucket)

    for key, err in sync.failed:
        if on_failed_download is not None:
            on_failed_download(key, err)
    outcome, report = publish_update(client, bucket, champion, sync.manifest, Path(work_dir), resync=fresh,
                                     prefix=prefix, cache_dir=cache_dir, batch_size=batch_size, reason=reason,
                                     failed_keys=[k for k, _ in sync.failed], products=products,
                                     clean_config=clean_config, deltas=deltas, scope=scope)
    seconds = {"ingest": round(t_ingest, 3), **report.seconds, "publish": outcome.get("publish_seconds"),
               "op_total": round(time.perf_counter() - t0, 3)}
    return CatalogUpdate(outcome, report, list(sync.failed), seconds)

"""The catalog's state in S3 (key -> ETag) and fingerprints of it and of configs, for the schedule
and the sensors to decide whether anything changed (no Dagster import)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pandas as pd

from skulens.catalog import contract
from skulens.catalog.s3 import list_objects, list_pages


@dataclass(frozen=True)
class CatalogState:
    images: dict  # catalog/images key -> etag (keys that follow the contract)
    products_etag: str | None
    fingerprint: str

    @property
    def set_fingerprint(self) -> str:
        """:func:`set_fingerprint` of this state: what the sensor's resumable scan computes."""
        return set_fingerprint(self.images.items(), self.products_etag)


def fingerprint(pairs, extra: str = "") -> str:
    h = hashlib.sha256()
    for key, etag in sorted(pairs):
        h.update(f"{key}\0{etag}\n".encode())
    h.update(extra.encode())
    return h.hexdigest()


def _is_image_key(key: str) -> bool:
    try:
        contract.parse_image_key(key, contract.CATALOG_IMAGES_PREFIX)
    except contract.CatalogError:
        return False
    return True


def catalog_state(client, bucket: str) -> CatalogState:
    """One listing of `catalog/` (1,000 keys per request; 30k keys took 6.4-7.0 s on SeaweedFS)."""
    images, products_etag = {}, None
    for obj in list_objects(client, bucket, "catalog/"):
        if obj.key == contract.PRODUCTS_KEY:
            products_etag = obj.etag
        elif _is_image_key(obj.key):
            images[obj.key] = obj.etag
    return CatalogState(images=images, products_etag=products_etag,
                        fingerprint=fingerprint(images.items(), extra=products_etag or ""))


# ====================================================================== a scan spread over sensor ticks
_MASK = (1 << 128) - 1


def _add_pair(total: int, key: str, etag: str) -> int:
    """``total`` plus the pair's 128-bit hash, mod 2^128 (the running sum of :func:`set_fingerprint`)."""
    return (total + int.from_bytes(hashlib.sha256(f"{key}\0{etag}".encode()).digest()[:16], "big")) & _MASK


def _scan_digest(total: int, n: int, products_etag: str | None) -> str:
    return hashlib.sha256(f"{total:032x}:{n}:{products_etag or ''}".encode()).hexdigest()


def set_fingerprint(pairs, products_etag: str | None = None) -> str:
    """An order-free fingerprint of (key, etag) pairs: the sum of each pair's 128-bit hash (mod 2^128) and
    the count, plus products.csv's ETag. A sum can be carried from one page of a listing to the next in a
    few bytes, so :func:`scan_step` can list a catalog of any size across several calls and still end with
    the fingerprint of the whole set (the same as this function over the complete listing)."""
    total, n = 0, 0
    for key, etag in pairs:
        total, n = _add_pair(total, key, etag), n + 1
    return _scan_digest(total, n, products_etag)


def scan_step(client, bucket: str, scan: dict | None, budget_s: float, page_size: int = 1000,
              clock=None) -> tuple[dict, dict | None]:
    """Continue a listing of ``catalog/`` that may span several calls (sensor ticks): list pages after
    ``scan["after"]`` until the listing ends or ``budget_s`` seconds have passed (at least one page a call).
    Returns ``(scan, None)`` while pages remain (the caller keeps ``scan``, a small JSON-able dict, and passes
    it back next time) or ``({}, {"fingerprint", "images", "pages"})`` once the listing is done;
    ``fingerprint`` is :func:`set_fingerprint` of the same keys :func:`catalog_state` keeps.

    One listing of 30k keys took 6.4-7.0 s on SeaweedFS, so at 100k SKUs x 3 images it would outlast
    Dagster's 60 s sensor timeout; split across ticks, each tick stays within its budget. A change made
    while a scan runs shows in this scan if its key is still ahead of it, and otherwise in the next one."""
    import time

    clock = clock or time.monotonic
    scan = dict(scan or {})
    total, n = int(scan.get("sum", "0"), 16), int(scan.get("n", 0))
    products_etag, pages = scan.get("products_etag"), int(scan.get("pages", 0))
    t0 = clock()
    for objs, after, more in list_pages(client, bucket, "catalog/", scan.get("after", ""), page_size):
        pages += 1
        for obj in objs:
            if obj.key == contract.PRODUCTS_KEY:
                products_etag = obj.etag
            elif _is_image_key(obj.key):
                total, n = _add_pair(total, obj.key, obj.etag), n + 1
        if more and clock() - t0 >= budget_s:
            return {"after": after, "sum": f"{total:x}", "n": n, "products_etag": products_etag, "pages": pages}, None
    return {}, {"fingerprint": _scan_digest(total, n, products_etag), "images": n, "pages": pages}


def manifest_fingerprint(manifest: pd.DataFrame, products_etag: str | None) -> str:
    """The same fingerprint computed from an ingest manifest (to tag what a model was trained on)."""
    return fingerprint(zip(manifest["key"], manifest["etag"]), extra=products_etag or "")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ====================================================================== retraining only when it pays
#: MLflow artifact of a training run: what it was trained on, per SKU (:func:`training_record`)
CATALOG_STATE_ARTIFACT = "catalog_state.json"
RECORD_FORMAT = 1


def sku_hashes(images: dict) -> dict[str, tuple[str, int]]:
    """{sku: (hash of its (key, etag) pairs, number of images)} of catalog images (key -> etag)."""
    per: dict[str, list] = {}
    for key, etag in images.items():
        per.setdefault(contract.parse_image_key(key, contract.CATALOG_IMAGES_PREFIX).sku, []).append((key, etag))
    return {sku: (fingerprint(pairs)[:16], len(pairs)) for sku, pairs in per.items()}


def training_record(images: dict, listed: set | None, trained_skus, catalog_fingerprint: str | None = None,
                    min_images_per_sku: int = 3) -> dict:
    """What a model is trained on, per SKU (JSON, logged to its training run as ``catalog_state.json``):
    ``skus`` {sku: [hash of its images' keys and etags, images, listed in products.csv]}, ``trained``
    (the SKUs that were training classes), the catalog fingerprint and the threshold of a training class."""
    return {"format": RECORD_FORMAT, "fingerprint": catalog_fingerprint,
            "min_images_per_sku": int(min_images_per_sku),
            "skus": {sku: [h, n, listed is None or sku in listed]
                     for sku, (h, n) in sorted(sku_hashes(images).items())},
            "trained": sorted({str(s) for s in trained_skus})}


def changed_trainable_skus(images: dict, record: dict, listed: set | None = None,
                           min_images_per_sku: int = 3) -> tuple[list[str], list[str]]:
    """``(new, changed)``: the catalog's trainable SKUs (at least ``min_images_per_sku`` images, listed in
    products.csv when ``listed`` is given) that the record did not see as such (new, or unlisted then), and
    those whose images (keys, etags) differ from the record's. SKUs with fewer images never count: they
    are never trained on (index_update keeps them recognizable). Removed SKUs do not count either."""
    then = record.get("skus") or {}
    new, changed = [], []
    for sku, (h, n) in sorted(sku_hashes(images).items()):
        if n < min_images_per_sku or (listed is not None and sku not in listed):
            continue
        old = then.get(sku)
        if old is None or not old[2]:
            new.append(sku)
        elif old[0] != h:
            changed.append(sku)
    return new, changed


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str  # one line, for the schedule tick / `skulens run`
    new_skus: tuple = ()
    changed_skus: tuple = ()
    threshold: int | None = None


def retrain_threshold(trainable: int, min_changed_skus: int = 1, min_changed_share: float = 0.0) -> int:
    """How many trainable SKUs must be new or changed to retrain: at least ``min_changed_skus`` (>= 1) and
    at least ``min_changed_share`` of the trainable SKUs."""
    import math

    return max(1, int(min_changed_skus), math.ceil(float(min_changed_share) * int(trainable) - 1e-9))


def _n_skus(n: int) -> str:
    return f"{n} trainable SKU{'' if n == 1 else 's'}"


def retrain_decision(images: dict, catalog_fingerprint: str, train_config_hash: str, champion_version: str | None,
                     champion_tags: dict | None = None, record: dict | None = None, listed: set | None = None,
                     min_images_per_sku: int = 3, min_changed_skus: int = 1, min_changed_share: float = 0.0,
                     rejected: dict | None = None) -> RetrainDecision:
    """Should the nightly run retrain? Pure: the catalog now (``images`` key -> etag, its ``catalog_fingerprint``,
    ``listed`` = products.csv's SKUs), the training config hash now, and the champion (version, its training
    run's tags ``catalog.fingerprint`` / ``train.config_hash``, its ``record`` = :func:`training_record`).

    Retrain when there is no champion, when the training config changed, or when at least
    :func:`retrain_threshold` trainable SKUs are new or changed since the champion was trained
    (:func:`changed_trainable_skus`); an older champion without a record retrains on any catalog change.
    ``rejected``: the latest challenger run trained with this config and not promoted over this champion
    (``run_id``, ``reason``, its catalog ``fingerprint`` and ``record``): when fewer than the threshold of
    trainable SKUs are new or changed since *it* was trained, retraining would (nearly) repeat it: skipped."""
    if champion_version is None:
        return RetrainDecision(True, "no champion yet: training the first model")
    tags = champion_tags or {}
    v = f"champion v{champion_version}"
    old_cfg = tags.get("train.config_hash")
    if old_cfg != train_config_hash:
        return RetrainDecision(True, f"training config changed since {v} "
                                     f"({old_cfg or 'unknown'} -> {train_config_hash})")
    if tags.get("catalog.fingerprint") == catalog_fingerprint:
        return RetrainDecision(False, f"catalog ({catalog_fingerprint[:12]}) and training config "
                                      f"({train_config_hash}) unchanged since {v}: nothing to retrain")
    if not record or record.get("format") != RECORD_FORMAT:
        return RetrainDecision(True, f"catalog changed since {v} (no per-SKU record of what it was trained on)")
    new, changed = changed_trainable_skus(images, record, listed, min_images_per_sku)
    trainable = sum(1 for s, (_, n) in sku_hashes(images).items()
                    if n >= min_images_per_sku and (listed is None or s in listed))
    t = retrain_threshold(trainable, min_changed_skus, min_changed_share)
    n = len(new) + len(changed)
    head = f"{_n_skus(n)} new or changed since {v} (retrain threshold {t})"
    if n < t:
        return RetrainDecision(False, f"{head}: index_update keeps them recognizable; nothing to retrain",
                               tuple(new), tuple(changed), t)
    if rejected:
        since = f"challenger run {str(rejected.get('run_id'))[:12]}, not promoted ({rejected.get('reason') or '?'})"
        if rejected.get("fingerprint") == catalog_fingerprint:
            return RetrainDecision(False, f"{head}, but {since}, was trained on this same catalog and config: "
                                          "retraining would repeat it", tuple(new), tuple(changed), t)
        if (rejected.get("record") or {}).get("format") == RECORD_FORMAT:
            rn = sum(map(len, changed_trainable_skus(images, rejected["record"], listed, min_images_per_sku)))
            if rn < t:
                return RetrainDecision(False, f"{head}, but only {rn} since {since}: retraining would nearly repeat "
                                              "it", tuple(new), tuple(changed), t)
    examples = ", ".join((new + changed)[:5]) + (" ..." if n > 5 else "")
    return RetrainDecision(True, f"{head}: {examples}", tuple(new), tuple(changed), t)

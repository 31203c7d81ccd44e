"""The catalog's state in S3 (key -> ETag) and fingerprints of it and of configs, for the schedule
and the sensors to decide whether anything changed (no Dagster import)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pandas as pd

from skulens.catalog import contract
from skulens.catalog.s3 import list_objects


@dataclass(frozen=True)
class CatalogState:
    images: dict  # catalog/images key -> etag (keys that follow the contract)
    products_etag: str | None
    fingerprint: str


def fingerprint(pairs, extra: str = "") -> str:
    h = hashlib.sha256()
    for key, etag in sorted(pairs):
        h.update(f"{key}\0{etag}\n".encode())
    h.update(extra.encode())
    return h.hexdigest()


def catalog_state(client, bucket: str) -> CatalogState:
    """One listing of `catalog/`: cheap enough to run on every sensor tick (1,000 keys per request)."""
    images, products_etag = {}, None
    for obj in list_objects(client, bucket, "catalog/"):
        if obj.key == contract.PRODUCTS_KEY:
            products_etag = obj.etag
            continue
        try:
            contract.parse_image_key(obj.key, contract.CATALOG_IMAGES_PREFIX)
        except contract.CatalogError:
            continue
        images[obj.key] = obj.etag
    return CatalogState(images=images, products_etag=products_etag,
                        fingerprint=fingerprint(images.items(), extra=products_etag or ""))


def manifest_fingerprint(manifest: pd.DataFrame, products_etag: str | None) -> str:
    """The same fingerprint computed from an ingest manifest (to tag what a model was trained on)."""
    return fingerprint(zip(manifest["key"], manifest["etag"]), extra=products_etag or "")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]

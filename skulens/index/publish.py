"""Publish SKU index versions to S3 behind one atomic pointer, and load them back.

Storage layout under ``<prefix>/`` (default ``index/``) in the bucket::

    index/versions/<version>.npz    immutable index files, never overwritten, never deleted (history)
    index/versions/<version>.json   manifest written next to each file (same content as the pointer)
    index/CURRENT.json              small pointer {version, key, model_version, count, sha256, ...}

Publishing writes and verifies the version object first and only then replaces the pointer with a
single PUT. A PUT replaces an S3 object atomically, so a reader sees either the old or the new
pointer, and every pointer names a complete, verified, immutable object: a reader never sees a
half-written index. Readers verify the sha256 named in the pointer before using a download.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from skulens.index.sku_index import IndexIntegrityError, SkuIndex, _iso, _utcnow

POINTER_NAME = "CURRENT.json"


class NoIndexPublished(LookupError):
    """There is no ``CURRENT.json`` pointer under the prefix yet."""


# ====================================================================== S3 publishing
def _key(prefix: str, *parts: str) -> str:
    prefix = prefix.strip("/")
    return "/".join([prefix, *parts]) if prefix else "/".join(parts)


def pointer_key(prefix: str = "index") -> str:
    return _key(prefix, POINTER_NAME)


def _is_missing(err) -> bool:
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _exists(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if _is_missing(e):
            return False
        raise


def publish_index(client, bucket: str, index: SkuIndex, prefix: str = "index", verify: str = "full") -> str:
    """Upload ``index`` as a new immutable version, verify it, then swap ``CURRENT.json`` to it.

    Returns the version string ``<UTC timestamp>-<content hash[:12]>``. Never overwrites an existing
    version and never deletes anything. ``verify="full"`` re-downloads the object and checks its
    sha256 (default); ``"size"`` only checks the HEAD size. If verification fails the pointer is not
    touched and :class:`IndexIntegrityError` is raised.
    """
    if verify not in ("full", "size"):
        raise ValueError("verify must be 'full' or 'size'")
    data = index.to_bytes()
    sha = hashlib.sha256(data).hexdigest()
    now = _utcnow()
    version = f"{now:%Y%m%dT%H%M%S%fZ}-{index.content_hash()[:12]}"
    key = _key(prefix, "versions", f"{version}.npz")
    while _exists(client, bucket, key):  # same microsecond and same content: never overwrite history
        time.sleep(0.001)
        now = _utcnow()
        version = f"{now:%Y%m%dT%H%M%S%fZ}-{index.content_hash()[:12]}"
        key = _key(prefix, "versions", f"{version}.npz")

    client.put_object(
        Bucket=bucket, Key=key, Body=data, ContentType="application/octet-stream",
        Metadata={"sha256": sha, "model-version": str(index.model_version), "count": str(len(index))},
    )
    head = client.head_object(Bucket=bucket, Key=key)
    if int(head["ContentLength"]) != len(data):
        raise IndexIntegrityError(f"{key}: stored size {head['ContentLength']} != {len(data)}; pointer not moved")
    if verify == "full":
        got = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if hashlib.sha256(got).hexdigest() != sha:
            raise IndexIntegrityError(f"{key}: re-read sha256 differs; pointer not moved")

    previous = read_pointer(client, bucket, prefix)
    pointer = {
        "version": version,
        "key": key,
        "model_version": index.model_version,
        "count": len(index),
        "n_skus": index.meta.get("n_skus"),
        "embed_dim": index.embed_dim,
        "sha256": sha,
        "size": len(data),
        "content_hash": index.content_hash(),
        "created_at": index.meta.get("created_at"),
        "published_at": _iso(now),
        "previous": previous.get("version") if previous else None,
    }
    body = json.dumps(pointer, indent=2, sort_keys=True).encode()
    client.put_object(Bucket=bucket, Key=_key(prefix, "versions", f"{version}.json"), Body=body,
                      ContentType="application/json")
    client.put_object(Bucket=bucket, Key=pointer_key(prefix), Body=body, ContentType="application/json")
    return version


def read_pointer(client, bucket: str, prefix: str = "index") -> dict | None:
    """The current pointer (dict) or ``None`` if nothing was published yet."""
    from botocore.exceptions import ClientError

    try:
        obj = client.get_object(Bucket=bucket, Key=pointer_key(prefix))
    except ClientError as e:
        if _is_missing(e):
            return None
        raise
    pointer = json.loads(obj["Body"].read())
    pointer["etag"] = obj.get("ETag", "").strip('"')
    return pointer


def pointer_etag(client, bucket: str, prefix: str = "index") -> str | None:
    """Cheap change check: the pointer object's ETag via HEAD (``None`` if absent)."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=pointer_key(prefix))["ETag"].strip('"')
    except ClientError as e:
        if _is_missing(e):
            return None
        raise


def load_version(client, bucket: str, pointer: dict, cache_dir: str | os.PathLike | None = None) -> SkuIndex:
    """Download the index file named by ``pointer`` (``key`` + ``sha256``), verify, load.

    With ``cache_dir`` the verified file is kept as ``<cache_dir>/<version>.npz`` and reused (after
    re-checking its sha256) by later calls; it is written atomically (temp file + rename).
    """
    key, sha = pointer["key"], pointer["sha256"]
    cached = Path(cache_dir) / f"{pointer['version']}.npz" if cache_dir is not None else None
    if cached is not None and cached.exists():
        data = cached.read_bytes()
        if hashlib.sha256(data).hexdigest() == sha:
            return SkuIndex.from_bytes(data)
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise IndexIntegrityError(f"{key}: sha256 {got[:12]}... != pointer {sha[:12]}...")
    index = SkuIndex.from_bytes(data)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=cached.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, cached)
    return index


def load_current(
    client, bucket: str, prefix: str = "index", cache_dir: str | os.PathLike | None = None
) -> tuple[SkuIndex, dict]:
    """Load the index named by ``CURRENT.json``: ``(index, pointer)``; verified against its sha256.

    Raises :class:`NoIndexPublished` if there is no pointer yet.
    """
    pointer = read_pointer(client, bucket, prefix)
    if pointer is None:
        raise NoIndexPublished(f"s3://{bucket}/{pointer_key(prefix)} does not exist")
    return load_version(client, bucket, pointer, cache_dir), pointer


def list_versions(client, bucket: str, prefix: str = "index") -> list[dict]:
    """All published versions, oldest first: ``{version, key, size, last_modified, current}``."""
    current = read_pointer(client, bucket, prefix)
    cur = current["version"] if current else None
    out = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=_key(prefix, "versions") + "/"):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith(".npz"):
                continue
            version = obj["Key"].rsplit("/", 1)[-1][: -len(".npz")]
            out.append({
                "version": version, "key": obj["Key"], "size": int(obj["Size"]),
                "last_modified": obj["LastModified"].isoformat() if obj.get("LastModified") else None,
                "current": version == cur,
            })
    out.sort(key=lambda d: d["version"])
    return out

"""Publish SKU index versions to S3 behind one atomic pointer, and load them back.

Storage layout under ``<prefix>/`` (default ``index/``) in the bucket::

    index/versions/<version>.npz    immutable index files, never overwritten, never deleted (history)
    index/versions/<version>.json   manifest written next to each file (same content as the pointer)
    index/CURRENT.json              small pointer {version, key, model_version, count, sha256, ...}

Publishing writes and verifies the version object first and only then replaces the pointer with a
single PUT. A PUT replaces an S3 object atomically, so a reader sees either the old or the new
pointer, and every pointer names a complete, verified, immutable object: a reader never sees a
half-written index. Readers verify the sha256 named in the pointer before using a download.

The pointer moves by compare-and-swap: the PUT is conditional on the pointer being the one the
publisher started from (``If-Match: <its ETag>``, or ``If-None-Match: *`` for the first version;
S3 conditional writes, supported by AWS S3, SeaweedFS and MinIO). When another publisher moved it
first, the PUT fails with 412 and :func:`publish_index` raises :class:`PublishConflict`;
:func:`publish_with_retry` then rebuilds the new index on top of the winner's version and tries
again. Without conditional writes the last writer would silently win, so :func:`check_conditional_writes`
refuses a store that ignores them.
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


class PublishConflict(RuntimeError):
    """Another publisher moved the pointer after this one read it: nothing was overwritten."""

    def __init__(self, message: str, base: str | None = None, current: dict | None = None):
        super().__init__(message)
        self.base, self.current = base, current


class ConditionalWritesUnsupported(RuntimeError):
    """The S3 store ignores ``If-Match`` / ``If-None-Match`` on PUT: publishing could lose a version."""


_UNSET = object()


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


def publish_index(client, bucket: str, index: SkuIndex, prefix: str = "index", verify: str = "full",
                  base=_UNSET) -> str:
    """Upload ``index`` as a new immutable version, verify it, then swap ``CURRENT.json`` to it.

    Returns the version string ``<UTC timestamp>-<content hash[:12]>``. Never overwrites an existing
    version and never deletes anything. ``verify="full"`` re-downloads the object and checks its
    sha256 (default); ``"size"`` only checks the HEAD size. If verification fails the pointer is not
    touched and :class:`IndexIntegrityError` is raised.

    ``base`` is the pointer (from :func:`read_pointer`) the new index was made from, ``None`` when
    nothing was published yet; by default the pointer as it is now. The pointer only moves if it
    still is ``base``; otherwise :class:`PublishConflict` is raised and the uploaded version stays as
    unreferenced history.
    """
    if verify not in ("full", "size"):
        raise ValueError("verify must be 'full' or 'size'")
    check_conditional_writes(client, bucket, prefix)
    if base is _UNSET:
        base = read_pointer(client, bucket, prefix)
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
        "previous": base.get("version") if base else None,
    }
    body = json.dumps(pointer, indent=2, sort_keys=True).encode()
    client.put_object(Bucket=bucket, Key=_key(prefix, "versions", f"{version}.json"), Body=body,
                      ContentType="application/json")
    swap_pointer(client, bucket, body, base, prefix)
    return version


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def _precondition_failed(err) -> bool:
    resp = getattr(err, "response", {}) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412)


def swap_pointer(client, bucket: str, body: bytes, base: dict | None, prefix: str = "index") -> None:
    """PUT ``body`` as the pointer if the pointer is still ``base`` (``None``: if there is none).

    A retried PUT whose first try did land (the answer was lost) fails its precondition against its
    own write; that case is recognised by reading the pointer back and is not a conflict."""
    from botocore.exceptions import ClientError

    cond = {"IfMatch": _quoted(base["etag"])} if base else {"IfNoneMatch": "*"}
    try:
        client.put_object(Bucket=bucket, Key=pointer_key(prefix), Body=body, ContentType="application/json", **cond)
    except ClientError as e:
        if not _precondition_failed(e):
            raise
        now = read_pointer(client, bucket, prefix)
        mine = json.loads(body)
        if now is not None and now.get("version") == mine["version"]:
            return  # our own earlier attempt landed
        raise PublishConflict(
            f"s3://{bucket}/{pointer_key(prefix)} moved while publishing: started from "
            f"{base.get('version') if base else 'no index'}, now {now.get('version') if now else 'none'}; "
            "the pointer was not touched", base=base.get("version") if base else None, current=now) from None


_CAS_CHECKED: dict[tuple, bool] = {}


def check_conditional_writes(client, bucket: str, prefix: str = "index") -> None:
    """Refuse a store that ignores conditional PUTs (once per endpoint and bucket per process): it
    writes ``<prefix>/.cas-probe`` and checks that a PUT with a wrong ``If-Match`` is rejected."""
    from botocore.exceptions import ClientError

    where = (getattr(client.meta, "endpoint_url", None), bucket)
    if _CAS_CHECKED.get(where):
        return
    key = _key(prefix, ".cas-probe")
    client.put_object(Bucket=bucket, Key=key, Body=b"skulens conditional-write probe\n")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"skulens conditional-write probe\n",
                          IfMatch='"00000000000000000000000000000000"')
    except ClientError as e:
        if _precondition_failed(e):
            _CAS_CHECKED[where] = True
            return
        raise
    raise ConditionalWritesUnsupported(
        f"the S3 store at {where[0] or 'AWS'} ignores If-Match on PUT: the index pointer could not be "
        "moved safely (two publishers would overwrite each other); use a store with S3 conditional "
        "writes (AWS S3, SeaweedFS, MinIO)")


class Base:
    """What a publish attempt starts from: the pointer (``None`` = nothing published) and its index,
    loaded on first use. ``attempt`` counts from 0."""

    def __init__(self, client, bucket: str, pointer: dict | None, attempt: int, cache_dir=None):
        self.pointer, self.attempt = pointer, attempt
        self._client, self._bucket, self._cache_dir, self._index = client, bucket, cache_dir, None

    @property
    def version(self) -> str | None:
        return self.pointer.get("version") if self.pointer else None

    @property
    def index(self) -> SkuIndex | None:
        if self._index is None and self.pointer is not None:
            self._index = load_version(self._client, self._bucket, self.pointer, self._cache_dir)
        return self._index


def publish_with_retry(client, bucket: str, make, prefix: str = "index", start=_UNSET, attempts: int = 5,
                       cache_dir: str | os.PathLike | None = None, verify: str = "full",
                       backoff: float = 0.2) -> dict:
    """Compare-and-swap publishing with rebase: ``make(base: Base) -> SkuIndex | None`` builds the index
    to publish on top of ``base`` (``None``: nothing to publish). The first attempt starts from
    ``start`` (the pointer the caller's work began from; by default the pointer now); when another
    publisher moves the pointer first, ``make`` is called again on the winner's version.

    Returns the pointer now in place plus ``published`` (bool), ``attempts``, ``conflicts`` (the
    versions that won meanwhile) and ``rebased_on`` (the version this one was built on). An index
    equal in content to its base is not published again. Raises :class:`PublishConflict` after
    ``attempts`` lost races."""
    import random

    pointer = read_pointer(client, bucket, prefix) if start is _UNSET else start
    conflicts: list[str] = []
    spent = 0.0  # seconds in publish_index (upload, verify, swap)
    for attempt in range(max(1, int(attempts))):
        base = Base(client, bucket, pointer, attempt, cache_dir)
        index = make(base)
        if index is None or (pointer is not None and pointer.get("content_hash") == index.content_hash()):
            now = read_pointer(client, bucket, prefix) if attempt else pointer
            return {**(now or {}), "published": False, "attempts": attempt + 1, "conflicts": conflicts,
                    "rebased_on": base.version, "publish_seconds": round(spent, 3)}
        t0 = time.perf_counter()
        try:
            publish_index(client, bucket, index, prefix=prefix, verify=verify, base=pointer)
        except PublishConflict as c:
            spent += time.perf_counter() - t0
            conflicts.append(c.current.get("version") if c.current else None)
            pointer = c.current
            time.sleep(backoff * (attempt + 1) * random.uniform(0.5, 1.5))
            continue
        spent += time.perf_counter() - t0
        return {**read_pointer(client, bucket, prefix), "published": True, "attempts": attempt + 1,
                "conflicts": conflicts, "rebased_on": base.version, "publish_seconds": round(spent, 3)}
    raise PublishConflict(f"s3://{bucket}/{pointer_key(prefix)}: lost {len(conflicts)} races to other publishers "
                          f"({', '.join(map(str, conflicts))}); nothing was overwritten, run again",
                          current=pointer)


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


def read_manifest(client, bucket: str, version: str, prefix: str = "index") -> dict:
    """The manifest written next to a version (what the pointer said when it moved to it)."""
    obj = client.get_object(Bucket=bucket, Key=_key(prefix, "versions", f"{version}.json"))
    return json.loads(obj["Body"].read())


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

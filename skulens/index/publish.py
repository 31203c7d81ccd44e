"""Publish SKU index versions to S3 behind one atomic pointer, and load them back.

Storage layout under ``<prefix>/`` (default ``index/``) in the bucket::

    index/versions/<version>.npz    immutable index files, never overwritten, never deleted (history)
    index/versions/<version>.json   manifest written next to each file (same content as the pointer)
    index/deltas/<version>.npz      immutable deltas (rows of added/replaced SKUs, removed SKUs, meta patch)
    index/deltas/<version>.json     manifest written next to each delta
    index/CURRENT.json              small pointer {version, key, model_version, count, sha256, ...}

The pointer names either a full version (format 1: ``key``/``sha256`` are the version's .npz), or a
chain (``format`` 2): a full ``base`` plus the ordered ``deltas`` on top of it, each with its key,
sha256 and the content hash of the index after it; ``key``/``sha256`` then name the newest delta, which
is not an index file, so a reader that predates deltas fails clearly (``not a skulens index file``)
instead of serving the base without the changes. ``version`` is always the newest state (a full
version or the last delta). A reader that has the base applies only the deltas it lacks
(:func:`advance`); :func:`publish_with_retry` (``deltas="auto"``) publishes a small delta on top of
the current chain and a new full version when the chain would grow past ``max_deltas`` deltas or
``max_delta_ratio`` of the base's size (compaction), when the model changes, or on request.

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

POINTER_FORMAT = 2  # 1: the pointer names one full version; 2: a full base plus ordered deltas
DELTA_KIND = "skulens-index-delta"
DELTA_FORMAT = 1
#: compaction: a delta publish writes a full version instead when the chain would hold more deltas than
#: this, or deltas larger in total than this share of the base's size
MAX_DELTAS = int(os.environ.get("SKULENS_INDEX_MAX_DELTAS", "32"))
MAX_DELTA_RATIO = float(os.environ.get("SKULENS_INDEX_MAX_DELTA_RATIO", "0.10"))

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


def _new_version(client, bucket: str, prefix: str, folder: str, tag: str) -> tuple:
    """``(now, version, key)`` of a new immutable object ``<prefix>/<folder>/<UTC time>-<tag>.npz``: same
    microsecond and same content never overwrite history."""
    while True:
        now = _utcnow()
        version = f"{now:%Y%m%dT%H%M%S%fZ}-{tag}"
        key = _key(prefix, folder, f"{version}.npz")
        if not _exists(client, bucket, key):
            return now, version, key
        time.sleep(0.001)


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
    now, version, key = _new_version(client, bucket, prefix, "versions", index.content_hash()[:12])

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
        "format": POINTER_FORMAT,
        "base": None,
        "deltas": [],
    }
    body = json.dumps(pointer, indent=2, sort_keys=True).encode()
    client.put_object(Bucket=bucket, Key=_key(prefix, "versions", f"{version}.json"), Body=body,
                      ContentType="application/json")
    swap_pointer(client, bucket, body, base, prefix)
    _remember(client, bucket, prefix, pointer, index)
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

    def __init__(self, client, bucket: str, pointer: dict | None, attempt: int, cache_dir=None,
                 prefix: str = "index"):
        self.pointer, self.attempt = pointer, attempt
        self._client, self._bucket, self._cache_dir, self._index = client, bucket, cache_dir, None
        self._prefix, self.meta = prefix, None
        self.load = None  # how the index was obtained: memo / deltas / full

    @property
    def version(self) -> str | None:
        return self.pointer.get("version") if self.pointer else None

    @property
    def index(self) -> SkuIndex | None:
        """The index the pointer names: this process's last published/loaded one (the memo, also a lost
        attempt's base) when it is that version, else that one advanced by the new deltas, else loaded."""
        if self._index is None and self.pointer is not None:
            have, index = _recall(self._client, self._bucket, self._prefix)
            if have is not None and index is not None:
                index, info = advance(self._client, self._bucket, have, index, self.pointer, self._cache_dir)
                self.load = "memo" if info["mode"] == "same" else info["mode"]
            else:
                index, self.load = load_version(self._client, self._bucket, self.pointer, self._cache_dir), "full"
            self.meta = _meta_copy(index.meta)  # as published: the delta's meta patch starts from it
            _remember(self._client, self._bucket, self._prefix, self.pointer, index)
            self._index = index
        return self._index


def publish_with_retry(client, bucket: str, make, prefix: str = "index", start=_UNSET, attempts: int = 5,
                       cache_dir: str | os.PathLike | None = None, verify: str = "full",
                       backoff: float = 0.2, deltas: bool = False, max_deltas: int | None = None,
                       max_delta_ratio: float | None = None) -> dict:
    """Compare-and-swap publishing with rebase: ``make(base: Base) -> SkuIndex | None`` builds the index
    to publish on top of ``base`` (``None``: nothing to publish). The first attempt starts from
    ``start`` (the pointer the caller's work began from; by default the pointer now); when another
    publisher moves the pointer first, ``make`` is called again on the winner's version.

    ``deltas``: publish the change as a delta on the current chain (:func:`publish_delta`) when it can be
    one (same model, :func:`make_delta`) and the chain allows it (:func:`chain_allows`: ``max_deltas``,
    ``max_delta_ratio``); else, and by default, a full version (:func:`publish_index`).

    Returns the pointer now in place plus ``published`` (bool), ``mode`` (``delta``/``full``/None),
    ``compacted`` (why a delta publish wrote a full version), ``attempts``, ``conflicts`` (the versions
    that won meanwhile), ``rebased_on`` (the version this one was built on), ``base_load`` (how the base
    index was obtained) and ``publish_seconds``. An index equal in content to its base is not published
    again. Raises :class:`PublishConflict` after ``attempts`` lost races."""
    import random

    pointer = read_pointer(client, bucket, prefix) if start is _UNSET else start
    conflicts: list[str] = []
    spent = 0.0  # seconds in publishing (diff, upload, verify, swap)
    for attempt in range(max(1, int(attempts))):
        base = Base(client, bucket, pointer, attempt, cache_dir, prefix=prefix)
        index = make(base)
        chash = index.content_hash() if index is not None else None
        if index is None or (pointer is not None and pointer.get("content_hash") == chash):
            now = read_pointer(client, bucket, prefix) if attempt else pointer
            return {**(now or {}), "published": False, "mode": None, "attempts": attempt + 1,
                    "conflicts": conflicts, "rebased_on": base.version, "base_load": base.load,
                    "publish_seconds": round(spent, 3)}
        t0 = time.perf_counter()
        mode, compacted = "full", None
        try:
            delta = None
            if deltas and pointer is not None:
                old = base.index
                delta = make_delta(old, index, old_meta=base.meta, parent=base.version, content_hash=chash)
                if delta is None:
                    compacted = "the change is not a per-SKU delta (model or layout changed)"
                else:
                    compacted = chain_allows(pointer, len(delta.to_bytes()), max_deltas, max_delta_ratio)
                    if compacted:
                        delta = None
            if delta is not None:
                # what every reader rebuilds from the chain (with_updates normalises the rows it adds, so
                # the head can differ from ``index`` in the last bit): its content hash goes in the pointer
                head = apply_deltas(old, [delta])
                delta.meta["content_hash"] = head.content_hash()
                publish_delta(client, bucket, delta, head, pointer, prefix=prefix, verify=verify)
                mode = "delta"
            else:
                publish_index(client, bucket, index, prefix=prefix, verify=verify, base=pointer)
        except PublishConflict as c:
            spent += time.perf_counter() - t0
            conflicts.append(c.current.get("version") if c.current else None)
            pointer = c.current
            time.sleep(backoff * (attempt + 1) * random.uniform(0.5, 1.5))
            continue
        spent += time.perf_counter() - t0
        return {**read_pointer(client, bucket, prefix), "published": True, "mode": mode,
                "compacted": compacted if mode == "full" and deltas else None, "attempts": attempt + 1,
                "conflicts": conflicts, "rebased_on": base.version, "base_load": base.load,
                "publish_seconds": round(spent, 3)}
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
    """Download the index named by ``pointer`` (``key`` + ``sha256``; for a chain its base and then every
    delta, applied in order), verify each file, load.

    With ``cache_dir`` each verified file is kept (``<cache_dir>/<version>.npz``, deltas under
    ``<cache_dir>/deltas/``) and reused (after re-checking its sha256) by later calls; files are written
    atomically (temp file + rename).
    """
    base, entries = chain_of(pointer)
    cached = Path(cache_dir) / f"{base['version']}.npz" if cache_dir is not None else None
    index = SkuIndex.from_bytes(_verified_bytes(client, bucket, base["key"], base["sha256"], cached))
    if entries:
        index = apply_deltas(index, [load_delta(client, bucket, e, cache_dir) for e in entries])
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


# ====================================================================== deltas
class Delta:
    """One step of a chain: all rows of the SKUs in ``skus`` replace that SKU's rows, SKUs in ``remove`` are
    dropped, the meta is patched (:func:`meta_patch`); applied with :meth:`SkuIndex.with_updates`.

    Stored as an .npz of plain arrays (``delta_vectors``, ``delta_skus``, ``delta_keys``, ``delta_remove``,
    ``delta_meta`` JSON), deliberately without the arrays of an index file: code that predates deltas
    refuses it (``not a skulens index file``) rather than serving it as an index."""

    def __init__(self, vectors, skus, keys, remove, meta: dict):
        import numpy as np

        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.skus = np.asarray([str(x) for x in skus], dtype=np.str_) if len(skus) else np.zeros(0, "<U1")
        self.keys = np.asarray([str(x) for x in keys], dtype=np.str_) if len(keys) else np.zeros(0, "<U1")
        self.remove = sorted({str(x) for x in remove})
        self.meta = dict(meta)  # kind, format, model_version, parent (version), content_hash (after), meta_patch

    @property
    def replaced(self) -> list[str]:
        return sorted(set(self.skus.tolist()))

    def to_bytes(self) -> bytes:
        import io

        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, delta_vectors=self.vectors, delta_skus=self.skus, delta_keys=self.keys,
                 delta_remove=np.asarray(self.remove, dtype=np.str_) if self.remove else np.zeros(0, "<U1"),
                 delta_meta=np.asarray(json.dumps(self.meta, sort_keys=True)))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Delta:
        import io

        import numpy as np

        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            missing = {"delta_vectors", "delta_skus", "delta_keys", "delta_remove", "delta_meta"} - set(z.files)
            if missing:
                raise ValueError(f"not a skulens index delta (missing {sorted(missing)})")
            meta = json.loads(str(z["delta_meta"]))
            if meta.get("kind") != DELTA_KIND or int(meta.get("format", 0)) > DELTA_FORMAT:
                raise ValueError(f"index delta format {meta.get('format')} is not readable by this code ({DELTA_FORMAT})")
            return cls(z["delta_vectors"], z["delta_skus"], z["delta_keys"], z["delta_remove"], meta)


_BIG_DICT = 64  # meta dicts larger than this are patched key by key (e.g. ``sources``: one entry per catalog file)


def meta_patch(old: dict, new: dict) -> dict:
    """What turns meta ``old`` into ``new``: ``{"set": {k: v}, "del": [k], "dict": {k: {"set", "del"}}}``."""
    out: dict = {"set": {}, "del": sorted(k for k in old if k not in new), "dict": {}}
    for k, v in new.items():
        o = old.get(k, _UNSET)
        if o == v:
            continue
        if isinstance(o, dict) and isinstance(v, dict) and len(v) > _BIG_DICT:
            out["dict"][k] = {"set": {kk: vv for kk, vv in v.items() if o.get(kk, _UNSET) != vv},
                              "del": sorted(kk for kk in o if kk not in v)}
        else:
            out["set"][k] = v
    return out


def apply_meta_patch(meta: dict, patch: dict) -> dict:
    out = dict(meta)
    for k in patch.get("del", ()):
        out.pop(k, None)
    for k, d in (patch.get("dict") or {}).items():
        sub = dict(out.get(k) or {})
        for kk in d.get("del", ()):
            sub.pop(kk, None)
        sub.update(d.get("set") or {})
        out[k] = sub
    out.update(patch.get("set") or {})
    return out


def _meta_copy(meta: dict) -> dict:
    return json.loads(json.dumps(meta))


def make_delta(old: SkuIndex, new: SkuIndex, old_meta: dict | None = None, parent: str | None = None,
               content_hash: str | None = None) -> Delta | None:
    """The delta that turns ``old`` into ``new``, or ``None`` when ``new`` is not ``old`` plus per-SKU
    replacements and removals (another model or dimension, duplicate keys, rows of an untouched SKU moved):
    then only a full version can say it. ``old_meta``: ``old``'s meta as published (default ``old.meta``).

    A SKU is touched when any of its rows is new, changed or gone; the delta carries every row of each
    touched SKU that is still in ``new`` (in ``new``'s order) and removes the others, so
    ``old.with_updates(...)`` rebuilds ``new`` row for row (same content hash)."""
    import numpy as np

    if str(old.model_version) != str(new.model_version) or old.embed_dim != new.embed_dim:
        return None
    old_keys = old.keys.tolist()
    pos = {k: i for i, k in enumerate(old_keys)}
    if len(pos) != len(old_keys) or len(set(new.keys.tolist())) != len(new):
        return None  # rows are matched by key: keys must be unique
    idx = np.fromiter((pos.get(k, -1) for k in new.keys.tolist()), dtype=np.int64, count=len(new))
    hit = idx >= 0
    same = np.zeros(len(new), dtype=bool)
    if hit.any():
        hi = idx[hit]
        same[hit] = (old.skus[hi] == new.skus[hit]) & np.all(old.vectors[hi] == new.vectors[hit], axis=1)
    used = np.zeros(len(old), dtype=bool)
    used[idx[same]] = True
    touched = set(new.skus[~same].tolist()) | set(old.skus[~used].tolist())
    keep_new = ~np.isin(new.skus, list(touched)) if touched else np.ones(len(new), dtype=bool)
    keep_old = ~np.isin(old.skus, list(touched)) if touched else np.ones(len(old), dtype=bool)
    kept = idx[keep_new]
    # untouched SKUs: exactly old's rows, in old's order (else with_updates would not rebuild new)
    if int(keep_old.sum()) != len(kept) or (len(kept) > 1 and not np.all(np.diff(kept) > 0)):
        return None
    in_new = set(new.skus.tolist())
    rows = ~keep_new
    meta = {"kind": DELTA_KIND, "format": DELTA_FORMAT, "model_version": new.model_version, "parent": parent,
            "content_hash": content_hash or new.content_hash(), "rows": int(rows.sum()),
            "meta_patch": meta_patch(old.meta if old_meta is None else old_meta, new.meta)}
    return Delta(new.vectors[rows], new.skus[rows], new.keys[rows], sorted(touched - in_new), meta)


def apply_deltas(index: SkuIndex, deltas: list[Delta]) -> SkuIndex:
    """``index`` with ``deltas`` applied in order, folded into one :meth:`SkuIndex.with_updates` (a SKU's
    rows are those of the last delta that touched it), meta patched in order."""
    import numpy as np

    if not deltas:
        return index
    net: dict[str, tuple | None] = {}  # sku -> (delta i, row mask) or None (removed); order = last touch
    for i, d in enumerate(deltas):
        if str(d.meta.get("model_version")) != str(index.model_version):
            raise IndexIntegrityError(f"delta {d.meta.get('parent')}->: model {d.meta.get('model_version')} != "
                                      f"index model {index.model_version}")
        for s in d.remove:
            net.pop(s, None)
            net[s] = None
        if len(d.skus):
            uniq, first = np.unique(d.skus, return_index=True)
            for s in uniq[np.argsort(first, kind="stable")].tolist():
                net.pop(s, None)
                net[s] = (i,)
    vecs, skus, keys = [], [], []
    for s, where in net.items():
        if where is None:
            continue
        d = deltas[where[0]]
        m = d.skus == s
        vecs.append(d.vectors[m])
        skus.extend(d.skus[m].tolist())
        keys.extend(d.keys[m].tolist())
    vectors = np.concatenate(vecs) if vecs else np.zeros((0, index.embed_dim), np.float32)
    removed = [s for s, w in net.items() if w is None]
    meta = index.meta
    for d in deltas:
        meta = apply_meta_patch(meta, d.meta.get("meta_patch") or {})
    out = index.with_updates(vectors, skus, keys, remove_skus=removed, model_version=index.model_version)
    out.meta = meta
    return out


def chain_of(pointer: dict) -> tuple[dict, list[dict]]:
    """``(base entry, delta entries)`` of a pointer; a format-1 pointer is its own base with no deltas."""
    if pointer.get("deltas"):
        return pointer["base"], list(pointer["deltas"])
    return pointer, []


def _verified_bytes(client, bucket: str, key: str, sha: str, cached: Path | None) -> bytes:
    if cached is not None and cached.exists():
        data = cached.read_bytes()
        if hashlib.sha256(data).hexdigest() == sha:
            return data
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise IndexIntegrityError(f"{key}: sha256 {got[:12]}... != pointer {sha[:12]}...")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=cached.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, cached)
    return data


def load_delta(client, bucket: str, entry: dict, cache_dir: str | os.PathLike | None = None) -> Delta:
    """Download (or reuse from ``<cache_dir>/deltas/``) the delta named by a chain entry, verified by sha256."""
    cached = Path(cache_dir) / "deltas" / f"{entry['version']}.npz" if cache_dir is not None else None
    return Delta.from_bytes(_verified_bytes(client, bucket, entry["key"], entry["sha256"], cached))


def advance(client, bucket: str, have: dict | None, index: SkuIndex | None, pointer: dict,
            cache_dir: str | os.PathLike | None = None) -> tuple[SkuIndex, dict]:
    """The index named by ``pointer``, starting from ``index`` (the state named by pointer ``have``):
    when ``pointer`` continues the same chain (same base, ``have``'s deltas a prefix of its deltas) only
    the missing deltas are downloaded and applied; otherwise the whole chain is loaded.
    Returns ``(index, info)``: ``info["mode"]`` is ``same``, ``deltas`` or ``full``, ``deltas`` the number
    applied, ``bytes`` downloaded (0 for files found in ``cache_dir``)."""
    if have is not None and index is not None:
        if have.get("version") == pointer.get("version"):
            return index, {"mode": "same", "deltas": 0}
        hb, hd = chain_of(have)
        pb, pd = chain_of(pointer)
        if hb.get("version") == pb.get("version") and [d["version"] for d in hd] == [d["version"] for d in pd[:len(hd)]]:
            todo = pd[len(hd):]
            deltas = [load_delta(client, bucket, e, cache_dir) for e in todo]
            return apply_deltas(index, deltas), {"mode": "deltas", "deltas": len(todo),
                                                 "bytes": sum(int(e.get("size") or 0) for e in todo)}
    base, deltas = chain_of(pointer)
    return load_version(client, bucket, pointer, cache_dir), {
        "mode": "full", "deltas": len(deltas), "bytes": int(base.get("size") or 0) + sum(int(e.get("size") or 0) for e in deltas)}


# the last index this process published or loaded per location (a warm publisher need not reload it)
_MEMO: dict[tuple, tuple[dict, SkuIndex, str]] = {}


def _where(client, bucket: str, prefix: str) -> tuple:
    return (getattr(getattr(client, "meta", None), "endpoint_url", None), bucket, prefix.strip("/"))


def _remember(client, bucket: str, prefix: str, pointer: dict, index: SkuIndex) -> None:
    _MEMO[_where(client, bucket, prefix)] = (dict(pointer), index, json.dumps(index.meta))


def _recall(client, bucket: str, prefix: str) -> tuple[dict, SkuIndex] | tuple[None, None]:
    got = _MEMO.get(_where(client, bucket, prefix))
    if got is None:
        return None, None
    pointer, index, meta = got
    index.meta = json.loads(meta)  # callers may have written to the meta of the object they got
    return pointer, index


def chain_allows(pointer: dict, delta_size: int, max_deltas: int | None = None,
                 max_delta_ratio: float | None = None) -> str | None:
    """None when one more delta of ``delta_size`` bytes may go on ``pointer``'s chain, else why not
    (then a full version is written: compaction)."""
    max_deltas = MAX_DELTAS if max_deltas is None else int(max_deltas)
    ratio = MAX_DELTA_RATIO if max_delta_ratio is None else float(max_delta_ratio)
    base, deltas = chain_of(pointer)
    if len(deltas) + 1 > max_deltas:
        return f"chain would hold {len(deltas) + 1} deltas (max {max_deltas})"
    total = delta_size + sum(int(d.get("size") or 0) for d in deltas)
    base_size = int(base.get("size") or 0)
    if base_size and total > ratio * base_size:
        return f"deltas would total {total} bytes, over {ratio:.0%} of the base's {base_size}"
    return None


def publish_delta(client, bucket: str, delta: Delta, index: SkuIndex, base: dict, prefix: str = "index",
                  verify: str = "full") -> str:
    """Upload ``delta`` (turning the index named by pointer ``base`` into ``index``), verify it, then move the
    pointer from ``base`` to the chain plus this delta by compare-and-swap (:class:`PublishConflict` when
    another publisher moved it first). Returns the new version (the delta's)."""
    if verify not in ("full", "size"):
        raise ValueError("verify must be 'full' or 'size'")
    check_conditional_writes(client, bucket, prefix)
    data = delta.to_bytes()
    sha = hashlib.sha256(data).hexdigest()
    chash = delta.meta.get("content_hash") or index.content_hash()
    now, version, key = _new_version(client, bucket, prefix, "deltas", f"d{chash[:12]}")
    client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/octet-stream",
                      Metadata={"sha256": sha, "model-version": str(index.model_version), "parent": str(base["version"])})
    head = client.head_object(Bucket=bucket, Key=key)
    if int(head["ContentLength"]) != len(data):
        raise IndexIntegrityError(f"{key}: stored size {head['ContentLength']} != {len(data)}; pointer not moved")
    if verify == "full" and hashlib.sha256(client.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest() != sha:
        raise IndexIntegrityError(f"{key}: re-read sha256 differs; pointer not moved")
    b, deltas = chain_of(base)
    base_entry = {k: b.get(k) for k in ("version", "key", "sha256", "size", "content_hash", "count", "model_version")}
    entry = {"version": version, "key": key, "sha256": sha, "size": len(data), "content_hash": chash,
             "parent": base["version"], "rows": len(delta.skus), "replaced_skus": len(delta.replaced),
             "removed_skus": len(delta.remove), "published_at": _iso(now)}
    pointer = {
        "format": POINTER_FORMAT, "version": version, "key": key, "sha256": sha, "size": len(data),
        "model_version": index.model_version, "count": len(index), "n_skus": index.meta.get("n_skus"),
        "embed_dim": index.embed_dim, "content_hash": chash, "created_at": index.meta.get("created_at"),
        "published_at": _iso(now), "previous": base["version"], "base": base_entry,
        "deltas": [*({k: v for k, v in d.items()} for d in deltas), entry],
    }
    body = json.dumps(pointer, indent=2, sort_keys=True).encode()
    client.put_object(Bucket=bucket, Key=_key(prefix, "deltas", f"{version}.json"), Body=body,
                      ContentType="application/json")
    swap_pointer(client, bucket, body, base, prefix)
    _remember(client, bucket, prefix, pointer, index)
    return version

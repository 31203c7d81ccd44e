"""Incremental pull of bucket prefixes into a local cache, keyed by ETag.

Only new or changed objects are downloaded; objects that left the bucket leave the
manifest (and their cached copy is removed locally; nothing is ever deleted from S3).
The manifest is a DataFrame with columns ``sku, key, etag, bytes, path``.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from skulens.catalog import contract
from skulens.catalog.s3 import S3Object, list_objects, normalize_etag

MANIFEST_COLUMNS = ["sku", "key", "etag", "bytes", "path"]


@dataclass
class SyncResult:
    manifest: pd.DataFrame
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)
    bytes_downloaded: int = 0
    seconds: float = 0.0

    @property
    def downloaded(self) -> int:
        return len(self.added) + len(self.changed)

    def stats(self) -> dict:
        return {
            "objects": len(self.manifest),
            "skus": int(self.manifest["sku"].nunique()) if len(self.manifest) else 0,
            "added": len(self.added),
            "changed": len(self.changed),
            "removed": len(self.removed),
            "unchanged": self.unchanged,
            "rejected": len(self.rejected),
            "failed": len(self.failed),
            "bytes_downloaded": self.bytes_downloaded,
            "seconds": round(self.seconds, 3),
        }


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "bytes" else "object") for c in MANIFEST_COLUMNS})


def _state_path(dest: Path) -> Path:
    return dest / ".manifest.parquet"


def load_state(dest: Path) -> pd.DataFrame:
    path = _state_path(dest)
    if path.exists():
        return pd.read_parquet(path)
    return empty_manifest()


def _save_state(dest: Path, manifest: pd.DataFrame) -> None:
    path = _state_path(dest)
    tmp = path.with_suffix(".tmp")
    manifest.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _part_path(dst: Path) -> Path:
    """The temp file a download goes to: short and fixed-length whatever the name (a name near the
    file-system limit plus a suffix would not fit), hidden, one per destination and process."""
    digest = hashlib.sha1(dst.name.encode("utf-8", "surrogateescape"), usedforsecurity=False).hexdigest()[:16]
    return dst.with_name(f".part-{digest}-{os.getpid()}")


def download_object(client, bucket: str, key: str, dst: Path) -> tuple[str, int]:
    """Download to a temp file then rename, so a crash never leaves a half file in the cache."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part_path(dst)
    resp = client.get_object(Bucket=bucket, Key=key)
    etag = normalize_etag(resp["ETag"])
    size = 0
    try:
        with open(tmp, "wb") as fh:
            for chunk in resp["Body"].iter_chunks(1 << 20):
                fh.write(chunk)
                size += len(chunk)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return etag, size


def _inside(path: Path, root: Path) -> bool:
    """``path`` (symlinks resolved) lies under ``root`` (resolved): a symlink planted in the cache cannot
    redirect a download elsewhere."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def sync_images(
    client,
    bucket: str,
    prefix: str,
    dest: Path,
    workers: int = 16,
    progress: bool = False,
    objects=None,
) -> SyncResult:
    """Mirror ``prefix<sku>/<file>`` into ``dest/<sku>/<file>``, downloading only the delta.

    ``objects``: the listing of ``prefix`` (:class:`S3Object` s) when the caller has just made it (None: list)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    previous = load_state(dest)
    prev = {row.key: row for row in previous.itertuples(index=False)}

    result = SyncResult(manifest=empty_manifest())
    wanted: dict[str, tuple[S3Object, str, Path]] = {}
    root = dest.resolve()
    for obj in (objects if objects is not None else list_objects(client, bucket, prefix)):
        try:
            ik = contract.parse_image_key(obj.key, prefix)
        except contract.CatalogError as exc:
            result.rejected.append((obj.key, str(exc)))
            continue
        local = dest / ik.sku / ik.filename
        if not _inside(local, root):
            result.rejected.append((obj.key, f"local path {local} resolves outside the cache {root} (a symlink?)"))
            continue
        wanted[obj.key] = (obj, ik.sku, local)

    todo = []
    rows = []
    for key, (obj, sku, local) in wanted.items():
        old = prev.get(key)
        if old is not None and old.etag == obj.etag and local.exists() and local.stat().st_size == obj.size:
            result.unchanged += 1
            rows.append((sku, key, obj.etag, obj.size, str(local)))
        else:
            todo.append((key, obj, sku, local, old is not None))

    bar = tqdm(total=len(todo), unit="img", desc=f"ingest {prefix}", disable=not progress or not todo)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(download_object, client, bucket, key, local): (key, obj, sku, local, was)
                   for key, obj, sku, local, was in todo}
        for fut in as_completed(futures):
            key, obj, sku, local, was = futures[fut]
            try:
                etag, size = fut.result()
            except Exception as exc:  # a failed download is reported and retried next run
                result.failed.append((key, f"{type(exc).__name__}: {exc}"))
                bar.update(1)
                continue
            rows.append((sku, key, etag, size, str(local)))
            (result.changed if was else result.added).append(key)
            result.bytes_downloaded += size
            bar.update(1)
    bar.close()

    for key in sorted(set(prev) - set(wanted)):
        result.removed.append(key)
        old_path = Path(prev[key].path)
        try:
            if old_path.is_relative_to(dest):
                old_path.unlink(missing_ok=True)
        except OSError:
            pass

    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("key", ignore_index=True)
    manifest["bytes"] = manifest["bytes"].astype("int64")
    result.manifest = manifest
    result.added.sort()
    result.changed.sort()
    _save_state(dest, manifest)
    result.seconds = time.perf_counter() - t0
    return result


def fetch_object_bytes(client, bucket: str, key: str) -> bytes | None:
    from botocore.exceptions import ClientError

    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in {"404", "NoSuchKey", "NotFound"}:
            return None
        raise


def fetch_products(client, bucket: str) -> pd.DataFrame:
    data = fetch_object_bytes(client, bucket, contract.PRODUCTS_KEY)
    if data is None:
        raise contract.CatalogError(
            f"s3://{bucket}/{contract.PRODUCTS_KEY} not found: upload a catalog with `skulens import catalog DIR`"
        )
    return contract.read_products(data)


def sync_shelf_photos(client, bucket: str, dest: Path, workers: int = 8) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Cut labelled crops out of ``shelf/photos/`` using ``shelf/boxes.csv``.

    Returns (manifest of crops with key ``shelf/photos/<photo>#x,y,w,h``, rejected rows).
    """
    from PIL import Image

    boxes_bytes = fetch_object_bytes(client, bucket, contract.SHELF_BOXES_KEY)
    if boxes_bytes is None:
        return empty_manifest(), []
    boxes = contract.read_boxes(boxes_bytes)
    photos = sync_images_flat(client, bucket, contract.SHELF_PHOTOS_PREFIX, Path(dest) / "photos", workers)
    rows, rejected = [], []
    out_dir = Path(dest) / "cut"
    out_dir.mkdir(parents=True, exist_ok=True)
    for photo, group in boxes.groupby("photo", sort=True):
        info = photos.get(photo)
        if info is None:
            rejected += [(f"{contract.SHELF_PHOTOS_PREFIX}{photo}", "photo listed in boxes.csv not found")] * len(group)
            continue
        path, etag = info
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                for r in group.itertuples(index=False):
                    key = f"{contract.SHELF_PHOTOS_PREFIX}{photo}#{int(r.x)},{int(r.y)},{int(r.w)},{int(r.h)}"
                    try:
                        contract.validate_sku(str(r.sku))
                    except contract.CatalogError as exc:
                        rejected.append((key, str(exc)))
                        continue
                    x0, y0 = max(0, int(r.x)), max(0, int(r.y))
                    x1, y1 = min(im.width, int(r.x) + int(r.w)), min(im.height, int(r.y) + int(r.h))
                    if x1 - x0 < 8 or y1 - y0 < 8:
                        rejected.append((key, f"box outside the photo or smaller than 8 px ({r.x},{r.y},{r.w},{r.h})"))
                        continue
                    crop_path = out_dir / f"{Path(photo).stem}_{etag[:8]}_{x0}_{y0}_{x1 - x0}_{y1 - y0}.png"
                    if not crop_path.exists():
                        im.crop((x0, y0, x1, y1)).save(crop_path)
                    rows.append((str(r.sku), key, etag, crop_path.stat().st_size, str(crop_path)))
        except Exception as exc:  # unreadable photo: every box of it is reported
            rejected += [(f"{contract.SHELF_PHOTOS_PREFIX}{photo}", f"unreadable photo: {exc}")] * len(group)
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    df["bytes"] = df["bytes"].astype("int64")
    return df, rejected


def sync_images_flat(client, bucket: str, prefix: str, dest: Path, workers: int = 8) -> dict[str, tuple[Path, str]]:
    """Mirror ``prefix<file>`` (no SKU level) into dest; returns name -> (path, etag)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    todo = []
    for obj in list_objects(client, bucket, prefix):
        name = obj.key[len(prefix):]
        try:
            contract.validate_name_part(name)
        except contract.CatalogError:
            continue
        local = dest / name
        marker = dest / f".{name}.etag"
        if local.exists() and marker.exists() and marker.read_text() == obj.etag:
            out[name] = (local, obj.etag)
        else:
            todo.append((obj, name, local, marker))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futs = {pool.submit(download_object, client, bucket, o.key, local): (o, n, local, m) for o, n, local, m in todo}
        for fut in as_completed(futs):
            o, n, local, m = futs[fut]
            etag, _ = fut.result()
            m.write_text(etag)
            out[n] = (local, etag)
    return out

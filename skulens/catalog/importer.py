"""Upload a local folder into the bucket following the catalog contract, sending only what changed.

A file is unchanged when an object with the same key has the same size and the same MD5
(the ETag of a single-part upload, or the ``md5`` metadata we attach to multipart ones).

products.csv is uploaded as it is. Its optional ``packshot`` column (the contract's, see
:mod:`skulens.catalog.contract`) is checked against the folder: a cell that is not a safe image file name,
or that names a file missing from ``images/<sku>/``, is a warning (``ImportReport.warnings``, shown by
``skulens import``), never a reason to refuse the import: that SKU falls back to its first image.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from skulens.catalog import contract
from skulens.catalog.s3 import list_objects

SINGLE_PART_LIMIT = 64 * 1024 * 1024
#: store-side failures (5xx, unreachable) in a row, each after the client's own retries, after which an upload
#: stops sending files: a store that cannot write (a full disk) fails fast instead of retrying every file
STOP_AFTER_FAILURES = 8


@dataclass(frozen=True)
class UploadItem:
    local: Path
    key: str
    size: int


@dataclass
class ImportReport:
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (local path, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, error)
    bytes_uploaded: int = 0
    warnings: list[str] = field(default_factory=list)  # uploaded, but worth a look (e.g. a packshot not found)
    not_attempted: list[str] = field(default_factory=list)  # keys not sent because the upload stopped
    stopped: str | None = None  # why the upload stopped sending files (the store kept failing)

    def summary(self) -> str:
        text = (
            f"{len(self.uploaded)} uploaded ({self.bytes_uploaded / 1e6:.1f} MB), "
            f"{len(self.unchanged)} unchanged, {len(self.rejected)} rejected, {len(self.failed)} failed"
        )
        if self.stopped:
            text += f", {len(self.not_attempted)} not attempted (stopped: {self.stopped})"
        if self.warnings:
            more = f" (and {len(self.warnings) - 1} more)" if len(self.warnings) > 1 else ""
            text += f"; {len(self.warnings)} warning(s): {self.warnings[0]}{more}"
        return text

    def raise_for_failures(self) -> "ImportReport":
        """Raise ImportFailed when any upload failed (rejected files are a recorded drop, not a failure)."""
        if self.failed or self.not_attempted:
            shown = "; ".join(f"{key}: {err}" for key, err in self.failed[:3])
            more = f" (and {len(self.failed) - 3} more)" if len(self.failed) > 3 else ""
            total = len(self.failed) + len(self.uploaded) + len(self.unchanged) + len(self.not_attempted)
            stop = f"; stopped with {len(self.not_attempted)} not attempted: {self.stopped}" if self.stopped else ""
            raise ImportFailed(f"{len(self.failed)} of {total} uploads failed: {shown}{more}{stop}")
        return self


class ImportFailed(RuntimeError):
    """Some files could not be written to S3 (the store refused or was unreachable)."""


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _walk_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def plan_image_tree(root: Path, prefix: str, report: ImportReport) -> list[UploadItem]:
    """``root/<sku>/<file>`` -> items under ``prefix``; unsafe names are rejected, not uploaded."""
    items = []
    for path in _walk_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            contract.validate_relative_key(rel)
            parts = rel.split("/")
            if len(parts) != 2:
                raise contract.CatalogError(f"expected <sku>/<file>, got {rel!r}")
            contract.validate_sku(parts[0])
        except contract.CatalogError as exc:
            report.rejected.append((str(path), str(exc)))
            continue
        if path.is_symlink() and not path.resolve().is_file():
            report.rejected.append((str(path), "broken symlink"))
            continue
        items.append(UploadItem(local=path, key=prefix + rel, size=path.stat().st_size))
    return items


def packshot_warnings(products, images: Path) -> list[str]:
    """products.csv's ``packshot`` cells that are unsafe or name no file of ``images/<sku>/`` (one line each)."""
    names, problems = contract.packshot_names(products)
    out = [f"packshot of {sku}: {why}" for sku, _cell, why in problems]
    for sku, name in sorted(names.items()):
        if not (Path(images) / sku / name).is_file():
            out.append(f"packshot of {sku}: no file {name!r} in {Path(images) / sku}/ (the SKU uses its first image)")
    return out


def plan_catalog(src: Path, report: ImportReport) -> list[UploadItem]:
    """``DIR/products.csv`` + ``DIR/images/<sku>/<file>``; unusable ``packshot`` cells go to ``report.warnings``."""
    src = Path(src)
    products = src / "products.csv"
    images = src / "images"
    if not products.is_file() and not images.is_dir():
        raise contract.CatalogError(
            f"{src} is not a catalog folder: expected {src}/products.csv and/or {src}/images/<sku>/<file>"
        )
    items: list[UploadItem] = []
    if products.is_file():
        df = contract.read_products(products.read_bytes())
        problems = contract.check_products(df)
        if problems:
            raise contract.CatalogError(f"{products}: " + "; ".join(problems))
        if images.is_dir():
            report.warnings += packshot_warnings(df, images)
        items.append(UploadItem(products, contract.PRODUCTS_KEY, products.stat().st_size))
    if images.is_dir():
        items += plan_image_tree(images, contract.CATALOG_IMAGES_PREFIX, report)
    return items


def plan_shelf(src: Path, report: ImportReport) -> list[UploadItem]:
    """``DIR/<sku>/<file>`` crops, or ``DIR/photos/<file>`` + ``DIR/boxes.csv`` (or both)."""
    src = Path(src)
    if not src.is_dir():
        raise contract.CatalogError(f"{src} is not a folder")
    items: list[UploadItem] = []
    photos, boxes = src / "photos", src / "boxes.csv"
    if photos.is_dir() != boxes.is_file():
        raise contract.CatalogError(f"{src}: shelf photos need both photos/ and boxes.csv")
    if boxes.is_file():
        df = contract.read_boxes(boxes.read_bytes())
        names = {p.name for p in photos.iterdir() if p.is_file()}
        missing = sorted(set(df["photo"]) - names)
        if missing:
            raise contract.CatalogError(f"{boxes}: photos not found in {photos}: {missing[:5]}")
        for sku in set(df["sku"]):
            contract.validate_sku(sku)
        items.append(UploadItem(boxes, contract.SHELF_BOXES_KEY, boxes.stat().st_size))
        for path in sorted(photos.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            try:
                contract.validate_name_part(path.name)
            except contract.CatalogError as exc:
                report.rejected.append((str(path), str(exc)))
                continue
            items.append(UploadItem(path, contract.SHELF_PHOTOS_PREFIX + path.name, path.stat().st_size))
    crop_dirs = [d for d in sorted(src.iterdir()) if d.is_dir() and d.name != "photos" and not d.name.startswith(".")]
    for d in crop_dirs:
        try:
            contract.validate_sku(d.name)
        except contract.CatalogError as exc:
            report.rejected.append((str(d), str(exc)))
            continue
        items += plan_image_tree_one(d, contract.SHELF_CROPS_PREFIX + d.name + "/", report)
    if not items and not report.rejected:
        raise contract.CatalogError(f"{src}: no shelf crops (<sku>/<file>) and no photos/ + boxes.csv found")
    return items


def plan_image_tree_one(sku_dir: Path, prefix: str, report: ImportReport) -> list[UploadItem]:
    items = []
    for path in _walk_files(sku_dir):
        rel = path.relative_to(sku_dir).as_posix()
        try:
            if "/" in rel:
                raise contract.CatalogError(f"nested folders are not part of the layout: {rel!r}")
            contract.validate_name_part(rel)
        except contract.CatalogError as exc:
            report.rejected.append((str(path), str(exc)))
            continue
        items.append(UploadItem(path, prefix + rel, path.stat().st_size))
    return items


def store_side(exc: BaseException) -> bool:
    """Whether ``exc`` (after the client's retries) says the store cannot take writes now, as opposed to
    this one file being refused: a 5xx answer (SeaweedFS answers InternalError when its disk is full), or
    no answer at all (refused, reset, timed out)."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        code = (exc.response.get("Error") or {}).get("Code", "")
        return status >= 500 or code in ("InternalError", "ServiceUnavailable", "SlowDown")
    return isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))


def _remote_md5(client, bucket: str, key: str, etag: str) -> str | None:
    if "-" not in etag:
        return etag
    head = client.head_object(Bucket=bucket, Key=key)
    return (head.get("Metadata") or {}).get("md5")


def _upload_one(client, bucket: str, item: UploadItem, md5: str) -> None:
    if item.size <= SINGLE_PART_LIMIT:
        import base64

        with open(item.local, "rb") as fh:
            body = fh.read()
        client.put_object(
            Bucket=bucket,
            Key=item.key,
            Body=body,
            ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode(),
            Metadata={"md5": md5},
        )
    else:
        client.upload_file(str(item.local), bucket, item.key, ExtraArgs={"Metadata": {"md5": md5}})


def upload(
    client,
    bucket: str,
    items: list[UploadItem],
    report: ImportReport | None = None,
    workers: int = 16,
    progress: bool = True,
    remote_prefixes: Iterable[str] | None = None,
    on_event: Callable[[str, str], None] | None = None,
    stop_after: int | None = STOP_AFTER_FAILURES,
) -> ImportReport:
    """Upload items whose size or MD5 differs from the bucket's copy; in parallel with a progress bar.

    A file that fails (after the client's retries) is recorded in ``report.failed`` and the rest go on.
    After ``stop_after`` store-side failures in a row (:func:`store_side`; a success resets the count) no
    further file is sent: they are listed in ``report.not_attempted`` and ``report.stopped`` says why, so a
    store that cannot write fails in the time of one round of retries rather than one per file. Nothing
    is ever deleted; running the upload again sends only what is missing or different."""
    import threading

    from tqdm.auto import tqdm

    report = report or ImportReport()
    prefixes = sorted(set(remote_prefixes or {_top_prefix(i.key) for i in items}))
    remote = {}
    for prefix in prefixes:
        for obj in list_objects(client, bucket, prefix):
            remote[obj.key] = obj

    stop = threading.Event()
    streak = 0

    def work(item: UploadItem) -> tuple[str, UploadItem]:
        if stop.is_set():
            return "not_attempted", item
        md5 = md5_file(item.local)
        obj = remote.get(item.key)
        if obj is not None and obj.size == item.size and _remote_md5(client, bucket, obj.key, obj.etag) == md5:
            return "unchanged", item
        _upload_one(client, bucket, item, md5)
        return "uploaded", item

    bar = tqdm(total=len(items), unit="file", desc="import", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(work, it): it for it in items}
        for fut in as_completed(futures):
            item = futures[fut]
            try:
                status, _ = fut.result()
            except Exception as exc:  # one bad file must not stop the batch; it is reported
                report.failed.append((item.key, f"{type(exc).__name__}: {exc}"))
                status = "failed"
                if store_side(exc):
                    streak += 1
                    if stop_after and streak >= stop_after and not stop.is_set():
                        stop.set()
                        report.stopped = (f"the store failed {streak} writes in a row, each after the client's "
                                          f"retries; last: {type(exc).__name__}: {exc}")
            else:
                if status == "uploaded":
                    report.uploaded.append(item.key)
                    report.bytes_uploaded += item.size
                    streak = 0
                elif status == "not_attempted":
                    report.not_attempted.append(item.key)
                else:  # unchanged: read, not written, so it says nothing about whether the store can write
                    report.unchanged.append(item.key)
            if on_event:
                on_event(status, item.key)
            bar.update(1)
    bar.close()
    report.uploaded.sort()
    report.unchanged.sort()
    report.not_attempted.sort()
    return report


def _top_prefix(key: str) -> str:
    parts = key.split("/")
    return "/".join(parts[:2]) + "/" if len(parts) > 2 else key


def import_catalog(client, bucket: str, src: Path, workers: int = 16, progress: bool = True) -> ImportReport:
    report = ImportReport()
    items = plan_catalog(Path(src), report)
    upload(client, bucket, items, report, workers=workers, progress=progress)
    from skulens.catalog.notes import note_change  # a hint for the warm index worker (skulens.index.worker)

    try:
        note_change(client, bucket, [k.split("/")[2] for k in report.uploaded if k.startswith("catalog/images/")])
    except Exception:  # noqa: BLE001 - a hint only: the worker's periodic listing and the sensor see the upload
        pass
    return report


def import_shelf(client, bucket: str, src: Path, workers: int = 16, progress: bool = True) -> ImportReport:
    report = ImportReport()
    items = plan_shelf(Path(src), report)
    return upload(client, bucket, items, report, workers=workers, progress=progress)

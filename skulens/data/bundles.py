"""The balanced training set as one content-addressed object in S3, for training on another machine.

The ``balanced_dataset`` asset writes ``data/balanced`` (parquet rows pointing into ``data/clean``) on
the Dagster machine. A training process elsewhere (Dagster Pipes subprocess with its own working
directory, a Kubernetes pod on a GPU node) cannot open those paths, so the asset also packs what the
training set references into one deterministic tar::

    balanced/train.parquet, balanced/val.parquet, balanced/params.json
    clean/images/<sku>/<file>            only the images the two frames reference

uploads it once to ``s3://<bucket>/artifacts/datasets/<content key>.tar`` and passes ``{uri, sha256}``
on (:func:`ensure`). The content key hashes the balanced folder's files, whose rows carry every
image's sha256: a run with the same data finds the object and neither packs nor uploads again. :func:`fetch` downloads, verifies the
sha256 and unpacks it (refusing any member that would land outside the target folder).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

from skulens.registry.store import file_sha256

__all__ = ["PREFIX", "content_key", "ensure", "fetch", "pack", "publish"]

PREFIX = "artifacts/datasets"


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, path: Path | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
    if data is None:
        data = Path(path).read_bytes()
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack(balanced_dir: str | os.PathLike, clean_dir: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, str]:
    """Write the tar of a balanced folder and the clean images it references: ``(path, sha256)``."""
    balanced_dir, clean_dir, out = Path(balanced_dir), Path(clean_dir).resolve(), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rel: set[str] = set()
    for name in ("train", "val"):
        df = pd.read_parquet(balanced_dir / f"{name}.parquet", columns=["clean_path"])
        rel |= set(df["clean_path"].astype(str))
    bad = sorted(p for p in rel if os.path.isabs(p) or ".." in Path(p).parts)
    if bad:
        raise ValueError(f"balanced rows must point inside {clean_dir}: {bad[:3]}")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(p.name for p in balanced_dir.iterdir() if p.is_file()):
            _add(tar, f"balanced/{f}", path=balanced_dir / f)
        for p in sorted(rel):
            _add(tar, f"clean/{p}", path=clean_dir / p)
    sha = file_sha256(tmp)
    os.replace(tmp, out)
    return out, sha


def content_key(balanced_dir: str | os.PathLike) -> str:
    """sha256 over the balanced folder's files (rows name each image by its sha256)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in Path(balanced_dir).iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def publish(client, bucket: str, tar_path: str | os.PathLike, sha256: str, key: str | None = None,
            prefix: str = PREFIX) -> dict:
    """Upload the tar as ``<prefix>/<key or sha256>.tar`` with its sha256 in the object metadata:
    ``{uri, sha256, bytes, uploaded}``."""
    obj = f"{prefix.strip('/')}/{key or sha256}.tar"
    size = Path(tar_path).stat().st_size
    client.upload_file(str(tar_path), bucket, obj, ExtraArgs={"Metadata": {"sha256": sha256}})
    return {"uri": f"s3://{bucket}/{obj}", "sha256": sha256, "bytes": size, "uploaded": True}


def ensure(client, bucket: str, balanced_dir: str | os.PathLike, clean_dir: str | os.PathLike,
           work_tar: str | os.PathLike, prefix: str = PREFIX) -> dict:
    """The bundle of this balanced folder in S3, packed and uploaded only when it is not there yet."""
    from botocore.exceptions import ClientError

    key = content_key(balanced_dir)
    obj = f"{prefix.strip('/')}/{key}.tar"
    try:
        head = client.head_object(Bucket=bucket, Key=obj)
        sha = (head.get("Metadata") or {}).get("sha256")
        if sha:
            return {"uri": f"s3://{bucket}/{obj}", "sha256": sha, "bytes": int(head["ContentLength"]),
                    "uploaded": False}
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
            raise
    tar, sha = pack(balanced_dir, clean_dir, work_tar)
    try:
        return publish(client, bucket, tar, sha, key=key, prefix=prefix)
    finally:
        Path(tar).unlink(missing_ok=True)


def fetch(client, uri: str, sha256: str, dst: str | os.PathLike) -> tuple[Path, Path]:
    """Download and unpack a bundle into ``dst/<sha256>/``: ``(balanced_dir, clean_dir)``. A folder
    unpacked before (marker file) is reused; a download whose sha256 differs raises ValueError."""
    if not uri.startswith("s3://"):
        raise ValueError(f"dataset bundle URI must be s3://bucket/key, got {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    root = Path(dst) / sha256
    if (root / ".complete").is_file():
        return root / "balanced", root / "clean"
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as td:
        tar_path = Path(td) / "bundle.tar"
        client.download_file(bucket, key, str(tar_path))
        got = file_sha256(tar_path)
        if got != sha256:
            raise ValueError(f"{uri}: sha256 {got[:12]} does not match the expected {sha256[:12]}")
        out = Path(td) / "x"
        out.mkdir()
        with tarfile.open(tar_path) as tar:
            tar.extractall(out, filter="data")  # refuses absolute paths, '..', links out of the folder
        (out / ".complete").write_text(sha256)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(out, root)
    return root / "balanced", root / "clean"

"""The balanced training set as one content-addressed object in S3, for training on another machine.

The ``balanced_dataset`` asset writes ``data/balanced`` (parquet rows pointing into ``data/clean``) on
the Dagster machine. A training process elsewhere (Dagster Pipes subprocess with its own working
directory, a Kubernetes pod on a GPU node) cannot open those paths, so the asset also packs what the
training set references into one deterministic tar::

    balanced/train.parquet, balanced/val.parquet, balanced/params.json
    clean/images/<sku>/<file>            only the images the two frames reference

uploads it once to ``s3://<bucket>/artifacts/datasets/<sha256>.tar`` (a second run with the same data
finds it and uploads nothing) and passes ``{uri, sha256}`` on. :func:`fetch` downloads, verifies the
sha256 and unpacks it (refusing any member that would land outside the target folder).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

__all__ = ["PREFIX", "fetch", "pack", "publish"]

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
    h = hashlib.sha256()
    with open(tmp, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    os.replace(tmp, out)
    return out, h.hexdigest()


def publish(client, bucket: str, tar_path: str | os.PathLike, sha256: str, prefix: str = PREFIX) -> dict:
    """Upload the tar under its sha256 unless an object of that name and size is there: ``{uri, sha256, bytes, uploaded}``."""
    from skulens.s3 import object_exists

    key = f"{prefix.strip('/')}/{sha256}.tar"
    size = Path(tar_path).stat().st_size
    uploaded = False
    if not object_exists(client, bucket, key) or int(client.head_object(Bucket=bucket, Key=key)["ContentLength"]) != size:
        client.upload_file(str(tar_path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}})
        uploaded = True
    return {"uri": f"s3://{bucket}/{key}", "sha256": sha256, "bytes": size, "uploaded": uploaded}


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
        h = hashlib.sha256()
        with open(tar_path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != sha256:
            raise ValueError(f"{uri}: sha256 {h.hexdigest()[:12]} does not match the expected {sha256[:12]}")
        out = Path(td) / "x"
        out.mkdir()
        with tarfile.open(tar_path) as tar:
            tar.extractall(out, filter="data")  # refuses absolute paths, '..', links out of the folder
        (out / ".complete").write_text(sha256)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(out, root)
    return root / "balanced", root / "clean"

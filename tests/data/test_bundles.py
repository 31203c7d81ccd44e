"""The training-set bundle on real S3: packed and uploaded once per content, verified and unpacked safely."""

from __future__ import annotations

import io
import tarfile

import pandas as pd
import pytest
from PIL import Image

from skulens.data import bundles, layout


def _balanced(tmp_path):
    clean = tmp_path / "clean"
    rows = []
    for i in range(3):
        p = clean / "images" / f"SKU{i}" / "a.png"
        p.parent.mkdir(parents=True)
        Image.new("RGB", (40, 40), (i * 60, 10, 10)).save(p)
        rows.append({"sku": f"SKU{i}", "clean_path": str(p), "sha256": f"{i}" * 64})
    df = pd.DataFrame(rows)
    layout.write_balanced(df, df.iloc[:1], clean, tmp_path / "balanced", {"depth": 1})
    return tmp_path / "balanced", clean


def test_ensure_packs_once_and_fetch_checks(s3, tmp_path):
    bucket = s3.new_bucket("bundle")
    balanced, clean = _balanced(tmp_path)
    first = bundles.ensure(s3.client(), bucket, balanced, clean, tmp_path / "work" / "b.tar")
    assert first["uploaded"] and first["uri"].endswith(f"/{bundles.content_key(balanced)}.tar")
    assert not (tmp_path / "work" / "b.tar").exists()  # the local tar is not kept
    again = bundles.ensure(s3.client(), bucket, balanced, clean, tmp_path / "work" / "b.tar")
    assert not again["uploaded"] and again["sha256"] == first["sha256"]  # same content: nothing packed or sent
    b2, c2 = bundles.fetch(s3.client(), first["uri"], first["sha256"], tmp_path / "remote")
    tr, _ = layout.read_balanced(b2, c2)
    assert sorted(tr["sku"]) == ["SKU0", "SKU1", "SKU2"] and all(open(p, "rb").read(4) for p in tr["clean_path"])
    with pytest.raises(ValueError, match="does not match"):
        bundles.fetch(s3.client(), first["uri"], "0" * 64, tmp_path / "remote2")


def test_fetch_refuses_members_outside_the_folder(s3, tmp_path):
    import hashlib

    bucket = s3.new_bucket("bundle")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    data = buf.getvalue()
    s3.client().put_object(Bucket=bucket, Key="artifacts/datasets/evil.tar", Body=data)
    with pytest.raises(tarfile.TarError):
        bundles.fetch(s3.client(), f"s3://{bucket}/artifacts/datasets/evil.tar", hashlib.sha256(data).hexdigest(),
                      tmp_path / "remote")
    assert not (tmp_path / "escape.txt").exists()

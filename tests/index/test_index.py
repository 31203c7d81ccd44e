"""SkuIndex: search correctness, updates, .npz without pickle, atomic publishing on a real S3."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
import zipfile

import numpy as np
import pytest

from skulens.index.publish import (
    NoIndexPublished,
    list_versions,
    load_current,
    load_version,
    pointer_etag,
    publish_index,
    read_pointer,
)
from skulens.index.sku_index import IndexIntegrityError, SkuIndex


def _rand_index(n_skus=20, per_sku=3, dim=16, seed=0, tag="s", model_version="1"):
    rng = np.random.default_rng(seed)
    skus = [f"{tag}{i:03d}" for i in range(n_skus) for _ in range(per_sku)]
    keys = [f"catalog/images/{s}/{j}.jpg" for i, s in enumerate(skus) for j in [i % per_sku]]
    return SkuIndex(rng.normal(size=(len(skus), dim)), skus, keys, model_version=model_version)


def _brute_force(index: SkuIndex, q: np.ndarray, k: int):
    q = q / np.linalg.norm(q)
    best: dict[str, float] = {}
    for v, s in zip(index.vectors, index.skus):
        best[s] = max(best.get(s, -9.0), float(v @ q))
    return sorted(best.items(), key=lambda t: (-t[1], t[0]))[:k]


def test_vectors_are_normalised_and_meta_filled():
    idx = _rand_index()
    assert idx.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(idx.vectors, axis=1), 1.0, atol=1e-5)
    assert idx.meta["count"] == 60 and idx.meta["embed_dim"] == 16 and idx.meta["n_skus"] == 20
    assert idx.meta["created_at"].endswith("Z")
    with pytest.raises(ValueError):
        SkuIndex(np.zeros((3, 4)), ["a", "b"], ["k1", "k2"])
    with pytest.raises(ValueError):
        SkuIndex(np.full((1, 4), np.nan), ["a"], ["k"])


def test_search_matches_brute_force_and_aggregates_by_sku():
    idx = _rand_index(n_skus=30, per_sku=4, dim=24, seed=1)
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(25, 24)).astype(np.float32)
    res = idx.search(queries, k=5)
    assert len(res) == 25
    for q, r in zip(queries, res):
        exp = _brute_force(idx, q, 5)
        assert [s for s, _ in r] == [s for s, _ in exp]
        np.testing.assert_allclose([sc for _, sc in r], [sc for _, sc in exp], atol=1e-5)
        assert len({s for s, _ in r}) == 5  # each SKU at most once

    # a stored row is its own best match with cosine 1, and only once although the SKU has 4 rows
    one = idx.search(idx.vectors[7], k=3)[0]
    assert one[0][0] == idx.skus[7] and one[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for s, _ in one].count(idx.skus[7]) == 1


def test_search_k_larger_than_skus_and_chunking():
    idx = _rand_index(n_skus=3, per_sku=2, dim=8)
    r = idx.search(np.ones(8), k=10)[0]
    assert sorted(s for s, _ in r) == ["s000", "s001", "s002"]
    assert [sc for _, sc in r] == sorted((sc for _, sc in r), reverse=True)
    q = np.random.default_rng(3).normal(size=(7, 8))
    a, b = idx.search(q, k=2, chunk=2), idx.search(q, k=2, chunk=1000)
    assert [[s for s, _ in r] for r in a] == [[s for s, _ in r] for r in b]
    np.testing.assert_allclose([[x for _, x in r] for r in a], [[x for _, x in r] for r in b], atol=1e-6)
    with pytest.raises(ValueError):
        idx.search(np.ones(9))
    empty = SkuIndex(np.zeros((0, 8)), [], [])
    assert empty.search(np.ones((2, 8))) == [[], []]


def test_with_updates_replaces_and_removes_skus():
    idx = _rand_index(n_skus=5, per_sku=2, dim=8, seed=4)
    new = np.random.default_rng(5).normal(size=(3, 8))
    up = idx.with_updates(new, ["s001", "s001", "new1"], ["n/a.jpg", "n/b.jpg", "n/c.jpg"], remove_skus=["s004"])
    assert len(idx) == 10  # original untouched
    assert sorted(set(up.skus)) == ["new1", "s000", "s001", "s002", "s003"]
    assert list(up.keys[up.skus == "s001"]) == ["n/a.jpg", "n/b.jpg"]  # old s001 rows replaced
    assert (up.skus == "s000").sum() == 2 and len(up) == 2 + 2 + 2 + 2 + 1
    np.testing.assert_allclose(up.vectors[up.skus == "s000"], idx.vectors[idx.skus == "s000"])
    assert up.search(new[2], k=1)[0][0][0] == "new1"
    assert up.meta["parent_content_hash"] == idx.content_hash()
    assert "s004" not in {s for s, _ in up.search(idx.vectors[idx.skus == "s004"][0], k=10)[0]}
    with pytest.raises(ValueError):
        idx.with_updates(new[:1], ["x"], ["k"], model_version="2")
    only_remove = idx.with_updates(remove_skus=["s000"])
    assert "s000" not in set(only_remove.skus) and len(only_remove) == 8


def test_npz_round_trip_without_pickle(tmp_path):
    idx = SkuIndex(np.random.default_rng(6).normal(size=(4, 5)), ["café-1", "a", "a", "0042"],
                   ["catalog/images/café-1/ü.jpg", "k1", "k2", "k3"], model_version="7",
                   meta={"variant": "retailklip", "n_aug": 2})
    p = idx.save(tmp_path / "sub" / "idx.npz")
    with np.load(p, allow_pickle=False) as z:  # plain arrays only: loads without pickle
        assert set(z.files) == {"vectors", "skus", "keys", "ids", "meta"}  # below the ANN threshold: no structure
        assert z["skus"].dtype.kind == "U" and z["keys"].dtype.kind == "U" and z["vectors"].dtype == np.float32
        assert z["ids"].dtype == np.int64
    with zipfile.ZipFile(p) as zf:
        assert all(not n.endswith(".pkl") for n in zf.namelist())
    back = SkuIndex.load(p)
    np.testing.assert_array_equal(back.vectors, idx.vectors)
    assert list(back.skus) == ["0042", "a", "a", "café-1"]  # grouped by SKU; leading zeros kept
    assert list(back.keys) == list(idx.keys) == ["k3", "k1", "k2", "catalog/images/café-1/ü.jpg"]
    assert back.model_version == "7" and back.meta["variant"] == "retailklip"
    assert back.meta["created_at"] == idx.meta["created_at"]
    assert back.content_hash() == idx.content_hash()
    assert SkuIndex.from_bytes(idx.to_bytes()).search(idx.vectors[0]) == idx.search(idx.vectors[0])
    assert not list(tmp_path.joinpath("sub").glob(".tmp-*"))  # atomic write left no temp file
    # an object array would need pickle: refused
    bad = tmp_path / "bad.npz"
    np.savez(bad, vectors=np.zeros((1, 2), np.float32), skus=np.array([{"x": 1}], dtype=object),
             keys=np.array(["k"]), meta=np.array("{}"))
    with pytest.raises(ValueError):
        SkuIndex.load(bad)


# ---------------------------------------------------------------------------------- real S3
@pytest.fixture
def prefix():
    return f"test-index-{uuid.uuid4().hex[:8]}"


def test_publish_and_load_current(s3, prefix, tmp_path):
    client = s3.client()
    with pytest.raises(NoIndexPublished):
        load_current(client, s3.bucket, prefix)
    assert read_pointer(client, s3.bucket, prefix) is None and pointer_etag(client, s3.bucket, prefix) is None

    idx = _rand_index(model_version="3")
    v1 = publish_index(client, s3.bucket, idx, prefix=prefix)
    ptr = read_pointer(client, s3.bucket, prefix)
    assert ptr["version"] == v1 and ptr["key"] == f"{prefix}/versions/{v1}.npz"
    assert ptr["model_version"] == "3" and ptr["count"] == 60 and ptr["previous"] is None
    data = client.get_object(Bucket=s3.bucket, Key=ptr["key"])["Body"].read()
    assert hashlib.sha256(data).hexdigest() == ptr["sha256"]

    got, _ = load_current(client, s3.bucket, prefix, cache_dir=tmp_path)
    np.testing.assert_array_equal(got.vectors, idx.vectors)
    assert (tmp_path / f"{v1}.npz").exists()
    # a corrupted cache file is detected by sha256 and replaced by a fresh download
    (tmp_path / f"{v1}.npz").write_bytes(b"garbage")
    got2, _ = load_current(client, s3.bucket, prefix, cache_dir=tmp_path)
    assert got2.content_hash() == idx.content_hash()

    # a pointer whose sha256 does not match the object is refused
    with pytest.raises(IndexIntegrityError):
        load_version(client, s3.bucket, {**ptr, "sha256": "0" * 64, "version": "other"})

    v2 = publish_index(client, s3.bucket, idx.with_updates(remove_skus=["s000"]), prefix=prefix)
    assert v2 > v1 and read_pointer(client, s3.bucket, prefix)["previous"] == v1
    vs = list_versions(client, s3.bucket, prefix)
    assert [v["version"] for v in vs] == [v1, v2] and [v["current"] for v in vs] == [False, True]


def test_reader_never_sees_partial_index_during_publishes(s3, prefix):
    """A reader polling CURRENT.json while versions are published always gets a complete index whose
    sha256 matches the pointer, and every old version stays in the bucket."""
    client = s3.client()
    gens = 6
    # generation g: (g+1)*40 rows of 32 dims, every SKU tagged with g -> a mix would be detected
    indexes = [_rand_index(n_skus=(g + 1) * 20, per_sku=2, dim=32, seed=g, tag=f"g{g}-") for g in range(gens)]
    publish_index(client, s3.bucket, indexes[0], prefix=prefix, verify="size")

    seen, errors = [], []
    stop = threading.Event()

    def reader():
        rc = s3.client()
        while not stop.is_set():
            try:
                idx, ptr = load_current(rc, s3.bucket, prefix)  # verifies sha256 against the pointer
                g = int(idx.skus[0].split("-")[0][1:])
                assert all(s.startswith(f"g{g}-") for s in idx.skus), "mixed generations"
                assert len(idx) == ptr["count"] == (g + 1) * 40
                assert idx.content_hash() == indexes[g].content_hash() == ptr["content_hash"]
                seen.append(ptr["version"])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    versions = []
    try:
        for g in range(1, gens):
            versions.append(publish_index(client, s3.bucket, indexes[g], prefix=prefix))
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors[:3]
    assert len(seen) >= 5 and len(set(seen)) >= 2
    listed = list_versions(client, s3.bucket, prefix)
    assert len(listed) == gens  # history kept: nothing deleted or overwritten
    assert all(client.head_object(Bucket=s3.bucket, Key=v["key"])["ContentLength"] > 0 for v in listed)
    assert read_pointer(client, s3.bucket, prefix)["version"] == versions[-1] == listed[-1]["version"]


def test_content_hash_of_empty_and_loaded_indexes():
    empty = SkuIndex(np.zeros((0, 8)), [], [])
    assert empty.content_hash() == SkuIndex.from_bytes(empty.to_bytes()).content_hash()
    idx = _rand_index()
    h = hashlib.sha256()  # the documented recipe: shape, vector bytes, skus, keys, model version
    h.update(str(idx.vectors.shape).encode())
    h.update(idx.vectors.tobytes())
    for arr in (idx.skus, idx.keys):
        h.update("\x1f".join(arr.tolist()).encode("utf-8"))
        h.update(b"\x1e")
    h.update(str(idx.model_version).encode())
    assert idx.content_hash() == h.hexdigest()

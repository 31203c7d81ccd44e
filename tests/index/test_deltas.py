"""Delta publishing on the real S3 (SeaweedFS): a chain of small deltas behind the same compare-and-swap
pointer, readers that apply only the deltas they lack, compaction into a full version, racing publishers,
delisted SKUs gone for good, and a reader that predates deltas failing clearly."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from skulens.index import publish as P
from skulens.index.sku_index import SkuIndex

DIM = 16


def _rows(sku: str, n: int = 2, seed: int = 0):
    rng = np.random.default_rng(abs(hash((sku, seed))) % 2**32)
    return rng.normal(size=(n, DIM)), [sku] * n, [f"catalog/images/{sku}/{j}.jpg" for j in range(n)]


def _index(skus, model_version="1") -> SkuIndex:
    vs, ss, ks = [], [], []
    for s in skus:
        v, sk, k = _rows(s)
        vs.append(v), ss.extend(sk), ks.extend(k)
    return SkuIndex(np.concatenate(vs), ss, ks, model_version=model_version,
                    meta={"sources": {f"catalog/images/{s}/{j}.jpg": f"e-{s}" for s in skus for j in range(2)}})


def _change(index: SkuIndex, add=(), remove=(), seed=1) -> SkuIndex:
    """What index_update does: replace/add SKUs' rows, drop SKUs, update the meta (sources)."""
    vs, ss, ks = [], [], []
    for s in add:
        v, sk, k = _rows(s, seed=seed)
        vs.append(v), ss.extend(sk), ks.extend(k)
    new = index.with_updates(np.concatenate(vs) if vs else None, ss, ks, remove_skus=list(remove))
    src = {k: e for k, e in (index.meta.get("sources") or {}).items() if k.split("/")[2] not in set(add) | set(remove)}
    src.update({k: f"e-{k}-{seed}" for k in ks})
    new.meta["sources"] = src
    return new


def _same(a: SkuIndex, b: SkuIndex) -> None:
    """Same rows and meta; vectors equal to float32 rounding (with_updates re-normalises the rows it adds)."""
    assert (a.skus == b.skus).all() and (a.keys == b.keys).all()
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
    assert a.meta["sources"] == b.meta["sources"]


class Counting:
    """The real S3 client, recording which keys were downloaded (GET)."""

    def __init__(self, client):
        self._c, self.gets = client, []

    def get_object(self, **kw):
        self.gets.append(kw["Key"])
        return self._c.get_object(**kw)

    def __getattr__(self, name):
        return getattr(self._c, name)


@pytest.fixture
def prefix():
    P._MEMO.clear()  # each test starts like a fresh process
    return f"delta-{uuid.uuid4().hex[:8]}"


def _publish(client, bucket, prefix, change, **kw):
    kw.setdefault("max_delta_ratio", 100)  # these indexes are tiny: a delta is as big as the base
    return P.publish_with_retry(client, bucket, lambda base: change(base.index), prefix=prefix, deltas=True, **kw)


def test_delta_chain_round_trip_and_reader_applies_only_new_deltas(s3, prefix, tmp_path):
    client = s3.client()
    first = _index(["a", "b", "c"])
    out = _publish(client, s3.bucket, prefix, lambda _: first)
    assert out["published"] and out["mode"] == "full"  # nothing to chain on: a full version
    base_key = out["key"]

    reader = Counting(s3.client())
    have = P.read_pointer(reader, s3.bucket, prefix)
    index, info = P.advance(reader, s3.bucket, None, None, have, tmp_path / "r")
    assert info["mode"] == "full" and base_key in reader.gets

    expected = first
    for step, (add, remove) in enumerate([(["d"], []), (["b"], []), ([], ["c"]), (["e", "c"], ["a"])]):
        expected = _change(expected, add, remove, seed=step + 2)
        out = _publish(client, s3.bucket, prefix, lambda idx, a=add, r=remove, s=step: _change(idx, a, r, seed=s + 2))
        assert out["published"] and out["mode"] == "delta", out
    pointer = P.read_pointer(client, s3.bucket, prefix)
    base, deltas = P.chain_of(pointer)
    assert pointer["format"] == 2 and base["key"] == base_key and len(deltas) == 4
    assert [d["parent"] for d in deltas[1:]] == [d["version"] for d in deltas[:-1]]
    assert pointer["content_hash"] == deltas[-1]["content_hash"]

    # the reader that has the base downloads the four deltas and not the base again
    reader.gets.clear()
    index, info = P.advance(reader, s3.bucket, have, index, pointer, tmp_path / "r")
    assert info == {"mode": "deltas", "deltas": 4, "bytes": sum(d["size"] for d in deltas)}
    assert reader.gets == [d["key"] for d in deltas]
    _same(index, expected)
    assert index.content_hash() == pointer["content_hash"]  # the pointer says what every reader rebuilds
    assert sorted(index.sku_list) == ["b", "c", "d", "e"]
    # a fresh reader loads base + chain; a second load reuses the cached files
    fresh, _ = P.load_current(client, s3.bucket, prefix, tmp_path / "fresh")
    _same(fresh, expected)
    assert fresh.content_hash() == pointer["content_hash"]
    again = Counting(s3.client())
    P.load_version(again, s3.bucket, pointer, tmp_path / "fresh")
    assert again.gets == []
    # every delta and its manifest stay as history next to the base
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}/deltas/")["Contents"]}
    assert {d["key"] for d in deltas} <= keys and len(keys) == 8


def test_a_delisted_sku_removed_by_a_delta_is_never_returned(s3, prefix, tmp_path):
    client = s3.client()
    _publish(client, s3.bucket, prefix, lambda _: _index(["keep", "gone", "other"]))
    have = P.read_pointer(client, s3.bucket, prefix)
    index, _ = P.load_current(client, s3.bucket, prefix, tmp_path / "r")
    probe = index.vectors[index.skus == "gone"][0]
    assert index.search(probe, k=1)[0][0][0] == "gone"

    out = _publish(client, s3.bucket, prefix, lambda idx: _change(idx, remove=["gone"]))
    assert out["mode"] == "delta" and P.chain_of(out)[1][-1]["removed_skus"] == 1
    pointer = P.read_pointer(client, s3.bucket, prefix)
    for got in (P.advance(client, s3.bucket, have, index, pointer, tmp_path / "r")[0],
                P.load_current(client, s3.bucket, prefix, tmp_path / "x")[0]):
        assert "gone" not in got.sku_list
        assert all(s != "gone" for hits in got.search(np.vstack([probe, -probe]), k=3) for s, _ in hits)
        assert not any(k.startswith("catalog/images/gone/") for k in got.meta["sources"])


def test_two_delta_publishers_at_once_both_land_in_one_chain(s3, prefix):
    """Publishers start from the same pointer and each add one SKU as a delta; the losers of the
    compare-and-swap rebase onto the winner's chain, so the chain ends up with every SKU."""
    client = s3.client()
    _publish(client, s3.bucket, prefix, lambda _: _index(["x"]))
    start = P.read_pointer(client, s3.bucket, prefix)
    n = 3
    barrier = threading.Barrier(n)
    results, errors = {}, []

    def worker(i):
        try:
            c = s3.client()

            def make(base):
                idx = base.index
                if base.attempt == 0:
                    barrier.wait(timeout=30)
                return _change(idx, add=[f"n{i}"], seed=10 + i)

            results[i] = P.publish_with_retry(c, s3.bucket, make, prefix=prefix, start=start, deltas=True,
                                              attempts=10, backoff=0.05, max_delta_ratio=100)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert not errors, errors
    assert all(r["published"] and r["mode"] == "delta" for r in results.values())
    assert sum(len(r["conflicts"]) for r in results.values()) >= n - 1  # all started from one pointer
    pointer = P.read_pointer(client, s3.bucket, prefix)
    base, deltas = P.chain_of(pointer)
    assert base["version"] == start["version"] and len(deltas) == n
    P._MEMO.clear()
    final, _ = P.load_current(client, s3.bucket, prefix)
    assert sorted(final.sku_list) == ["n0", "n1", "n2", "x"]
    assert final.content_hash() == pointer["content_hash"]


def test_compaction_writes_a_full_version_and_readers_follow(s3, prefix, tmp_path):
    client = s3.client()
    _publish(client, s3.bucket, prefix, lambda _: _index(["a", "b"]))
    have = P.read_pointer(client, s3.bucket, prefix)
    index, _ = P.load_current(client, s3.bucket, prefix, tmp_path / "r")
    modes = [_publish(client, s3.bucket, prefix, lambda idx, i=i: _change(idx, add=[f"s{i}"], seed=i),
                      max_deltas=2)
             for i in range(3)]
    assert [m["mode"] for m in modes] == ["delta", "delta", "full"]
    assert "max 2" in modes[2]["compacted"]
    pointer = P.read_pointer(client, s3.bucket, prefix)
    assert pointer["deltas"] == [] and pointer["previous"] == modes[1]["version"]
    got, info = P.advance(client, s3.bucket, have, index, pointer, tmp_path / "r")
    assert info["mode"] == "full" and sorted(got.sku_list) == ["a", "b", "s0", "s1", "s2"]
    # the size rule: a delta bigger than the allowed share of the base compacts at once
    out = _publish(client, s3.bucket, prefix, lambda idx: _change(idx, add=["big"], seed=9), max_delta_ratio=0.01)
    assert out["mode"] == "full" and "of the base" in out["compacted"]
    # a model change is never a delta
    out = _publish(client, s3.bucket, prefix, lambda idx: _index(["a"], model_version="2"))
    assert out["mode"] == "full" and "not a per-SKU delta" in out["compacted"]


def test_a_reader_that_predates_deltas_fails_clearly(s3, prefix):
    client = s3.client()
    _publish(client, s3.bucket, prefix, lambda _: _index(["a"]))
    _publish(client, s3.bucket, prefix, lambda idx: _change(idx, add=["b"]))
    pointer = P.read_pointer(client, s3.bucket, prefix)
    # format-1 readers load pointer["key"] as an index file: it names the newest delta, which is not one
    data = client.get_object(Bucket=s3.bucket, Key=pointer["key"])["Body"].read()
    with pytest.raises(ValueError, match="not a skulens index file"):
        SkuIndex.from_bytes(data)
    with pytest.raises(ValueError, match="not a skulens index delta"):
        P.Delta.from_bytes(_index(["a"]).to_bytes())


def test_make_delta_refuses_what_only_a_full_version_can_say():
    a = _index(["a", "b"])
    assert P.make_delta(a, _index(["a", "b"], model_version="2")) is None
    same = P.make_delta(a, a)
    assert same is not None and same.remove == [] and len(same.skus) == 0
    b = _change(a, add=["c"], remove=["a"])
    d = P.make_delta(a, b)
    assert d.replaced == ["c"] and d.remove == ["a"]
    applied = P.apply_deltas(a, [d])
    assert sorted(applied.sku_list) == ["b", "c"] and applied.meta == b.meta
    np.testing.assert_allclose(applied.vectors, b.vectors, atol=1e-6)  # with_updates re-normalises added rows
    assert (applied.keys == b.keys).all()


def test_recognizer_reload_applies_deltas_without_downloading_the_base(s3, prefix, tmp_path):
    from skulens.model.factory import ModelSpec, create_encoder
    from skulens.serving.recognize import Recognizer

    client = s3.client()
    _publish(client, s3.bucket, prefix, lambda _: _index(["a", "b"]))
    base_key = P.read_pointer(client, s3.bucket, prefix)["key"]
    reader = Counting(s3.client())
    enc = create_encoder(ModelSpec(name="tiny-test", embed_dim=DIM))
    rec = Recognizer.from_s3(enc, reader, s3.bucket, prefix=prefix, cache_dir=tmp_path / "rec", products_key=None,
                             model_version="1", reload_interval_s=0.0)
    assert base_key in reader.gets and not rec.maybe_reload(force=True)  # nothing new: one HEAD, no download

    _publish(client, s3.bucket, prefix, lambda idx: _change(idx, add=["new"]))
    reader.gets.clear()
    assert rec.maybe_reload(force=True)
    pointer = P.read_pointer(client, s3.bucket, prefix)
    assert rec.index_version == pointer["version"] and "new" in rec.index.sku_list
    assert base_key not in reader.gets and pointer["deltas"][-1]["key"] in reader.gets
    probe = rec.index.vectors[rec.index.skus == "new"][0]
    assert rec.index.search(probe, k=1)[0][0][0] == "new"

    _publish(client, s3.bucket, prefix, lambda idx: _change(idx, remove=["new"]))
    reader.gets.clear()
    assert rec.maybe_reload(force=True)
    assert "new" not in rec.index.sku_list and base_key not in reader.gets
    assert all(s != "new" for s, _ in rec.index.search(probe, k=3)[0])
    assert rec.index.content_hash() == P.read_pointer(client, s3.bucket, prefix)["content_hash"]

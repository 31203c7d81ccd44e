"""The ANN layer of SkuIndex (FAISS HNSW / IVF above a size threshold), forced on a few thousand rows
by a low threshold: recall against exact search, incremental add/remove with stable ids, the
structure kept through to_bytes/from_bytes, stale structures rebuilt, format-1 files still loading."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest

from skulens.index.ann import AnnConfig, AnnIndex
from skulens.index.sku_index import FORMAT_VERSION, SkuIndex

DIM = 32


def _clustered(n_skus=400, per_sku=6, dim=DIM, noise=0.12, seed=0, tag="s"):
    """SKU centres + per-image noise: rows of one SKU are close, SKUs are apart (like embeddings)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n_skus, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    v = np.repeat(c, per_sku, axis=0) + noise * rng.normal(size=(n_skus * per_sku, dim))
    skus = [f"{tag}{i:04d}" for i in range(n_skus) for _ in range(per_sku)]
    keys = [f"catalog/images/{s}/{j % per_sku}.jpg" for j, s in enumerate(skus)]
    return c, v, skus, keys


def _index(kind="hnsw", threshold=1000, **kw):
    c, v, skus, keys = _clustered(**kw)
    # ivfpq scans every list of the toy index here (its default, a quarter of the lists, finds the best
    # row of the top SKU for 95% of these queries; recall at scale is bench_index.py's job)
    extra = {"pq_nprobe": 32} if kind == "ivfpq" else {}
    return c, SkuIndex(v, skus, keys, model_version="1", ann=AnnConfig(kind=kind, threshold=threshold, **extra))


def _queries(c, n=300, noise=0.15, seed=1):
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(c), size=n)
    return c[pick] + noise * rng.normal(size=(n, c.shape[1]))


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_ann_search_agrees_with_exact_and_scores_are_exact(kind):
    c, idx = _index(kind)
    assert len(idx) == 2400 and idx.uses_ann and idx.ann_index is None  # built on first use
    q = _queries(c)
    got, exact = idx.search(q, k=3), idx.search_exact(q, k=3)
    assert idx.ann_index is not None and idx.ann_index.ntotal == len(idx)
    top1 = np.mean([g[0][0] == e[0][0] for g, e in zip(got, exact)])
    assert top1 >= 0.99, top1
    for g, e in zip(got, exact):
        assert len(g) == 3 and len({s for s, _ in g}) == 3  # k distinct SKUs
        if g[0][0] == e[0][0]:
            assert g[0][1] == pytest.approx(e[0][1], abs=1e-5)  # re-scored exactly, not fp16 scores
    # a stored row finds its own SKU at cosine 1, once
    one = idx.search(idx.vectors[123], k=5)[0]
    assert one[0] == (idx.skus[123], pytest.approx(1.0, abs=1e-5))
    assert [s for s, _ in one].count(idx.skus[123]) == 1
    # k larger than the candidates fetched: widened until k distinct SKUs are found
    wide = idx.search(q[:3], k=50)
    assert all(len({s for s, _ in r}) == 50 for r in wide)


def test_below_threshold_and_exact_kind_never_build(monkeypatch):
    _, small = _index(threshold=10_000)
    assert not small.uses_ann
    small.search(small.vectors[:2], k=2)
    assert small.ann_index is None
    _, exact = _index(kind="exact", threshold=1)
    exact.search(exact.vectors[:2], k=2)
    assert exact.ann_index is None and not exact.uses_ann
    # environment knobs: threshold and kind for indexes built or loaded without an explicit config
    monkeypatch.setenv("SKULENS_ANN_THRESHOLD", "500")
    monkeypatch.setenv("SKULENS_ANN_KIND", "ivf")
    _, v, skus, keys = _clustered(n_skus=100, per_sku=6)
    env_idx = SkuIndex(v, skus, keys)
    assert env_idx.ann.threshold == 500 and env_idx.ann.kind == "ivf" and env_idx.uses_ann
    with pytest.raises(ValueError):
        AnnConfig(kind="lsh")


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_with_updates_is_incremental_with_stable_ids(kind):
    c, idx = _index(kind)
    idx.ensure_ann()
    parent_ann, parent_total = idx.ann_index, idx.ann_index.ntotal
    id_of = {(s, k): i for s, k, i in zip(idx.skus, idx.keys, idx.ids)}
    rng = np.random.default_rng(7)
    new_c = rng.normal(size=(2, DIM))
    new = np.concatenate([np.repeat(new_c, 3, axis=0) + 0.05 * rng.normal(size=(6, DIM))])
    new_skus = ["s0001"] * 3 + ["n-new"] * 3  # s0001 replaced, n-new added
    removed = ["s0002", "s0399"]
    up = idx.with_updates(new, new_skus, [f"new/{i}.jpg" for i in range(6)], remove_skus=removed)

    # the parent is untouched; the child got the parent's structure updated, not a rebuild
    assert idx.ann_index is parent_ann and parent_ann.ntotal == parent_total and len(idx) == 2400
    assert up.ann_index is not None and up.ann_index is not parent_ann
    dropped = 3 * 6  # s0001, s0002, s0399 rows
    assert len(up) == 2400 - dropped + 6
    if kind == "hnsw":  # HNSW cannot delete: tombstones, skipped at search time
        assert up.ann_index.ntotal == parent_total + 6 and up.ann_index.tombstones.size == dropped
    else:  # IVF removes natively
        assert up.ann_index.ntotal == len(up) and up.ann_index.tombstones.size == 0
    assert np.array_equal(up.ann_index.live_ids(), np.sort(up.ids))

    # kept rows keep their ids (rows were re-sorted by SKU); new rows get ids never used before
    for s, k, i in zip(up.skus, up.keys, up.ids):
        if not k.startswith("new/"):
            assert id_of[(s, k)] == i
    fresh = up.ids[np.char.startswith(up.keys.astype(str), "new/")]
    assert fresh.min() > idx.ids.max() and up.meta["next_id"] == idx.ids.max() + 7

    # removed and replaced rows are never returned, even for queries sitting on them
    for sku in removed:
        for r in up.search(idx.vectors[idx.skus == sku], k=10):
            assert sku not in {s for s, _ in r}
    old_s0001 = idx.vectors[idx.skus == "s0001"]
    for r in up.search(old_s0001, k=10):
        for s, score in r:
            if s == "s0001":  # only its new rows can match now: the score is a new row's cosine
                assert score < 0.999
    assert all(r[0][0] == "n-new" for r in up.search(new[3:], k=1))
    assert all(r[0][0] == "s0001" for r in up.search(new[:3], k=1))

    # a second update on top of the first, then removing ids twice, stays consistent
    up2 = up.with_updates(remove_skus=["n-new"])
    assert "n-new" not in {s for r in up2.search(new[3:], k=5) for s, _ in r}
    assert np.array_equal(up2.ann_index.live_ids(), np.sort(up2.ids))
    # ids of removed rows are never reused, even after the highest id was removed
    up3 = up2.with_updates(new[3:4], ["n-again"], ["new/x.jpg"])
    assert up3.ids[up3.skus == "n-again"][0] > up.ids.max()


def test_hnsw_rebuilds_when_tombstones_exceed_their_share():
    c, idx = _index("hnsw")
    idx.ensure_ann()
    many = sorted(set(idx.skus))[:120]  # 720 of 2400 rows: 30% > 20% tombstones
    up = idx.with_updates(remove_skus=many)
    assert up.ann_index is None and up.uses_ann  # left for a rebuild on first use
    r = up.search(_queries(c, n=20), k=2)
    assert up.ann_index.ntotal == len(up) == 2400 - 720 and up.ann_index.tombstones.size == 0
    assert not ({s for x in r for s, _ in x} & set(many))


def test_update_of_unbuilt_index_builds_lazily():
    c, idx = _index("hnsw")
    up = idx.with_updates(remove_skus=["s0000"])
    assert up.ann_index is None
    assert "s0000" not in {s for s, _ in up.search(idx.vectors[0], k=5)[0]}
    assert up.ann_index.ntotal == len(up)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_round_trip_keeps_the_structure_without_rebuild(kind, tmp_path, monkeypatch):
    if kind == "ivfpq":  # search knobs of a loaded index come from the code/env, not the file
        monkeypatch.setenv("SKULENS_ANN_PQ_NPROBE", "32")
    c, idx = _index(kind)
    up = idx.with_updates(np.ones((1, DIM)), ["n-new"], ["new/0.jpg"], remove_skus=["s0005"])
    data = up.to_bytes()  # builds the structure (to_bytes is what is published)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        assert {"vectors", "skus", "keys", "ids", "meta", "ann_index", "ann_tombstones"} <= set(z.files)
        assert z["ann_index"].dtype == np.uint8
        meta = json.loads(str(z["meta"]))
        assert meta["format_version"] == FORMAT_VERSION == 2 and meta["ann"]["config"]["kind"] == kind

    def no_build(*a, **k):
        raise AssertionError("the stored ANN structure must be used, not rebuilt")

    monkeypatch.setattr(AnnIndex, "build", classmethod(no_build))
    back = SkuIndex.from_bytes(data)
    assert back.ann_index is not None and back.ann.kind == kind and back.ann.threshold == 1000
    assert back.content_hash() == up.content_hash() and np.array_equal(back.ids, up.ids)
    q = _queries(c, n=50)
    assert back.search(q, k=3) == up.search(q, k=3)
    # save/load (streamed to a file) keeps it too, and a loaded index updates incrementally
    loaded = SkuIndex.load(up.save(tmp_path / "idx.npz"))
    assert loaded.ann_index is not None
    again = loaded.with_updates(remove_skus=["s0006"])
    assert again.ann_index is not None and "s0006" not in {s for s, _ in again.search(idx.vectors[36], k=5)[0]}
    # search-time knobs can be changed at load time without a rebuild
    tuned = SkuIndex.from_bytes(data, ann=AnnConfig(kind=kind, threshold=1000, ef_search=128, nprobe=64))
    assert tuned.ann_index is not None and tuned.ann_index.config.ef_search == 128


def test_stale_or_missing_structure_is_rebuilt_with_a_warning(caplog):
    c, a = _index("hnsw")
    _, b = _index("hnsw", seed=3, tag="t")  # same size, different rows and ids
    b = b.with_updates(remove_skus=["t0000"])  # ids 0..5 gone from b
    arrays_a = np.load(io.BytesIO(a.to_bytes()), allow_pickle=False)
    arrays_b = np.load(io.BytesIO(b.to_bytes()), allow_pickle=False)
    # a file whose structure belongs to another index (ids differ): not used, rebuilt
    mixed = {f: arrays_b[f] for f in arrays_b.files}
    mixed["ann_index"], mixed["ann_tombstones"] = arrays_a["ann_index"], arrays_a["ann_tombstones"]
    meta = json.loads(str(mixed["meta"]))
    meta["ann"] = json.loads(str(arrays_a["meta"]))["ann"]
    mixed["meta"] = np.asarray(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **mixed)
    with caplog.at_level(logging.WARNING, logger="skulens.index.sku_index"):
        stale = SkuIndex.from_bytes(buf.getvalue())
    assert stale.ann_index is None and "not used" in caplog.text
    assert stale.search(b.vectors[10], k=1)[0][0][0] == b.skus[10]
    assert stale.ann_index.ntotal == len(b)
    # a corrupt blob: same outcome
    mixed["ann_index"] = np.frombuffer(b"not a faiss index", dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **mixed)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skulens.index.sku_index"):
        corrupt = SkuIndex.from_bytes(buf.getvalue())
    assert corrupt.ann_index is None and "not used" in caplog.text


def test_format_1_file_still_loads_and_builds_on_first_search(tmp_path, caplog, monkeypatch):
    c, v, skus, keys = _clustered()
    norm = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    meta = {"format_version": 1, "model_version": "4", "created_at": "2026-01-01T00:00:00.000000Z",
            "count": len(skus), "embed_dim": DIM, "n_skus": 400}
    p = tmp_path / "old.npz"
    np.savez(p, vectors=norm, skus=np.asarray(skus), keys=np.asarray(keys), meta=np.asarray(json.dumps(meta)))
    monkeypatch.setenv("SKULENS_ANN_THRESHOLD", "1000")
    with caplog.at_level(logging.WARNING, logger="skulens.index.sku_index"):
        old = SkuIndex.load(p)
    assert "no ANN structure" in caplog.text
    assert old.model_version == "4" and np.array_equal(old.ids, np.arange(len(skus)))
    assert old.uses_ann and old.ann_index is None
    assert old.search(norm[50], k=1)[0][0] == (skus[50], pytest.approx(1.0, abs=1e-5))
    assert old.ann_index is not None
    back = SkuIndex.from_bytes(old.to_bytes())  # re-saved as format 2 with the structure
    assert back.ann_index is not None and back.meta["format_version"] == 2
    # a file from newer code is refused
    meta["format_version"] = FORMAT_VERSION + 1
    np.savez(p, vectors=norm, skus=np.asarray(skus), keys=np.asarray(keys), meta=np.asarray(json.dumps(meta)))
    with pytest.raises(ValueError):
        SkuIndex.load(p)


def test_new_ids_never_hit_a_tombstone_even_if_meta_loses_next_id():
    c, idx = _index("hnsw")
    idx.ensure_ann()
    top = idx.skus[idx.ids == idx.ids.max()][0]
    up = idx.with_updates(remove_skus=[top])  # the highest ids become tombstones
    up.meta.pop("next_id")  # e.g. a meta rewritten by a caller
    again = up.with_updates(np.ones((1, DIM)), ["n-x"], ["new/x.jpg"])
    assert again.ids[again.skus == "n-x"][0] > idx.ids.max()
    assert again.search(np.ones(DIM), k=1)[0][0][0] == "n-x"


def test_search_knobs_follow_the_code_and_environment_not_the_file(monkeypatch):
    c, idx = _index("hnsw")
    idx.ann = AnnConfig(kind="hnsw", threshold=1000, ef_search=16, hnsw_m=16)
    data = idx.to_bytes()
    back = SkuIndex.from_bytes(data)
    assert back.ann.hnsw_m == 16 and back.ann.threshold == 1000  # build-time: from the file
    assert back.ann.ef_search == AnnConfig().ef_search == back.ann_index.config.ef_search
    monkeypatch.setenv("SKULENS_ANN_EF_SEARCH", "99")
    tuned = SkuIndex.from_bytes(data)
    assert tuned.ann_index is not None and tuned.ann_index.config.ef_search == 99


def test_ivfpq_fast_scan_proposes_many_candidates_rescored_exactly(monkeypatch):
    from skulens.index.ann import auto_nlist_pq, pq_subquantizers

    assert auto_nlist_pq(100_960) == 1024 and auto_nlist_pq(800_960) == 2048 and auto_nlist_pq(2400) == 32
    assert pq_subquantizers(1280, 256) == 256 and pq_subquantizers(1280, 100) == 80 and pq_subquantizers(32, 256) == 32
    c, v, skus, keys = _clustered(dim=64)
    idx = SkuIndex(v, skus, keys, ann=AnnConfig(kind="ivfpq", threshold=1000, pq_m=16, pq_candidates=100))
    ann = idx.ensure_ann()
    import faiss

    assert isinstance(ann.index, faiss.IndexIVFPQFastScan) and ann.index.by_residual
    assert ann.index.M == 16 and ann.index.nlist == 32 and ann.pq_nprobe == 8  # auto: a quarter of the lists
    assert ann.describe()["pq_m"] == 16 and ann.nbytes() < idx.vectors.nbytes
    # 4-bit codes only rank: the structure returns pq_candidates rows whatever the caller asked for
    assert (ann.search(idx.vectors[:2], 5) >= 0).sum(axis=1).tolist() == [100, 100]
    q = _queries(c)
    got, exact = idx.search(q, k=3), idx.search_exact(q, k=3)
    assert np.mean([g[0][0] == e[0][0] for g, e in zip(got, exact)]) >= 0.95  # toy data, a quarter of 32 lists
    assert all(g[0][1] <= e[0][1] + 1e-5 for g, e in zip(got, exact))  # exact cosines of candidate rows
    # search knobs from the environment reach a loaded structure without a rebuild
    monkeypatch.setenv("SKULENS_ANN_PQ_NPROBE", "32")
    monkeypatch.setenv("SKULENS_ANN_PQ_CANDIDATES", "50")
    back = SkuIndex.from_bytes(idx.to_bytes())
    assert back.ann_index is not None and back.ann_index.pq_nprobe == 32
    assert (back.ann_index.search(idx.vectors[:1], 5) >= 0).sum() == 50
    full = SkuIndex(v, skus, keys, ann=AnnConfig(kind="exact")).search(q[:50], k=3)  # all lists: exact
    assert np.mean([g[0][0] == e[0][0] for g, e in zip(back.search(q[:50], k=3), full)]) >= 0.9


def test_ivfpq_few_queries_split_their_lists_across_threads_with_the_same_candidates(monkeypatch):
    """Fewer than SINGLE_THREAD_BELOW queries: FAISS fast-scan implementation 14 on ``search_threads``
    threads (0: min(2, cores)); batches keep the default implementation. Same candidate rows either way."""
    import faiss

    from skulens.index.ann import FEW_QUERY_IMPLEM, SINGLE_THREAD_BELOW

    c, v, skus, keys = _clustered(dim=64)
    one = SkuIndex(v, skus, keys, ann=AnnConfig(kind="ivfpq", threshold=1000, pq_m=16, search_threads=1))
    ann1 = one.ensure_ann()
    assert ann1.few_query_threads == 1
    two = AnnIndex(ann1.index, AnnConfig.resolve(ann1.config, search_threads=2), ann1.dim)
    assert two.few_query_threads == 2
    q = _queries(c, n=SINGLE_THREAD_BELOW - 1).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    threads_before = faiss.omp_get_max_threads()
    got1 = ann1.search(q, 5)
    assert ann1.index.implem == 0
    got2 = two.search(q, 5)
    assert ann1.index.implem == FEW_QUERY_IMPLEM  # the shared structure: the last caller's choice
    assert faiss.omp_get_max_threads() == threads_before  # the caller's thread count is restored
    assert got1.shape == got2.shape == (len(q), 256)
    # the same candidates but for ties with the last one's PQ score (which of them makes the cut), so a
    # few of 256 at most; the order among equal scores differs too
    assert all(len(set(a) ^ set(b)) <= 4 for a, b in zip(got1, got2))
    two.search(np.repeat(q, 2, axis=0), 5)  # a batch: the default implementation again
    assert two.index.implem == 0
    # the SKU index on the two-thread structure answers as on the one-thread one
    one_results = one.search(q, k=3)
    one._ann = two
    assert one.search(q, k=3) == one_results
    # automatic: at most 2 threads, at least 1; other kinds always search few queries on one thread
    auto = AnnIndex(ann1.index, AnnConfig.resolve(ann1.config, search_threads=0), ann1.dim)
    assert 1 <= auto.few_query_threads <= 2
    assert AnnIndex(ann1.index, AnnConfig(kind="hnsw", search_threads=4), ann1.dim).few_query_threads == 1
    # a knob of serving: the environment reaches a stored index without a rebuild
    monkeypatch.setenv("SKULENS_ANN_SEARCH_THREADS", "3")
    back = SkuIndex.from_bytes(one.to_bytes())
    assert back.ann_index.config.search_threads == 3 and back.ann_index.few_query_threads == 3
    with pytest.raises(ValueError, match="search_threads"):
        AnnConfig(search_threads=-1)


def test_row_lookup_by_id_dense_and_sparse():
    """``_rows_of``: a table by id for dense ids, binary search for sparse ones; unknown ids give -1."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 8)).astype(np.float32)
    skus = ["b", "a", "c", "a", "b", "c"]
    for ids in ([5, 0, 3, 9, 7, 2], [10**12, 4, 7, 2**40, 0, 12]):
        idx = SkuIndex(v, skus, None, ids=np.asarray(ids))
        probe = np.asarray([*idx.ids[::-1], 1, 8, -1, 10**13, 2**40 + 1])
        rows = idx._rows_of(probe)
        assert rows.dtype == np.int64
        assert rows[:6].tolist() == list(range(5, -1, -1))  # each id's own row (rows are sorted by SKU)
        assert rows[6:].tolist() == [-1] * 5
        assert (idx._id_table is not None) is (max(ids) < 1000)  # dense ids: a table by id
    empty = SkuIndex(np.zeros((0, 8), np.float32), [], None)
    assert empty._rows_of(np.asarray([0, 3])).tolist() == [-1, -1]

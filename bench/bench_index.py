"""SKU index at scale: exact numpy vs the FAISS ANN layer (HNSW / IVF) of ``SkuIndex``.

    .venv/bin/python bench/bench_index.py                       # real GroZi set + 100k synthetic
    .venv/bin/python bench/bench_index.py --sizes 100000 800000 # + 800k (HNSW build: minutes)
    .venv/bin/python bench/bench_index.py --sizes 100000 --kinds hnsw ivf --storage fp16 sq8
    .venv/bin/python bench/bench_index.py --sizes 100000 800000 --kinds ivfpq --pq-nprobe 256 512 --queries 300

Vectors. Real: EfficientNet-Lite0 (ImageNet weights, the offline default tower) embeddings of GroZi-120
crops (``--real-per-sku`` per product, evenly spread over each product's frames; embedded once and
cached in ``--cache``). Synthetic, for 100k / 800k rows: a generator calibrated on the real set. It
keeps the real data's mean vector and covariance spectrum (PCA of the real embeddings) and splits the
variance between a per-SKU centre and per-image noise, the split fitted so that the median cosine
between two images of one SKU matches the real one; the real and synthetic intra-SKU, inter-SKU and
nearest-other-SKU cosine quantiles are printed side by side. Queries are fresh images (new noise) of
random SKUs, as a shelf crop is a new view of a catalogued product. The real held-out crops are also
searched against the real gallery planted inside the synthetic scale index.

Figures, per structure: build time, single-query p50/p99 through ``SkuIndex.search`` (one query at a
time, as ``serve`` does, k=5, exact re-scoring and per-SKU aggregation included), recall@1 (the top-1
SKU equals exact search's), recall@5 (same top-5 list), memory (float32 vectors + ANN structure),
serialised size and load time, and incremental update (``with_updates``: replace 50 SKUs and remove
50) against a full rebuild. Single-query timings use one thread per query, as serve's workers do.

Importable: :func:`real_embeddings`, :func:`fit_generator`, :func:`generate`, :func:`bench_structure`,
:func:`run`.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GROZI = Path("/work/shared/datasets/grozi120/images")
FAMILY = 4  # synthetic SKUs come in families of this many variants (flavours, sizes)


# ------------------------------------------------------------------ real embeddings
def real_embeddings(per_sku: int = 12, cache: str | Path = "/tmp/idxbench/grozi_lite0_emb.npz",
                    root: Path = GROZI, model: str = "efficientnet-lite0", batch_size: int = 32):
    """(vectors (N, D) float32 L2-normalised, skus (N,), frame numbers (N,)) of GroZi-120 crops:
    ``per_sku`` frames per product spread evenly over its frames, embedded by ``model`` (a model
    name, or an ``encoder.pt`` written by ``save_encoder``, e.g. a fine-tuned champion). Cached in
    ``cache``."""
    cache = Path(cache)
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if len(z["skus"]) and "keys" in z.files:
            frames = np.array([int(Path(k).stem.replace("video", "") or 0) for k in z["keys"]])
            return z["vectors"], z["skus"], frames
    from skulens.model.embed import embed_images
    from skulens.model.factory import create_encoder
    from skulens.model.io import load_encoder

    paths, skus = [], []
    for d in sorted(root.iterdir()):
        fs = sorted(d.glob("*.jpg"), key=lambda p: int(p.stem.replace("video", "") or 0))
        pick = sorted(set(np.linspace(0, len(fs) - 1, min(per_sku, len(fs))).round().astype(int).tolist()))
        paths += [str(fs[i]) for i in pick]
        skus += [d.name] * len(pick)
    encoder = load_encoder(model) if Path(model).is_file() else create_encoder(model)  # a saved encoder.pt or a name
    vecs = embed_images(encoder, paths, batch_size=batch_size).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, vectors=vecs, skus=np.array(skus), keys=np.array(paths))
    return real_embeddings(per_sku, cache, root, model, batch_size)


def default_cache(model: str) -> str:
    """The embeddings cache of ``model`` (a name, or an ``encoder.pt`` path: keyed by its resolved path)."""
    import hashlib

    tag = "lite0" if model == "efficientnet-lite0" else hashlib.sha1(str(Path(model).resolve()).encode()).hexdigest()[:10]
    return f"/tmp/idxbench/grozi_{tag}_emb.npz"


def split_gallery(skus: np.ndarray, frames: np.ndarray):
    """Per SKU, frames in order: two of every three go to the gallery, the third is a query."""
    gal = np.zeros(len(skus), dtype=bool)
    for s in np.unique(skus):
        rows = np.where(skus == s)[0]
        rows = rows[np.argsort(frames[rows])]
        gal[rows[np.arange(len(rows)) % 3 != 1]] = True
    return gal


# ------------------------------------------------------------------ synthetic generator
@dataclass
class Generator:
    mean: np.ndarray       # (D,) real mean embedding
    basis: np.ndarray      # (D, D) PCA directions (columns) scaled by sqrt(eigenvalue)
    alpha: float           # share of the variance in the SKU centre (the rest is per-image noise)
    family: float = 0.0    # share of a centre's variance shared with its family (FAMILY SKUs: variants)
    spread: float = 0.0    # log-normal sigma of a SKU's own noise scale (some SKUs vary more)
    views: int = 1         # views per SKU (front, side, ...): images of one view are closer
    view: float = 0.0      # share of an image's own variance that is its view's (the rest: noise)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def _cos_stats(v: np.ndarray, skus: np.ndarray, max_rows: int = 3000, seed: int = 0) -> dict:
    """Quantiles of intra-SKU, inter-SKU and nearest-other-SKU-centre cosines."""
    rng = np.random.default_rng(seed)
    u, inv = np.unique(skus, return_inverse=True)
    if len(v) > max_rows:  # whole SKUs, so intra pairs survive the sampling
        keep_skus = rng.choice(len(u), size=max(2, int(len(u) * max_rows / len(v))), replace=False)
        m = np.isin(inv, keep_skus)
        v, inv = v[m], inv[m]
    sims = v @ v.T
    same = inv[:, None] == inv[None, :]
    iu = np.triu_indices(len(v), 1)
    qs = [5, 50, 95]
    intra, inter = sims[iu][same[iu]], sims[iu][~same[iu]]
    groups = np.unique(inv)
    c = np.stack([v[inv == g].mean(0) for g in groups])
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    cc = c @ c.T
    np.fill_diagonal(cc, -2)
    return {"intra": np.percentile(intra, qs).round(3).tolist(), "inter": np.percentile(inter, qs).round(3).tolist(),
            "nn_centre": np.percentile(cc.max(1), qs).round(3).tolist(), "n_skus": len(groups)}


def _query_stats(gv, gs, qv, qs) -> dict:
    """Exact search of held-out images against a gallery: quantiles of the top-1 score and of the gap
    to the second SKU, and the top-1 accuracy (what decides how hard the search is)."""
    from skulens.index.ann import AnnConfig
    from skulens.index.sku_index import SkuIndex

    ex = SkuIndex(gv, gs, None, ann=AnnConfig(kind="exact")).search_exact(qv, k=2)
    top = np.array([e[0][1] for e in ex])
    gap = np.array([e[0][1] - e[1][1] for e in ex])
    return {"top1": np.percentile(top, [5, 50, 95]).round(3).tolist(),
            "gap": np.percentile(gap, [5, 50, 95]).round(3).tolist(),
            "accuracy": round(float(np.mean([e[0][0] == t for e, t in zip(ex, qs)])), 3)}


def _stats(v, skus, frames) -> dict:
    gal = split_gallery(skus, frames)
    return {**_cos_stats(v[gal], skus[gal]), **_query_stats(v[gal], skus[gal], v[~gal], skus[~gal])}


def fit_generator(vectors: np.ndarray, skus: np.ndarray, frames: np.ndarray, seed: int = 0,
                  cached: Path | None = None, views: int | None = None) -> tuple[Generator, dict]:
    """Fit the generator to real embeddings (``frames`` orders each SKU's images; the same 2-of-3
    gallery split as the benchmark). Mean and covariance spectrum come from the real vectors; the
    variance split (centre / family / views / image noise) is fitted on a grid, the centre share by
    bisection on the median intra-SKU cosine, so that the intra-SKU cosine spread, the nearest other
    SKU, and the held-out images' top-1 score and gap match the real set. ``views=1`` forces one
    view per SKU (a harder, view-less set). ``cached``: a JSON file keeping the fitted scalars."""
    v = np.asarray(vectors, np.float64)
    skus, frames = np.asarray(skus), np.asarray(frames)
    mean = v.mean(0)
    lam, vec = np.linalg.eigh(np.cov((v - mean).T))
    lam = np.clip(lam, 0, None)
    # a real catalog has far more SKUs than this sample: the tail of the spectrum (directions the
    # sample cannot resolve) is extended by a power law so the synthetic set is not rank-deficient
    order = np.argsort(lam)[::-1]
    lam, vec = lam[order], vec[:, order]
    r = min(len(v) - 1, len(lam)) // 2
    ks = np.arange(1, len(lam) + 1)
    slope, icpt = np.polyfit(np.log(ks[10:r]), np.log(lam[10:r]), 1)
    lam[r:] = np.maximum(lam[r:], np.exp(icpt) * ks[r:] ** slope)
    basis = (vec * np.sqrt(lam)[None, :]).astype(np.float32)
    mean = mean.astype(np.float32)
    if cached is not None and Path(cached).exists():
        calib = json.loads(Path(cached).read_text())
        if "params" in calib and calib.get("views_forced") == views:
            return Generator(mean, basis, **calib["params"]), calib
    real = _stats(np.asarray(vectors, np.float32), skus, frames)
    per = int(np.round(np.mean(np.unique(skus, return_counts=True)[1])))
    syn_frames = np.tile(np.arange(per), 120)

    def fit(**kw):
        lo, hi = 0.0, 1.0
        for _ in range(10):  # bisection on the median intra-SKU cosine (gallery pairs)
            g = Generator(mean, basis, (lo + hi) / 2, **kw)
            sv, ss, _, _ = generate(g, 120, per, seed=seed)
            st = _cos_stats(sv[split_gallery(ss, syn_frames)], ss[split_gallery(ss, syn_frames)])
            lo, hi = (g.alpha, hi) if st["intra"][1] < real["intra"][1] else (lo, g.alpha)
        g = Generator(mean, basis, (lo + hi) / 2, **kw)
        sv, ss, _, _ = generate(g, 120, per, seed=seed)
        return g, _stats(sv, ss, syn_frames)

    best = None
    for family in (0.0, 0.35, 0.7):
        for spread in (0.0, 0.3):
            for n_views, view in ([(1, 0.0)] if views == 1 else [(1, 0.0), (3, 0.4), (3, 0.7), (3, 0.9)]):
                g, st = fit(family=family, spread=spread, views=n_views, view=view)
                err = (abs(st["intra"][0] - real["intra"][0]) + abs(st["intra"][2] - real["intra"][2])
                       + 2 * abs(st["nn_centre"][1] - real["nn_centre"][1])
                       + 2 * abs(st["top1"][1] - real["top1"][1]) + 2 * abs(st["gap"][1] - real["gap"][1]))
                if best is None or err < best[0]:
                    best = (err, g, st)
    _, gen, _ = best
    sv, ss, _, _ = generate(gen, 120, per, seed=seed + 1)  # a fresh draw for the report
    calib = {"real": real, "synthetic": _stats(sv, ss, syn_frames), "views_forced": views,
             "params": {"alpha": gen.alpha, "family": gen.family, "spread": gen.spread, "views": gen.views,
                        "view": gen.view}}
    if cached is not None:
        Path(cached).write_text(json.dumps(calib))
    return gen, calib


def generate(gen: Generator, n_skus: int, per_sku: int, seed: int = 0, n_queries: int = 0,
             chunk_skus: int = 4096, out: np.ndarray | None = None):
    """``n_skus`` x ``per_sku`` L2-normalised float32 rows (SKU-major), their SKU names, and
    ``n_queries`` fresh images (one of the SKU's views, new noise) of random SKUs with their SKU
    names. Generated in chunks of SKUs, written into ``out`` (or a new array) so memory stays at the
    output plus one chunk. Row j of a SKU shows view j % views."""
    d = gen.dim
    n = n_skus * per_sku
    vecs = np.empty((n, d), np.float32) if out is None else out
    rng_q = np.random.default_rng([seed, 1])
    q_skus = np.sort(rng_q.choice(n_skus, size=min(n_queries, n_skus), replace=False)) if n_queries else np.zeros(0, int)
    queries = np.empty((len(q_skus), d), np.float32)
    sa, sn = np.float32(np.sqrt(gen.alpha)), np.float32(np.sqrt(1 - gen.alpha))
    sv, se = np.float32(np.sqrt(gen.view)), np.float32(np.sqrt(1 - gen.view))
    assert chunk_skus % FAMILY == 0
    view_of_row = np.arange(per_sku) % gen.views
    for c0 in range(0, n_skus, chunk_skus):
        c1 = min(n_skus, c0 + chunk_skus)
        rng = np.random.default_rng([seed, 0, c0])
        ns = c1 - c0
        fam = rng.standard_normal((-(-ns // FAMILY), d), dtype=np.float32)
        z = (np.float32(np.sqrt(gen.family)) * np.repeat(fam, FAMILY, axis=0)[:ns]
             + np.float32(np.sqrt(1 - gen.family)) * rng.standard_normal((ns, d), dtype=np.float32)) * sa
        scale = np.exp(gen.spread * rng.standard_normal(ns) - gen.spread ** 2).astype(np.float32) * sn
        views = rng.standard_normal((ns, gen.views, d), dtype=np.float32) * sv if gen.view > 0 else None
        lat = np.repeat(z, per_sku, axis=0)
        noise = rng.standard_normal(lat.shape, dtype=np.float32) * se
        if views is not None:
            noise += views[:, view_of_row].reshape(-1, d)
        lat += noise * np.repeat(scale, per_sku)[:, None]
        del noise
        block = lat @ gen.basis.T
        block += gen.mean
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vecs[c0 * per_sku:c1 * per_sku] = block
        sel = np.where((q_skus >= c0) & (q_skus < c1))[0]
        if sel.size:
            loc = q_skus[sel] - c0
            qn = rng.standard_normal((sel.size, d), dtype=np.float32) * se
            if views is not None:
                qn += views[loc, rng.integers(0, gen.views, size=sel.size)]
            qb = (z[loc] + qn * scale[loc, None]) @ gen.basis.T + gen.mean
            queries[sel] = qb / np.linalg.norm(qb, axis=1, keepdims=True)
        del lat, block
    width = max(6, len(str(n_skus - 1)))
    names = np.char.add("syn", np.char.zfill(np.arange(n_skus).astype(str), width))
    return vecs, np.repeat(names, per_sku), queries, names[q_skus]


def planted_set(gen: Generator, real_vecs: np.ndarray, real_skus: np.ndarray, n_skus: int, per_sku: int,
                seed: int, n_queries: int):
    """The scale set: the real gallery rows first (real UPCs sort before "syn...", so the rows are already
    grouped by SKU and ``SkuIndex`` keeps this one array), then ``n_skus`` x ``per_sku`` synthetic rows
    generated in place. Returns (vectors, skus, synthetic queries, their true SKUs)."""
    m = len(real_vecs)
    vecs = np.empty((m + n_skus * per_sku, real_vecs.shape[1]), np.float32)
    vecs[:m] = real_vecs
    _, syn_skus, queries, q_true = generate(gen, n_skus, per_sku, seed=seed, n_queries=n_queries, out=vecs[m:])
    return vecs, np.concatenate([real_skus, syn_skus]), queries, q_true


# ------------------------------------------------------------------ measurements
def _pct(xs, p):
    return float(np.percentile(np.asarray(xs) * 1000, p))


def exact_top(idx, queries: np.ndarray, k: int = 5, chunk: int = 64):
    """Exact top-k lists (batched BLAS; chunked to bound the Q x N similarity matrix)."""
    return idx.search_exact(queries, k=k, chunk=chunk)


def recall(got, exact) -> tuple[float, float]:
    r1 = float(np.mean([bool(g) and g[0][0] == e[0][0] for g, e in zip(got, exact)]))
    r5 = float(np.mean([[s for s, _ in g] == [s for s, _ in e] for g, e in zip(got, exact)]))
    return r1, r5


def near_recall(got, exact, eps: float = 0.01) -> float:
    """Share of queries whose returned top-1 scores within ``eps`` cosine of the exact top-1 (a miss
    between two SKUs this close is a near-tie, not a lost match)."""
    return float(np.mean([bool(g) and g[0][1] >= e[0][1] - eps for g, e in zip(got, exact)]))


def single_query_times(idx, queries: np.ndarray, k: int = 5, warmup: int = 20):
    for q in queries[:warmup]:
        idx.search(q, k=k)
    times, cpu, res = [], [], []
    for q in queries:
        t, c = time.perf_counter(), time.thread_time()
        r = idx.search(q, k=k)
        cpu.append(time.thread_time() - c)
        times.append(time.perf_counter() - t)
        res.append(r[0])
    single_query_times.cpu = cpu  # CPU seconds of the calling thread: less sensitive to a busy machine
    return times, res


def bench_structure(vectors, skus, keys, queries, exact, config, real_queries=None, real_exact=None,
                    sweep=None, update_skus: int = 50, log=print, search_threads=(None,)) -> list[dict]:
    """Build one ``SkuIndex`` with ``config`` (an AnnConfig) and measure it at each search-time knob
    value in ``sweep`` (efSearch for HNSW, nprobe for IVF; same structure, no rebuild), and each
    ``search_threads`` value (None: the config's). Returns one row per setting; build, serialisation,
    load and update figures are on the last row."""
    from dataclasses import replace

    from skulens.index.sku_index import SkuIndex

    idx = SkuIndex(vectors, skus, keys, model_version="bench", ann=config)
    t0 = time.perf_counter()
    idx.ensure_ann()
    build_s = time.perf_counter() - t0
    ann = idx.ann_index
    knob = {"hnsw": "ef_search", "ivf": "nprobe", "ivfpq": "pq_nprobe"}[config.kind]
    rows = []
    settings = [(v, th) for v in (sweep or [getattr(config, knob)]) for th in search_threads]
    for i, (val, th) in enumerate(settings):
        idx.ann = ann.config = replace(config, **{knob: int(val)},
                                       **({"search_threads": int(th)} if th is not None else {}))
        times, got = single_query_times(idx, queries)
        cpu = single_query_times.cpu
        r1, r5 = recall(got, exact)
        out = {"kind": config.kind, "storage": config.storage, knob: int(val),
               "search_threads": ann.few_query_threads,
               "rows": len(idx), "skus": int(idx.meta["n_skus"]), "build_s": round(build_s, 1),
               "p50_ms": round(_pct(times, 50), 2), "p99_ms": round(_pct(times, 99), 2),
               "cpu_p50_ms": round(_pct(cpu, 50), 2), "cpu_p99_ms": round(_pct(cpu, 99), 2),
               "recall1": round(r1, 4), "recall1_within_0.01": round(near_recall(got, exact), 4),
               "recall5": round(r5, 4), "queries": len(queries),
               "vectors_mb": round(idx.vectors.nbytes / 2**20), "ann_mb": round(ann.nbytes() / 2**20)}
        if config.kind in ("ivf", "ivfpq"):
            out["nlist"] = int(ann.index.nlist)
            out["list_imbalance"] = round(float(ann.index.invlists.imbalance_factor()), 2)
            out["train_sample"] = config.train_sample
        if config.kind == "ivfpq":
            out.update(pq_m=int(ann.index.M), pq_candidates=config.pq_candidates, pq_nprobe=ann.pq_nprobe)
        out["total_mb"] = out["vectors_mb"] + out["ann_mb"] + round(idx.ids.nbytes / 2**20)
        if real_queries is not None:
            _, rg = single_query_times(idx, real_queries, warmup=0)
            out["real_in_scale_recall1"] = round(recall(rg, real_exact)[0], 4)
        rows.append(out)
        if i < len(settings) - 1:
            log(json.dumps(out))
    # serialised structure and load (what serve/recognize do: from_bytes, no rebuild)
    if ann is not None:
        t = time.perf_counter()
        blob = ann.serialize()
        out["serialize_s"] = round(time.perf_counter() - t, 2)
        out["ann_file_mb"] = round(blob.nbytes / 2**20)
        from skulens.index.ann import AnnIndex

        t = time.perf_counter()
        back = AnnIndex.deserialize(blob, ann.describe(), ann.tombstones)
        ok = np.array_equal(back.live_ids(), np.sort(idx.ids))
        out["load_verify_s"] = round(time.perf_counter() - t, 2)
        assert ok
        del blob, back
        gc.collect()
    # incremental update: replace `update_skus` SKUs (new rows) and remove `update_skus` others
    rng = np.random.default_rng(5)
    names = np.asarray(idx.sku_list)
    pick = rng.choice(len(names), size=2 * update_skus, replace=False)
    repl, gone = names[pick[:update_skus]], names[pick[update_skus:]]
    per = max(1, len(idx) // len(names))
    new = idx.vectors[rng.choice(len(idx), size=update_skus * per)] + 0.05 * rng.standard_normal(
        (update_skus * per, idx.embed_dim), dtype=np.float32)
    t = time.perf_counter()
    up = idx.with_updates(new, np.repeat(repl, per), None, remove_skus=gone)
    out["update_s"] = round(time.perf_counter() - t, 2)
    out["update_rows"] = f"+{update_skus * per} -{int(np.isin(idx.skus, np.concatenate([repl, gone])).sum())}"
    out["update_incremental"] = up.ann_index is not None
    if up.ann_index is not None:
        _, g2 = single_query_times(up, queries[:200], warmup=0)
        out["after_update_recall1"] = round(recall(g2, exact_top(up, queries[:200]))[0], 4)
    log(json.dumps(out))
    del up, idx
    gc.collect()
    return rows


def run(sizes=(100_000,), per_sku: int = 8, kinds=("hnsw",), storages=("fp16",), ef_search=(128, 256, 512),
        nprobe=(32, 64, 128), n_queries: int = 1000, real_per_sku: int = 12, cache="/tmp/idxbench/grozi_lite0_emb.npz",
        hnsw_m: int = 32, ef_construction: int = 80, views: int | None = None, log=print,
        pq_nprobe=(0,), pq_m: int = 256, pq_candidates: int = 256, model: str = "efficientnet-lite0",
        train_sample: int | None = None, search_threads=(None,)) -> dict:
    """The whole benchmark; returns {"calibration": ..., "real": [...], "scale": {size: [...]}}."""
    import faiss

    from skulens.index.ann import AnnConfig
    from skulens.index.sku_index import SkuIndex

    faiss.omp_set_num_threads(2)

    def config(kind, st, **extra):
        return AnnConfig(kind=kind, storage=st, threshold=1, hnsw_m=hnsw_m, ef_construction=ef_construction,
                         ef_search=ef_search[0], nprobe=nprobe[0], pq_m=pq_m, pq_nprobe=pq_nprobe[0],
                         pq_candidates=pq_candidates, **({"train_sample": train_sample} if train_sample else {}),
                         **extra)

    report: dict = {"real": [], "scale": {}}
    rv, rs, rf = real_embeddings(real_per_sku, cache, model=model)
    log(f"real embeddings: {model} ({len(rv)} GroZi crops, cache {cache})")
    gal = split_gallery(rs, rf)
    fit_cache = Path(f"{cache}.generator{'-views1' if views == 1 else ''}.json")
    gen, calib = fit_generator(rv, rs, rf, cached=fit_cache, views=views)
    report["calibration"] = calib
    log("calibration (cosine quantiles 5/50/95):", json.dumps(calib))

    # real set alone: gallery of every product, held-out crops as queries, ANN forced (threshold 1)
    real_idx = SkuIndex(rv[gal], rs[gal], None, ann=AnnConfig(kind="exact"))
    real_exact = exact_top(real_idx, rv[~gal])
    real_top1 = float(np.mean([e[0][0] == s for e, s in zip(real_exact, rs[~gal])]))
    log(f"real set: {gal.sum()} gallery rows, {(~gal).sum()} queries, {len(np.unique(rs))} SKUs; "
        f"exact top-1 accuracy {real_top1:.3f}")
    for kind in kinds:
        for st in storages:
            idx = SkuIndex(rv[gal], rs[gal], None, ann=config(kind, st, ivf_nlist=16 if kind == "ivf" else 0))
            r1, r5 = recall(idx.search(rv[~gal], k=5), real_exact)
            row = {"kind": kind, "storage": st, "recall1": round(r1, 4), "recall5": round(r5, 4)}
            report["real"].append(row)
            log("real", json.dumps(row))

    for n in sizes:
        n_skus = n // per_sku
        t = time.perf_counter()
        # the real gallery planted in the scale set: real queries must still find their product
        vecs, skus, queries, q_true = planted_set(gen, rv[gal], rs[gal], n_skus, per_sku, seed=n, n_queries=n_queries)
        keys = np.arange(len(skus)).astype(str)
        log(f"\n== {len(vecs)} rows ({n_skus} synthetic SKUs x {per_sku} + {gal.sum()} real rows), "
            f"generated in {time.perf_counter() - t:.1f} s")
        base = SkuIndex(vecs, skus, keys, ann=AnnConfig(kind="exact"))
        assert base.vectors is vecs or np.shares_memory(base.vectors, vecs), "rows were re-sorted (copied)"
        skus, keys = base.skus, base.keys
        t = time.perf_counter()
        exact = exact_top(base, queries)
        batched = time.perf_counter() - t
        real_exact_n = exact_top(base, rv[~gal])
        top = np.array([e[0][1] for e in exact])
        gap = np.array([e[0][1] - e[1][1] for e in exact])
        acc = float(np.mean([e[0][0] == t for e, t in zip(exact, q_true)]))
        log(f"synthetic queries, exact search: top-1 accuracy {acc:.3f}, top-1 score 5/50/95% "
            f"{np.percentile(top, [5, 50, 95]).round(3).tolist()}, gap to 2nd SKU {np.percentile(gap, [5, 50, 95]).round(3).tolist()}")
        ex_times, _ = single_query_times(base, queries[:100], warmup=5)
        ex_cpu = single_query_times.cpu
        log(f"exact numpy: single query p50 {_pct(ex_times, 50):.1f} ms p99 {_pct(ex_times, 99):.1f} ms "
            f"(CPU of the calling thread p50 {_pct(ex_cpu, 50):.1f} ms; BLAS may use more threads); "
            f"batched {1000 * batched / len(queries):.1f} ms/query; vectors {vecs.nbytes / 2**20:.0f} MB")
        rows = [{"kind": "exact", "rows": len(vecs), "p50_ms": round(_pct(ex_times, 50), 2),
                 "p99_ms": round(_pct(ex_times, 99), 2), "recall1": 1.0, "vectors_mb": round(vecs.nbytes / 2**20)}]
        del base
        gc.collect()
        for kind in kinds:
            for st in storages:
                rows += bench_structure(vecs, skus, keys, queries, exact, config(kind, st), rv[~gal], real_exact_n,
                                        sweep={"hnsw": ef_search, "ivf": nprobe, "ivfpq": pq_nprobe}[kind], log=log,
                                        search_threads=search_threads)
        report["scale"][len(vecs)] = rows
        del vecs, skus, keys
        gc.collect()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="synthetic rows (800000: HNSW builds for minutes)")
    ap.add_argument("--per-sku", type=int, default=8)
    ap.add_argument("--kinds", nargs="+", default=["ivfpq"], choices=["hnsw", "ivf", "ivfpq"])
    ap.add_argument("--storage", nargs="+", default=["fp16"], choices=["fp16", "sq8", "flat"])
    ap.add_argument("--ef-search", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--pq-nprobe", type=int, nargs="+", default=[0], help="ivfpq lists scanned (0: auto, nlist/4)")
    ap.add_argument("--pq-m", type=int, default=256)
    ap.add_argument("--pq-candidates", type=int, default=256)
    ap.add_argument("--search-threads", type=int, nargs="+", default=None,
                    help="ivfpq: threads scanning one query's lists, each value timed on the same structure "
                         "(0: automatic, min(2, cores); default: AnnConfig's)")
    ap.add_argument("--train-sample", type=int, default=None, help="IVF k-means training rows (default: AnnConfig's)")
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--real-per-sku", type=int, default=12)
    ap.add_argument("--model", default="efficientnet-lite0",
                    help="tower whose GroZi embeddings calibrate the set: a model name (default: the offline "
                         "ImageNet tower, not fine-tuned) or a fine-tuned encoder.pt, e.g. from "
                         "`bench_recipe.py --keep` (the vectors a production index holds)")
    ap.add_argument("--cache", default=None, help="embeddings cache (default: one file per --model under /tmp/idxbench)")
    ap.add_argument("--views", type=int, choices=[1], help="1: one view per synthetic SKU (harder queries)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    a = ap.parse_args(argv)
    if a.cache is None:
        a.cache = default_cache(a.model)
    rep = run(a.sizes, a.per_sku, a.kinds, a.storage, a.ef_search, a.nprobe, a.queries, a.real_per_sku, a.cache,
              a.hnsw_m, a.ef_construction, a.views, pq_nprobe=a.pq_nprobe, pq_m=a.pq_m,
              pq_candidates=a.pq_candidates, model=a.model, train_sample=a.train_sample,
              search_threads=tuple(a.search_threads) if a.search_threads else (None,))
    if a.json:
        a.json.write_text(json.dumps(rep, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

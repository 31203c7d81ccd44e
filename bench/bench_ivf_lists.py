"""IVF list count vs recall and single-query time at scale (the 800k-row index question).

For each list count: a k-means coarse quantizer (trained once, ``--train-rows`` rows), the share of
queries whose exact nearest row lies in the lists scanned, then an ``IndexIVFPQFastScan`` (PQ 256 x 4 bit,
residual codes, as ``skulens.index.ann``'s ``ivfpq``; ``--no-residual``) over an HNSW quantizer on those
centroids (efSearch twice the lists scanned; ``--quantizer flat``: exact), timed one query at a time on one thread with the exact re-scoring of the
candidates, recall@1 (top-1 SKU equals exact search's) on synthetic and real queries.

Vectors as in ``bench_index.py``: the real GroZi embeddings of ``--model`` planted in ``--rows`` synthetic
rows from the generator calibrated on them (cached next to ``--cache``).

    .venv/bin/python bench/bench_ivf_lists.py --model /path/encoder.pt --nlist 4096 2048 --nprobe 128 256 512

Figures of 2026-12-06 (fine-tuned default model, 800,960 rows) are in README "Search at scale".
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet-lite0", help="encoder.pt of a fine-tuned model, or a model name")
    ap.add_argument("--cache", default=None, help="embeddings cache (default: bench_index's, per --model)")
    ap.add_argument("--rows", type=int, default=800_000)
    ap.add_argument("--per-sku", type=int, default=8)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nlist", type=int, nargs="+", default=[4096, 2048])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--candidates", type=int, nargs="+", default=[256])
    ap.add_argument("--train-rows", type=int, default=131_072)
    ap.add_argument("--quantizer", choices=["hnsw", "flat"], default="hnsw", help="coarse quantizer over the centroids")
    ap.add_argument("--no-residual", action="store_true", help="PQ codes of the rows themselves, not of their "
                    "residuals to the list centroid (one lookup table per query instead of one per list)")
    ap.add_argument("--centroids", type=Path, default=Path("/tmp/idxbench/centroids"),
                    help="k-means centroids are cached here, per list count and row count")
    args = ap.parse_args(argv)

    import bench_index as B
    import faiss

    cache = args.cache or B.default_cache(args.model)
    rv, rs, rf = B.real_embeddings(12, cache, model=args.model)
    gal = B.split_gallery(rs, rf)
    gen, _ = B.fit_generator(rv, rs, rf, cached=Path(f"{cache}.generator.json"))
    vecs, skus, queries, _ = B.planted_set(gen, rv[gal], rs[gal], args.rows // args.per_sku, args.per_sku,
                                           seed=args.rows, n_queries=args.queries)
    allq = np.concatenate([queries, rv[~gal]])
    nq = len(queries)
    d = vecs.shape[1]
    faiss.omp_set_num_threads(2)
    top = np.concatenate([np.argmax(allq[s:s + 50] @ vecs.T, axis=1) for s in range(0, len(allq), 50)])
    exact = skus[top]
    print(f"{len(vecs)} rows, {nq} synthetic + {len(allq) - nq} real queries", flush=True)
    rng = np.random.default_rng(0)
    sample = vecs[np.sort(rng.choice(len(vecs), min(len(vecs), args.train_rows), replace=False))]
    for nlist in args.nlist:
        cfile = args.centroids / f"{Path(cache).stem}-{len(vecs)}-{args.train_rows}-{nlist}.npy"
        if cfile.exists():
            cent = np.load(cfile)
        else:
            t = time.time()
            km = faiss.Kmeans(d, nlist, niter=10, max_points_per_centroid=10**9, seed=1)
            km.train(sample)
            cent = km.centroids
            print(json.dumps({"nlist": nlist, "kmeans_s": round(time.time() - t, 1)}), flush=True)
            cfile.parent.mkdir(parents=True, exist_ok=True)
            np.save(cfile, cent)
        rowlist = np.argmax(vecs[top] @ cent.T, axis=1)  # the list holding the exact nearest row
        qs = allq @ cent.T
        rank = (qs > qs[np.arange(len(allq)), rowlist][:, None]).sum(1)
        t = time.time()
        if args.quantizer == "hnsw":
            quant = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            quant.hnsw.efConstruction = 200
        else:
            quant = faiss.IndexFlatIP(d)
        quant.add(cent)
        index = faiss.IndexIVFPQFastScan(quant, d, nlist, 256, 4, faiss.METRIC_INNER_PRODUCT)
        index.by_residual = not args.no_residual
        index.own_fields = True
        quant.this.disown()
        index.train(sample)  # the quantizer holds its centroids already: trains the PQ only
        for s in range(0, len(vecs), 65536):
            index.add(vecs[s:s + 65536])
        print(json.dumps({"nlist": nlist, "pq_and_add_s": round(time.time() - t, 1)}), flush=True)
        for npb in args.nprobe:
            for k in args.candidates:
                p = faiss.SearchParametersIVF()
                p.nprobe = npb
                if args.quantizer == "hnsw":
                    qp = faiss.SearchParametersHNSW()
                    qp.efSearch = max(64, 2 * npb)
                    p.quantizer_params = qp
                faiss.omp_set_num_threads(1)
                got, times = [], []
                for q in allq:
                    t = time.perf_counter()
                    _, ids = index.search(q[None], k, params=p)
                    ids = ids[0][ids[0] >= 0]
                    got.append(skus[ids[np.argmax(vecs[ids] @ q)]])
                    times.append(time.perf_counter() - t)
                faiss.omp_set_num_threads(2)
                ok = np.asarray(got) == exact
                ms = np.asarray(times[:nq]) * 1000
                print(json.dumps({"nlist": nlist, "nprobe": npb, "candidates": k, "quantizer": args.quantizer,
                                  "residual": not args.no_residual,
                                  "nearest_row_list_scanned": round(float((rank[:nq] < npb).mean()), 4),
                                  "recall1_synthetic": round(float(ok[:nq].mean()), 4),
                                  "recall1_real": round(float(ok[nq:].mean()), 4),
                                  "p50_ms": round(float(np.percentile(ms, 50)), 2),
                                  "p99_ms": round(float(np.percentile(ms, 99)), 2)}), flush=True)
        del index
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

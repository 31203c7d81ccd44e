"""Score challenger, champion and base tower on the same shelf crops (RetailKLIP protocol).

Every shelf crop is classified by 1-NN (a SKU scores its best gallery row) against two galleries built
with the model under test:

* ``catalog``    - every cleaned catalog image (what the published index holds in production);
* ``retailklip`` - one catalog image per SKU plus ``n_aug`` shelf-like augmentations of it.

Every model is scored on exactly the same crops; the crops are fingerprinted (``eval_set``, a hash of
the sorted crop keys and ETags) so that numbers from different runs are only compared when they were
measured on the same crops. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from skulens.evaluation.retrieval import EvalReport, evaluate, retailklip_gallery
from skulens.index.build import SPARSE_BELOW, SPARSE_VIEWS, catalog_index
from skulens.model.embed import EmbeddingCache
from skulens.registry.store import file_sha256

GALLERIES = ("catalog", "retailklip")
MODEL_ROLES = ("challenger", "champion", "base")
#: EvalReport.metrics() keys that are copied to MLflow / the promotion decision
METRIC_KEYS = ("top1", "top5", "category_acc", "mean_per_sku_top1", "n_queries", "n_unknown_sku",
               "top1_sparse", "n_sparse", "top1_rich", "n_rich")

Echo = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def select_crops(shelf_crops: pd.DataFrame, sources: tuple[str, ...] | list[str] = ("crop", "photo")) -> pd.DataFrame:
    """The evaluation crops: rows of ``shelf_crops`` whose ``source`` is in ``sources``, with a local
    file, sorted by key (a stable order for every model)."""
    if shelf_crops is None or len(shelf_crops) == 0:
        return pd.DataFrame(columns=["sku", "key", "etag", "bytes", "path", "source"])
    df = shelf_crops.copy()
    if "source" not in df.columns:
        df["source"] = "crop"
    df = df[df["source"].isin(list(sources))]
    df = df[df["path"].map(lambda p: bool(p) and Path(str(p)).is_file())]
    df["sku"] = df["sku"].astype(str)
    return df.sort_values("key", kind="stable").reset_index(drop=True)


def eval_set_fingerprint(crops: pd.DataFrame) -> str:
    """``crops-<n>-<sha256[:16]>`` over the sorted (key, etag, sku) triples of the evaluation crops.

    Two evaluations are comparable only if their fingerprints are equal: same objects, same
    content (ETag) and same labels."""
    h = hashlib.sha256()
    rows = sorted(zip(crops["key"].astype(str), crops["etag"].astype(str), crops["sku"].astype(str)))
    for key, etag, sku in rows:
        h.update(f"{key}\t{etag}\t{sku}\n".encode())
    return f"crops-{len(rows)}-{h.hexdigest()[:16]}"




def sparse_split(report: EvalReport, catalog: pd.DataFrame, below: int) -> dict:
    """Top-1 over the queries of sparse SKUs (fewer than ``below`` catalog images) and of the others."""
    counts = catalog.groupby("sku").size()
    p = report.predictions
    sparse = p["true"].map(counts).fillna(0).to_numpy() < below
    out = {}
    for name, mask in (("sparse", sparse), ("rich", ~sparse)):
        n = int(mask.sum())
        out[f"n_{name}"] = float(n)
        if n:  # no NaN in the metrics: they are compared and logged
            out[f"top1_{name}"] = float(p["correct"].to_numpy()[mask].mean())
    return out


def evaluate_model(encoder, crops: pd.DataFrame, catalog: pd.DataFrame, products: pd.DataFrame | None,
                   k: int = 5, n_aug: int = 8, aug_seed: int = 0, batch_size: int = 64,
                   galleries: tuple[str, ...] = GALLERIES, cache: EmbeddingCache | None = None,
                   encoder_sha: str | None = None, sparse_below: int = SPARSE_BELOW,
                   sparse_views: int = SPARSE_VIEWS) -> dict:
    """Score one encoder on ``crops`` against each gallery.

    Returns ``{"reports": {gallery: EvalReport}, "metrics": {gallery: {...}}, "seconds",
    "crops_per_s"}``."""
    from skulens.model.embed import embed_images

    t0 = time.perf_counter()
    q = embed_images(encoder, crops["path"].astype(str).tolist(), batch_size=batch_size)
    t_query = time.perf_counter() - t0
    reports: dict[str, EvalReport] = {}
    catalog_gallery = None
    for g in galleries:
        if g == "catalog":
            index = catalog_gallery = catalog_index(encoder, catalog, batch_size=batch_size, cache=cache, encoder_sha=encoder_sha,
                                  sparse_below=sparse_below, sparse_views=sparse_views, aug_seed=aug_seed)
        elif g == "retailklip":
            index = retailklip_gallery(encoder, catalog, n_aug=n_aug, seed=aug_seed, image_col="clean_path",
                                       key_col="key", batch_size=batch_size)
        else:
            raise ValueError(f"unknown gallery {g!r}; one of {GALLERIES}")
        rep = evaluate(q, crops["sku"].tolist(), index, products=products, k=k)
        rep.extra["gallery_rows"] = len(index)
        rep.extra["sparse"] = sparse_split(rep, catalog, sparse_below if sparse_below > 0 else SPARSE_BELOW)
        reports[g] = rep
    return {
        "reports": reports,
        "metrics": {g: report_metrics(r) for g, r in reports.items()},
        "seconds": round(time.perf_counter() - t0, 2),
        "crops_per_s": round(len(crops) / t_query, 1) if t_query > 0 else None,
        "backend": str(getattr(encoder, "backend", None) or "torch"),
        "preprocess": str(getattr(encoder, "preprocess_mode", None) or "torchvision"),
        "catalog_index": catalog_gallery,
    }


def backend_agreement(engine, encoder, crops: pd.DataFrame, index, n: int = 64, batch_size: int = 64) -> dict:
    """How closely ``engine`` (a compiled :class:`skulens.model.engine.InferenceEngine`) reproduces PyTorch
    (``encoder``, the same weights) on real evaluation crops: ``n`` crops spread evenly over the sorted
    set, embedded by both; ``max_abs_diff`` / ``min_cosine`` of the L2-normalised embeddings and
    ``top1_agreement``: the share of those crops whose top-1 SKU in ``index`` (the engine's catalog
    gallery) is the same for both embeddings."""
    import numpy as np

    from skulens.model.embed import embed_images
    from skulens.model.engine import parity_stats

    paths = crops["path"].astype(str).tolist()
    if not paths:
        return {"backend": engine.backend, "n": 0}
    idx = sorted(set(np.linspace(0, len(paths) - 1, min(n, len(paths))).round().astype(int).tolist()))
    sample = [paths[i] for i in idx]
    t0 = time.perf_counter()
    qe = embed_images(engine, sample, batch_size=batch_size)
    t_engine = time.perf_counter() - t0
    t0 = time.perf_counter()
    qt = embed_images(encoder, sample, batch_size=batch_size)
    t_torch = time.perf_counter() - t0
    st = parity_stats(qe, qt)
    agree = None
    if index is not None and len(index):
        he, ht = index.search(qe, k=1), index.search(qt, k=1)
        agree = float(np.mean([(a[0][0] if a else None) == (b[0][0] if b else None) for a, b in zip(he, ht)]))
    return {"backend": engine.backend, "device": engine.device, "n": len(sample),
            "preprocess": getattr(engine, "preprocess_mode", None),
            "max_abs_diff": st["max_abs_diff"], "min_cosine": 1.0 - st["max_cos_diff"], "top1_agreement": agree,
            "engine_crops_per_s": round(len(sample) / t_engine, 1) if t_engine > 0 else None,
            "torch_crops_per_s": round(len(sample) / t_torch, 1) if t_torch > 0 else None,
            "reference_batch": {k: engine.parity.get(k) for k in ("max_abs_diff", "max_cos_diff", "ok", "checked")}}


def report_metrics(report: EvalReport) -> dict:
    """The numbers of one report that go to MLflow and into the promotion decision."""
    m = {**report.metrics(), **report.extra.get("sparse", {})}
    out = {k: float(m[k]) for k in METRIC_KEYS if k in m and m[k] is not None}
    out.setdefault("top5", float(report.top5))
    return out






def _seeded(seed: int):
    import torch

    torch.manual_seed(int(seed))


def evaluate_all(
    challenger_path: str | None,
    crops: pd.DataFrame,
    catalog: pd.DataFrame,
    products: pd.DataFrame | None,
    store=None,
    k: int = 5,
    n_aug: int = 8,
    aug_seed: int = 0,
    base_seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    include_base: bool = True,
    include_champion: bool = True,
    cache_dir: str | os.PathLike | None = None,
    echo: Echo = _noop,
    sparse_below: int = SPARSE_BELOW,
    sparse_views: int = SPARSE_VIEWS,
    base_spec=None,
    backend: str | None = None,
    parity_crops: int = 64,
) -> dict:
    """Evaluate the challenger (file), the current champion (``store``: a
    :class:`skulens.registry.store.ModelStore`; its ``champion`` alias, if any) and the
    un-fine-tuned base tower (``create_encoder`` with the spec stored in the challenger's file, so
    the same architecture, input size and preprocessing; torch seeded with ``base_seed`` so a
    randomly initialised tower equals the challenger's starting point) on the same crops and galleries.

    Returns a dict: ``eval_set``, ``n_crops``, ``sources``, ``k``, ``n_aug``, ``models`` (role ->
    ``{version, metrics, seconds, crops_per_s}``), ``reports`` (role -> gallery -> EvalReport),
    ``champion_version`` (the version that was evaluated, or None), ``champion_error``.
    A champion that cannot be loaded is reported in ``champion_error``, never silently skipped: the
    promotion decision then keeps the champion. A champion whose weights file is byte-identical to
    the challenger's is not embedded twice. ``cache_dir``: catalog embeddings of the challenger and
    champion are cached there (see :class:`EmbeddingCache`) for the index build.

    Every model runs on the compiled inference engine (:mod:`skulens.model.engine`, ``backend``; None:
    the store's default / ``$SKULENS_INFERENCE_BACKEND`` / auto), the challenger and the base tower
    compiled from their files too. ``inference`` in the result: the backend of each role and, unless
    the backend is PyTorch on the CPU, :func:`backend_agreement` of the first model evaluated against
    PyTorch on ``parity_crops`` of the crops.
    """
    from skulens.model.factory import create_encoder
    from skulens.model.io import load_encoder

    def engine_of(path):
        if store is not None:
            return store.engine(str(path), backend=backend, device=device)
        from skulens.model.engine import get_engine

        return get_engine(path, backend, device)

    if len(crops) == 0:
        raise ValueError("no shelf crops to evaluate on: upload labelled crops to shelf/crops/<sku>/ "
                         "or shelf/photos/ + shelf/boxes.csv")
    if len(catalog) == 0:
        raise ValueError("the cleaned catalog has no images")
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    kw = {"k": k, "n_aug": n_aug, "aug_seed": aug_seed, "batch_size": batch_size, "cache": cache,
          "sparse_below": sparse_below, "sparse_views": sparse_views}
    challenger_sha = file_sha256(challenger_path) if challenger_path else None
    out: dict = {"eval_set": eval_set_fingerprint(crops), "n_crops": len(crops),
                 "n_crop_skus": int(crops["sku"].nunique()),
                 "sources": {str(s): int(n) for s, n in crops["source"].value_counts().sort_index().items()},
                 "catalog_images": len(catalog), "catalog_skus": int(catalog["sku"].nunique()),
                 "k": int(k), "n_aug": int(n_aug), "aug_seed": int(aug_seed), "device": device,
                 "challenger_sha256": challenger_sha, "champion_checked": bool(include_champion),
                 "models": {}, "reports": {}, "champion_version": None, "champion_run_id": None,
                 "champion_error": None,
                 "inference": {"backends": {}, "parity": None}}

    def run(role: str, encoder, version: str | None, sha: str | None = None, torch_encoder=None) -> None:
        res = evaluate_model(encoder, crops, catalog, products, encoder_sha=sha, **kw)
        report(role, res, version)
        out["inference"]["backends"][role] = res["backend"]
        out["inference"].setdefault("preprocess", {})[role] = res["preprocess"]
        if (out["inference"]["parity"] is None and torch_encoder is not None and parity_crops > 0
                and not (res["backend"] == "torch" and str(getattr(encoder, "device", "cpu")) == "cpu")):
            p = backend_agreement(encoder, torch_encoder(), crops, res["catalog_index"], n=parity_crops,
                                  batch_size=batch_size)
            out["inference"]["parity"] = {"role": role, **p}
            echo(f"{role}: {p['backend']} vs PyTorch on {p['n']} crops: max |diff| {p['max_abs_diff']:.2e}, "
                 f"top-1 agreement {p['top1_agreement']}")

    def report(role: str, res: dict, version: str | None, note: str = "") -> None:
        out["reports"][role] = res["reports"]
        out["models"][role] = {"version": version, "metrics": res["metrics"], "seconds": res["seconds"],
                               "crops_per_s": res["crops_per_s"]}
        echo(f"{role}{f' v{version}' if version else ''}{note}: " + "; ".join(
            f"{g} {r.summary()}" for g, r in res["reports"].items()))

    if challenger_path:  # None when training was skipped and the champion stays
        challenger = engine_of(challenger_path)
        base_spec = dataclasses.replace(challenger.spec)
        run("challenger", challenger, None, challenger_sha,
            torch_encoder=lambda: load_encoder(challenger_path, device=device))
        del challenger

    if include_champion and store is not None:
        ref = store.champion()
        if ref is not None:
            version = ref.version
            out["champion_version"] = version
            out["champion_run_id"] = ref.run_id  # its training run: what it was trained on (open-set split)
            try:
                path = store.path(ref)
                sha = file_sha256(path)
                engine = store.engine(ref, backend=backend, device=device)
                if base_spec is None:
                    base_spec = dataclasses.replace(engine.spec)
                if sha == challenger_sha:  # same weights (e.g. a resumed, finished training): same numbers
                    same = out["models"]["challenger"]
                    report("champion", {"reports": out["reports"]["challenger"], "metrics": same["metrics"],
                                        "seconds": 0.0, "crops_per_s": same["crops_per_s"]}, version,
                           " (same weights as the challenger)")
                else:
                    run("champion", engine, version, sha, torch_encoder=lambda: store.encoder(ref, device=device))
            except Exception as e:  # noqa: BLE001 - reported; the decision keeps the champion
                out["champion_error"] = f"{type(e).__name__}: {e}"[:500]
                echo(f"champion v{version} could not be evaluated: {out['champion_error']}")

    if include_base and base_spec is not None:
        from skulens.model.factory import ModelSpec

        if isinstance(base_spec, dict):
            base_spec = ModelSpec.from_dict(base_spec)
        _seeded(base_seed)
        base = create_encoder(base_spec, device="cpu")
        run("base", _base_engine(base, store, cache_dir, device, engine_of), None)
    return out


def _base_engine(base, store, cache_dir, device, engine_of):
    """The base tower through the engine too: saved to a file (deterministic weights: the same file and
    sha256 every run, so it is compiled once), compiled like any model; PyTorch when that fails."""
    import tempfile

    from skulens.model.io import save_encoder

    try:
        with tempfile.TemporaryDirectory(dir=cache_dir if cache_dir and Path(cache_dir).is_dir() else None) as td:
            path = save_encoder(base, Path(td) / "encoder.pt")
            if store is not None:
                return engine_of(store.put(path)[0])
            keep = Path(cache_dir or tempfile.gettempdir()) / "base-towers" / file_sha256(path)
            keep.mkdir(parents=True, exist_ok=True)
            for f in (path, path.with_name(path.name + ".json")):
                if not (keep / f.name).exists():
                    os.replace(f, keep / f.name)
            return engine_of(keep / "encoder.pt")
    except Exception:  # noqa: BLE001 - the base tower is a reference number: eager PyTorch still gives it
        return base.to(device)


# ====================================================================== reporting
def flat_metrics(evaluation: dict, roles: tuple[str, ...] = MODEL_ROLES) -> dict[str, float]:
    """``eval/<role>/<gallery>/<metric>`` -> value, for MLflow; with the open-set split when it was added
    (:func:`skulens.evaluation.splits.add_open_set`: ``top1_seen``, ``top1_unseen``, ``n_seen``, ...,
    ``top1_cat_<category>``) and ``eval/<role>/trained_skus``."""
    out = {}
    for role in roles:
        m = evaluation["models"].get(role)
        if not m:
            continue
        open_set = m.get("open_set") or {}
        for g, metrics in m["metrics"].items():
            for key, v in {**metrics, **(open_set.get(g) or {}).get("metrics", {})}.items():
                if v is not None and math.isfinite(float(v)):
                    out[f"eval/{role}/{g}/{key}"] = float(v)
        if m.get("trained_skus") is not None:
            out[f"eval/{role}/trained_skus"] = float(m["trained_skus"])
    return out

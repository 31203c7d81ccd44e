"""The model half of the pipeline as plain functions (no Dagster): evaluate challenger / champion /
base tower on the same shelf crops, register + decide promotion, build and publish the SKU index with
the champion, export the champion to ONNX. The Dagster assets in ``assets/`` are thin calls into here.

Evaluation protocol (RetailKLIP): every shelf crop is classified by 1-NN (a SKU scores its best
gallery row) against two galleries built with the model under test:

* ``catalog``    - every cleaned catalog image (what the published index holds in production);
* ``retailklip`` - one catalog image per SKU plus ``n_aug`` shelf-like augmentations of it.

Every model is scored on exactly the same crops; the crops are fingerprinted (``eval_set``, a hash of
the sorted crop keys and ETags) so that numbers from different runs are only compared when they were
measured on the same crops.

Heavy libraries (torch, mlflow, matplotlib, onnx) are imported inside the functions.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from skulens.evaluate import EvalReport, evaluate, plot_confusions, plot_per_sku, retailklip_gallery
from skulens.index import SkuIndex

GALLERIES = ("catalog", "retailklip")
MODEL_ROLES = ("challenger", "champion", "base")
#: EvalReport.metrics() keys that are copied to MLflow / the promotion decision
METRIC_KEYS = ("top1", "top5", "category_acc", "mean_per_sku_top1", "n_queries", "n_unknown_sku",
               "top1_sparse", "n_sparse", "top1_rich", "n_rich")
#: SKUs with fewer catalog images than this get shelf-like views in the index (RetailKLIP 4.2) ...
SPARSE_BELOW = 3
#: ... this many per image (0 = none)
SPARSE_VIEWS = 8

Echo = Callable[[str], None]


def _noop(_: str) -> None:
    pass


# ====================================================================== inputs
def resolve_device(preferred: str | None = None) -> str:
    """``preferred`` if given, else ``cuda`` when available, else ``cpu``."""
    if preferred:
        return str(preferred)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def catalog_frame(kept: pd.DataFrame) -> pd.DataFrame:
    """Cleaned catalog images (sku, key, clean_path), sorted by sku then path; only existing files."""
    df = kept[["sku", "key", "clean_path"]].copy()
    df["sku"] = df["sku"].astype(str)
    df["clean_path"] = df["clean_path"].astype(str)
    df = df[df["clean_path"].map(lambda p: Path(p).is_file())]
    return df.sort_values(["sku", "clean_path"], kind="stable").reset_index(drop=True)


def thumbnails(catalog: pd.DataFrame) -> dict[str, str]:
    """sku -> its first cleaned catalog image (for the confusion plot)."""
    first = catalog.drop_duplicates("sku", keep="first")
    return dict(zip(first["sku"], first["clean_path"]))


# ====================================================================== evaluation
def catalog_fingerprint(catalog: pd.DataFrame) -> str:
    """sha256 over the cleaned images (sku, key, file, size, mtime): a key for cached embeddings."""
    h = hashlib.sha256()
    for sku, key, path in zip(catalog["sku"], catalog["key"].astype(str), catalog["clean_path"]):
        st = os.stat(path)
        h.update(f"{sku}\t{key}\t{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class EmbeddingCache:
    """Catalog embeddings per (encoder file sha256, catalog fingerprint) as ``.npy`` files, so that the
    index build reuses what the evaluation computed with the same weights (and a re-run skips work).
    Files are written atomically; a damaged or mismatching file is ignored."""

    def __init__(self, root: str | os.PathLike, keep: int = 8):
        self.root = Path(root)
        self.keep = keep  # newest files kept; older ones are removed (local cache only)

    def _path(self, encoder_sha: str, catalog_fp: str) -> Path:
        return self.root / f"{encoder_sha[:20]}-{catalog_fp[:20]}.npy"

    def get(self, encoder_sha: str | None, catalog_fp: str, n: int):
        import numpy as np

        if not encoder_sha:
            return None
        p = self._path(encoder_sha, catalog_fp)
        try:
            v = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return v if v.ndim == 2 and v.shape[0] == n and np.isfinite(v).all() else None

    def put(self, encoder_sha: str | None, catalog_fp: str, vectors) -> None:
        import numpy as np

        if not encoder_sha:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        p = self._path(encoder_sha, catalog_fp)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(vectors, dtype=np.float32))
        os.replace(tmp, p)
        files = sorted(self.root.glob("*.npy"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
        for old in files[self.keep:]:
            old.unlink(missing_ok=True)


def sparse_rows(catalog: pd.DataFrame, below: int) -> pd.DataFrame:
    """The catalog rows of SKUs with fewer than ``below`` images (sparse SKUs, e.g. packshot-only)."""
    if below <= 0 or len(catalog) == 0:
        return catalog.iloc[:0]
    counts = catalog.groupby("sku")["sku"].transform("size")
    return catalog[counts < below]


#: the sparse-SKU rule of an index that records none (the IndexSettings defaults)
DEFAULT_SPARSE_RULE = {"below": SPARSE_BELOW, "views": SPARSE_VIEWS, "seed": 0}


def view_labels(rows: pd.DataFrame, views: int) -> tuple[list[str], list[str]]:
    """``(skus, keys)`` of the view rows of ``rows``, in :func:`view_vectors` order (keys ``<key>#aug<i>``)."""
    skus = [s for s in rows["sku"].astype(str) for _ in range(views)]
    keys = [f"{k}#aug{i}" for k in rows["key"].astype(str) for i in range(1, views + 1)]
    return skus, keys


def view_vectors(encoder, rows: pd.DataFrame, views: int, seed: int = 0, batch_size: int = 64,
                 chunk: int = 16):
    """``views`` shelf-like augmentations (:func:`skulens.augment.shelf_augment`) of each row's image,
    embedded, in :func:`view_labels` order. Seeded per (seed, key), so a SKU's views do not depend on
    the rest of the catalog (the full build and ``index_update`` agree)."""
    import zlib

    import numpy as np

    from skulens.augment import shelf_augment
    from skulens.embed import embed_images
    from skulens.images import load_rgb

    vecs = []
    items = list(zip(rows["key"].astype(str), rows["clean_path"].astype(str)))
    for start in range(0, len(items), chunk):  # a few images at a time: packshots can be large
        imgs = []
        for key, path in items[start:start + chunk]:
            base = load_rgb(path)
            rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
            imgs += [shelf_augment(base, rng) for _ in range(views)]
        vecs.append(embed_images(encoder, imgs, batch_size=batch_size))
    dim = int(getattr(encoder, "embed_dim", 0) or (vecs[0].shape[1] if vecs else 0))
    return np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)


def catalog_index(encoder, catalog: pd.DataFrame, model_version: str | None = None, batch_size: int = 64,
                  meta: dict | None = None, cache: EmbeddingCache | None = None,
                  encoder_sha: str | None = None, sparse_below: int = 0, sparse_views: int = 0,
                  aug_seed: int = 0) -> SkuIndex:
    """An index of every cleaned catalog image embedded with ``encoder`` (through ``cache`` when the
    encoder's file hash is known), plus ``sparse_views`` shelf-like views of every image of the SKUs
    with fewer than ``sparse_below`` images. The rule is stored in the index meta (``sparse``) so
    that ``index_update`` applies the same one."""
    import numpy as np

    from skulens.embed import embed_images

    fp = catalog_fingerprint(catalog) if cache is not None and encoder_sha else None
    vecs = cache.get(encoder_sha, fp, len(catalog)) if fp else None
    if vecs is None:
        vecs = embed_images(encoder, catalog["clean_path"].tolist(), batch_size=batch_size)
        if fp:
            cache.put(encoder_sha, fp, vecs)
    skus, keys = catalog["sku"].tolist(), catalog["key"].astype(str).tolist()
    rows = sparse_rows(catalog, sparse_below) if sparse_views > 0 else catalog.iloc[:0]
    if len(rows):
        vfp = (hashlib.sha256(f"{fp}|views|{sparse_below}|{sparse_views}|{aug_seed}".encode()).hexdigest()
               if fp else None)
        n_views = len(rows) * sparse_views
        v = cache.get(encoder_sha, vfp, n_views) if vfp else None
        if v is None:
            v = view_vectors(encoder, rows, sparse_views, aug_seed, batch_size)
            if vfp:
                cache.put(encoder_sha, vfp, v)
        vskus, vkeys = view_labels(rows, sparse_views)
        vecs, skus, keys = np.concatenate([vecs, v]), skus + vskus, keys + vkeys
    m = dict(meta or {})
    m["sparse"] = {"below": int(sparse_below), "views": int(sparse_views), "seed": int(aug_seed),
                   "skus": int(rows["sku"].nunique()) if len(rows) else 0}
    return SkuIndex(vecs, skus, keys, model_version=model_version, meta=m)


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
    from skulens.embed import embed_images

    t0 = time.perf_counter()
    q = embed_images(encoder, crops["path"].astype(str).tolist(), batch_size=batch_size)
    t_query = time.perf_counter() - t0
    reports: dict[str, EvalReport] = {}
    for g in galleries:
        if g == "catalog":
            index = catalog_index(encoder, catalog, batch_size=batch_size, cache=cache, encoder_sha=encoder_sha,
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
    }


def report_metrics(report: EvalReport) -> dict:
    """The numbers of one report that go to MLflow and into the promotion decision."""
    m = {**report.metrics(), **report.extra.get("sparse", {})}
    out = {k: float(m[k]) for k in METRIC_KEYS if k in m and m[k] is not None}
    out.setdefault("top5", float(report.top5))
    return out




from skulens.model_store import file_sha256  # noqa: E402 - one checksum helper for every artifact


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
) -> dict:
    """Evaluate the challenger (file), the current champion (``store``: a
    :class:`skulens.model_store.ModelStore`; its ``champion`` alias, if any) and the
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
    """
    from skulens.models.factory import create_encoder
    from skulens.models.io import load_encoder

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
                 "models": {}, "reports": {}, "champion_version": None, "champion_error": None}

    def run(role: str, encoder, version: str | None, sha: str | None = None) -> None:
        res = evaluate_model(encoder, crops, catalog, products, encoder_sha=sha, **kw)
        report(role, res, version)

    def report(role: str, res: dict, version: str | None, note: str = "") -> None:
        out["reports"][role] = res["reports"]
        out["models"][role] = {"version": version, "metrics": res["metrics"], "seconds": res["seconds"],
                               "crops_per_s": res["crops_per_s"]}
        echo(f"{role}{f' v{version}' if version else ''}{note}: " + "; ".join(
            f"{g} {r.summary()}" for g, r in res["reports"].items()))

    if challenger_path:  # None when training was skipped and the champion stays
        challenger = load_encoder(challenger_path, device=device)
        base_spec = dataclasses.replace(challenger.spec)
        run("challenger", challenger, None, challenger_sha)
        del challenger

    if include_champion and store is not None:
        ref = store.champion()
        if ref is not None:
            version = ref.version
            out["champion_version"] = version
            try:
                path = store.path(ref)
                sha = file_sha256(path)
                if base_spec is None:
                    base_spec = dataclasses.replace(store.encoder(ref, device=device).spec)
                if sha == challenger_sha:  # same weights (e.g. a resumed, finished training): same numbers
                    same = out["models"]["challenger"]
                    report("champion", {"reports": out["reports"]["challenger"], "metrics": same["metrics"],
                                        "seconds": 0.0, "crops_per_s": same["crops_per_s"]}, version,
                           " (same weights as the challenger)")
                else:
                    run("champion", store.encoder(ref, device=device), version, sha)
            except Exception as e:  # noqa: BLE001 - reported; the decision keeps the champion
                out["champion_error"] = f"{type(e).__name__}: {e}"[:500]
                echo(f"champion v{version} could not be evaluated: {out['champion_error']}")

    if include_base and base_spec is not None:
        from skulens.models.factory import ModelSpec

        if isinstance(base_spec, dict):
            base_spec = ModelSpec.from_dict(base_spec)
        _seeded(base_seed)
        base = create_encoder(base_spec, device=device)
        run("base", base, None)
    return out


# ====================================================================== reporting
def flat_metrics(evaluation: dict, roles: tuple[str, ...] = MODEL_ROLES) -> dict[str, float]:
    """``eval/<role>/<gallery>/<metric>`` -> value, for MLflow."""
    out = {}
    for role in roles:
        m = evaluation["models"].get(role)
        if not m:
            continue
        for g, metrics in m["metrics"].items():
            for key, v in metrics.items():
                if v is not None and math.isfinite(float(v)):
                    out[f"eval/{role}/{g}/{key}"] = float(v)
    return out


def comparison_table(evaluation: dict) -> pd.DataFrame:
    """One row per (model, gallery): top-1, top-5, category accuracy, mean per-SKU top-1."""
    rows = []
    for role in MODEL_ROLES:
        m = evaluation["models"].get(role)
        if not m:
            continue
        for g, met in m["metrics"].items():
            rows.append({"model": role + (f" v{m['version']}" if m.get("version") else ""), "gallery": g,
                         "top1": round(met.get("top1", float("nan")), 4),
                         "top5": round(met.get("top5", float("nan")), 4),
                         "category_acc": round(met["category_acc"], 4) if "category_acc" in met else None,
                         "mean_per_sku_top1": round(met.get("mean_per_sku_top1", float("nan")), 4),
                         "crops_per_s": m.get("crops_per_s")})
    return pd.DataFrame(rows)


def confusions_table(evaluation: dict, gallery: str = "catalog", top: int = 10) -> pd.DataFrame:
    """Top confused pairs (true -> predicted, count) of every evaluated model on ``gallery``."""
    frames = []
    for role, reps in evaluation["reports"].items():
        rep = reps.get(gallery)
        if rep is None or len(rep.confusions) == 0:
            continue
        c = rep.confusions.head(top)[["true", "true_name", "predicted", "predicted_name", "count"]].copy()
        c.insert(0, "model", role)
        frames.append(c)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def per_sku_table(evaluation: dict, gallery: str = "catalog") -> pd.DataFrame:
    """Per-SKU top-1 of each model side by side (worst challenger SKUs first)."""
    out = None
    for role, reps in evaluation["reports"].items():
        rep = reps.get(gallery)
        if rep is None:
            continue
        df = rep.per_sku[["sku", "name", "n", "top1"]].rename(columns={"top1": f"top1_{role}"})
        out = df if out is None else out.merge(df[["sku", f"top1_{role}"]], on="sku", how="outer")
    if out is None:
        return pd.DataFrame()
    sort = "top1_challenger" if "top1_challenger" in out else out.columns[-1]
    return out.sort_values([sort, "sku"]).reset_index(drop=True)


def write_reports(evaluation: dict, catalog: pd.DataFrame, out_dir: str | os.PathLike,
                  gallery: str = "catalog", top_confusions: int = 8) -> dict[str, str]:
    """Write the challenger's plots (per-SKU accuracy, confused pairs with thumbnails) as PNG and the
    tables (comparison, per-SKU, confusions, summary JSON). Returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    role = next((r for r in MODEL_ROLES if r in evaluation["reports"]), None)  # the challenger, when there is one
    if role is None:
        raise ValueError("nothing was evaluated")
    rep = evaluation["reports"][role][gallery]
    paths = {
        "per_sku_png": plot_per_sku(rep, out_dir / "per_sku_accuracy.png"),
        "confusions_png": plot_confusions(rep, thumbnails(catalog), out_dir / "confusions.png", top=top_confusions),
    }
    comparison_table(evaluation).to_csv(out_dir / "comparison.csv", index=False)
    per_sku_table(evaluation, gallery).to_csv(out_dir / "per_sku.csv", index=False)
    confusions_table(evaluation, gallery, top=50).to_csv(out_dir / "confusions.csv", index=False)
    summary = {k: v for k, v in evaluation.items() if k != "reports"}
    (out_dir / "evaluation.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    paths.update({"comparison_csv": str(out_dir / "comparison.csv"), "per_sku_csv": str(out_dir / "per_sku.csv"),
                  "confusions_csv": str(out_dir / "confusions.csv"), "summary_json": str(out_dir / "evaluation.json")})
    return paths


def png_markdown(path: str | os.PathLike, title: str = "", max_side: int = 720, max_bytes: int = 350_000) -> str:
    """Markdown with the PNG embedded as a base64 data URI (downscaled to ``max_side`` px); if it is
    still larger than ``max_bytes``, only the file path."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, "PNG", optimize=True)
    data = buf.getvalue()
    if len(data) > max_bytes:
        return f"{title}\n\n`{path}` ({len(data) // 1024} KiB, too large to embed)"
    b64 = base64.b64encode(data).decode()
    return f"{title}\n\n![{Path(path).stem}](data:image/png;base64,{b64})\n\n`{path}`"


def log_to_run(tracking_uri: str, run_id: str, metrics: dict | None = None, files: dict | None = None,
               artifact_path: str = "evaluation", tags: dict | None = None) -> None:
    """Log metrics (step 0), tags and files (artifacts under ``artifact_path``) to an existing MLflow run."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items()
          if v is not None and math.isfinite(float(v))]
    ts_tags = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
    for i in range(0, max(len(ms), 1), 900):
        client.log_batch(run_id, metrics=ms[i:i + 900], tags=ts_tags if i == 0 else [])
    for p in (files or {}).values():
        client.log_artifact(run_id, str(p), artifact_path)


# ====================================================================== registry
def lineage(trained: dict, evaluation: dict, extra: dict | None = None) -> dict:
    """What the registered version was made from and measured on."""
    dv = trained.get("dataset_version") or {}
    out = {
        "dataset_clean_md5": dv.get("clean_md5"), "dataset_balanced_md5": dv.get("balanced_md5"),
        "git_rev": dv.get("git_rev"), "git_dirty": dv.get("git_dirty"),
        "eval_set": evaluation["eval_set"], "eval_crops": evaluation["n_crops"],
        "training_run_id": trained.get("mlflow_run_id"), "device": trained.get("device"),
        "evaluated_champion": evaluation.get("champion_version"),
    }
    out.update(extra or {})
    return {k: v for k, v in out.items() if v is not None}


def registration_metrics(trained: dict, evaluation: dict, gallery: str = "catalog") -> dict:
    """Metrics stored on the registered version's run: the primary gallery's metrics under their
    plain names (``top1``, ``top5``, ...; what :func:`skulens.registry.get_champion` returns), the
    other galleries as ``<gallery>/<metric>``, and the training summary as ``train/<metric>``."""
    ch = evaluation["models"]["challenger"]["metrics"]
    out = dict(ch[gallery])
    for g, m in ch.items():
        for k, v in m.items():
            out[f"{g}/{k}"] = v
    for k, v in (trained.get("metrics") or {}).items():
        out[f"train/{k}"] = v
    return out


def saved_spec(encoder_path: str | os.PathLike) -> dict | None:
    """The resolved spec stored next to an encoder file (``<file>.json``, written by save_encoder):
    what evaluation and serving use (training may have run at another input size)."""
    side = Path(str(encoder_path) + ".json")
    try:
        return dict(json.loads(side.read_text())["spec"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


#: tags of the training run copied to the registered version's run (the nightly schedule compares
#: ``catalog.fingerprint`` and ``train.config_hash`` of the champion's run with the current ones)
CARRIED_TAG_PREFIXES = ("catalog.", "train.", "dataset.", "git.")


def training_run_tags(tracking_uri: str, run_id: str | None) -> dict:
    """The training run's ``catalog.*``, ``train.*``, ``dataset.*`` and ``git.*`` tags."""
    if not run_id:
        return {}
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri).get_run(run_id).data.tags
    return {k: v for k, v in tags.items() if k.startswith(CARRIED_TAG_PREFIXES)}


def register_and_decide(
    tracking_uri: str,
    model_name: str,
    trained: dict,
    evaluation: dict,
    metric: str = "top1",
    gallery: str = "catalog",
    margin: float = 0.0,
    checks_passed: bool = True,
    experiment: str | None = None,
    extra_lineage: dict | None = None,
    tags: dict | None = None,
) -> dict:
    """Register the challenger (alias ``challenger``) with lineage, then promote it to ``champion``
    only if it beats the champion evaluated in the same run on the same crops.

    Never promotes when: data checks failed, the challenger metric is missing, the champion could
    not be evaluated on these crops, the champion alias moved since the evaluation (another run
    promoted meanwhile), or the challenger is not better by ``margin``. A tie is not promoted.
    """
    from skulens.registry import decide_promotion, get_champion, log_and_register, promote

    encoder_path = trained["encoder_path"]  # the verified local copy (ModelStore.fetch of encoder_uri)
    sha = evaluation.get("challenger_sha256")
    if sha and file_sha256(encoder_path) != sha:
        raise RuntimeError(f"{encoder_path} changed since it was evaluated (another training run?): "
                           "re-run model_evaluation before registering")
    if gallery not in evaluation["models"]["challenger"]["metrics"]:
        raise ValueError(f"gallery {gallery!r} was not evaluated; one of {list(evaluation['models']['challenger']['metrics'])}")
    eval_set = evaluation["eval_set"]
    challenger = {**evaluation["models"]["challenger"]["metrics"][gallery], "eval_set": eval_set}
    spec, cfg = saved_spec(encoder_path) or trained.get("spec") or {}, trained.get("train_config") or {}
    params = {**{f"model.{k}": v for k, v in spec.items()}, **{f"train.{k}": v for k, v in cfg.items()},
              "eval.gallery": gallery, "eval.metric": metric, "eval.k": evaluation.get("k")}
    version = log_and_register(
        tracking_uri, model_name, encoder_path,
        metrics=registration_metrics(trained, evaluation, gallery), params=params,
        tags={**training_run_tags(tracking_uri, trained.get("mlflow_run_id")),
              "run_name": f"register-{spec.get('name', 'encoder')}", "skulens.stage": "register", **(tags or {})},
        lineage=lineage(trained, evaluation, extra_lineage), experiment=experiment,
    )

    evaluated = evaluation.get("champion_version")
    current = get_champion(tracking_uri, model_name)
    current_version = current[0] if current else None
    champion_metric = None
    if current_version != evaluated and evaluated is None and not evaluation.get("champion_checked", True):
        promote_it, reason = False, (f"champion v{current_version} was not evaluated in this run (include_champion="
                                     "False): not comparable, keeping the champion")
    elif current_version != evaluated:
        promote_it, reason = False, (f"champion changed during the run (evaluated v{evaluated}, now v{current_version}): "
                                     "not comparable, keeping the champion; run again to compare on the same crops")
    elif current is None:
        promote_it, reason = decide_promotion(challenger, None, metric=metric, margin=margin,
                                              checks_passed=checks_passed)
    else:
        champ_eval = evaluation["models"].get("champion")
        champion = {"eval_set": eval_set}
        if champ_eval:
            champion.update(champ_eval["metrics"].get(gallery, {}))
            champion_metric = champion.get(metric)
        promote_it, reason = decide_promotion(challenger, champion, metric=metric, margin=margin,
                                              checks_passed=checks_passed)
        if not champ_eval and evaluation.get("champion_error"):
            reason += f" (champion v{evaluated} could not be evaluated: {evaluation['champion_error']})"

    previous = None
    if promote_it:
        previous = promote(tracking_uri, model_name, version, reason=reason)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_model_version_tag(model_name, version, "promotion_decision", "promoted" if promote_it else "kept-champion")
    client.set_model_version_tag(model_name, version, "promotion_decision_reason", reason[:5000])
    after = get_champion(tracking_uri, model_name)
    return {
        "version": version, "promoted": bool(promote_it), "reason": reason,
        "champion_version": after[0] if after else None,
        "previous_champion": previous if promote_it else current_version,
        "metric": metric, "gallery": gallery, "margin": float(margin), "eval_set": eval_set,
        "challenger_metric": challenger.get(metric), "champion_metric": champion_metric,
        "checks_passed": bool(checks_passed), "model_name": model_name,
        "clean_md5": (trained.get("dataset_version") or {}).get("clean_md5"),
    }


# ====================================================================== index
def build_champion_index(
    store,
    catalog: pd.DataFrame,
    device: str = "cpu",
    batch_size: int = 64,
    meta: dict | None = None,
    sources: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    sparse_below: int = SPARSE_BELOW,
    sparse_views: int = SPARSE_VIEWS,
    aug_seed: int = 0,
) -> tuple[SkuIndex, str]:
    """Embed every cleaned catalog image with the current ``champion`` of ``store`` (a
    :class:`skulens.model_store.ModelStore`): ``(index, version)``. The index meta names the model by
    version, sha256 and URI, so readers load it from their cache without the registry.

    ``sources`` ({catalog key: etag} of every file the cleaning looked at, kept or dropped) is stored
    in the index meta so that the incremental index update (:mod:`skulens.automation`) only embeds
    SKUs that changed after this build."""
    from skulens.automation import SOURCES_META

    if len(catalog) == 0:
        raise ValueError("the cleaned catalog has no images to index")
    ref = store.champion()
    if ref is None:
        raise LookupError(f"registered model {store.model_name!r} has no 'champion' alias")
    sha = store.complete(ref).sha256  # the cache names the file by its checked sha256: no re-hash
    encoder = store.encoder(ref, device=device)
    version = ref.version
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    index = catalog_index(encoder, catalog, model_version=version, batch_size=batch_size,
                          cache=cache, encoder_sha=sha if cache is not None else None,
                          sparse_below=sparse_below, sparse_views=sparse_views, aug_seed=aug_seed,
                          meta={"model_name": store.model_name, "model_sha256": sha, "model_uri": ref.uri,
                                "source": "catalog", **(meta or {}),
                                **({SOURCES_META: dict(sources)} if sources is not None else {})})
    return index, version


def publish_if_changed(client, bucket: str, index: SkuIndex, prefix: str = "index") -> dict:
    """Publish ``index`` atomically (:func:`skulens.index.publish_index`) unless the current pointer
    already names an index with the same content (same vectors, SKUs, keys and model version).
    Returns the pointer plus ``published`` (bool)."""
    from skulens.index import publish_index, read_pointer

    current = read_pointer(client, bucket, prefix)
    if current is not None and current.get("content_hash") == index.content_hash():
        return {**current, "published": False}
    publish_index(client, bucket, index, prefix=prefix)
    pointer = read_pointer(client, bucket, prefix)
    return {**pointer, "published": True}


# ====================================================================== ONNX
def export_champion_onnx(store, work_dir: str | os.PathLike,
                         opset: int = 17, atol: float = 1e-4, artifact_path: str = "onnx") -> dict:
    """Export the champion encoder to ONNX (parity-checked with onnxruntime) and log the file to the
    champion version's MLflow run under ``artifact_path/`` (once per version: an existing file is
    never replaced). Returns the export info plus ``version``, ``run_id``, ``artifact_uri``, ``uploaded``."""
    from mlflow import MlflowClient

    from skulens.export import export_onnx

    work_dir = Path(work_dir)
    model_name = store.model_name
    client = MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    ref = store.champion()
    if ref is None:
        raise LookupError(f"registered model {model_name!r} has no 'champion' alias")
    version, run_id = ref.version, ref.run_id
    encoder = store.encoder(ref, device="cpu")
    name = f"encoder-v{version}.onnx"
    info = export_onnx(encoder, work_dir / "onnx" / name, opset=opset, atol=atol)
    existing = {Path(f.path).name for f in client.list_artifacts(run_id, artifact_path)}
    uploaded = name not in existing
    if uploaded:
        client.log_artifact(run_id, info["path"], artifact_path)
    client.set_model_version_tag(model_name, version, "onnx.max_abs_diff", f"{info['max_abs_diff']:.3g}")
    artifact_uri = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}/{name}"
    return {**info, "version": version, "run_id": run_id, "artifact_uri": artifact_uri, "uploaded": uploaded}

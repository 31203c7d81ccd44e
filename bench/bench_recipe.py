"""Recipe benchmark on real shelf crops (GroZi-120): which training and gallery levers help, measured.

Every row fine-tunes through the ``main`` job's own path (``split_validation`` + ``balance`` as the
``balanced_dataset`` asset does, then :func:`skulens.model.training_run.run_training` with the launchpad
defaults of ``TrainSettings`` / ``BalanceSettings`` plus the row's overrides), then embeds with the
compiled inference engine, as evaluation does.

Two protocols, so that nothing is tuned on the figures we report (frames of each product ordered by N
in ``videoN.jpg``; neighbouring frames are near-duplicates, so splits are by ranges of N):

* ``dev`` (choose levers here): products held out from training drawn with seed ``1000 + seed``;
  training on frames ``[0, n/4)`` of the other products; gallery = first k frames of every product;
  queries = frames ``[n/4, n/2)``. Never touches the second half of any product.
* ``test`` (report here; the protocol of ``bench_grozi.py``): products held out drawn with ``seed``;
  training on frames ``[0, n/2)``; gallery = first k frames; queries = frames ``[n/2, n)``.

Gallery levers are scored from the same embeddings, so they cost no training: ``nn`` (a SKU scores its
best gallery image), ``centroid`` (the normalised mean of its gallery images), and ``flip`` (test-time
horizontal flip: each image's embedding is the normalised sum of it and its mirror image).

Results are appended to ``<out>/results.jsonl`` (one line per variant x protocol x seed; rows already
there are skipped, so an interrupted run continues) and the table is printed from that file.

Usage::

    .venv/bin/python bench/bench_recipe.py --variants base lite0-e8 --protocol dev --seeds 0 1
    .venv/bin/python bench/bench_recipe.py --table              # print the table of what is there
    .venv/bin/python bench/bench_recipe.py --list               # the variants
    .venv/bin/python bench/bench_recipe.py --table --by-aspect  # also k1 per long:short side of the query crop
    .venv/bin/python bench/bench_recipe.py --rescore --variants d-proj-bn --protocol test --seeds 0 1 2
                                                                # kept models (--keep) scored again, no training

The data set is used for this benchmark only; nothing in ``skulens`` references it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench_grozi import DEFAULT_DATA, load_grozi  # noqa: E402

#: name -> (TrainSettings overrides, BalanceSettings overrides). "none": no fine-tuning (the base tower).
#: "base" is today's defaults spelled out, so the row keeps its meaning when the defaults change.
#: The "none*" rows ran with the centre crop (fit "crop", the default until 2026-12-06 15:20 UTC): pinned, so
#: that a rerun keeps their meaning ("none-ms128-pad" / "-squash" are the base tower with the other fits).
VARIANTS: dict[str, tuple[dict, dict]] = {
    "none": ({"eval_scales": [], "fit": "crop"}, {}),  # single-scale, as every row before multi-scale existed
    "none-ms128": ({"eval_scales": [128], "fit": "crop"}, {}),
    "none-lite1": ({"model": "efficientnet-lite1", "eval_scales": [], "fit": "crop"}, {}),
    "none-lite2": ({"model": "efficientnet-lite2", "eval_scales": [], "fit": "crop"}, {}),
}
#: the defaults before this benchmark (issue 9): Lite0, 4 epochs at 128 px, depth 16, last epoch saved, centre
#: crop, no projector (every knob that has a different default since is pinned, so these rows keep their meaning)
OLD = {"model": "efficientnet-lite0", "epochs": 4, "train_image_size": 128, "keep_best": False, "ema_decay": None,
       "augment_strength": 1.0, "augment_originals": False, "wise_alpha": 1.0, "sub_centers": 1, "m_per_class": None,
       "image_size": None, "freeze_blocks": 0, "eval_scales": [], "fit": "crop", "projector": "none"}


def _v(name: str, depth: int = 16, **over) -> None:
    VARIANTS[name] = ({**OLD, **over}, {"depth": depth})


#: "defaults": the launchpad defaults of the code being run (each row records the resolved config and spec).
#: The "defaults" rows in results.jsonl from before eval_scales became [128] (2026-12-06) are single-scale:
#: the same as "defaults-single" now
VARIANTS["defaults"] = ({}, {})
#: multi-scale inference at the training size / off (same training, so the same weights per seed)
VARIANTS["defaults-ms128"] = ({"eval_scales": [128]}, {})
VARIANTS["defaults-single"] = ({"eval_scales": []}, {})
_v("base")
_v("e8", epochs=8)
_v("e12", epochs=12)
_v("e8-best", epochs=8, keep_best=True)
_v("e8-ema", epochs=8, ema_decay=0.998)
_v("px176-e8", epochs=8, train_image_size=176)
_v("px224-e8", epochs=8, train_image_size=224)
_v("aug0.5-e8", epochs=8, augment_strength=0.5)
_v("augall-e8", epochs=8, augment_originals=True)
_v("d32-e4", depth=32)
_v("e8-wise0.7", epochs=8, wise_alpha=0.7)
_v("e8-wise0.5", epochs=8, wise_alpha=0.5)
_v("e8-f3", epochs=8, freeze_blocks=3)
_v("px176-e8-f3", epochs=8, train_image_size=176, freeze_blocks=3)
_v("px176-e8-f3-ema", epochs=8, train_image_size=176, freeze_blocks=3, ema_decay=0.998)
_v("e8-f3-ema", epochs=8, freeze_blocks=3, ema_decay=0.998)
_v("e12-f3-ema", epochs=12, freeze_blocks=3, ema_decay=0.998)
_v("e8-subc3", epochs=8, sub_centers=3)
_v("e8-mpc4", epochs=8, m_per_class=4)
_v("lite1-e8", epochs=8, model="efficientnet-lite1")
_v("lite1-e8-f3", epochs=8, model="efficientnet-lite1", freeze_blocks=3)
_v("lite2-e8", epochs=8, model="efficientnet-lite2")
_v("lite2-px176-e8", epochs=8, model="efficientnet-lite2", train_image_size=176)
#: "d-*": the launchpad defaults of the code being run plus one change, so their meaning moves with the
#: defaults (each row records its resolved config and spec). The rows of 2026-12-06 before 15:20 UTC ran
#: on centre-crop defaults: d-scale32 is crop + that change, and d-pad-noaug = the defaults until the
#: projector (pinned to projector none below, so its recorded rows keep their meaning). d-f5,
#: d-margin15, d-e12, d-lite1 and d-ms160 ran after 17:15 UTC on the pad defaults.
#: Loss and freezing levers aimed at never-seen products:
VARIANTS["d-scale32"] = ({"scale": 32.0}, {})
VARIANTS["d-margin15"] = ({"margin": 15.0}, {})
VARIANTS["d-f5"] = ({"freeze_blocks": 5}, {})
VARIANTS["d-e12"] = ({"epochs": 12}, {})
VARIANTS["d-lite1"] = ({"model": "efficientnet-lite1"}, {})
#: a training-only head between the tower and ArcFace (dropped after training), for never-seen products.
#: They ran on the pad defaults with projector none (2026-12-06 after 22:40 UTC); d-proj-bn = the defaults from
#: then until 2026-12-07 06:00 UTC (m-per-class batches and the metric loss pinned off, so its rows keep their meaning)
VARIANTS["d-proj-bn"] = ({"projector": "bn", "m_per_class": None, "metric_loss": "none"}, {})
VARIANTS["d-proj-bn-lr5e3"] = ({"projector": "bn", "projector_lr": 5e-3, "m_per_class": None, "metric_loss": "none"}, {})
VARIANTS["d-proj-mlp"] = ({"projector": "mlp", "m_per_class": None, "metric_loss": "none"}, {})
VARIANTS["d-proj-mlp512"] = ({"projector": "mlp", "projector_dim": 512, "m_per_class": None, "metric_loss": "none"}, {})
#: a pair loss on the tower's features before the neck, ArcFace after it (the re-identification BNNeck recipe),
#: with the m-per-class batches it needs; d-mpc4 is the same batches without it (the control). They ran on the
#: d-proj-bn defaults (2026-12-07); d-tri-w30 = the defaults since
VARIANTS["d-mpc4"] = ({"m_per_class": 4, "metric_loss": "none"}, {})
VARIANTS["d-ms"] = ({"m_per_class": 4, "metric_loss": "multi_similarity", "metric_loss_weight": 1.0}, {})
VARIANTS["d-tri"] = ({"m_per_class": 4, "metric_loss": "triplet", "metric_loss_weight": 1.0}, {})
#: the same at a weight where the pair loss is not dwarfed by ArcFace (scale 64: its loss is ~10x MS's, ~100x
#: the batch-hard triplet's at margin 0.1)
VARIANTS["d-ms-w10"] = ({"m_per_class": 4, "metric_loss": "multi_similarity", "metric_loss_weight": 10.0}, {})
VARIANTS["d-tri-w30"] = ({"m_per_class": 4, "metric_loss": "triplet", "metric_loss_weight": 30.0}, {})
#: another second inference scale instead of 128 px
VARIANTS["d-ms160"] = ({"eval_scales": [160]}, {})
#: how images are fitted to the square input (ModelSpec.fit): the whole product instead of a centre crop;
#: "-noaug": the augmented training views still crop the raw image (only evaluation, validation and the
#: non-augmented training rows see the fit)
VARIANTS["d-squash"] = ({"fit": "squash"}, {})
VARIANTS["d-pad"] = ({"fit": "pad"}, {})
VARIANTS["d-squash-noaug"] = ({"fit": "squash", "fit_augment": False}, {})
VARIANTS["d-pad-noaug"] = ({"fit": "pad", "fit_augment": False, "projector": "none"}, {})
VARIANTS["d-crop"] = ({"fit": "crop"}, {})
VARIANTS["none-ms128-squash"] = ({"eval_scales": [128], "fit": "squash"}, {})
VARIANTS["none-ms128-pad"] = ({"eval_scales": [128], "fit": "pad"}, {})
KS = (1, 3, 5)


def protocol(df, mode: str, seed: int, holdout_frac: float = 0.25):
    """``(train_df, queries, held)`` for the ``dev`` or ``test`` protocol (see the module docstring)."""
    skus = np.array(sorted(df["sku"].unique()))
    rng = np.random.default_rng(seed if mode == "test" else 1000 + seed)
    held = set(rng.choice(skus, size=round(holdout_frac * len(skus)), replace=False).tolist())
    r, n = df["rank"], df["n"]
    if mode == "test":
        train_mask, query_mask = r < n // 2, r >= n // 2
    elif mode == "dev":
        train_mask, query_mask = r < n // 4, (r >= np.maximum(n // 4, max(KS))) & (r < n // 2)
    else:
        raise ValueError(mode)
    train_df = df[train_mask & ~df["sku"].isin(held)].reset_index(drop=True)
    return train_df, df[query_mask].reset_index(drop=True), held


def _flip_embed(engine, paths, batch_size=64):
    from PIL import ImageOps

    from skulens.data.images import load_rgb
    from skulens.model.embed import embed_images

    out = []
    for i in range(0, len(paths), 256):
        out.append(embed_images(engine, [ImageOps.mirror(load_rgb(p)) for p in paths[i:i + 256]],
                                batch_size=batch_size))
    return np.concatenate(out) if out else np.zeros((0, engine.embed_dim), np.float32)


def _best_per_sku(sims: np.ndarray, g_sku: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(skus, per-SKU score)``: each SKU scores its best gallery row (1-NN per SKU, as the index does)."""
    skus, inv = np.unique(g_sku, return_inverse=True)
    per_sku = np.full((len(sims), len(skus)), -np.inf, dtype=np.float32)
    for j in range(len(skus)):
        per_sku[:, j] = sims[:, inv == j].max(axis=1)
    return skus, per_sku


#: query crops by the ratio of their long to their short side (>= 1): (upper bound, label); ``--by-aspect``
ASPECT_BUCKETS = ((1.5, "1-1.5"), (2.0, "1.5-2"), (3.0, "2-3"), (float("inf"), ">=3"))


def aspect_bucket(ratio: float) -> str:
    return next(label for hi, label in ASPECT_BUCKETS if ratio < hi)


def image_aspect(path) -> float:
    """Long side / short side of an image file (its header only)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return max(w, h) / max(1, min(w, h))


def _rank_metrics(skus: np.ndarray, per_sku: np.ndarray, q_sku: np.ndarray, q_held: np.ndarray,
                  q_bucket: np.ndarray | None = None) -> dict:
    order = np.argsort(-per_sku, axis=1)[:, :5]
    ok1 = skus[order[:, 0]] == q_sku
    ok5 = (skus[order] == q_sku[:, None]).any(axis=1)
    out = {"seen": float(ok1[~q_held].mean()), "unseen": float(ok1[q_held].mean()),
           "all": float(ok1.mean()), "top5_all": float(ok5.mean())}
    if q_bucket is not None:  # top-1 and counts per aspect bucket of the query crop
        out["by_aspect"] = {}
        for b in sorted(set(q_bucket.tolist())):
            cell = out["by_aspect"][b] = {}
            for g, m in (("seen", (q_bucket == b) & ~q_held), ("unseen", (q_bucket == b) & q_held)):
                cell[g] = float(ok1[m].mean()) if m.any() else None
                cell[f"n_{g}"] = int(m.sum())
    return out


def score(df, queries, held, emb: dict[str, np.ndarray]) -> dict:
    """``{f"{flip}/{scoring}/k{k}": {"seen", "unseen", "all", "top5_all"}}`` from the embeddings by path."""
    q_paths = queries["clean_path"].tolist()
    q_sku = queries["sku"].to_numpy()
    q_held = queries["sku"].isin(held).to_numpy()
    q_bucket = (np.array([aspect_bucket(a) for a in queries["aspect"]]) if "aspect" in queries else None)
    out = {}
    for flip in ("plain", "flip"):
        def vec(paths, flip=flip):
            v = np.stack([emb["plain"][p] + (emb["flip"][p] if flip == "flip" else 0) for p in paths])
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        q = vec(q_paths)
        for k in KS:
            gal = df[df["rank"] < k]
            g = vec(gal["clean_path"].tolist())
            g_sku = gal["sku"].to_numpy()
            nn = _rank_metrics(*_best_per_sku(q @ g.T, g_sku), q_sku, q_held, q_bucket)
            out[f"{flip}/nn/k{k}"] = nn
            skus, inv = np.unique(g_sku, return_inverse=True)
            cent = np.stack([g[inv == j].sum(axis=0) for j in range(len(skus))])
            cent /= np.linalg.norm(cent, axis=1, keepdims=True)
            out[f"{flip}/centroid/k{k}"] = _rank_metrics(skus, q @ cent.T, q_sku, q_held)
            if k in emb["views"]:  # as the index does: SKUs with < 3 images also get 8 shelf-like views each
                vg = np.concatenate([g, emb["views"][k]])
                v_sku = np.concatenate([g_sku, emb["views_sku"][k]])
                out[f"{flip}/views/k{k}"] = _rank_metrics(*_best_per_sku(q @ vg.T, v_sku), q_sku, q_held)
            else:
                out[f"{flip}/views/k{k}"] = nn
    return out


def embed_all(model_path: str, paths: list[str], df) -> tuple[dict, dict]:
    from skulens.index.build import SPARSE_BELOW, SPARSE_VIEWS, view_vectors
    from skulens.model.embed import embed_images
    from skulens.model.engine import get_engine

    t0 = time.perf_counter()
    engine = get_engine(model_path)
    plain = embed_images(engine, paths)
    flip = _flip_embed(engine, paths)
    emb = {"plain": dict(zip(paths, plain)), "flip": dict(zip(paths, flip)), "views": {}, "views_sku": {}}
    for k in KS:
        if k < SPARSE_BELOW:  # the index's rule for sparse SKUs (skulens.index.build)
            rows = df[df["rank"] < k].assign(key=lambda d: d["clean_path"])
            emb["views"][k] = view_vectors(engine, rows, SPARSE_VIEWS)
            emb["views_sku"][k] = np.repeat(rows["sku"].to_numpy(), SPARSE_VIEWS)
    info = {"backend": engine.info().get("backend"), "embed_s": round(time.perf_counter() - t0, 1)}
    return emb, info


def embed_and_score(model_path: str, df, queries, held) -> tuple[dict, dict]:
    """``(scores, embedding info)`` of one model on a protocol's queries and galleries (run_one, rescore)."""
    need = sorted(set(df[df["rank"] < max(KS)]["clean_path"]) | set(queries["clean_path"]))
    emb, info = embed_all(model_path, need, df)
    if "aspect" not in queries:
        queries = queries.assign(aspect=[image_aspect(p) for p in queries["clean_path"]])
    return score(df, queries, held, emb), info


def run_one(name: str, mode: str, seed: int, args) -> dict:
    from assets.datasets import BalanceSettings
    from assets.training import TrainSettings
    from skulens.data import balance as bal
    from skulens.data import layout
    from skulens.model import ModelSpec, create_encoder
    from skulens.model.io import save_encoder
    from skulens.model.training_run import run_training

    t_over, b_over = VARIANTS[name]
    df = load_grozi(Path(args.data))
    train_df, queries, held = protocol(df, mode, seed)
    work = Path(args.out) / "runs" / f"{name}-{mode}-s{seed}"
    ts = TrainSettings().model_copy(update={**t_over, "seed": seed})
    row: dict = {"variant": name, "protocol": mode, "seed": seed, "train": t_over, "balance": b_over,
                 "config": ts.train_config(), "spec": ts.spec(),
                 "n_train_images": len(train_df), "n_queries": len(queries), "n_held_products": len(held)}
    if name.startswith("none"):
        work.mkdir(parents=True, exist_ok=True)
        model_path = str(work / "encoder.pt")
        save_encoder(create_encoder(ModelSpec.from_dict(ts.spec())), model_path)
        row.update(train_minutes=0.0)
    else:
        bs = BalanceSettings().model_copy(update={**b_over, "seed": seed})
        train_src, val = bal.split_validation(train_df, per_sku=bs.val_per_sku, seed=seed)
        depth = bs.depth or bal.suggest_depth(train_src)
        balanced = bal.balance(train_src, depth, seed=seed)
        layout.write_balanced(balanced, val, Path(args.data), work / "balanced", {"depth": depth})
        request = {"balanced_dir": str(work / "balanced"), "clean_dir": str(args.data), "spec": ts.spec(),
                   "config": ts.train_config(), "out_dir": str(work / "train"), "progress": sys.stderr.isatty(),
                   "device": "cpu"}
        t0 = time.perf_counter()
        summary = run_training(request, echo=lambda m: print("  " + m, flush=True))
        row.update(train_minutes=round((time.perf_counter() - t0) / 60, 2), images_per_s=summary["images_per_s"],
                   steps=summary["steps"], val_acc_per_epoch=summary.get("val_acc_per_epoch"),
                   best_epoch=summary.get("best_epoch"), balanced_rows=len(balanced))
        model_path = summary["encoder_uri"]
    queries = queries.assign(aspect=[image_aspect(p) for p in queries["clean_path"]])
    scores, info = embed_and_score(model_path, df, queries, held)
    for size in args.eval_sizes or ():  # the same weights evaluated at other input sizes (CNN towers)
        import dataclasses

        from skulens.model.io import load_encoder, save_encoder

        enc = load_encoder(model_path)
        enc.spec = dataclasses.replace(enc.spec, image_size=int(size))
        sized = save_encoder(enc, work / f"eval{size}" / "encoder.pt")
        scores.update({f"px{size}/{k}": v for k, v in embed_and_score(str(sized), df, queries, held)[0].items()})
    row.update(info, scores=scores, load=os.getloadavg()[0])
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def rescore(name: str, mode: str, seed: int, args) -> dict | None:
    """Scores of a kept run (``--keep``: ``<out>/runs/<name>-<mode>-s<seed>/train/encoder.pt``) recomputed with
    today's scoring, the same weights (None when the run was not kept)."""
    model = Path(args.out) / "runs" / f"{name}-{mode}-s{seed}" / "train" / "encoder.pt"
    if not model.exists():
        return None
    df = load_grozi(Path(args.data))
    _, queries, held = protocol(df, mode, seed)
    return embed_and_score(str(model), df, queries, held)[0]


def budget(args) -> int:
    """Train with the launchpad defaults as they are now (``TrainSettings()``, ``BalanceSettings()``) through
    the job's path on a catalog of about 3,000 real images (all 120 GroZi products, the first 70% of their
    frames) and print the training time: the issue's "at most 20 minutes on the 2-core CPU" check."""
    from assets.datasets import BalanceSettings
    from assets.training import TrainSettings
    from skulens.data import balance as bal
    from skulens.data import layout
    from skulens.model.training_run import run_training

    df = load_grozi(Path(args.data))
    cat = df[df["rank"] < (df["n"] * 0.7).astype(int)].reset_index(drop=True)
    ts, bs = TrainSettings(), BalanceSettings()
    work = Path(args.out) / "budget"
    shutil.rmtree(work, ignore_errors=True)
    train_src, val = bal.split_validation(cat, per_sku=bs.val_per_sku, seed=bs.seed)
    depth = bs.depth or bal.suggest_depth(train_src)
    balanced = bal.balance(train_src, depth, seed=bs.seed)
    layout.write_balanced(balanced, val, Path(args.data), work / "balanced", {"depth": depth})
    print(f"catalog: {cat['sku'].nunique()} SKUs, {len(cat)} images; balanced {len(balanced)} rows/epoch; "
          f"defaults: {ts.train_config()}", flush=True)
    t0 = time.perf_counter()
    summary = run_training({"balanced_dir": str(work / "balanced"), "clean_dir": str(args.data), "spec": ts.spec(),
                            "config": ts.train_config(), "out_dir": str(work / "train"),
                            "progress": sys.stderr.isatty(), "device": "cpu"})
    minutes = (time.perf_counter() - t0) / 60
    print(f"training with the defaults: {minutes:.1f} min ({summary['steps']} steps, {summary['images_per_s']} "
          f"images/s, saved {summary.get('saved_weights')}, val {summary.get('val_acc_per_epoch')}); "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"minutes": minutes, "summary": summary}, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def load_rows(out: Path) -> list[dict]:
    f = out / "results.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def table(rows: list[dict], mode: str, gallery: str = "plain/nn") -> str:
    """Mean (and half the spread of the seeds) per variant, for one protocol and one gallery scoring."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["protocol"] == mode:
            by.setdefault(r["variant"], []).append(r)
    cols = [("k1", "seen"), ("k1", "unseen"), ("k5", "seen"), ("k5", "unseen"), ("k5", "top5_all")]
    head = (f"{'variant':<16} {'seeds':>5} " + " ".join(f"{k}-{c:<7}".rjust(14) for k, c in cols)
            + f" {'train min':>9} {'img/s':>6}")
    lines = [f"protocol {mode}, gallery {gallery} (mean ± half-range over seeds)", head]
    for name, rs in by.items():
        rs = [r for r in rs if f"{gallery}/k1" in r["scores"]]  # rows from before a scoring existed lack it
        if not rs:
            continue
        cells = []
        for k, c in cols:
            v = np.array([r["scores"][f"{gallery}/{k}"][c] for r in rs])
            cells.append(f"{v.mean():.3f}±{(v.max() - v.min()) / 2:.3f}".rjust(14))
        mins = np.mean([r.get("train_minutes", 0) for r in rs])
        ips = [r["images_per_s"] for r in rs if r.get("images_per_s")]
        lines.append(f"{name:<16} {len(rs):>5} " + " ".join(cells) + f" {mins:>9.1f} "
                     + (f"{np.mean(ips):>6.1f}" if ips else f"{'-':>6}"))
    return "\n".join(lines)


def aspect_table(rows: list[dict], mode: str, gallery: str = "plain/nn") -> str:
    """k = 1 top-1 of seen / never-seen products per aspect bucket of the query crop, mean over seeds (rows
    recorded before the buckets existed are left out), with the number of queries in each bucket."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["protocol"] == mode and "by_aspect" in r["scores"].get(f"{gallery}/k1", {}):
            by.setdefault(r["variant"], []).append(r["scores"][f"{gallery}/k1"]["by_aspect"])
    if not by:
        return ""
    buckets = [label for _, label in ASPECT_BUCKETS]
    lines = [f"protocol {mode}, gallery {gallery}, k1 seen / never seen by the query's long:short side "
             "(mean over seeds; queries per seed)", f"{'variant':<16} {'seeds':>5} "
             + " ".join(b.rjust(24) for b in buckets)]
    for name, rs in by.items():
        cells = []
        for b in buckets:
            cells_b = [x[b] for x in rs if b in x]
            vals = {g: [c[g] for c in cells_b if c[g] is not None] for g in ("seen", "unseen")}
            n = np.mean([c["n_seen"] + c["n_unseen"] for c in cells_b]) if cells_b else 0
            txt = "/".join(f"{np.mean(v):.3f}" if v else "-" for v in vals.values())
            cells.append(f"{txt} ({n:.0f})".rjust(24))
        lines.append(f"{name:<16} {len(rs):>5} " + " ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", default=".skulens/bench-recipe")
    ap.add_argument("--variants", nargs="+", default=["none", "base"])
    ap.add_argument("--protocol", nargs="+", default=["dev"], choices=["dev", "test"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--gallery", nargs="+", default=["plain/nn", "plain/views", "flip/nn", "flip/views", "plain/centroid"])
    ap.add_argument("--eval-sizes", type=int, nargs="*", default=[],
                    help="also evaluate each model at these input sizes (scores 'px<size>/<gallery>')")
    ap.add_argument("--table", action="store_true", help="only print the table of the results so far")
    ap.add_argument("--by-aspect", action="store_true",
                    help="with the table: k1 top-1 per aspect bucket of the query crops (rows that have them)")
    ap.add_argument("--list", action="store_true", help="list the variants")
    ap.add_argument("--budget", action="store_true",
                    help="time the current defaults on ~3,000 real images (the 20-minute CPU budget) and exit")
    ap.add_argument("--json", default=None, help="--budget: also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep each run's balanced folder and model")
    ap.add_argument("--redo", action="store_true", help="run rows again even if results.jsonl has them")
    ap.add_argument("--rescore", action="store_true",
                    help="re-embed the kept models (--keep) of these variants x protocols x seeds and replace their "
                         "rows' scores with today's scoring (no training)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.budget:
        return budget(args)
    if args.list:
        for k, (t, b) in VARIANTS.items():
            print(f"{k:<16} train {t} balance {b}")
        return 0
    if args.rescore:
        rows = load_rows(out)
        for mode in args.protocol:
            for name in args.variants:
                for seed in args.seeds:
                    hit = [i for i, r in enumerate(rows) if (r["variant"], r["protocol"], r["seed"]) == (name, mode, seed)]
                    if not hit:
                        print(f"{name} {mode} seed {seed}: no row to rescore", flush=True)
                        continue
                    scores = rescore(name, mode, seed, args)
                    if scores is None:
                        print(f"{name} {mode} seed {seed}: no kept model (run with --keep)", flush=True)
                        continue
                    rows[hit[-1]]["scores"] = scores
                    rows[hit[-1]]["rescored"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    tmp = out / "results.jsonl.tmp"  # rewritten whole, then renamed: never half a file
                    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
                    tmp.replace(out / "results.jsonl")
                    print(f"{name} {mode} seed {seed}: rescored", flush=True)
        args.table = True
    elif not args.table:
        import torch

        out.mkdir(parents=True, exist_ok=True)
        print(f"torch threads {torch.get_num_threads()}", flush=True)
        for mode in args.protocol:
            for name in args.variants:
                for seed in args.seeds:
                    done = {(r["variant"], r["protocol"], r["seed"]) for r in load_rows(out)}
                    if (name, mode, seed) in done and not args.redo:
                        continue
                    t0 = time.perf_counter()
                    print(f"== {name} {mode} seed {seed}", flush=True)
                    row = run_one(name, mode, seed, args)
                    row["wall_minutes"] = round((time.perf_counter() - t0) / 60, 2)
                    with open(out / "results.jsonl", "a") as f:
                        f.write(json.dumps(row, default=str) + "\n")
                    s = row["scores"]["plain/nn/k1"], row["scores"]["plain/nn/k5"]
                    print(f"   k1 seen {s[0]['seen']:.3f} unseen {s[0]['unseen']:.3f} | k5 seen {s[1]['seen']:.3f} "
                          f"unseen {s[1]['unseen']:.3f} | {row['wall_minutes']} min", flush=True)
    rows = load_rows(out)
    for mode in args.protocol if not args.table else ("dev", "test"):
        for g in args.gallery:
            if any(r["protocol"] == mode for r in rows):
                print("\n" + table(rows, mode, g))
        if args.by_aspect and (at := aspect_table(rows, mode)):
            print("\n" + at)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

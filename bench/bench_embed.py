"""Embedding throughput: model-only per backend, and the full path (JPEG files -> embed_images through the
compiled engine) in each preprocessing mode next to the backend's model-only figure, in one run.

    .venv/bin/python bench/bench_embed.py [--images DIR] [--n 640] [--n-large 128] [--batch 64]
        [--repeats 3] [--threads 2] [--bf16] [--skip-torch] [--accuracy] [--scales [128]]

The model is the one the defaults embed with: EfficientNet-Lite0 at 224 px plus a 128 px view
(multi-scale inference, ``TrainSettings.eval_scales``); ``--scales`` with no value measures the
single-scale tower. Model-only: that model (offline ImageNet weights), batch 64, forward only: PyTorch
eager, PyTorch channels_last, onnxruntime, OpenVINO on a float32 NCHW batch, and OpenVINO on a uint8
NHWC batch (the normalisation fused into the graph: what embedding feeds it); ``--bf16`` adds OpenVINO
BF16 (opt-in). Full path: ``embed_images(engine, files)`` with ``preprocess=exact`` and ``fast``, on
real JPEGs (GroZi-120 frames, small: upscaled to 256) and on large JPEGs (GroZi frames upscaled to a
1200 px short side and saved as JPEG, like catalog packshots). Each repeat measures OpenVINO model-only
and then every full path, so each ratio compares figures taken seconds apart; medians are printed.

``--accuracy``: 1-NN top-1 on GroZi-120 (gallery: the first frame of each product; queries: every
other frame) with the ImageNet tower on the OpenVINO engine, exact vs fast preprocessing, plus the
mean/min cosine between the two embeddings of the same image; also on the large-JPEG copies (where
``fast`` decodes at reduced scale).

The measuring functions are importable (``model_only``, ``full_path``, ``lite0_engine``,
``large_jpegs``) for bench/bench_speed.py. Figures on a shared machine are indicative.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_IMAGES = "/work/shared/datasets/grozi120/images"
MODES = ("exact", "fast")


def _timed(fn, n_images: int, repeats: int, warmup: int = 1) -> float:
    """Median images/s of ``repeats`` calls of ``fn()`` (which processes ``n_images``), after ``warmup``."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(n_images / (time.perf_counter() - t0))
    return statistics.median(rates)


def _wall_cpu(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds, all threads) of one ``fn()``."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


from skulens.model.factory import DEFAULT_EVAL_SCALES as DEFAULT_SCALES  # noqa: E402 - after the sys.path line
from skulens.model.factory import DEFAULT_FIT  # noqa: E402


def model_dir(scales=DEFAULT_SCALES, name: str = "lite0") -> str:
    """The cache folder of a benchmark model: its name, scales and fit (a cached engine is per model)."""
    return name + "".join(f"-ms{s}" for s in sorted(scales or ())) + f"-{DEFAULT_FIT}"


def lite0_engine(work_dir: str | os.PathLike, backend: str = "auto", precision: str = "f32",
                 preprocess: str | None = None, scales=DEFAULT_SCALES):
    """``(engine, encoder, model path)`` of EfficientNet-Lite0 (offline ImageNet weights) at 224 px plus the
    extra ``scales`` (multi-scale inference, as the default model embeds; ``()``: single-scale), with the
    default ``fit``, compiled in
    ``work_dir`` (reused by a later run)."""
    from skulens.model import ModelSpec, create_encoder, save_encoder
    from skulens.model.engine import load_engine

    path = Path(work_dir) / model_dir(scales) / "encoder.pt"
    encoder = None
    if not path.is_file():
        encoder = create_encoder(ModelSpec(name="efficientnet-lite0", scales=tuple(scales or ()), fit=DEFAULT_FIT))
        save_encoder(encoder, path)
    eng = load_engine(path, backend, precision=precision, preprocess=preprocess)
    return eng, encoder, path


def model_only(kind: str, model_path: str | os.PathLike, batch: int = 64, repeats: int = 3, engine=None) -> float:
    """Forward-only images/s of ``kind``: eager | channels_last | onnxruntime | openvino | openvino-u8 |
    onnxruntime-u8 | openvino-bf16 (``-u8``: a uint8 NHWC batch, as embedding feeds the engine)."""
    from skulens.model.engine import load_engine

    size = 224
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    if kind in ("eager", "channels_last"):
        import torch

        from skulens.model.io import load_encoder

        enc = load_encoder(model_path).eval()
        t = torch.from_numpy(x)
        if kind == "channels_last":
            enc = enc.to(memory_format=torch.channels_last)
            t = t.contiguous(memory_format=torch.channels_last)

        def fwd():
            with torch.inference_mode():
                enc(t)

        return _timed(fwd, batch, repeats)
    backend, _, variant = kind.partition("-")
    if variant == "u8":
        x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    eng = engine or load_engine(model_path, backend, precision=variant if variant == "bf16" else "f32")
    return _timed(lambda: eng.run(x), batch, repeats)


def full_path(engine, files: list[str], batch: int = 64, repeats: int = 1, threads: int | None = None) -> float:
    """images/s of ``embed_images(engine, files)``: decode + preprocess (threads) overlapping inference."""
    from skulens.model.embed import embed_images

    return _timed(lambda: embed_images(engine, files, batch_size=batch, num_workers=threads or 0),
                  len(files), repeats, warmup=0)


def decode_only(engine, files: list[str], threads: int | None = None) -> float:
    """images/s of decoding + preprocessing alone (the same thread pool, no inference)."""
    from concurrent.futures import ThreadPoolExecutor

    from skulens.model.embed import _decode_threads, _load_for, _max_decode_threads

    pre = engine.preprocess
    with ThreadPoolExecutor(threads or _decode_threads() or _max_decode_threads()) as pool:
        return _timed(lambda: list(pool.map(lambda f: pre(_load_for(f, pre)), files)), len(files), 1, warmup=0)


def large_jpegs(files: list[str], out_dir: str | os.PathLike, short_side: int = 1200) -> list[str]:
    """``files`` upscaled (bicubic) to a ``short_side`` px short side and saved as JPEG (quality 90)
    under ``out_dir`` (kept for later runs): stand-ins for large catalog packshots."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        p = out_dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.relpath(f, "/")) + f".{short_side}.jpg")
        if not p.is_file():
            with Image.open(f) as im:
                im = im.convert("RGB")
                k = short_side / min(im.size)
                im.resize((round(im.width * k), round(im.height * k)), Image.BICUBIC).save(p, quality=90)
        out.append(str(p))
    return out


def _grozi_frames(images_dir: str) -> list[tuple[str, str, int]]:
    rows = []
    for p in glob.glob(os.path.join(images_dir, "*", "video*.jpg")):
        m = re.fullmatch(r"video(\d+)\.jpg", os.path.basename(p))
        if m:
            rows.append((os.path.basename(os.path.dirname(p)), p, int(m.group(1))))
    return sorted(rows)


def _top1(gallery: np.ndarray, g_labels: list, queries: np.ndarray, q_labels: list) -> float:
    nn = np.argmax(queries @ gallery.T, axis=1)
    return float(np.mean([g_labels[i] == q for i, q in zip(nn, q_labels)]))


def accuracy_vs_torch(work: str, images_dir: str, every: int = 3, batch: int = 64, scales=DEFAULT_SCALES) -> dict:
    """1-NN top-1 on GroZi (gallery = first frame of each product, queries = every ``every``-th other
    frame) with the PyTorch encoder (eager, torchvision preprocessing: the reference) and with the default
    engine (backend ``auto``, the default preprocessing), on the same images."""
    from skulens.model.embed import embed_images
    from skulens.model.io import load_encoder

    rows = _grozi_frames(images_dir)
    first = {}
    for sku, p, _ in rows:
        first.setdefault(sku, p)
    qry = [(s, p) for s, p, _ in rows if first[s] != p][::every]
    files = list(first.values()) + [p for _, p in qry]
    engine, _, path = lite0_engine(work, "auto", scales=scales)
    torch_enc = load_encoder(path, device="cpu")
    vecs = {"pytorch": embed_images(torch_enc, files, batch_size=batch),
            f"{engine.backend} ({engine.preprocess_mode})": embed_images(engine, files, batch_size=batch)}
    g_labels, q_labels = list(first), [s for s, _ in qry]
    out = {name: _top1(v[:len(first)], g_labels, v[len(first):], q_labels) for name, v in vecs.items()}
    a, b = vecs.values()
    agree = float(np.mean(np.argmax(a[len(first):] @ a[:len(first)].T, 1) == np.argmax(b[len(first):] @ b[:len(first)].T, 1)))
    print(f"\naccuracy vs PyTorch: 1-NN top-1 on {len(qry)} GroZi queries against the first frame of {len(first)} "
          f"products: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items())
          + f"; same nearest neighbour for {agree:.1%} of queries; mean cosine {float(np.mean(np.sum(a * b, 1))):.5f}")
    return {"top1": out, "nn_agreement": agree, "queries": len(qry)}


def accuracy(work: str, images_dir: str, large_every: int = 4, batch: int = 64, scales=DEFAULT_SCALES) -> list[dict]:
    """Print (and return) 1-NN top-1 exact vs fast on GroZi (and on its large-JPEG copies) and the
    cosine between the two embeddings of each image."""
    rows = _grozi_frames(images_dir)
    first = {}
    for sku, p, _ in rows:
        first.setdefault(sku, p)
    gal = [(s, p) for s, p in first.items()]
    qry = [(s, p) for s, p, _ in rows if first[s] != p]
    sets = {"GroZi frames": (gal, qry)}
    qs = qry[::large_every]
    big = large_jpegs([p for _, p in gal] + [p for _, p in qs], Path(work) / "large")
    sets["GroZi, 1200 px JPEG"] = (list(zip([s for s, _ in gal], big[:len(gal)])),
                                   list(zip([s for s, _ in qs], big[len(gal):])))
    from skulens.model.embed import embed_images

    engines = {m: lite0_engine(work, "auto", preprocess=m, scales=scales)[0] for m in MODES}
    print(f"\naccuracy: 1-NN top-1, gallery = first frame of each of {len(gal)} products, "
          f"ImageNet EfficientNet-Lite0 on {engines['exact'].backend}")
    print(f"  {'images':<22}{'queries':>8}{'exact':>9}{'fast':>9}{'diff':>8}{'mean cos':>10}{'min cos':>9}")
    rows = []
    for name, (g, q) in sets.items():
        emb = {m: embed_images(e, [p for _, p in g] + [p for _, p in q], batch_size=batch) for m, e in engines.items()}
        top = {m: _top1(v[:len(g)], [s for s, _ in g], v[len(g):], [s for s, _ in q]) for m, v in emb.items()}
        cos = np.sum(emb["exact"] * emb["fast"], axis=1)
        print(f"  {name:<22}{len(q):>8}{top['exact']:>9.4f}{top['fast']:>9.4f}"
              f"{100 * (top['fast'] - top['exact']):>+7.2f}p{cos.mean():>10.5f}{cos.min():>9.5f}")
        rows.append({"set": name, "queries": len(q), "top1_exact": round(top["exact"], 4),
                     "top1_fast": round(top["fast"], 4), "mean_cos": round(float(cos.mean()), 5),
                     "min_cos": round(float(cos.min()), 5)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=DEFAULT_IMAGES)
    ap.add_argument("--n", type=int, default=640, help="GroZi JPEG files for the full path")
    ap.add_argument("--n-large", type=int, default=128, help="large JPEGs (1200 px) for the full path; 0: none")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="*", default=[0],
                    help="decode threads to try (0: the default: $SKULENS_DECODE_THREADS, else adaptive)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "skulens-bench-embed"))
    ap.add_argument("--bf16", action="store_true", help="also OpenVINO BF16 (opt-in precision)")
    ap.add_argument("--skip-torch", action="store_true", help="skip the (slow) eager/channels_last figures")
    ap.add_argument("--accuracy", action="store_true", help="also 1-NN top-1 exact vs fast on GroZi (~2 min)")
    ap.add_argument("--vs-torch", action="store_true",
                    help="only 1-NN top-1 on GroZi with PyTorch eager vs the default engine (~1 min), then exit")
    ap.add_argument("--scales", type=int, nargs="*", default=list(DEFAULT_SCALES),
                    help="multi-scale inference sizes of the model (default: the launchpad default's "
                         f"{list(DEFAULT_SCALES)}; no value: single-scale 224 px)")
    ap.add_argument("--json", help="also write the figures here (bench/bench_speed.py reads them)")
    args = ap.parse_args(argv)
    if args.vs_torch:
        accuracy_vs_torch(args.work, args.images, batch=args.batch, scales=args.scales)
        return 0

    t0 = time.perf_counter()
    engines = {m: lite0_engine(args.work, preprocess=m, scales=args.scales)[0] for m in MODES}
    engine = engines["exact"]
    path = Path(args.work) / model_dir(args.scales) / "encoder.pt"
    print(f"engine: {engine!r}, loaded/compiled in {time.perf_counter() - t0:.1f} s "
          f"(cache {path.parent / 'encoder.pt.engine'}); fallbacks: {engine.fallbacks or 'none'}")
    print(f"  runtime: {({k: v for k, v in engine.info().items() if k.startswith('runtime_')})}")
    print(f"cores: {os.cpu_count()}, batch {args.batch}, 224 px + scales {args.scales or 'none'}, "
          "EfficientNet-Lite0 (ImageNet weights), "
          f"load avg {os.getloadavg()[0]:.1f}; medians of {args.repeats}\n")

    base_kind = engine.backend
    kinds = ([] if args.skip_torch else ["eager", "channels_last"]) + ["onnxruntime", "openvino"]
    if engine.backend in ("openvino", "onnxruntime"):
        kinds.append(f"{engine.backend}-u8")
    if args.bf16:
        kinds.append("openvino-bf16")
    figures = {}
    print(f"{'model-only (forward)':<28}{'images/s':>10}")
    for kind in kinds:
        try:
            figures[kind] = model_only(kind, path, args.batch, args.repeats,
                                       engine=engine if kind.split("-")[0] == engine.backend
                                       and not kind.endswith("bf16") else None)
            print(f"  {kind:<26}{figures[kind]:>10.1f}")
        except Exception as e:  # noqa: BLE001 - a missing runtime is reported, the rest still measured
            print(f"  {kind:<26}{'n/a':>10}  ({type(e).__name__}: {e})")

    files = sorted(glob.glob(os.path.join(args.images, "**", "*.jp*g"), recursive=True))
    if not files:
        print(f"\nno JPEG files under {args.images}: full path not measured")
        return 0
    step = max(1, len(files) // args.n)
    sets = {"GroZi JPEGs": files[::step][:args.n]}
    if args.n_large > 0:
        big_src = files[::max(1, len(files) // args.n_large)][:args.n_large]
        sets["1200 px JPEGs"] = large_jpegs(big_src, Path(args.work) / "large")
    print(f"\nfull path: embed_images({base_kind} engine), JPEG files from {args.images}; "
          f"ratio = full / {base_kind} model-only (float input) measured in the same repeat")
    print("  (vs u8: ratio to model-only on the uint8 input; cpu est.: model-only CPU time per image / the full\n"
          "   path's, what the ratio would be on idle cores with perfect overlap; pre ms: the full path's\n"
          "   extra CPU ms per image over model-only, i.e. decoding + preprocessing + pipeline)")
    full_rows = []
    print(f"  {'images':<16}{'n':>5}{'mode':>7}{'threads':>8}{'decode-only':>13}{'full':>9}{'ratio':>8}"
          f"{'vs u8':>8}{'cpu est.':>9}{'pre ms':>9}")
    for name, fs in sets.items():
        for threads in args.threads:
            for mode in MODES:  # warm-up: file cache, thread pool, engine
                full_path(engines[mode], fs[:args.batch], args.batch, threads=threads)
            rows = {m: [] for m in MODES}
            xf = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
            x8 = np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
            reps = max(1, len(fs) // args.batch)
            for _ in range(args.repeats):
                w, _ = _wall_cpu(lambda: [engine.run(xf) for _ in range(reps)])
                mo = reps * args.batch / w
                w, c = _wall_cpu(lambda: [engine.run(x8) for _ in range(reps)])
                mo8, mo8_cpu = reps * args.batch / w, c / (reps * args.batch)
                for m in MODES:
                    w, c = _wall_cpu(lambda: full_path(engines[m], fs, args.batch, threads=threads))
                    f = len(fs) / w
                    rows[m].append((f, f / mo, f / mo8, mo8_cpu / (c / len(fs)), 1e3 * (c / len(fs) - mo8_cpu)))
            for m in MODES:
                dec = decode_only(engines[m], fs, threads or None)
                f, r, r8, rc, pre_ms = (statistics.median(v[i] for v in rows[m]) for i in range(5))
                full_rows.append({"set": name, "n": len(fs), "mode": m, "threads": threads or "auto",
                                  "decode_only_images_per_s": round(dec, 1), "images_per_s": round(f, 1),
                                  "ratio": round(r, 3), "ratio_u8": round(r8, 3), "cpu_estimate": round(rc, 3),
                                  "preprocess_cpu_ms": round(pre_ms, 3)})
                print(f"  {name:<16}{len(fs):>5}{m:>7}{threads or 'auto':>8}{dec:>13.1f}{f:>9.1f}{r:>8.0%}{r8:>8.0%}"
                      f"{rc:>9.0%}{pre_ms:>9.2f}")
    if "eager" in figures:
        print(f"\n  speed-up of the full path over the eager model: "
              f"{statistics.median(v[0] for v in rows['fast']) / figures['eager']:.1f}x (last set, fast)")
    acc = accuracy(args.work, args.images, batch=args.batch, scales=args.scales) if args.accuracy else None
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "backend": base_kind, "batch": args.batch, "scales": args.scales, "cores": os.cpu_count(), "load_avg": os.getloadavg()[0],
            "model_only": {k: round(v, 1) for k, v in figures.items()}, "full_path": full_rows,
            "accuracy": acc}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Embedding throughput: model-only per backend, and the full path (JPEG files -> embed_images through the
compiled engine) next to its backend's model-only figure, in one run.

    .venv/bin/python bench/bench_embed.py [--images DIR] [--n 640] [--batch 64] [--repeats 3] [--bf16]

Model-only: EfficientNet-Lite0 (offline ImageNet weights), 224 px, a random float32 batch, forward
only: PyTorch eager, PyTorch channels_last, onnxruntime and OpenVINO (the engine's runners, FP32;
``--bf16`` adds OpenVINO BF16, opt-in). Full path: ``embed_images(engine, files)`` on real JPEGs
(default /work/shared/datasets/grozi120/images), decoding in threads while the engine runs.
The measuring functions are importable (``model_only``, ``full_path``, ``lite0_engine``) for
bench/bench_speed.py. Figures on a shared machine are indicative; compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_IMAGES = "/work/shared/datasets/grozi120/images"


def _timed(fn, n_images: int, repeats: int, warmup: int = 1) -> float:
    """Best-of-``repeats`` images/s of ``fn()`` (which processes ``n_images``), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_images / best


def lite0_engine(work_dir: str | os.PathLike, backend: str = "auto", precision: str = "f32"):
    """``(engine, encoder, model path)`` of EfficientNet-Lite0 (offline ImageNet weights) compiled in
    ``work_dir`` (reused by a later run)."""
    from skulens.model import create_encoder, save_encoder
    from skulens.model.engine import load_engine

    path = Path(work_dir) / "lite0" / "encoder.pt"
    encoder = None
    if not path.is_file():
        encoder = create_encoder("efficientnet-lite0")
        save_encoder(encoder, path)
    eng = load_engine(path, backend, precision=precision)
    return eng, encoder, path


def model_only(kind: str, model_path: str | os.PathLike, batch: int = 64, repeats: int = 3) -> float:
    """Forward-only images/s of ``kind``: eager | channels_last | onnxruntime | openvino | openvino-bf16."""
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
    backend, _, precision = kind.partition("-")
    eng = load_engine(model_path, backend, precision=precision or "f32")
    return _timed(lambda: eng.run(x), batch, repeats)


def full_path(engine, files: list[str], batch: int = 64, repeats: int = 1) -> float:
    """images/s of ``embed_images(engine, files)``: decode + preprocess (threads) overlapping inference."""
    from skulens.model.embed import embed_images

    return _timed(lambda: embed_images(engine, files, batch_size=batch), len(files), repeats, warmup=0)


def decode_only(engine, files: list[str], threads: int | None = None) -> float:
    """images/s of decoding + preprocessing alone (the same thread pool, no inference)."""
    from concurrent.futures import ThreadPoolExecutor

    from skulens.model.embed import _decode_threads, _load_for

    pre = engine.preprocess
    with ThreadPoolExecutor(threads or _decode_threads()) as pool:
        return _timed(lambda: list(pool.map(lambda f: pre(_load_for(f, pre)), files)), len(files), 1, warmup=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=DEFAULT_IMAGES)
    ap.add_argument("--n", type=int, default=640, help="JPEG files for the full path")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "skulens-bench-embed"))
    ap.add_argument("--bf16", action="store_true", help="also OpenVINO BF16 (opt-in precision)")
    ap.add_argument("--skip-torch", action="store_true", help="skip the (slow) eager/channels_last figures")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    engine, _, path = lite0_engine(args.work)
    print(f"engine: {engine!r}, loaded/compiled in {time.perf_counter() - t0:.1f} s "
          f"(cache {path.parent / 'encoder.pt.engine'}); fallbacks: {engine.fallbacks or 'none'}")
    print(f"cores: {os.cpu_count()}, batch {args.batch}, 224 px, EfficientNet-Lite0 (ImageNet weights)\n")

    kinds = ([] if args.skip_torch else ["eager", "channels_last"]) + ["onnxruntime", "openvino"]
    if args.bf16:
        kinds.append("openvino-bf16")
    figures = {}
    print(f"{'model-only (forward)':<28}{'images/s':>10}")
    for kind in kinds:
        try:
            figures[kind] = model_only(kind, path, args.batch, args.repeats)
            print(f"  {kind:<26}{figures[kind]:>10.1f}")
        except Exception as e:  # noqa: BLE001 - a missing runtime is reported, the rest still measured
            print(f"  {kind:<26}{'n/a':>10}  ({type(e).__name__}: {e})")

    files = sorted(glob.glob(os.path.join(args.images, "**", "*.jp*g"), recursive=True))
    if not files:
        print(f"\nno JPEG files under {args.images}: full path not measured")
        return 0
    step = max(1, len(files) // args.n)
    files = files[::step][:args.n]
    dec = decode_only(engine, files)
    full = full_path(engine, files, args.batch)
    base = figures.get(engine.backend)
    print(f"\nfull path: embed_images({engine.backend} engine) on {len(files)} JPEGs from {args.images}")
    print(f"  decode + preprocess alone   {dec:>10.1f} images/s")
    print(f"  full path                   {full:>10.1f} images/s"
          + (f"   = {full / base:.0%} of {engine.backend} model-only ({base:.1f})" if base else ""))
    if "eager" in figures:
        print(f"  speed-up over eager model   {full / figures['eager']:>10.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of the data-quality stage (skulens.data.clean.clean_catalog): full-decode throughput.

    python bench/bench_clean.py --n 10000 [--workers 2] [--backends serial,process,thread] [--rounds 2] [--dir DIR]

Generates N product-like JPEGs (300-800 px sides, ~10 per SKU) with a few % bad files (truncated,
corrupt, HTML, empty, tiny, duplicates), cached in DIR (default /tmp/skulens-bench-N) so repeated runs
skip generation. Prints a per-stage profile of one image's inspection (read, sha256, md5, container
check, header parse, full decode) and clean_catalog's images/s for each backend x workers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import imagegen as g

from skulens.data import clean as C

BAD_KINDS = ("truncated", "corrupt", "html", "empty", "tiny", "dup")


def _make_one(args: tuple[int, str, int, str]) -> dict:
    i, sku, seed, kind = args
    rng = np.random.default_rng(seed)
    w, h = (int(x) for x in rng.integers(300, 801, size=2))
    path = Path(_make_one.root) / sku / f"{i:06d}.jpg"  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "ok":
        g.write(path, g.jpeg_bytes(g.product_image(w, h, seed), quality=int(rng.integers(82, 95))))
    elif kind == "truncated":
        g.write_truncated_jpeg(path, w, h, seed, keep=float(rng.uniform(0.2, 0.9)))
    elif kind == "corrupt":
        g.write_corrupt_jpeg(path, w, h, seed)
    elif kind == "html":
        g.write_html_as_jpg(path)
    elif kind == "empty":
        g.write_empty(path)
    elif kind == "tiny":
        g.write_tiny_dimensions(path, seed=seed)
    elif kind == "dup":  # same bytes as the SKU's first image (written by the same seed)
        first_seed = seed - (i % 10)
        r0 = np.random.default_rng(first_seed)
        w0, h0 = (int(x) for x in r0.integers(300, 801, size=2))
        g.write(path, g.jpeg_bytes(g.product_image(w0, h0, first_seed), quality=int(r0.integers(82, 95))))
    data = path.read_bytes()
    return {"sku": sku, "key": f"raw/{sku}/{path.name}", "etag": '"' + hashlib.md5(data).hexdigest() + '"',
            "bytes": len(data), "path": str(path)}


def _init(root: str) -> None:
    _make_one.root = root  # type: ignore[attr-defined]


def generate(root: Path, n: int, bad_share: float, workers: int) -> pd.DataFrame:
    manifest_path = root / "manifest.parquet"
    if manifest_path.exists():
        m = pd.read_parquet(manifest_path)
        if len(m) == n:
            return m
    rng = np.random.default_rng(12345)
    jobs = []
    for i in range(n):
        kind = "ok"
        if i % 10 != 0 and rng.random() < bad_share:  # the first image of each SKU is always good
            kind = BAD_KINDS[int(rng.integers(len(BAD_KINDS)))]
        jobs.append((i, f"SKU{i // 10:05d}", 1000 + i, kind))
    t = time.perf_counter()
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(str(root),)) as ex:
        rows = list(ex.map(_make_one, jobs, chunksize=64))
    m = pd.DataFrame(rows)
    try:
        m.to_parquet(manifest_path)
    except ImportError:  # pyarrow missing: no cache
        pass
    print(f"generated {n} files in {time.perf_counter() - t:.1f}s ({m['bytes'].sum() / 2**20:.0f} MiB)")
    return m


def profile_stages(paths: list[str], cfg: C.CleanConfig) -> dict[str, float]:
    """Median milliseconds per image for each step of inspect_image (single thread)."""
    from PIL import Image

    steps: dict[str, list[float]] = {k: [] for k in
                                     ("read", "sha256", "md5", "structure", "open_header", "decode", "exif", "inspect_image")}
    for p in paths:
        t0 = time.perf_counter(); data = Path(p).read_bytes(); t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest(); t2 = time.perf_counter()
        hashlib.md5(data).hexdigest(); t3 = time.perf_counter()
        C._jpeg_structure_problem(data); t4 = time.perf_counter()
        im = Image.open(io.BytesIO(data)); t5 = time.perf_counter()
        im.load(); t6 = time.perf_counter()
        im.getexif(); t7 = time.perf_counter()
        C.inspect_image(p, cfg); t8 = time.perf_counter()
        for k, a, b in (("read", t0, t1), ("sha256", t1, t2), ("md5", t2, t3), ("structure", t3, t4),
                        ("open_header", t4, t5), ("decode", t5, t6), ("exif", t6, t7), ("inspect_image", t7, t8)):
            steps[k].append((b - a) * 1000)
    return {k: float(np.median(v)) for k, v in steps.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--workers", default="2", help="comma-separated worker counts for process/thread")
    ap.add_argument("--backends", default="serial,process,thread",
                    help="comma-separated: serial (workers=1, in-process), process, thread")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--bad-share", type=float, default=0.04)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--profile-n", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)

    root = a.dir or Path(f"/tmp/skulens-bench-{a.n}")
    root.mkdir(parents=True, exist_ok=True)
    manifest = generate(root, a.n, a.bad_share, max(1, os.cpu_count() or 1))
    cfg1 = C.CleanConfig(workers=1)
    ok_paths = [p for p, b in zip(manifest["path"], manifest["bytes"]) if b > 5000][: 2 * a.profile_n]
    ok_paths = [p for p in ok_paths if C.inspect_image(p, cfg1).ok][: a.profile_n]
    C.inspect_image(ok_paths[0], cfg1)  # warm up
    prof = profile_stages(ok_paths, cfg1)
    reps = [C.inspect_image(p, cfg1) for p in ok_paths[:50]]
    mean_px = float(np.mean([r.width * r.height for r in reps if r.ok]))
    print(f"\nper-image profile, median of {len(ok_paths)} valid JPEGs "
          f"(mean {manifest['bytes'].mean() / 1024:.0f} KiB, ~{mean_px / 1e6:.2f} MP), one thread:")
    for k, v in prof.items():
        print(f"  {k:14s} {v:7.3f} ms")
    print(f"  => single-core ceiling ~{1000 / prof['inspect_image']:.0f} images/s; decode is "
          f"{100 * prof['decode'] / prof['inspect_image']:.0f}% of inspect_image")

    figures = {"n": a.n, "profile_ms": prof, "runs": []}
    print(f"\nclean_catalog on {a.n} files (cpu_count={os.cpu_count()}); load = 1-min load average before the"
          f" run (other processes compete for the cores); cpu = this process's CPU time (serial/thread only):")
    combos = [(b, int(w)) for b in a.backends.split(",") for w in a.workers.split(",")
              if not (b == "thread" and int(w) == 1) and not (b == "process" and int(w) == 1 and "serial" in a.backends)]
    for rnd in range(a.rounds):  # interleaved rounds: background load drifts, so compare within a round
        for backend, w in combos:
            be = "process" if backend == "serial" else backend
            cfg = C.CleanConfig(workers=1 if backend == "serial" else w, backend=be, chunk_size=a.chunk_size)
            out = root / f"clean-{backend}-{w}"
            load = os.getloadavg()[0]
            t, c = time.perf_counter(), time.process_time()
            res = C.clean_catalog(manifest, None, out, cfg)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            s = res.stats
            row = {"round": rnd, "backend": s["backend"], "workers": s["workers"], "seconds": round(wall, 2),
                   "images_per_s": round(a.n / wall, 1), "seconds_inspect": s["seconds_inspect"],
                   "load_before": round(load, 2), "cpu_ms_per_image": round(1000 * cpu / a.n, 3),
                   "kept": s["files_kept"], "dropped": s["files_dropped"], "by_reason": s["dropped_by_reason"]}
            figures["runs"].append(row)
            cpu_txt = f"cpu {row['cpu_ms_per_image']:.2f} ms/img" if s["backend"] != "process" else "cpu in workers"
            print(f"  round {rnd} {row['backend']:7s} workers={row['workers']}: {wall:6.1f}s  "
                  f"{row['images_per_s']:7.1f} images/s  load {load:4.1f}  {cpu_txt}")
    print(f"  result: kept {row['kept']}, dropped {row['dropped']}: {row['by_reason']}")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Load test of `skulens serve` on loopback, batched vs unbatched in one run: requests/s, p50/p95/p99 and
the batch sizes the server saw.

    .venv/bin/python bench/bench_serve.py                       # efficientnet-lite0, backend auto, 1 vs 32
    .venv/bin/python bench/bench_serve.py --model tiny-test --requests 400 --max-batch 1,8,32

For each ``--max-batch`` value (1 = the unbatched baseline) a fresh server process runs the same
``create_app`` as `skulens serve` (uvicorn, real HTTP, production defaults: bounded queue, timeout,
optional token) on a synthetic catalog (``--skus`` products, one image each) with the given tower on
the inference backend ``--backend`` (skulens.model.engine; ``torch`` = PyTorch eager). The load comes
from this process: ``--concurrency`` keep-alive connections on asyncio, each sending its next request
as soon as the last is answered (closed loop), ``--warmup`` requests first, then ``--requests``
measured ones. The server runs in its own process so the client does not share its GIL; both share
the machine's cores, as a load generator on the same host does.

A 429 is the queue saying "busy" (counted, not retried), anything else that is not 200 an error.
Requests/s counts answered 200s over the measured wall time. Batch sizes come from ``GET /metrics``
(the difference across the measured phase).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    arr = np.full((160, 110, 3), 235, np.uint8)
    arr[10:-10, 8:-8] = rng.integers(0, 255, 3)
    arr[40:60, 15:-15] = rng.integers(0, 255, 3)
    arr[80:90, 20:-20] = rng.integers(0, 255, 3)
    return Image.fromarray(arr, "RGB")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _request_bytes(port: int, data: bytes, k: int, token: str | None) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /recognize?k={k} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n")
    return head.encode() + body


# ---------------------------------------------------------------------------------------------- server
def _model_only(model_path: Path, backend: str, batch: int, seconds: float = 3.0) -> float:
    """Images/s of the encoder alone (preprocessed inputs, no HTTP, no search) at ``batch``."""
    from skulens.model.embed import embed_images, is_engine

    enc = _encoder(model_path, backend)
    imgs = [Image.open(io.BytesIO(_jpeg(_image(i)))).convert("RGB") for i in range(batch)]
    if is_engine(enc):
        x = np.stack([enc.preprocess(im) for im in imgs])

        def step():
            enc.run(x)
    else:
        def step():
            embed_images(enc, imgs, batch_size=batch)
    step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += batch
    return n / (time.perf_counter() - t0)


def _prepare(args) -> tuple[Path, Path]:
    """The encoder file (its compiled engine is cached next to it) and the index of the synthetic catalog."""
    from bench_embed import model_dir

    from skulens.index.sku_index import SkuIndex
    from skulens.model import ModelSpec, create_encoder, save_encoder
    from skulens.model.embed import embed_images
    from skulens.model.factory import DEFAULT_EVAL_SCALES, DEFAULT_FIT

    scales = DEFAULT_EVAL_SCALES if args.scales is None else tuple(args.scales)
    scales = scales if args.model != "tiny-test" else ()
    work = Path(args.work_dir) / model_dir(scales, args.model)
    model_path = work / "encoder.pt"
    if not model_path.exists():
        import torch

        torch.manual_seed(0)
        save_encoder(create_encoder(ModelSpec(name=args.model, scales=scales, fit=DEFAULT_FIT), device="cpu"), model_path)
    enc = _encoder(model_path, args.backend)
    index_path = work / f"index-{args.skus}-{args.backend}.npz"
    if not index_path.exists():
        t0 = time.perf_counter()
        skus = [f"SKU{i:05d}" for i in range(args.skus)]
        imgs = [Image.open(io.BytesIO(_jpeg(_image(i)))).convert("RGB") for i in range(args.skus)]
        SkuIndex(embed_images(enc, imgs), skus, [f"catalog/images/{s}/0.jpg" for s in skus],
                 model_version="1").save(index_path)
        print(f"index: {args.skus} SKUs embedded in {time.perf_counter() - t0:.1f}s", flush=True)
    return model_path, index_path


def _encoder(model_path: Path, backend: str):
    if backend == "torch-eager":
        from skulens.model import load_encoder

        return load_encoder(model_path, device="cpu")
    from skulens.model.engine import get_engine

    return get_engine(model_path, backend=backend)


def _serve(model_path: str, index_path: str, backend: str, port: int, opts: dict) -> None:
    """Child process: the recognizer and `skulens serve`'s app on uvicorn (uvloop + httptools when installed)."""
    import logging

    import uvicorn

    from skulens.index.sku_index import SkuIndex
    from skulens.serving.http import create_app
    from skulens.serving.recognize import Recognizer

    logging.getLogger("skulens.access").setLevel(logging.WARNING)
    enc = _encoder(Path(model_path), backend)
    rec = Recognizer(enc, SkuIndex.load(index_path), None, index_version="bench")
    rec.recognize([_image(0)], k=1)  # first call pays lazy initialisation
    app = create_app(lambda: rec, **opts)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- client
async def _load(port: int, payloads: list[bytes], concurrency: int, expect: list[str]) -> tuple[list, float]:
    """Closed loop: ``concurrency`` keep-alive connections, each sending the next payload when answered."""
    results: list = [None] * len(payloads)
    nxt = iter(range(len(payloads)))

    async def conn():
        reader = writer = None
        for i in nxt:
            t = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(payloads[i])
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                hdrs = {ln.split(":", 1)[0].lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln}
                body = await reader.readexactly(int(hdrs.get("content-length", "0")))
                if hdrs.get("connection", "").lower() == "close":
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                status, body = -1, str(e).encode()
                if writer is not None:
                    writer.close()
                reader = writer = None
            ms = (time.perf_counter() - t) * 1000
            ok = None
            if status == 200:
                doc = json.loads(body)
                ok = doc["sku"] == expect[i]
            results[i] = (status, ms, ok)
        if writer is not None:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(conn() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def _q(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1]


def _diff_sizes(before: dict, after: dict) -> dict:
    out = {int(s): n - int(before.get(s, 0)) for s, n in after.items()}
    return {s: n for s, n in sorted(out.items()) if n > 0}


def run_one(args, model_path: Path, index_path: Path, max_batch: int, payloads, expect) -> dict:
    port = _free_port()
    opts = {"max_batch": max_batch, "max_wait_ms": args.max_wait_ms, "max_pending": args.max_pending,
            "timeout_s": args.timeout, "decode_threads": args.decode_threads, "token": args.token}
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_serve, args=(str(model_path), str(index_path), args.backend, port, opts), daemon=True)
    proc.start()
    try:
        for _ in range(600):
            try:
                _get(port, "/health")
                break
            except OSError:
                if not proc.is_alive():
                    raise SystemExit(f"server for max_batch={max_batch} exited ({proc.exitcode})")
                time.sleep(0.1)
        reqs = [p(port) for p in payloads]
        if args.warmup:
            asyncio.run(_load(port, reqs[:args.warmup], args.concurrency, expect))
        before = _get(port, "/metrics")
        results, wall = asyncio.run(_load(port, reqs[args.warmup:], args.concurrency, expect[args.warmup:]))
        after = _get(port, "/metrics")
    finally:
        proc.terminate()
        proc.join(10)
    codes = Counter(c for c, _, _ in results)
    ok_ms = sorted(ms for c, ms, _ in results if c == 200)
    sizes = _diff_sizes(before["batching"]["batch_sizes"], after["batching"]["batch_sizes"])
    n_batches = sum(sizes.values())
    return {
        "max_batch": max_batch, "requests": len(results), "concurrency": args.concurrency,
        "status": dict(sorted(codes.items())), "errors": sum(n for c, n in codes.items() if c not in (200, 429)),
        "correct_top1": sum(1 for c, _, ok in results if c == 200 and ok),
        "rps": len(ok_ms) / wall, "wall_s": wall,
        "p50_ms": _q(ok_ms, 50), "p95_ms": _q(ok_ms, 95), "p99_ms": _q(ok_ms, 99), "max_ms": max(ok_ms or [0]),
        "batches": n_batches, "mean_batch": (sum(s * n for s, n in sizes.items()) / n_batches) if n_batches else 0,
        "batch_sizes": sizes,
        "busy_s": after["batching"]["busy_s"] - before["batching"]["busy_s"],
        "mean_batch_ms": (1000 * (after["batching"]["busy_s"] - before["batching"]["busy_s"]) / n_batches
                          if n_batches else 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=600, help="measured requests per configuration")
    ap.add_argument("--warmup", type=int, default=100, help="requests sent first, not measured")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--skus", type=int, default=200)
    ap.add_argument("--model", default="efficientnet-lite0",
                    help="efficientnet-lite0 (offline ImageNet weights) or tiny-test (random, tiny)")
    ap.add_argument("--scales", type=int, nargs="*", default=None,
                    help="multi-scale inference sizes (default: the launchpad default's, as a trained model "
                         "embeds; no value: single-scale; ignored for tiny-test)")
    ap.add_argument("--backend", default="auto",
                    help="inference engine: auto | openvino | onnxruntime | torch (channels_last) | "
                         "torch-eager (the plain PyTorch encoder, no engine)")
    ap.add_argument("--max-batch", default="1,32", help="comma-separated; 1 = the unbatched baseline")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-pending", type=int, default=128)
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--token", default=None)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "skulens-bench-serve"),
                    help="where the encoder, its compiled engine and the index are cached between runs")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model_path, index_path = _prepare(args)
    print(f"prepared {args.model} ({args.backend}) + {args.skus}-SKU index in {time.perf_counter() - t0:.1f}s "
          f"[{model_path.parent}]", flush=True)
    n = args.warmup + args.requests
    jpegs = [_jpeg(_image(i % args.skus)) for i in range(n)]
    expect = [f"SKU{i % args.skus:05d}" for i in range(n)]
    payloads = [(lambda port, d=d: _request_bytes(port, d, args.k, args.token)) for d in jpegs]

    batches = [int(x) for x in args.max_batch.split(",") if x.strip()]
    model_only = {b: _model_only(model_path, args.backend, b) for b in sorted(set(batches))}
    print("model-only (this process, no HTTP): " + ", ".join(f"batch {b}: {v:.1f} images/s"
                                                             for b, v in model_only.items()), flush=True)
    rows = []
    for mb in batches:
        r = run_one(args, model_path, index_path, mb, payloads, expect)
        r["model_only_ips"] = model_only[mb]
        rows.append(r)
        print(f"max_batch {mb:>3}: {r['rps']:7.1f} requests/s | p50 {r['p50_ms']:6.0f} ms  p95 {r['p95_ms']:6.0f} ms  "
              f"p99 {r['p99_ms']:6.0f} ms  max {r['max_ms']:6.0f} ms | status {r['status']} errors {r['errors']} "
              f"| top-1 correct {r['correct_top1']}/{r['status'].get(200, 0)}", flush=True)
        print(f"               {r['batches']} batches, mean size {r['mean_batch']:.1f}, sizes {r['batch_sizes']}; "
              f"{r['mean_batch_ms']:.0f} ms a batch; inference thread busy {r['busy_s']:.1f}s of {r['wall_s']:.1f}s; "
              f"{100 * r['rps'] / r['model_only_ips']:.0f}% of model-only at batch {mb}", flush=True)
    print(f"\n{args.requests} measured requests (+{args.warmup} warm-up), {args.concurrency} concurrent keep-alive "
          f"clients, model {args.model}, backend {args.backend}, k={args.k}, max_wait_ms {args.max_wait_ms:g}, "
          f"{os.cpu_count()} CPUs")
    if len(rows) > 1 and rows[0]["rps"] > 0:
        base = rows[0]
        for r in rows[1:]:
            print(f"max_batch {r['max_batch']} vs {base['max_batch']}: {r['rps'] / base['rps']:.2f}x requests/s, "
                  f"p99 {r['p99_ms']:.0f} ms vs {base['p99_ms']:.0f} ms")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

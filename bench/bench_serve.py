"""Bounded load test of `skulens serve`'s app on loopback: N requests, C at a time; prints status counts,
p50/p99 latency and requests/s.

    .venv/bin/python bench/bench_serve.py --requests 200 --concurrency 50 --model efficientnet-lite0

It serves a synthetic catalog (``--skus`` products, one image each) with the given tower through the same
``create_app`` as `skulens serve` (uvicorn, real HTTP), with the production defaults: bounded queue
(``--max-pending``), request timeout, optional token (``--token``). A 429 is the queue saying "busy", not
an error; anything else that is not 200 is counted as an error.
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    arr = np.full((160, 110, 3), 235, np.uint8)
    arr[10:-10, 8:-8] = rng.integers(0, 255, 3)
    arr[40:60, 15:-15] = rng.integers(0, 255, 3)
    return Image.fromarray(arr, "RGB")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--skus", type=int, default=200)
    ap.add_argument("--model", default="tiny-test", help="tiny-test (random) or efficientnet-lite0 (offline weights)")
    ap.add_argument("--max-pending", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--token", default=None)
    args = ap.parse_args()

    import uvicorn

    from skulens.index.sku_index import SkuIndex
    from skulens.model import ModelSpec, create_encoder
    from skulens.model.embed import embed_images
    from skulens.serving.http import create_app
    from skulens.serving.recognize import Recognizer

    enc = create_encoder(ModelSpec(name=args.model), device="cpu")
    imgs = [_image(i) for i in range(args.skus)]
    skus = [f"SKU{i:05d}" for i in range(args.skus)]
    t0 = time.perf_counter()
    index = SkuIndex(embed_images(enc, imgs), skus, [f"catalog/images/{s}/0.jpg" for s in skus], model_version="1")
    print(f"index: {args.skus} SKUs embedded with {args.model} in {time.perf_counter() - t0:.1f}s")
    rec = Recognizer(enc, index, None, index_version="bench")
    app = create_app(lambda: rec, token=args.token, max_pending=args.max_pending, timeout_s=args.timeout)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    payloads = [_multipart(_jpeg(imgs[i % args.skus])) for i in range(args.requests)]
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}

    def one(i: int) -> tuple[int, float]:
        body, ctype = payloads[i]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/recognize?k=3", data=body,
                                     headers={"Content-Type": ctype, **headers})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        except OSError:
            code = -1
        return code, (time.perf_counter() - t) * 1000

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - t0
    server.should_exit = True
    codes = Counter(c for c, _ in results)
    ok = sorted(ms for c, ms in results if c == 200)
    errors = sum(n for c, n in codes.items() if c not in (200, 429))
    q = statistics.quantiles(ok, n=100) if len(ok) >= 2 else [float("nan")] * 99
    print(f"{args.requests} requests, {args.concurrency} concurrent, model {args.model}, max_pending "
          f"{args.max_pending}: status {dict(sorted(codes.items()))}; errors {errors}")
    print(f"answered 200: p50 {q[49]:.0f} ms, p99 {q[98]:.0f} ms; {len(ok) / wall:.1f} recognitions/s, "
          f"{args.requests / wall:.1f} responses/s over {wall:.1f}s")


if __name__ == "__main__":
    main()

"""HTTP API (FastAPI TestClient) and the Recognizer, including hot reload from a real S3 + MLflow."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skulens.index.publish import publish_index
from skulens.index.sku_index import SkuIndex


def _product_image(i: int, size=(80, 120)) -> Image.Image:
    rng = np.random.default_rng(100 + i)
    arr = np.full((size[1], size[0], 3), 240, np.uint8)
    arr[8:-8, 6:-6] = rng.integers(0, 255, 3)
    for r in range(12, size[1] - 12, 9 + i % 4):
        arr[r:r + 3, 10:-10] = rng.integers(0, 255, 3)
    return Image.fromarray(arr, "RGB")


def _png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny():
    import torch

    from skulens.model import ModelSpec, create_encoder

    torch.manual_seed(2)
    return create_encoder(ModelSpec(name="tiny-test"), device="cpu")


@pytest.fixture(scope="module")
def gallery(tiny):
    from skulens.model.embed import embed_images

    imgs = [_product_image(i) for i in range(6)]
    skus = [f"SKU{i}" for i in range(6)]
    vecs = embed_images(tiny, imgs)
    products = pd.DataFrame({"sku": skus, "name": [f"Product {i}" for i in range(6)], "category": "x"})
    return imgs, SkuIndex(vecs, skus, [f"catalog/images/{s}/0.png" for s in skus], model_version="1"), products


@pytest.fixture(scope="module")
def client(tiny, gallery):
    from fastapi.testclient import TestClient

    from skulens.serving.http import create_app
    from skulens.serving.recognize import Recognizer

    _, index, products = gallery
    app = create_app(lambda: Recognizer(tiny, index, products, index_version="v-test"),
                     max_upload_bytes=200_000, max_pixels=1_000_000)
    with TestClient(app) as c:
        yield c


def test_recognize_returns_topk_with_names_and_versions(client, gallery):
    imgs = gallery[0]
    r = client.post("/recognize", params={"k": 3}, files={"file": ("crop.png", _png(imgs[4]), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sku"] == "SKU4" and body["name"] == "Product 4" and body["score"] == pytest.approx(1.0, abs=1e-4)
    assert body["results"][0]["sku"] == "SKU4" and len(body["results"]) == 3
    assert body["results"][0]["score"] >= body["results"][1]["score"] >= body["results"][2]["score"]
    assert body["model_version"] == "1" and body["index_version"] == "v-test" and body["latency_ms"] > 0
    # JPEG, grayscale and RGBA uploads are accepted too
    for img, fmt in [(imgs[2], "JPEG"), (imgs[3].convert("L"), "PNG"), (imgs[1].convert("RGBA"), "PNG")]:
        r = client.post("/recognize", files={"file": ("c", _png(img, fmt), "application/octet-stream")})
        assert r.status_code == 200, r.text
    assert client.post("/recognize", files={"file": ("c", _png(imgs[2], "JPEG"), "image/jpeg")}).json()["sku"] == "SKU2"


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model_version": "1", "index_version": "v-test",
                        "index_count": 6, "n_skus": 6}


def test_docs_pages_load_everything_from_the_service_itself(client):
    """/docs and /redoc work offline: every script and stylesheet they name is served by skulens, none from a CDN."""
    import re

    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css))["']""", html.text) + \
            re.findall(r"""(?:url|js_url|css_url)\s*:\s*["']([^"']+)["']""", html.text)
        assets = [u for u in urls if u.endswith((".js", ".css"))]
        assert assets, html.text[:500]
        for url in assets:
            assert not url.startswith(("http://", "https://", "//")), f"{page} loads {url} from the network"
            got = client.get(url)
            assert got.status_code == 200 and len(got.content) > 10_000, url


def test_rejects_bad_uploads(client, gallery):
    imgs = gallery[0]
    r = client.post("/recognize", files={"file": ("x.txt", b"this is not an image", "text/plain")})
    assert r.status_code == 415 and "image" in r.json()["detail"]
    truncated = _png(imgs[0])[:200]
    r = client.post("/recognize", files={"file": ("x.png", truncated, "image/png")})
    assert r.status_code == 400 and "corrupt" in r.json()["detail"]
    r = client.post("/recognize", files={"file": ("x.png", b"", "image/png")})
    assert r.status_code == 400
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)  # ~480 kB as PNG
    r = client.post("/recognize", files={"file": ("big.png", _png(Image.fromarray(big)), "image/png")})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    bomb = _png(Image.new("RGB", (2000, 1000)))  # small file, 2 Mpx > max_pixels
    r = client.post("/recognize", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    r = client.post("/recognize", files={"image": ("c.png", _png(imgs[0]), "image/png")})  # wrong field
    assert r.status_code == 422 and "file" in r.json()["detail"]  # a missing field: 422, the convention
    r = client.post("/recognize", content=b"raw", headers={"content-type": "image/png"})
    assert r.status_code == 415
    r = client.post("/recognize", params={"k": 0}, files={"file": ("c.png", _png(imgs[0]), "image/png")})
    assert r.status_code == 422


class _Gated:
    """A Recognizer that waits for ``gate`` before answering (to hold a request in flight)."""

    def __init__(self, inner, gate, wait_s: float = 30.0):
        import threading

        self.inner, self.gate, self.wait_s = inner, gate, wait_s
        self.entered = threading.Event()  # set once a request is inside (holding its queue slot)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def recognize(self, images, k=5):
        self.entered.set()
        self.gate.wait(self.wait_s)
        return self.inner.recognize(images, k=k)


def test_token_queue_timeout_and_access_log(tiny, gallery, caplog):
    """Safe to expose: a bearer token (never logged), a bounded queue (429), a request timeout (504), and one
    JSON access-log line per request."""
    import json
    import logging
    import threading
    import time

    from fastapi.testclient import TestClient

    from skulens.serving.http import create_app
    from skulens.serving.recognize import Recognizer

    imgs, index, products = gallery
    gate = threading.Event()
    rec = _Gated(Recognizer(tiny, index, products, index_version="v-test"), gate, wait_s=3.0)
    secret = "tok-" + uuid.uuid4().hex
    app = create_app(lambda: rec, token=secret, max_pending=1, timeout_s=1.0)
    body = {"file": ("c.png", _png(imgs[0]), "image/png")}
    auth = {"Authorization": f"Bearer {secret}"}
    with TestClient(app) as c, caplog.at_level(logging.INFO, logger="skulens.access"):
        assert c.post("/recognize", files=body).status_code == 401
        bad = c.post("/recognize", files=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
        assert c.get("/health").status_code == 200  # liveness stays open

        first = {}
        t = threading.Thread(target=lambda: first.update(r=c.post("/recognize", files=body, headers=auth)))
        t.start()
        assert rec.entered.wait(10), "the first request never reached the recognizer"
        busy = c.post("/recognize", files=body, headers=auth)  # the first request holds the only slot
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        t.join(10)
        assert first["r"].status_code == 504 and "longer than 1s" in first["r"].json()["detail"]
        gate.set()  # the slot frees when the abandoned work ends; then requests are answered again
        for _ in range(50):
            ok = c.post("/recognize", files=body, headers=auth)
            if ok.status_code != 429:
                break
            time.sleep(0.1)
        assert ok.status_code == 200 and ok.json()["sku"] == "SKU0"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "skulens.access"]
    assert {ln["status"] for ln in lines} >= {401, 429, 504, 200}
    assert all(set(ln) == {"method", "path", "status", "ms", "client"} for ln in lines)
    assert secret not in caplog.text


def test_health_503_when_recognizer_cannot_load():
    from fastapi.testclient import TestClient

    from skulens.serving.http import create_app

    def broken():
        raise RuntimeError("no index published")

    with TestClient(create_app(broken)) as c:
        assert c.get("/health").status_code == 503
        r = c.post("/recognize", files={"file": ("c.png", _png(_product_image(0)), "image/png")})
        assert r.status_code == 503


def test_from_services_and_hot_reload(s3, mlflow_server, tiny, gallery, tmp_path):
    """Champion from MLflow + index from S3; publishing a new index (built by a new model version)
    swaps both on the next request, and the API reports the new versions."""
    from fastapi.testclient import TestClient

    from skulens.model import ModelSpec, create_encoder, save_encoder
    from skulens.model.embed import embed_images
    from skulens.registry.model_registry import log_and_register, promote
    from skulens.serving.http import create_app
    from skulens.serving.recognize import Recognizer

    imgs, _, products = gallery
    s3c = s3.client()
    prefix = f"idx-serve-{uuid.uuid4().hex[:8]}"
    pkey = f"{prefix}-catalog/products.csv"
    s3c.put_object(Bucket=s3.bucket, Key=pkey, Body=products.to_csv(index=False).encode())
    name = f"serve-{uuid.uuid4().hex[:8]}"

    v1 = log_and_register(mlflow_server.uri, name, save_encoder(tiny, tmp_path / "e1.pt"),
                          {"top1": 0.5}, {}, {}, {})
    promote(mlflow_server.uri, name, v1)
    idx1 = SkuIndex(embed_images(tiny, imgs[:4]), [f"SKU{i}" for i in range(4)],
                    [f"k{i}" for i in range(4)], model_version=v1)
    ver1 = publish_index(s3c, s3.bucket, idx1, prefix=prefix)

    def factory():
        return Recognizer.from_services(mlflow_server.uri, name, s3.client(), s3.bucket, tmp_path / "cache",
                                        prefix=prefix, products_key=pkey, reload_interval_s=0.0)

    with TestClient(create_app(factory)) as c:
        body = c.post("/recognize", files={"file": ("c.png", _png(imgs[1]), "image/png")}).json()
        assert body["sku"] == "SKU1" and body["name"] == "Product 1"
        assert body["model_version"] == v1 and body["index_version"] == ver1

        import torch

        torch.manual_seed(3)
        other = create_encoder(ModelSpec(name="tiny-test"), device="cpu")  # "retrained" model
        v2 = log_and_register(mlflow_server.uri, name, save_encoder(other, tmp_path / "e2.pt"),
                              {"top1": 0.9}, {}, {}, {})
        promote(mlflow_server.uri, name, v2)
        idx2 = SkuIndex(embed_images(other, imgs), [f"SKU{i}" for i in range(6)],
                        [f"k{i}" for i in range(6)], model_version=v2)
        ver2 = publish_index(s3c, s3.bucket, idx2, prefix=prefix)

        body = c.post("/recognize", files={"file": ("c.png", _png(imgs[5]), "image/png")}).json()
        assert body["model_version"] == v2 and body["index_version"] == ver2
        assert body["sku"] == "SKU5" and body["score"] == pytest.approx(1.0, abs=1e-4)
        h = c.get("/health").json()
        assert h["index_count"] == 6 and h["index_version"] == ver2


def test_recognizer_refuses_mismatched_model_and_keeps_serving(s3, tiny, gallery, tmp_path):
    """Without a registry, an index built by another model version is not swapped in."""
    from skulens.model.embed import embed_images
    from skulens.serving.recognize import Recognizer, measure_latency

    imgs, index, _ = gallery
    s3c = s3.client()
    prefix = f"idx-rec-{uuid.uuid4().hex[:8]}"
    ver1 = publish_index(s3c, s3.bucket, index, prefix=prefix)
    rec = Recognizer.from_s3(tiny, s3c, s3.bucket, prefix=prefix, cache_dir=tmp_path, products_key=None,
                             reload_interval_s=3600)
    assert rec.index_version == ver1 and rec.model_version == "1"
    res = rec.recognize(imgs[:2], k=2)
    assert [r["sku"] for r in res] == ["SKU0", "SKU1"] and res[0]["index_version"] == ver1
    # same model, new index: swapped (when forced or after the interval)
    idx_b = index.with_updates(embed_images(tiny, imgs[:1]), ["NEW"], ["k-new"], remove_skus=["SKU0"])
    ver2 = publish_index(s3c, s3.bucket, idx_b, prefix=prefix)
    assert rec.maybe_reload() is False  # rate-limited: no S3 call yet
    assert rec.maybe_reload(force=True) is True and rec.index_version == ver2
    assert rec.recognize(imgs[0])[0]["sku"] == "NEW"
    assert rec.maybe_reload(force=True) is False  # unchanged pointer
    # another model's index: refused, old state kept
    bad = SkuIndex(index.vectors, index.skus, index.keys, model_version="99")
    publish_index(s3c, s3.bucket, bad, prefix=prefix)
    assert rec.maybe_reload(force=True) is False
    assert rec.index_version == ver2 and rec.model_version == "1"
    lat = measure_latency(rec, imgs[:3], repeats=2)
    assert lat["n"] == 6 and 0 < lat["p50_ms"] < 5000


class _Poisoned:
    """A Recognizer that fails any call holding an image of size ``bad_size`` (a corrupt input that decodes)."""

    def __init__(self, inner, bad_size=(13, 13)):
        self.inner, self.bad_size = inner, bad_size
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def recognize(self, images, k=5):
        self.calls.append(len(images))
        if any(getattr(getattr(im, "image", im), "size", None) == self.bad_size for im in images):
            raise ValueError("cannot embed this image")
        return self.inner.recognize(images, k=k)


def _post_all(c, jobs, headers=None):
    """POST each (params, files) job from its own thread at once; responses in job order."""
    import threading

    out = [None] * len(jobs)

    def one(i, params, files):
        out[i] = c.post("/recognize", params=params, files=files, headers=headers or {})

    threads = [threading.Thread(target=one, args=(i, p, f)) for i, (p, f) in enumerate(jobs)]
    for t in threads:
        t.start()
    return threads, out


def _wait_queued(c, n, what="requests"):
    import time

    for _ in range(300):
        if c.get("/metrics").json()["batching"]["queued"] >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} never queued: {c.get('/metrics').json()}")


def test_concurrent_requests_share_batches_each_with_its_own_answer_and_k(tiny, gallery):
    """While the inference thread is busy, concurrent requests queue and then run as one batch; each gets
    its own top-1 and exactly its own k, equal to what a one-image recognize() answers."""
    import threading

    from fastapi.testclient import TestClient

    from skulens.serving.http import create_app
    from skulens.serving.recognize import Recognizer

    imgs, index, products = gallery
    inner = Recognizer(tiny, index, products, index_version="v-test")
    gate = threading.Event()
    rec = _Gated(inner, gate)
    app = create_app(lambda: rec, max_batch=8, max_wait_ms=1.0)
    with TestClient(app) as c:
        first, out0 = _post_all(c, [({"k": 2}, {"file": ("c.png", _png(imgs[0]), "image/png")})])
        assert rec.entered.wait(10)  # the first request holds the inference thread
        jobs = [({"k": 1 + i % 5}, {"file": ("c.png", _png(imgs[i % 6], "JPEG" if i % 2 else "PNG"), "image/png")})
                for i in range(11)]
        threads, out = _post_all(c, jobs)
        _wait_queued(c, 11)
        gate.set()
        for t in first + threads:
            t.join(30)
        assert out0[0].status_code == 200 and out0[0].json()["batch_size"] == 1
        for i, r in enumerate(out):
            assert r.status_code == 200, r.text
            body = r.json()
            k = 1 + i % 5
            assert body["k"] == k and len(body["results"]) == k
            assert body["sku"] == f"SKU{i % 6}" and body["results"][0]["sku"] == body["sku"]
            alone = inner.recognize([Image.open(io.BytesIO(jobs[i][1]["file"][1])).convert("RGB")], k=k)[0]
            assert [h["sku"] for h in body["results"]] == [h["sku"] for h in alone["topk"]]
            assert [h["score"] for h in body["results"]] == pytest.approx([h["score"] for h in alone["topk"]],
                                                                          abs=1e-5)
        stats = c.get("/metrics").json()
        batching = stats["batching"]
        assert batching["images"] == 12 and batching["max_batch"] == 8
        assert batching["batch_sizes"] == {"1": 1, "3": 1, "8": 1}  # 1 alone, then the 11 queued: 8 + 3
        assert sorted(r.json()["batch_size"] for r in out) == [3] * 3 + [8] * 8
        assert stats["requests"]["served"] == 12 and stats["pending"] == 0


def test_a_bad_image_fails_only_its_own_request(tiny, gallery):
    import threading

    from fastapi.testclient import TestClient

    from skulens.serving.http import create_app
    from skulens.serving.recognize import Recognizer

    imgs, index, products = gallery
    gate = threading.Event()
    poisoned = _Poisoned(Recognizer(tiny, index, products, index_version="v-test"))
    rec = _Gated(poisoned, gate)
    with TestClient(create_app(lambda: rec, max_batch=16, max_wait_ms=1.0)) as c:
        first, out0 = _post_all(c, [({"k": 1}, {"file": ("c.png", _png(imgs[5]), "image/png")})])
        assert rec.entered.wait(10)
        bad = Image.new("RGB", (13, 13), (10, 200, 30))
        jobs = [({"k": 2}, {"file": ("c.png", _png(imgs[i]), "image/png")}) for i in range(5)]
        jobs.insert(2, ({"k": 2}, {"file": ("bad.png", _png(bad), "image/png")}))
        threads, out = _post_all(c, jobs)
        _wait_queued(c, 6)
        gate.set()
        for t in first + threads:
            t.join(30)
        assert out0[0].json()["sku"] == "SKU5"
        assert out[2].status_code == 500 and "recognition failed" in out[2].json()["detail"]
        good = [r for i, r in enumerate(out) if i != 2]
        assert [r.status_code for r in good] == [200] * 5
        assert [r.json()["sku"] for r in good] == [f"SKU{i}" for i in range(5)]
        assert all(r.json()["batch_size"] == 1 for r in good)  # answered by the one-by-one retry
        batching = c.get("/metrics").json()["batching"]
        assert batching["retried_batches"] == 1 and batching["failed"] == 1
        assert poisoned.calls == [1, 6, 1, 1, 1, 1, 1, 1]  # the first alone, the poisoned batch, 6 retries
        # the service goes on batching afterwards
        ok = c.post("/recognize", files={"file": ("c.png", _png(imgs[3]), "image/png")})
        assert ok.status_code == 200 and ok.json()["sku"] == "SKU3"


def test_queued_request_that_times_out_is_dropped_and_frees_its_slot(tiny, gallery):
    """A request still queued when its timeout fires is answered 504 and never run; its queue slot frees at
    once (429 only while the slots are really taken)."""
    import threading

    from fastapi.testclient import TestClient

    from skulens.serving.http import create_app
    from skulens.serving.recognize import Recognizer

    imgs, index, products = gallery
    gate = threading.Event()
    poisoned = _Poisoned(Recognizer(tiny, index, products, index_version="v-test"))
    rec = _Gated(poisoned, gate, wait_s=30.0)
    body = {"file": ("c.png", _png(imgs[1]), "image/png")}
    with TestClient(create_app(lambda: rec, max_pending=2, timeout_s=1.0, max_batch=4)) as c:
        first, out0 = _post_all(c, [({}, body)])
        assert rec.entered.wait(10)  # holds slot 1 and the inference thread
        queued = c.post("/recognize", files=body)  # slot 2: queued behind it, times out
        assert queued.status_code == 504
        m = c.get("/metrics").json()
        assert m["pending"] == 1  # the queued one gave its slot back; the running one still holds its own
        assert c.post("/recognize", files=body).status_code == 504  # so a new one is accepted (then queued)
        gate.set()
        for t in first:
            t.join(30)
        assert out0[0].status_code == 504  # ran past the timeout inside the batch
        for _ in range(100):
            m = c.get("/metrics").json()
            if m["pending"] == 0:
                break
            import time

            time.sleep(0.05)
        assert m["batching"]["dropped_cancelled"] == 2 and m["pending"] == 0
        assert m["requests"]["timed_out"] == 3
        assert poisoned.calls == [1]  # the timed-out queued request never reached the recognizer
        ok = c.post("/recognize", params={"k": 1}, files=body)
        assert ok.status_code == 200 and ok.json()["sku"] == "SKU1" and len(ok.json()["results"]) == 1


def test_max_batch_one_runs_one_image_per_call(tiny, gallery):
    """--max-batch 1 (the unbatched baseline): every call holds one image."""
    from fastapi.testclient import TestClient

    from skulens.serving.http import create_app
    from skulens.serving.recognize import Recognizer

    imgs, index, products = gallery
    rec = _Poisoned(Recognizer(tiny, index, products, index_version="v-test"))
    with TestClient(create_app(lambda: rec, max_batch=1, max_wait_ms=0)) as c:
        threads, out = _post_all(c, [({"k": 3}, {"file": ("c.png", _png(imgs[i % 6]), "image/png")})
                                     for i in range(8)])
        for t in threads:
            t.join(30)
        assert [r.json()["sku"] for r in out] == [f"SKU{i % 6}" for i in range(8)]
        assert set(rec.calls) == {1} and len(rec.calls) == 8
        assert c.get("/metrics").json()["batching"]["batch_sizes"] == {"1": 8}


@pytest.fixture(scope="module")
def tiny_engine(tiny, tmp_path_factory):
    """The tiny encoder compiled as an inference engine (onnxruntime), as `serve` loads champions."""
    from skulens.model import save_encoder
    from skulens.model.engine import load_engine

    return load_engine(save_encoder(tiny, tmp_path_factory.mktemp("engine") / "tiny.pt"), "onnxruntime")


def test_engine_recognizer_prepares_in_decode_threads_and_batches(tiny, tiny_engine, gallery):
    """With a compiled engine, uploads are preprocessed before the batch (Recognizer.prepare) and the batch
    runs the engine once; answers equal the PyTorch recognizer's. An input prepared for another encoder (a
    reload in between) is embedded from its image."""
    import threading

    from fastapi.testclient import TestClient

    from skulens.serving.http import create_app
    from skulens.serving.recognize import Prepared, Recognizer

    imgs, index, products = gallery
    rec_engine = Recognizer(tiny_engine, index, products, index_version="v-test")
    rec_torch = Recognizer(tiny, index, products, index_version="v-test")
    p = rec_engine.prepare(imgs[3])
    assert isinstance(p, Prepared) and p.encoder is tiny_engine and rec_torch.prepare(imgs[3]) is imgs[3]
    stale = Prepared(imgs[4], np.zeros_like(p.array), object())
    got = rec_engine.recognize([p, stale], k=3)
    want = rec_torch.recognize([imgs[3], imgs[4]], k=3)
    assert [r["sku"] for r in got] == ["SKU3", "SKU4"]
    for g, w in zip(got, want):
        assert [h["sku"] for h in g["topk"]] == [h["sku"] for h in w["topk"]]
        # within the engine's parity tolerance against PyTorch (skulens.model.engine.TOLERANCE)
        assert [h["score"] for h in g["topk"]] == pytest.approx([h["score"] for h in w["topk"]], abs=2e-3)

    gate = threading.Event()
    seen: list = []

    class _Spy(_Gated):
        def recognize(self, images, k=5):
            seen.append([type(im).__name__ for im in images])
            return super().recognize(images, k=k)

    rec = _Spy(rec_engine, gate)
    with TestClient(create_app(lambda: rec, max_batch=32, max_wait_ms=1.0)) as c:
        first, out0 = _post_all(c, [({"k": 1}, {"file": ("c.png", _png(imgs[0]), "image/png")})])
        assert rec.entered.wait(10)
        threads, out = _post_all(c, [({"k": 2}, {"file": ("c.png", _png(imgs[i % 6]), "image/png")})
                                     for i in range(9)])
        _wait_queued(c, 9)
        gate.set()
        for t in first + threads:
            t.join(30)
        assert [r.json()["sku"] for r in out] == [f"SKU{i % 6}" for i in range(9)]
        assert all(len(r.json()["results"]) == 2 for r in out)
        assert seen == [["Prepared"], ["Prepared"] * 9]

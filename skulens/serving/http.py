"""HTTP API for recognition (FastAPI).

``create_app(recognizer_factory)`` builds the app; the recognizer is created once, lazily, on the
first request that needs it (or at startup via the lifespan), so importing this module is cheap.

* ``POST /recognize?k=5`` - multipart form with one image file (field ``file``) -> top-k JSON.
* ``GET /health`` - model/index versions and index size; 503 until the recognizer is loaded.
* ``GET /metrics`` - batching statistics (batch-size distribution, queue depth) and request counters.

Concurrent requests are micro-batched (:mod:`skulens.serving.batcher`): each upload is decoded in a
thread, then queued; one inference thread embeds and searches up to ``max_batch`` queued images at once.

Errors: 413 upload larger than ``max_upload_bytes`` or image over ``max_pixels``; 415 not a
decodable image; 400 missing file or corrupt image data; 422 bad ``k``.

Run: ``uvicorn --factory skulens.serving.http:app_from_env`` (reads ``SKULENS_*`` settings).

(No ``from __future__ import annotations`` here: FastAPI must resolve the endpoint annotations.)
"""


import io
import logging
import os
import threading
import time
from collections.abc import Callable

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7700x5200 photo; shelf crops are far smaller
MAX_K = 50


class _Reject(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode upload bytes to an RGB image, refusing decompression bombs before decoding pixels."""
    from skulens.data.images import load_rgb

    if not data:
        raise _Reject(400, "empty file: send an image (JPEG, PNG, WebP, ...) in the 'file' form field")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _Reject(413, f"image too large: {e}")
    except UnidentifiedImageError:
        raise _Reject(415, "unsupported or unreadable image: send a JPEG, PNG, WebP, BMP, TIFF or GIF file")
    except Exception as e:  # noqa: BLE001
        raise _Reject(400, f"could not read image: {type(e).__name__}")
    w, h = img.size
    if w * h > max_pixels:
        raise _Reject(413, f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels")
    if w < 1 or h < 1:
        raise _Reject(400, "image has no pixels")
    try:
        img.load()
        return load_rgb(img)
    except Exception as e:  # noqa: BLE001 - truncated / corrupt data after a valid header
        raise _Reject(400, f"corrupt or truncated image data ({type(e).__name__})")


TOKEN_ENV = "SKULENS_SERVE_TOKEN"  # optional bearer token for /recognize (read from the environment, never logged)
MAX_BATCH_ENV = "SKULENS_SERVE_MAX_BATCH"  # largest inference batch (1 = no batching)
MAX_WAIT_MS_ENV = "SKULENS_SERVE_MAX_WAIT_MS"  # how long a request waits for others to join its batch


def create_app(
    recognizer_factory: Callable[[], object],
    max_upload_bytes: int = 10 * MiB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    load_on_startup: bool = True,
    token: str | None = None,
    max_pending: int = 128,
    timeout_s: float = 30.0,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    decode_threads: int = 2,
):
    """FastAPI app serving ``recognizer_factory()`` (a :class:`skulens.serving.recognize.Recognizer`).

    ``token``: when set, ``/recognize`` needs ``Authorization: Bearer <token>`` (401 otherwise; compared in
    constant time). ``max_pending``: recognitions queued or running at once; more get 429 with Retry-After.
    ``timeout_s``: a recognition that takes longer is answered 504. Every request is logged as one JSON line
    on the ``skulens.access`` logger (method, path, status, milliseconds, client; no headers, no token).

    Batching (:class:`skulens.serving.batcher.MicroBatcher`): uploads are decoded and preprocessed for the
    model (``Recognizer.prepare``) in ``decode_threads`` threads, off the event loop and in parallel with
    inference; one inference thread runs up to ``max_batch``
    queued images in one ``recognize`` call, waiting at most ``max_wait_ms`` for a batch to fill.
    ``max_batch=1`` answers one image per call. ``GET /metrics`` reports the batch sizes seen."""
    import asyncio
    import hmac
    import json as _json
    from concurrent.futures import Future, ThreadPoolExecutor
    from contextlib import asynccontextmanager

    from fastapi import HTTPException, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from skulens.serving.batcher import BatcherClosed, MicroBatcher, settle

    access = logging.getLogger("skulens.access")
    pending = threading.BoundedSemaphore(max_pending) if max_pending > 0 else None
    decoders = ThreadPoolExecutor(max_workers=max(1, int(decode_threads)), thread_name_prefix="skulens-decode")

    holder: dict = {}
    lock = threading.Lock()

    def get_recognizer():
        rec = holder.get("rec")
        if rec is None:
            with lock:
                rec = holder.get("rec")
                if rec is None:
                    rec = recognizer_factory()
                    holder["rec"] = rec
        return rec

    batcher = MicroBatcher(get_recognizer, max_batch=max_batch, max_wait_ms=max_wait_ms)
    counts = {"served": 0, "rejected_busy": 0, "timed_out": 0}
    stop_reloads = threading.Event()

    def reloader():
        """Index reloads off the request path: every ``reload_interval_s`` of the recognizer (a HEAD of the
        pointer; new deltas applied, the state swapped atomically; a batch in flight keeps its snapshot).
        A recognizer with ``reload_interval_s`` 0 checks before every batch instead (the batcher's reload)."""
        while not stop_reloads.is_set():
            rec = holder.get("rec")
            interval = float(getattr(rec, "reload_interval_s", 1.0) or 0.0) if rec is not None else 1.0
            if rec is not None and interval > 0 and hasattr(rec, "maybe_reload"):
                batcher.reload = False
                try:
                    rec.maybe_reload()
                except Exception as e:  # noqa: BLE001 - maybe_reload keeps the old state; never stop checking
                    log.warning("index reload check failed: %s", e)
            stop_reloads.wait(max(0.05, interval))

    reload_thread = threading.Thread(target=reloader, name="skulens-reload", daemon=True)

    @asynccontextmanager
    async def lifespan(app):
        if load_on_startup:
            try:
                await run_in_threadpool(get_recognizer)
            except Exception as e:  # noqa: BLE001 - serve /health as 503 and retry on the next request
                log.error("recognizer failed to load at startup: %s", e)
        batcher.start()
        reload_thread.start()
        yield
        stop_reloads.set()
        batcher.close(timeout=5.0)  # queued requests are failed, the batch in flight finishes
        decoders.shutdown(wait=False, cancel_futures=True)

    from fastapi_offline import FastAPIOffline  # Swagger UI / ReDoc served from local files: /docs works offline

    app = FastAPIOffline(title="skulens", version="1", lifespan=lifespan)
    app.state.get_recognizer = get_recognizer
    app.state.batcher = batcher

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            access.info(_json.dumps({"method": request.method, "path": request.url.path, "status": status,
                                     "ms": round((time.perf_counter() - t0) * 1000, 1),
                                     "client": request.client.host if request.client else None}))

    def _authorize(request: Request) -> None:
        if not token:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    def _loaded():
        rec = holder.get("rec")
        if rec is None:
            try:
                rec = get_recognizer()
            except Exception as e:  # noqa: BLE001
                raise HTTPException(503, f"recognizer not available: {type(e).__name__}: {e}")
        return rec

    @app.get("/health")
    def health():
        rec = holder.get("rec")
        if rec is None:
            try:
                rec = get_recognizer()
            except Exception as e:  # noqa: BLE001
                return JSONResponse({"status": "unavailable", "error": f"{type(e).__name__}",
                                     "detail": str(e)[:500]}, status_code=503)
        if batcher.reload:  # else the reload thread follows the index
            with batcher.exclusive():  # a reload from here never overlaps a batch in flight
                rec.maybe_reload()
        return {"status": "ok", "model_version": rec.model_version, "index_version": rec.index_version,
                "index_count": len(rec.index), "n_skus": len(rec.index.sku_list)}

    @app.get("/metrics")
    def metrics():
        """Batching statistics (batch-size distribution, queue depth) and request counters, as JSON."""
        return {"batching": batcher.stats(), "requests": dict(counts),
                "pending": (max_pending - pending._value) if pending is not None else None,  # noqa: SLF001
                "max_pending": max_pending, "decode_threads": int(decode_threads), "timeout_s": timeout_s}

    @app.post("/recognize")
    async def recognize(request: Request, k: int = Query(5, ge=1, le=MAX_K)):
        _authorize(request)
        # reject early on the declared size, before the body is parsed and spooled
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes + 64 * 1024:
            raise HTTPException(413, f"upload is {int(declared)} bytes; the limit is {max_upload_bytes} bytes")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise HTTPException(415, "send the image as multipart/form-data with a 'file' field")
        try:
            form = await request.form(max_files=1, max_fields=10)
        except HTTPException:
            raise
        except Exception as e:  # noqa: BLE001
            raise HTTPException(400, f"malformed multipart body: {type(e).__name__}")
        try:
            upload = form.get("file")
            if upload is None or not hasattr(upload, "read"):
                raise HTTPException(422, "no file: send the image in the multipart field 'file'")
            data = await upload.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise HTTPException(413, f"upload larger than the limit of {max_upload_bytes} bytes")
        finally:
            await form.close()
        rec = _loaded()  # 503 while the recognizer cannot load
        prepare = getattr(rec, "prepare", None)  # preprocessing for the model, here rather than in the batch
        if pending is not None and not pending.acquire(blocking=False):
            counts["rejected_busy"] += 1
            raise HTTPException(429, f"busy: {max_pending} recognitions already queued; retry shortly",
                                headers={"Retry-After": "1"})
        t_start = time.perf_counter()
        result: Future = Future()
        released = threading.Lock()

        def release(_=None):  # once: when the work ends (also after a timeout answered the client)
            if pending is not None and released.acquire(blocking=False):
                pending.release()

        def decode_and_queue():
            try:
                img = decode_image(data, max_pixels)
                if prepare is not None:
                    img = prepare(img)
            except BaseException as e:  # noqa: BLE001 - handed to the request
                settle(result, exc=e)
                release()
                return
            result.add_done_callback(release)  # runs now if the client already gave up
            if result.cancelled():
                return
            try:
                batcher.submit(img, k, future=result)
            except BatcherClosed as e:
                settle(result, exc=e)

        try:
            decoders.submit(decode_and_queue)
        except RuntimeError:  # executor shut down
            release()
            raise HTTPException(503, "the service is shutting down")
        try:
            # cancelling on timeout drops the request if it is still queued; a batch in flight finishes
            res = await asyncio.wait_for(asyncio.wrap_future(result), timeout_s)
        except asyncio.TimeoutError:
            counts["timed_out"] += 1
            raise HTTPException(504, f"recognition took longer than {timeout_s:g}s")
        except _Reject as r:
            raise HTTPException(r.status, r.detail)
        except BatcherClosed:
            raise HTTPException(503, "the service is shutting down")
        except Exception as e:  # noqa: BLE001 - this request's recognition failed (the others are served)
            log.error("recognition failed: %s: %s", type(e).__name__, e)
            raise HTTPException(500, f"recognition failed: {type(e).__name__}")
        counts["served"] += 1
        return {
            "sku": res["sku"], "name": res["name"], "score": res["score"],
            "results": res["topk"], "k": k,
            "model_version": res["model_version"], "index_version": res["index_version"],
            "latency_ms": round((time.perf_counter() - t_start) * 1000, 2), "batch_size": res.get("batch_size"),
        }

    return app


def app_from_env():
    """App factory for uvicorn (``--factory``): recognizer from the configured services."""
    from skulens.catalog.s3 import make_client
    from skulens.ops.settings import load_local_env, s3_credentials
    from skulens.serving.recognize import Recognizer

    settings = load_local_env()

    def factory():
        ak, sk = s3_credentials()
        client = make_client(settings.s3_endpoint, ak, sk, settings.region)
        from skulens.registry.store import ModelStore

        return Recognizer.from_services(settings.mlflow_uri, settings.model_name, client, settings.bucket,
                                        settings.cache_dir / "serve",
                                        store=ModelStore(settings.cache_dir / "models", settings.mlflow_uri,
                                                         settings.model_name))

    return create_app(factory, token=os.environ.get(TOKEN_ENV) or None,
                      max_batch=int(os.environ.get(MAX_BATCH_ENV) or 32),
                      max_wait_ms=float(os.environ.get(MAX_WAIT_MS_ENV) or 5.0))

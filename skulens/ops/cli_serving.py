"""`skulens recognize` and `skulens serve`: the published index + the model version that built it.

Both read the services from the environment like every skulens command (SKULENS_S3_ENDPOINT,
SKULENS_BUCKET, SKULENS_MLFLOW_URI, SKULENS_MODEL_NAME; S3 keys from the environment or
$SKULENS_HOME/credentials.env). torch, mlflow, fastapi and uvicorn load only inside the commands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from skulens.ops.settings import Settings, load_local_env


def _settings() -> Settings:
    return load_local_env(Settings.from_env())


def _client(settings: Settings):
    """S3 for recognition: few retries and short connect timeouts, so a store that is down is
    reported in seconds (the pipeline's own client retries harder)."""
    from skulens.catalog.s3 import client_for

    return client_for(settings, max_attempts=2, connect_timeout=2.0, read_timeout=30.0)


def _load_recognizer(settings: Settings, device: str, reload_interval_s: float = 30.0, warmup: bool = False):
    from botocore.exceptions import BotoCoreError, ClientError

    from skulens.index.publish import NoIndexPublished
    from skulens.registry.store import ModelStore, ModelUnavailable
    from skulens.serving.recognize import Recognizer

    try:
        client = _client(settings)
    except RuntimeError as exc:  # missing S3 keys
        raise click.ClickException(str(exc)) from exc
    store = ModelStore(settings.cache_dir / "models", settings.mlflow_uri, settings.model_name)
    try:
        rec = Recognizer.from_services(settings.mlflow_uri, settings.model_name, client, settings.bucket,
                                       cache_dir=settings.cache_dir / "recognize", device=device,
                                       reload_interval_s=reload_interval_s, store=store)
    except NoIndexPublished as exc:
        raise click.ClickException(f"no SKU index published yet ({exc}): run the pipeline first (skulens run)") from exc
    except ModelUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    except LookupError as exc:
        raise click.ClickException(f"{exc}: no champion model registered yet; run the pipeline first") from exc
    except (BotoCoreError, ClientError) as exc:
        raise click.ClickException(f"the S3 store at {settings.s3_endpoint} did not answer ({type(exc).__name__}: "
                                   f"{exc}); start it with `skulens services up`") from exc
    if warmup:  # the first forward pass pays lazy initialisation: not the first request's bill
        from PIL import Image

        rec.recognize([Image.new("RGB", (64, 64), (128, 128, 128))], k=1)
    return rec


@click.command("recognize")
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--k", "k", default=5, show_default=True, type=click.IntRange(1, 50), help="How many SKUs per image.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout (machine-readable).")
@click.option("--device", default="cpu", show_default=True, help="torch device for the encoder (cpu, cuda, cuda:1).")
def recognize_cmd(images: tuple[Path, ...], k: int, as_json: bool, device: str) -> None:
    """Recognize shelf crops: print the top-k SKUs of each IMAGE with scores and names.

    Loads the published index (s3://$SKULENS_BUCKET/index/CURRENT.json) and, from the MLflow
    registry ($SKULENS_MODEL_NAME), the model version that built it (normally the `champion`).
    Each image is recognized on its own; the latency shown is per crop (embed + search), after
    one warm-up call. Scores are cosine similarities (1.0 = identical embedding).

    \b
    Example:
      skulens recognize crop1.jpg crop2.png --k 3
      skulens recognize crop1.jpg --json | jq '.results[0].sku'
    """
    settings = _settings()
    t0 = time.perf_counter()
    rec = _load_recognizer(settings, device)
    load_s = time.perf_counter() - t0
    try:
        rec.recognize([str(images[0])], k=k)  # warm-up: the first call pays lazy initialisation
    except OSError:
        pass  # not an image: reported below
    results = []
    for path in images:
        t = time.perf_counter()
        try:
            res = rec.recognize([str(path)], k=k)[0]
        except OSError as exc:  # not an image / unreadable
            results.append({"image": str(path), "error": f"{type(exc).__name__}: {exc}"})
            continue
        res["latency_ms"] = round((time.perf_counter() - t) * 1000, 2)
        results.append({"image": str(path), **res})
    lat = [r["latency_ms"] for r in results if "latency_ms" in r]
    doc = {"model_name": settings.model_name, "model_version": rec.model_version,
           "index_version": rec.index_version, "index_count": len(rec.index), "index_skus": len(rec.index.sku_list),
           "load_s": round(load_s, 2), "mean_latency_ms": round(sum(lat) / len(lat), 2) if lat else None,
           "results": results}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"model {settings.model_name} v{rec.model_version} | index {rec.index_version} "
                   f"({doc['index_count']} images, {doc['index_skus']} SKUs) | loaded in {load_s:.1f}s")
        for r in results:
            if "error" in r:
                click.echo(f"\n{r['image']}: {r['error']}", err=True)
                continue
            click.echo(f"\n{r['image']}  ({r['latency_ms']:.1f} ms)")
            for i, hit in enumerate(r["topk"], 1):
                click.echo(f"  {i}. {hit['sku']:<20} {hit['score']:.4f}  {hit['name']}")
        if lat:
            click.echo(f"\nper-crop latency: mean {doc['mean_latency_ms']:.1f} ms over {len(lat)} crop(s) on {device}")
    if any("error" in r for r in results):
        raise SystemExit(1)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 = all).")
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port.")
@click.option("--device", default="cpu", show_default=True, help="torch device for the encoder.")
@click.option("--reload-interval", default=1.0, show_default=True, type=float,
              help="Seconds between checks of index/CURRENT.json (a HEAD request); a new index, and the "
                   "model version that built it, are swapped in without a restart.")
@click.option("--max-upload-mb", default=10.0, show_default=True, type=float, help="Largest accepted upload.")
@click.option("--max-pending", default=128, show_default=True, type=int,
              help="Recognitions decoding, queued or running at once; more are answered 429 (Retry-After: 1).")
@click.option("--timeout", "timeout_s", default=30.0, show_default=True, type=float,
              help="Seconds a recognition may take before the request is answered 504.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 1024),
              envvar="SKULENS_SERVE_MAX_BATCH", show_envvar=True,
              help="Largest batch of concurrent requests embedded and searched in one call (1 = no batching).")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0, 1000),
              envvar="SKULENS_SERVE_MAX_WAIT_MS", show_envvar=True,
              help="Longest a request waits for others to join its batch; under load batches fill without waiting.")
@click.option("--decode-threads", default=2, show_default=True, type=click.IntRange(1, 64),
              envvar="SKULENS_SERVE_DECODE_THREADS", show_envvar=True,
              help="Threads decoding uploads, off the event loop and in parallel with inference.")
def serve_cmd(host: str, port: int, device: str, reload_interval: float, max_upload_mb: float, max_pending: int,
              timeout_s: float, max_batch: int, max_wait_ms: float, decode_threads: int) -> None:
    """Serve recognition over HTTP (FastAPI + uvicorn).

    \b
    POST /recognize?k=5   multipart form, image in the field `file` -> top-k SKUs, versions, latency
    GET  /health          model/index versions and index size (503 until loaded)
    GET  /metrics         batch-size distribution, queue depth, request counters (JSON)
    GET  /docs            interactive API docs (served offline)

    With SKULENS_SERVE_TOKEN set, /recognize needs 'Authorization: Bearer <token>' (401 otherwise).
    Each request is logged as one JSON line (logger skulens.access; no headers, no token).

    Concurrent requests are batched: uploads are decoded in --decode-threads threads, then one
    inference thread embeds and searches up to --max-batch queued images in one call, waiting at
    most --max-wait-ms for a batch to fill. GET /metrics shows the batch sizes served.

    The recognizer loads the published index and its model at startup and follows
    index/CURRENT.json: when the pipeline publishes a new index (or promotes a new champion and
    rebuilds it), requests switch to it atomically; a failed reload keeps the old state.

    \b
    Example:
      curl -F file=@crop.jpg 'http://127.0.0.1:8000/recognize?k=3'
    """
    import os

    import uvicorn

    from skulens.serving.http import TOKEN_ENV, MiB, create_app

    settings = _settings()
    token = os.environ.get(TOKEN_ENV) or None
    app = create_app(lambda: _load_recognizer(settings, device, reload_interval_s=reload_interval, warmup=True),
                     max_upload_bytes=int(max_upload_mb * MiB), token=token, max_pending=max_pending,
                     timeout_s=timeout_s, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     decode_threads=decode_threads)
    click.echo(f"serving {settings.model_name} + s3://{settings.bucket}/index on http://{host}:{port} "
               f"(docs: http://{host}:{port}/docs; token {'required' if token else 'off'}; "
               f"batches of up to {max_batch}, {max_wait_ms:g} ms wait)")
    uvicorn.run(app, host=host, port=port, log_level="info")

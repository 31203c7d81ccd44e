"""Time from a new SKU's upload to `recognize` returning it, with the Dagster daemon and the catalog sensor.

    .venv/bin/python bench/bench_new_sku.py --skus 10000 --images-per-sku 3 --model tiny-test --embed-dim 1280

Starts its own S3, MLflow and dagster-daemon (free ports, a temporary SKULENS_HOME), uploads a
synthetic catalog of N SKUs, registers an encoder as champion (no training), builds the index once,
turns the catalog sensor on, then uploads ``--new-skus`` new SKUs one after another (3 images each) and
polls a Recognizer (as `skulens serve` does, pointer checked every 1 s) until each is the top-1 answer.
Prints p50/p95/max upload -> recognizable and, per SKU, where the time went (sensor wait, run launch,
run process start, ingest, champion + index load, embed, publish, reader apply). ``--model tiny-test
--embed-dim 1280`` keeps the index full-size (1280-d) while the initial build of N SKUs stays fast.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic_image(rng: random.Random, size: int = 112) -> bytes:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(3, 6)):
        x0, y0 = rng.randint(0, size - 20), rng.randint(0, size - 20)
        x1, y1 = rng.randint(x0 + 8, size), rng.randint(y0 + 8, size)
        col = tuple(rng.randint(0, 255) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=col)
    d.text((5, size - 14), "".join(rng.choice("ABCDEFGHKLMNPRSTUVXZ") for _ in range(5)), fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data + b"\0" * max(0, 1100 - len(data))  # above the 1 KiB minimum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skus", type=int, default=10000)
    ap.add_argument("--images-per-sku", type=int, default=1)
    ap.add_argument("--model", default="efficientnet-lite0", help="encoder registered as champion (no training)")
    ap.add_argument("--home", type=Path, default=None, help="state folder (default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--new-skus", type=int, default=5, help="new SKUs uploaded one after another, each timed")
    ap.add_argument("--embed-dim", type=int, default=None,
                    help="embedding size of the registered model (e.g. tiny-test with 1280: a full-size index, fast embedding)")
    ap.add_argument("--sensor-interval", type=int, default=3, help="SKULENS_SENSOR_INTERVAL for the daemon")
    ap.add_argument("--worker", action=argparse.BooleanOptionalAction, default=True,
                    help="start the warm index worker next to the daemon, as `skulens services up --ui` does")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="skulens-bench-"))
    from skulens.ops.services import ServiceManager, free_port, write_dagster_yaml
    from skulens.ops.settings import Settings, load_local_env

    os.environ.update({"SKULENS_HOME": str(home), "SKULENS_S3_PORT": str(free_port()),
                       "SKULENS_MLFLOW_PORT": str(free_port()), "SKULENS_BUCKET": "bench",
                       "DAGSTER_HOME": str(home / "dagster"),
                       "SKULENS_SENSOR_INTERVAL": str(args.sensor_interval)})
    settings = Settings.from_env()
    mgr = ServiceManager(settings)
    write_dagster_yaml(settings.dagster_home)
    t = time.perf_counter()
    mgr.up(["s3", "mlflow"])
    load_local_env(settings)
    print(f"services up in {time.perf_counter() - t:.1f}s (home {home})")
    try:
        run_bench(args, settings, mgr)
    finally:
        mgr.down()


def run_bench(args, settings, mgr) -> None:
    import dagster as dg

    from skulens.catalog import importer
    from skulens.catalog.s3 import ensure_bucket, make_client
    from skulens.model.factory import ModelSpec, create_encoder
    from skulens.model.io import save_encoder
    from skulens.ops.settings import s3_credentials
    from skulens.registry.model_registry import log_and_register, promote
    from skulens.serving.recognize import Recognizer

    client = make_client(settings.s3_endpoint, *s3_credentials())
    ensure_bucket(client, settings.bucket)
    rng = random.Random(0)
    src = settings.home / "catalog"
    t = time.perf_counter()
    (src / "images").mkdir(parents=True, exist_ok=True)
    with open(src / "products.csv", "w") as fh:
        fh.write("sku,name,category\n")
        for i in range(args.skus + args.new_skus):
            fh.write(f"sku{i:06d},Product {i},cat{i % 20}\n")
    for i in range(args.skus):
        d = src / "images" / f"sku{i:06d}"
        d.mkdir(exist_ok=True)
        for j in range(args.images_per_sku):
            (d / f"{j}.jpg").write_bytes(synthetic_image(rng))
    print(f"generated {args.skus} SKUs x {args.images_per_sku} images in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    rep = importer.import_catalog(client, settings.bucket, src, workers=16, progress=False)
    print(f"uploaded: {rep.summary()} in {time.perf_counter() - t:.1f}s")

    enc = create_encoder(ModelSpec(name=args.model, embed_dim=args.embed_dim))
    path = save_encoder(enc, settings.home / "champion" / "encoder.pt")
    version = log_and_register(settings.mlflow_uri, settings.model_name, str(path), metrics={"top1": 0.0},
                               params={"model": args.model}, tags={}, lineage={"eval_set": "bench"})
    promote(settings.mlflow_uri, settings.model_name, version)
    print(f"champion: {args.model} as version {version}")

    from pipelines.definitions import defs

    instance = dg.DagsterInstance.get()
    t = time.perf_counter()
    res = defs.get_job_def("index_update").execute_in_process(instance=instance)
    out = res.output_for_node("update_sku_index")
    print(f"initial full index build: {time.perf_counter() - t:.1f}s ({out.get('seconds')})")

    env = mgr.base_env()
    dagster = str(Path(sys.executable).parent / "dagster")
    t = time.perf_counter()
    mgr.start("dagster-daemon")
    print(f"daemon up in {time.perf_counter() - t:.1f}s")
    if args.worker:
        t = time.perf_counter()
        mgr.start("index-worker")  # the service `skulens services up --ui` starts next to the daemon
        print(f"index worker up in {time.perf_counter() - t:.1f}s (log {settings.log_dir / 'index-worker.log'})")
    subprocess.run([dagster, "sensor", "start", "catalog_upload_sensor", "-w", str(ROOT / "workspace.yaml")],
                   env=env, cwd=ROOT, check=True, capture_output=True)
    # first tick records the catalog state (one no-op run); wait for it so the measurement starts clean
    deadline = time.time() + 120
    while time.time() < deadline:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="index_update", statuses=[dg.DagsterRunStatus.SUCCESS]))
        if any(r.tags.get("dagster/sensor_name") for r in runs):
            break
        time.sleep(1)
    print("sensor on; first tick's run finished")

    from skulens.registry.store import ModelStore

    t = time.perf_counter()
    rec = Recognizer.from_services(settings.mlflow_uri, settings.model_name, client, settings.bucket,
                                   cache_dir=settings.home / "rec-cache", reload_interval_s=1.0,
                                   store=ModelStore(settings.cache_dir / "models", settings.mlflow_uri,
                                                    settings.model_name))
    print(f"reader (as `skulens serve`) loaded the full index in {time.perf_counter() - t:.1f}s "
          f"({len(rec.index)} rows x {rec.index.embed_dim})")
    t = time.perf_counter()
    from skulens.catalog.state import catalog_state

    catalog_state(client, settings.bucket)
    print(f"one sensor tick's catalog listing: {time.perf_counter() - t:.2f}s")
    time.sleep(2)

    results = []
    for n in range(args.new_skus):
        r = one_new_sku(args, settings, client, instance, rec, args.skus + n)
        if r is None:
            break
        results.append(r)
        time.sleep(1)
    if not results:
        return
    import numpy as np

    total = np.array([r["total"] for r in results])
    print(f"\nupload -> recognizable over {len(results)} new SKUs (catalog {args.skus} SKUs x {args.images_per_sku} "
          f"images, {len(rec.index)} index rows x {rec.index.embed_dim}, model {args.model}, sensor interval "
          f"{args.sensor_interval} s, reader checks every 1 s, index worker {'on' if args.worker else 'off'}):")
    print(f"  p50 {np.percentile(total, 50):.1f}s   p95 {np.percentile(total, 95):.1f}s   max {total.max():.1f}s")
    names = [k for k in results[0] if k not in ("total", "mode", "sku", "path")]
    print(f"  {'where the time goes (s)':<36} " + " ".join(f"{r['sku'][-5:]:>6}" for r in results) + "   median")
    for k in names:
        vals = [r[k] for r in results]
        print(f"  {k:<36} " + " ".join(f"{v:6.2f}" for v in vals) + f"   {np.nanmedian(vals):6.2f}")
    print("  published as: " + ", ".join(str(r["mode"]) for r in results))
    print("  published by: " + ", ".join(str(r["path"]) for r in results))
    if args.json:
        import json

        args.json.write_text(json.dumps({
            "skus": args.skus, "images_per_sku": args.images_per_sku, "model": args.model,
            "embed_dim": rec.index.embed_dim, "index_rows": len(rec.index), "worker": args.worker, "n": len(results),
            "p50_s": round(float(np.percentile(total, 50)), 2), "p95_s": round(float(np.percentile(total, 95)), 2),
            "max_s": round(float(total.max()), 2), "per_sku": results}, indent=1, default=str))


def one_new_sku(args, settings, client, instance, rec, i: int) -> dict | None:
    import dagster as dg

    new_sku = f"sku{i:06d}"
    img = synthetic_image(random.Random(12345 + i))
    probe = settings.home / f"probe-{i}.jpg"
    probe.write_bytes(img)
    t0 = time.time()
    for j in range(3):
        client.put_object(Bucket=settings.bucket, Key=f"catalog/images/{new_sku}/{j}.jpg",
                          Body=img if j == 0 else synthetic_image(random.Random(99 + 7 * i + j)))
    from skulens.catalog.notes import note_change

    note_change(client, settings.bucket, [new_sku], source="bench")  # as `skulens import catalog` does
    t_upload = time.time()
    found, reload_s = None, float("nan")
    while time.time() - t0 < args.timeout:
        t = time.perf_counter()
        if rec.maybe_reload():
            reload_s = time.perf_counter() - t
        hit = rec.recognize([str(probe)], k=1)[0]
        if hit["sku"] == new_sku:
            found = time.time()
            break
        time.sleep(0.1)
    if not found:
        print(f"{new_sku}: NOT recognized within {args.timeout:.0f}s")
        return None
    def sensor_run():  # the daemon's backstop run for this upload (the worker may have published first)
        runs = [r for r in instance.get_runs(filters=dg.RunsFilter(job_name="index_update"))
                if r.tags.get("dagster/sensor_name")]
        recs = [instance.get_run_record_by_id(r.run_id) for r in runs]
        recs = [rr for rr in recs if rr.create_timestamp.timestamp() >= t_upload - 1]
        return min(recs, key=lambda rr: rr.create_timestamp.timestamp()) if recs else None

    deadline = time.time() + 120
    record = sensor_run()
    while record is None and time.time() < deadline:
        time.sleep(0.5)
        record = sensor_run()
    if record is None:
        print(f"{new_sku}: the sensor started no run within 120 s")
        return None
    created = record.create_timestamp.timestamp()
    start, end = record.start_time, record.end_time
    deadline = time.time() + 120
    while end is None and time.time() < deadline:  # the run may still be going while the reader has the index
        time.sleep(0.5)
        record = instance.get_run_record_by_id(record.dagster_run.run_id)
        start, end = record.start_time, record.end_time
    mats = [m for m in instance.fetch_materializations(dg.AssetKey("sku_index"), limit=5).records
            if m.run_id == record.dagster_run.run_id]
    md = mats[0].asset_materialization.metadata if mats else {}
    secs = md["seconds"].value if "seconds" in md else {}
    nan = float("nan")
    path = "daemon run" if mats and md.get("index_version") and md["index_version"].value == rec.index_version else None
    wsecs = worker_seconds(settings, rec.index_version) if path is None else None
    if wsecs is not None:
        path = "worker"
    elif path is None:
        path = "?"
    op_total = secs.get("op_total", nan)
    row = {
        "sku": new_sku,
        "upload (3 images)": t_upload - t0,
        "sensor wait (to run created)": created - t_upload,
        "queue + launch (to run start)": (start or created) - created,
        "run: process, code load, resources": (end - start) - op_total if start and end else nan,
        "  op: ingest (catalog listing + new files)": secs.get("ingest", nan),
        "  op: champion + index load": op_total - secs.get("ingest", nan) - secs.get("total", nan) - secs.get("publish", nan),
        "  op: delta + file checks": secs.get("delta", nan) + secs.get("check", nan),
        "  op: embed": secs.get("embed", nan),
        "  op: publish": secs.get("publish", nan),
        "worker: change check -> published": wsecs.get("op_total", nan) if wsecs else nan,
        "  worker: ingest (noted SKU relisted + files)": wsecs.get("ingest", nan) if wsecs else nan,
        "  worker: embed": wsecs.get("embed", nan) if wsecs else nan,
        "  worker: publish": wsecs.get("publish", nan) if wsecs else nan,
        "reader: apply (in maybe_reload)": reload_s,
        "run end -> recognized (reader poll)": found - end if end else nan,
        "total": found - t0,
        "mode": md["published_as"].value if "published_as" in md else (wsecs or {}).get("mode"),
        "path": path,
    }
    print(f"{new_sku}: recognizable {row['total']:.1f}s after its upload began ({row['mode']}, by {path}); "
          f"the sensor's run: {'published it' if path == 'daemon run' else 'found nothing to publish' if end else 'running'}")
    return row


def worker_seconds(settings, version: str | None) -> dict | None:
    """The worker's timing of the update that published ``version`` (its log line), or None."""
    import ast

    try:
        lines = (settings.log_dir / "index-worker.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for ln in reversed(lines):
        if version and f"published index {version}" in ln:
            i = ln.find("; {")
            if i < 0:
                return {}
            try:
                d = ast.literal_eval(ln[i + 2:ln.index("}", i) + 1])
            except (ValueError, SyntaxError):
                d = {}
            d["mode"] = "delta" if "published as delta" in ln else "full"
            return d
    return None


if __name__ == "__main__":
    main()

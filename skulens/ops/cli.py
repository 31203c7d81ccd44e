"""The `skulens` command line. Heavy libraries load only inside the commands that need them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from skulens.ops.cli_serving import recognize_cmd, serve_cmd
from skulens.ops.settings import Settings, load_local_env


def _settings() -> Settings:
    return load_local_env(Settings.from_env())


def _client(settings: Settings):
    from skulens.catalog.s3 import client_for

    return client_for(settings)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="skulens")
def main() -> None:
    """skulens: keep a retail product (SKU) recognizer current.

    State lives in $SKULENS_HOME (default ./.skulens); ports and bucket come from
    SKULENS_S3_PORT, SKULENS_MLFLOW_PORT, SKULENS_DAGSTER_PORT, SKULENS_BUCKET.
    """


# --- services ---------------------------------------------------------------------------
@main.group()
def services() -> None:
    """Start, stop and inspect the local S3 (SeaweedFS), MLflow and Dagster services."""


@services.command("up")
@click.option("--ui", is_flag=True, help="Also start the Dagster webserver and daemon, and the warm index worker.")
def services_up(ui: bool) -> None:
    """Start the services (idempotent) and wait until each one answers."""
    from skulens.ops.services import DEFAULT, UI, ServiceError, ServiceManager

    names = list(DEFAULT) + (list(UI) if ui else [])
    mgr = ServiceManager(_settings())
    try:
        for name in names:
            t0 = time.monotonic()
            was_running = mgr.is_running(name)
            st = mgr.start(name)
            how = "already running" if was_running else f"ready in {time.monotonic() - t0:.1f}s"
            click.echo(f"{name:<18} pid {st.pid:<8} {how:<18} {st.url or ''}")
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc


@services.command("down")
def services_down() -> None:
    """Stop every service skulens started (by PID); nothing is left running."""
    from skulens.ops.services import ServiceManager

    stopped = ServiceManager(_settings()).down()
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@services.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def services_status(as_json: bool) -> None:
    """Show each service's state, PID and URL."""
    from skulens.ops.services import ServiceManager

    rows = ServiceManager(_settings()).status()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['service']:<18} {r['state']:<8} pid {str(r['pid'] or '-'):<8} "
                   f"{'answering' if r['answering'] else '-':<10} {r['url'] or ''}")


@main.command("index-worker")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05, 3600),
              help="Seconds between change checks (upload notes + the ETag of products.csv).")
@click.option("--full-every", default=60.0, show_default=True, type=click.FloatRange(1, 86400),
              help="Seconds between full listings of catalog/ (catches uploads made without `skulens import`).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 1024))
@click.option("--once", is_flag=True, help="One check (and update) then exit.")
def index_worker_cmd(interval: float, full_every: float, batch_size: int, once: bool) -> None:
    """Keep the SKU index current within seconds of a catalog upload (the warm path).

    A long-lived loop running the `index_update` job's update (same ingest, rules and delta publish by
    compare-and-swap) with the champion and the index kept in memory. `skulens services up --ui` starts it
    next to the Dagster daemon, whose catalog sensor stays the backstop (its run then finds nothing to do).
    SIGTERM/Ctrl-C stop it after the update in progress."""
    import logging
    import signal
    import threading

    from skulens.index.worker import worker_from_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = _settings()
    worker = worker_from_settings(s, interval_s=interval, batch_size=batch_size)
    worker.full_every_s = full_every
    if once:
        done = worker.cycle()
        click.echo(done.summary() if done is not None else "catalog unchanged (or left to the pipeline)")
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"index worker on s3://{s.bucket} (model {s.model_name}): checking every {interval:g}s")
    worker.run(stop)


@main.command("env")
def env_cmd() -> None:
    """Print `export` lines for the local services (use: eval "$(skulens env)")."""
    s = _settings()
    for key, value in {
        "SKULENS_HOME": str(s.home), "DAGSTER_HOME": str(s.dagster_home), "SKULENS_BUCKET": s.bucket,
        "SKULENS_S3_ENDPOINT": s.s3_endpoint, "MLFLOW_TRACKING_URI": s.mlflow_uri,
    }.items():
        click.echo(f"export {key}={value}")
    click.echo("# S3 keys for the embedded store are in " + str(s.credentials_path))


# --- import -----------------------------------------------------------------------------------
@main.group("import")
def import_group() -> None:
    """Upload a local folder to the bucket (only what changed, by size + MD5)."""


REJECTS_EXIT = 3  # `skulens import`: some files were rejected (the rest was uploaded)


def _store_hint(s) -> str:
    """Where to look when the embedded store (started by ``skulens up``) fails writes: its data disk's free
    space and a full disk in its log. Empty for an external store."""
    import shutil

    data = s.home / "s3"
    if s.s3_endpoint.rstrip("/") != s.embedded_s3_endpoint or not data.is_dir():  # (`skulens env` exports it)
        return ""
    free = shutil.disk_usage(data).free
    hint = f" (the embedded SeaweedFS keeps its data in {data}, on a disk with {free / 1e6:,.0f} MB free"
    log = s.log_dir / "s3.log"
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, log.stat().st_size - 256_000))
            if b"no space left on device" in fh.read():
                hint += "; its log, " + str(log) + ", says: no space left on device"
    except OSError:
        pass
    return hint + ")"


def _run_import(kind: str, src: Path, workers: int, allow_rejects: bool = False) -> None:
    from skulens.catalog import importer
    from skulens.catalog.contract import CatalogError
    from skulens.catalog.s3 import ensure_bucket

    s = _settings()
    client = _client(s)
    ensure_bucket(client, s.bucket)
    fn = importer.import_catalog if kind == "catalog" else importer.import_shelf
    try:
        report = fn(client, s.bucket, src, workers=workers, progress=True)
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from exc
    for path, why in report.rejected:
        click.echo(f"rejected {path}: {why}", err=True)
    for key, err in report.failed:
        click.echo(f"failed {key}: {err}", err=True)
    for w in getattr(report, "warnings", []):
        click.echo(f"warning {w}", err=True)
    click.echo(f"{kind} -> s3://{s.bucket}: {report.summary()}")
    if report.stopped:
        raise click.ClickException(
            f"the import stopped: {report.stopped}. {len(report.uploaded)} file(s) uploaded, {len(report.failed)} "
            f"failed, {len(report.not_attempted)} not attempted; nothing was deleted. Fix the store{_store_hint(s)}, "
            "then run the import again: it sends only what is missing or different")
    if report.failed:
        raise click.ClickException(f"{len(report.failed)} upload(s) failed; run the import again to retry them")
    if report.rejected and not allow_rejects:
        err = click.ClickException(f"{len(report.rejected)} file(s) rejected and not uploaded (listed above; the "
                                   "rest was uploaded): rename or remove them, or pass --allow-rejects to accept this")
        err.exit_code = REJECTS_EXIT
        raise err


@import_group.command("catalog")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--workers", default=16, show_default=True, help="Parallel uploads.")
@click.option("--allow-rejects", is_flag=True, help="Exit 0 even when some files were rejected.")
def import_catalog_cmd(src: Path, workers: int, allow_rejects: bool) -> None:
    """Upload SRC/products.csv and SRC/images/<sku>/<file> to catalog/."""
    _run_import("catalog", src, workers, allow_rejects)


@import_group.command("shelf")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--workers", default=16, show_default=True, help="Parallel uploads.")
@click.option("--allow-rejects", is_flag=True, help="Exit 0 even when some files were rejected.")
def import_shelf_cmd(src: Path, workers: int, allow_rejects: bool) -> None:
    """Upload labelled shelf crops SRC/<sku>/<file>, and/or SRC/photos/ + SRC/boxes.csv, to shelf/."""
    _run_import("shelf", src, workers, allow_rejects)


@main.command("demo-catalog")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--skus", default=30, show_default=True, help="Number of synthetic products.")
@click.option("--images", default=6, show_default=True, help="Catalog images per SKU.")
@click.option("--crops", default=4, show_default=True, help="Shelf crops per SKU.")
@click.option("--seed", default=7, show_default=True)
@click.option("--no-bad-files", is_flag=True, help="Leave out the deliberately broken files.")
def demo_catalog(out: Path, skus: int, images: int, crops: int, seed: int, no_bad_files: bool) -> None:
    """Write a deterministic synthetic catalog (OUT/catalog) and shelf set (OUT/shelf)."""
    from skulens.catalog.demo import write_demo

    counts = write_demo(out, n_skus=skus, images_per_sku=images, crops_per_sku=crops, seed=seed,
                        bad_files=not no_bad_files)
    click.echo(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    click.echo(f"next: skulens import catalog {out}/catalog && skulens import shelf {out}/shelf")


# --- data (the dvc.yaml stages) ---------------------------------------------------------------------
@main.group("data")
def data_group() -> None:
    """Dataset stages run by `dvc repro` (the same code the Dagster assets call)."""


@data_group.command("ingest")
@click.option("--out", "out", default="data/raw", show_default=True, type=click.Path(file_okay=False, path_type=Path))
def data_ingest(out: Path) -> None:
    """Mirror catalog images from S3 into OUT/images and write OUT/manifest.parquet + OUT/products.csv."""
    from skulens.catalog import contract, ingest
    from skulens.data import layout

    s = _settings()
    client = _client(s)
    res = ingest.sync_images(client, s.bucket, contract.CATALOG_IMAGES_PREFIX, out / "images", progress=True)
    products = ingest.fetch_products(client, s.bucket)
    layout.write_raw(res.manifest, products, out)
    click.echo(f"ingest: {res.stats()}")


@data_group.command("clean")
@click.option("--raw", default="data/raw", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default="data/clean", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(path_type=Path))
def data_clean(raw: Path, out: Path, params_file: Path) -> None:
    """Drop tiny, corrupt, duplicate files and SKUs with too few images; write the cleaned dataset OUT."""
    from skulens.data import layout
    from skulens.data.clean import CleanConfig, clean_catalog

    p = dict(layout.read_params(params_file.parent, "clean"))
    cfg = CleanConfig(**p)
    manifest, products = layout.read_raw(raw)
    result = clean_catalog(manifest, products, out.parent / ".normalised", cfg, progress=True)
    max_share = cfg.max_dropped_share
    params = layout.params_dict(cfg)
    params.pop("workers", None)
    layout.write_clean(result, out, params)
    st = result.stats
    click.echo(f"clean: kept {st['files_kept']}/{st['files_in']} files, {st['skus_kept']} SKUs; "
               f"dropped {st['dropped_by_reason']} ({st['images_per_s']} images/s)")
    if st["share_dropped"] > max_share:
        raise click.ClickException(f"{st['share_dropped']:.1%} of files dropped > max_dropped_share {max_share:.0%}; "
                                   f"see {out}/dropped_files.csv")


@data_group.command("balance")
@click.option("--clean", "clean_dir", default="data/clean", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default="data/balanced", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(path_type=Path))
def data_balance(clean_dir: Path, out: Path, params_file: Path) -> None:
    """Hold out a validation split and balance the rest to depth D per SKU (RetailKLIP)."""
    from skulens.data import balance as bal
    from skulens.data import layout

    p = layout.read_params(params_file.parent, "balance")
    kept = bal.training_classes(layout.read_clean(clean_dir))
    train_src, val = bal.split_validation(kept, per_sku=int(p.get("val_per_sku", 1)), seed=int(p.get("seed", 0)))
    depth = int(p.get("depth", 0)) or bal.suggest_depth(train_src)
    train = bal.balance(train_src, depth, seed=int(p.get("seed", 0)))
    layout.write_balanced(train, val, clean_dir, out, {"depth": depth, "val_per_sku": int(p.get("val_per_sku", 1)),
                                                          "seed": int(p.get("seed", 0))})
    click.echo(f"balance: {train['sku'].nunique()} SKUs x {depth} = {len(train)} rows, validation {len(val)}")


# --- run ----------------------------------------------------------------------------------------
DEMO_LOADING = ".loading"  # in <home>/demo while a demo load has not finished (removed once it has)


def load_demo(client, s) -> bool:
    """Load the demo catalog and shelf set when the bucket has no catalog yet, or when an earlier demo load
    did not finish (its ``.loading`` marker is still there: a store that failed part of the upload must not
    leave a partial catalog that later runs take for the whole one). The import sends only what is missing.
    A failed upload raises a ClickException (nothing deleted; the marker stays, so the next run resumes).
    Returns whether it loaded."""
    from skulens.catalog import importer
    from skulens.catalog.demo import write_demo
    from skulens.catalog.s3 import bucket_is_empty

    demo_dir = s.home / "demo"
    marker = demo_dir / DEMO_LOADING
    if not marker.exists() and not bucket_is_empty(client, s.bucket, "catalog/"):
        return False
    counts = write_demo(demo_dir)
    marker.write_text("a demo load started and has not finished; `skulens run` resumes it\n")
    click.echo("loading the demo catalog: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    for kind, fn in (("catalog", importer.import_catalog), ("shelf", importer.import_shelf)):
        report = fn(client, s.bucket, demo_dir / kind, progress=False)
        click.echo(f"  {kind + ':':<8} {report.summary()}")
        try:
            report.raise_for_failures()
        except importer.ImportFailed as exc:
            raise click.ClickException(
                f"loading the demo {kind} failed: {exc}. Nothing was deleted. Fix the store{_store_hint(s)}, then "
                "run again: the load resumes and sends only what is missing") from exc
    marker.unlink()
    return True


@main.command("run")
@click.option("--job", default="main", show_default=True, help="Dagster job to execute.")
@click.option("--demo/--no-demo", default=True, show_default=True,
              help="Load the demo catalog when the bucket has no catalog yet.")
@click.option("--verbose", is_flag=True, help="Echo every Dagster event and traceback (they are always in the log file).")
@click.option("--force", is_flag=True,
              help="Run `main` even when the nightly retrain policy would skip it (nothing trainable changed since "
                   "the champion).")
def run_cmd(job: str, demo: bool, verbose: bool, force: bool) -> None:
    """Start the services, load the demo catalog if the bucket is empty, and run the pipeline.

    The job runs through Dagster's in-process API on the instance in DAGSTER_HOME (it shows in the UI).
    The console shows one line per asset as it finishes (duration and key figure) and per asset check;
    Dagster's event log, warnings and tracebacks go to .skulens/logs/run-<job>-<time>.log (--verbose
    echoes them too). A failed run ends with one line naming the asset, the cause and the log."""
    from skulens.catalog.s3 import ensure_bucket
    from skulens.ops.services import DEFAULT, ServiceManager, write_dagster_yaml

    s = _settings()
    mgr = ServiceManager(s)
    write_dagster_yaml(s.dagster_home)
    t0 = time.monotonic()
    for name in DEFAULT:
        st = mgr.start(name)
        click.echo(f"{name:<8} {st.url}")
    client = _client(s)
    ensure_bucket(client, s.bucket)
    if demo:
        load_demo(client, s)
    env = mgr.base_env()
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pipelines.console", "--job", job] + (["--force"] if force else [])
    started = time.time()
    click.echo(f"running Dagster job {job!r} (DAGSTER_HOME={s.dagster_home}) ...\n")
    rc, log_path, error = _run_logged(cmd, env, root, s.log_dir / f"run-{job}-{time.strftime('%Y%m%dT%H%M%S')}.log",
                                      echo_all=verbose)
    took = time.monotonic() - t0
    if rc == SKIPPED_EXIT:
        click.echo(f"\njob {job!r} skipped: retraining would not pay (reason above).")
        return
    if rc != 0:
        what = error or f"job {job!r} failed (exit {rc}); see the run in the UI (make ui)"
        click.echo("")
        raise click.ClickException(f"{what}  [log: {log_path}]")
    click.echo(f"\njob {job!r} succeeded in {took:.0f}s.")
    _print_summary(s, Path(os.environ.get("SKULENS_PROJECT_DIR") or root), since=started)
    _print_recognize_example(s, env)
    click.echo("Where to look:")
    click.echo(f"  Dagster UI : make ui   (then open {s.dagster_url})")
    click.echo(f"  MLflow     : {s.mlflow_uri}")
    click.echo(f"  S3 endpoint: {s.s3_endpoint}  bucket {s.bucket}  (keys in {s.credentials_path})")
    click.echo("  stop all   : make down")


ERROR_MARK = "skulens error: "  # assets raise dg.Failure("skulens error: <what happened and what to do>")
MARK = "::skulens:: "  # a console line of `python -m pipelines.console` (the job runner)
PROGRESS = "::skulens-progress:: "  # a progress line: rewritten in place on a terminal
SKIPPED_EXIT = 100  # the runner skipped the job (the retrain policy: nothing to retrain since the champion)


def _run_logged(cmd: list[str], env: dict, cwd: Path, log_path: Path,
                echo_all: bool = False) -> tuple[int, Path, str | None]:
    """Run the job runner ``cmd``: its console lines (``MARK``) and progress lines go to the console, and
    everything it prints (Dagster's event log, warnings, tracebacks) to ``log_path`` (with ``echo_all``
    to the console as well). Returns ``(exit code, log path, the one-line skulens error, if any)``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    error = None
    tty = sys.stdout.isatty()
    pending = False  # a progress line is on screen, to be overwritten
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        for line in proc.stdout:
            log.write(line)
            text = None
            for mark in (PROGRESS, MARK):  # a library's progress bar (\r, no newline) may precede a mark
                i = line.find(mark)
                if i > 0:
                    line = line[i:]
            if line.startswith(PROGRESS):
                body = line[len(PROGRESS):].rstrip("\n")
                if tty and not echo_all:
                    sys.stdout.write("\r\033[K  .. " + body)
                    sys.stdout.flush()
                    pending = True
                    continue
                text = "  .. " + body + "\n"
            elif line.startswith(MARK):
                text = line[len(MARK):]
                if text.startswith(ERROR_MARK) and error is None:
                    error = text[len(ERROR_MARK):].strip()
            elif echo_all:
                text = line
            if text is not None:
                if pending:
                    sys.stdout.write("\r\033[K")
                    pending = False
                sys.stdout.write(text)
                sys.stdout.flush()
        rc = proc.wait()
    if pending:
        sys.stdout.write("\n")
    if rc != 0 and error is None:  # it died before or outside a step: show the end of its output
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        error = next((t.strip() for t in reversed(tail) if t.strip()), f"exit {rc}")
    return rc, log_path, error


def _print_recognize_example(s: Settings, env: dict) -> None:
    """Recognize one held-out demo shelf crop with the published index, as a user would."""
    crops = sorted((s.home / "demo" / "shelf").glob("*/crop00.jpg")) or sorted(
        (s.home / "cache" / "shelf" / "crops").glob("*/*.jpg"))
    if not crops:
        return
    crop = crops[len(crops) // 2]
    cmd = [str(Path(sys.executable).parent / "skulens"), "recognize", str(crop), "--k", "3"]
    click.echo(f"\nexample: skulens recognize {crop} --k 3   (true SKU: {crop.parent.name})")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    click.echo(proc.stdout.rstrip() or proc.stderr.rstrip()[-2000:])


def _print_summary(s: Settings, root: Path, since: float = 0.0) -> None:
    """What this run produced, read from the files it wrote (no Dagster import here); files older than
    ``since`` (another job's outputs) are not reported."""
    import yaml

    def fresh(p: Path) -> bool:
        return p.exists() and p.stat().st_mtime >= since - 1.0

    stats_path = root / "data" / "clean" / "stats.json"
    if fresh(stats_path):
        st = json.loads(stats_path.read_text())
        click.echo(f"  cleaning   : kept {st['files_kept']}/{st['files_in']} files and {st['skus_kept']}/{st['skus_in']} SKUs; "
                   f"dropped {st['dropped_by_reason']}")
        click.echo(f"               list: {root / 'data' / 'clean' / 'dropped_files.csv'}")
    reports = sorted((s.home / "gx" / "reports").glob("*.html"), key=lambda p: p.stat().st_mtime)
    if reports and fresh(reports[-1]):
        click.echo(f"  quality    : {reports[-1]}  (Great Expectations results, opens offline)")
    docs = s.home / "gx" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    if fresh(docs):
        click.echo(f"  data docs  : {docs}  (GX Data Docs; their styles load from a CDN)")
    lock = root / "dvc.lock"
    if fresh(lock):
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in ("clean", "balance"):
            md5 = next((o.get("md5") for o in stages.get(stage, {}).get("outs", [])), None)
            if md5:
                click.echo(f"  dvc {stage:<7}: {md5}  (remote s3://{s.bucket}/dvc)")


# --- recognition (skulens/ops/cli_serving.py) ------------------------------------------------------

main.add_command(recognize_cmd)
main.add_command(serve_cmd)


if __name__ == "__main__":  # pragma: no cover
    main()

"""Thirty catalog days, simulated end to end: does the recognizer stay current and never regress?

    .venv/bin/python bench/simulate_days.py --out /tmp/sim30                      # GroZi-120, 30 days
    .venv/bin/python bench/simulate_days.py --out /tmp/sim3 --source demo --days 3 --model tiny-test

A timeline of N days runs through a real Dagster instance: SeaweedFS, MLflow, the Dagster webserver and
the daemon are started here (free loopback ports, a fresh home under ``--out``), the catalog sensor and
the champion sensor are switched on, and the nightly schedule is evaluated once per simulated day
(``scheduleDryRun`` at that day's 02:00, time compressed: no waiting for real midnights); its run
request, if any, is launched through the webserver and executed by the daemon.

Each day applies a scripted, seeded mix straight to the catalog in S3 (as the product DB would):
launches (every ``--packshot-every``-th one with a single packshot), package redesigns (the SKU's
old images removed, a new look uploaded: rendered by the demo generator), delistings (images and the
products.csv row removed), a bad file, and the day's shelf crops. With ``--source grozi`` products are
GroZi-120's real products released in waves (first frames -> catalog, last half -> shelf crops); with
``--source demo`` the demo generator's (CI has no GroZi).

Per day it records: top-1 on that day's shelf crops over the SKUs live that day, split into new /
redesigned / stable, with the champion before the nightly run and after it (same crops); seconds
from each upload to ``recognize`` returning the SKU (probe: its packshot, polled every 0.5 s through
the serving path's hot reload); whether a delisted SKU was returned after its delisting was
processed; training minutes or the schedule's skip reason; the champion and every promotion decision
with its reason; data-check failures. Writes ``days.csv``, ``uploads.csv``, ``report.html`` (plots)
and ``summary.json`` under ``--out``, and prints a summary.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GROZI = Path(os.environ.get("SKULENS_GROZI", "/work/shared/datasets/grozi120"))
START = datetime(2026, 1, 5, tzinfo=timezone.utc)  # day 0 (a Monday)


# ================================================================================== product looks
@dataclass
class Look:
    """What a SKU looks like now: catalog image bytes and an endless supply of shelf crops."""

    sku: str
    name: str
    category: str
    catalog: list  # [bytes]
    shelf: callable  # (i) -> bytes
    packshot_only: bool = False


class DemoSource:
    """Synthetic products from the demo generator; a redesign is another rendered design for the SKU."""

    def __init__(self, n: int, seed: int = 7, catalog_images: int = 4):
        from skulens.catalog import demo

        self.demo, self.seed, self.k = demo, seed, catalog_images
        self.products = demo.make_products(n, seed)
        self.skus = [p.sku for p in self.products]
        self._alt = demo.make_products(max(n, 4) * 2, seed + 1000)

    def look(self, sku: str, version: int = 0, packshot_only: bool = False) -> Look:
        import dataclasses

        d = self.demo
        i = self.skus.index(sku)
        p = self.products[i] if version == 0 else dataclasses.replace(self._alt[(i + 7 * version) % len(self._alt)],
                                                                        sku=sku, name=self.products[i].name)
        n = 1 if packshot_only else self.k
        catalog = [d._jpeg_bytes(d.render_packshot(p, view=v, rng=random.Random(f"{sku}-{version}-{v}")), 92)
                   for v in range(n)]

        def shelf(j: int, p=p) -> bytes:
            r = random.Random(f"{sku}-{version}-shelf-{j}")
            return d._jpeg_bytes(d.shelfify(d.render_packshot(p, view=100 + j, rng=r), r), 80)

        return Look(sku, p.name, p.category, catalog, shelf, packshot_only)


class GroziSource:
    """GroZi-120's real products: the first frames are the catalog, the last half the shelf crops; a
    redesign is a rendered demo look (GroZi has one look per product)."""

    def __init__(self, root: Path = GROZI, catalog_images: int = 4, seed: int = 7):
        import pandas as pd

        sys.path.insert(0, str(ROOT / "bench"))
        from bench_grozi import load_grozi

        self.df = load_grozi(root)
        prod = pd.read_csv(root / "products.csv", dtype={"sku": str})
        self.names = dict(zip(prod["sku"], prod["name"]))
        self.skus = sorted(self.df["sku"].unique())
        self.k = catalog_images
        self.demo = DemoSource(len(self.skus), seed=seed, catalog_images=catalog_images)
        self.demo.skus = self.skus  # the same ids for the redesigned looks

    def look(self, sku: str, version: int = 0, packshot_only: bool = False) -> Look:
        if version:
            look = self.demo.look(sku, version, packshot_only)
            look.name = self.names[sku]
            return look
        frames = self.df[self.df["sku"] == sku].sort_values("rank")
        n = len(frames)
        paths = frames["clean_path"].tolist()
        # the catalog half: frames at least min_side px on both sides first (a product DB holds usable
        # images; GroZi's in-situ frames go down to 20 px), the packshot the largest of them
        half = paths[: max(1, n // 2)]
        sizes = {p: _size(p) for p in half}
        usable = [p for p in half if min(sizes[p]) >= MIN_SIDE] or sorted(half, key=lambda p: -min(sizes[p]))
        if packshot_only:
            chosen = [max(usable, key=lambda p: sizes[p][0] * sizes[p][1])]
        else:
            chosen = usable[: min(self.k, max(1, n // 2))]
        catalog = [Path(p).read_bytes() for p in chosen]
        shelf_paths = paths[n // 2:]
        return Look(sku, self.names[sku], "grocery", catalog, lambda j: Path(shelf_paths[j % len(shelf_paths)]).read_bytes(),
                    packshot_only)


MIN_SIDE = 32  # params.yaml clean.min_side


def _size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def not_indexable(look: Look, work: Path) -> str | None:
    """Why none of ``look``'s catalog files would be indexed, by the pipeline's own rule
    (skulens.index.rules, the params.yaml thresholds), or None when one would."""
    import pandas as pd

    from skulens.data.clean import CleanConfig
    from skulens.index import rules

    rows = []
    for i, data in enumerate(look.catalog):
        path = work / look.sku / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append((look.sku, f"catalog/images/{look.sku}/{i:02d}.jpg", f"e{i}", len(data), str(path)))
    cleaned = rules.check_images(pd.DataFrame(rows, columns=["sku", "key", "etag", "bytes", "path"]), None,
                                 work / "checked", CleanConfig(workers=1))
    if len(rules.indexable(cleaned)):
        return None
    d = cleaned.dropped_files
    return "; ".join(f"{r.reason} ({r.detail})" for r in d.itertuples()) if len(d) else "no file kept"


# ================================================================================== the timeline
@dataclass
class Day:
    index: int
    launches: list = field(default_factory=list)  # [(sku, packshot_only)]
    redesigns: list = field(default_factory=list)
    delists: list = field(default_factory=list)
    bad: list = field(default_factory=list)  # [(sku, kind)]


def build_timeline(skus: list[str], days: int, initial: int, launches_per_day: int, packshot_every: int,
                   redesign_every: int, delist_every: int, bad_every: int, seed: int) -> list[Day]:
    """A seeded, deterministic script: which SKUs launch, change their look or leave on which day."""
    rng = random.Random(seed)
    pool = list(skus)
    rng.shuffle(pool)
    out, live, launched = [], [], 0
    for d in range(days):
        day = Day(d)
        n_new = initial if d == 0 else launches_per_day
        for _ in range(n_new):
            if not pool:
                break
            sku = pool.pop()
            launched += 1
            day.launches.append((sku, d > 0 and packshot_every > 0 and launched % packshot_every == 0))
        settled = [s for s in live if s not in {x for x, _ in day.launches}]
        if d > 0 and redesign_every and d % redesign_every == 0 and settled:
            day.redesigns.append(rng.choice(settled))
        if d > 0 and delist_every and d % delist_every == 0:
            left = [s for s in settled if s not in day.redesigns]
            if len(left) > 4:
                day.delists.append(rng.choice(left))
        if d > 0 and bad_every and d % bad_every == 0 and settled:
            day.bad.append((rng.choice(settled), rng.choice(["truncated", "html", "empty"])))
        live = [s for s in live if s not in day.delists] + [s for s, _ in day.launches]
        out.append(day)
    return out


# ================================================================================== the stack
def scratch_project(path: Path) -> Path:
    """A git + DVC checkout of the project's pipeline files only, so the simulated runs version their datasets
    there (``SKULENS_PROJECT_DIR``) and never touch this checkout's ``dvc.lock`` or ``data/``."""
    if (path / ".dvc").is_dir():
        return path
    path.mkdir(parents=True, exist_ok=True)
    for f in ("dvc.yaml", "params.yaml", "dvc.lock", ".gitignore"):
        shutil.copy(ROOT / f, path / f)
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=path, check=True)
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")  # the committed remote (endpoint: config.local)
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(["git", "-c", "user.email=sim@skulens", "-c", "user.name=skulens-sim", "commit", "-q", "-m",
                    "simulation project"], cwd=path, check=True)
    return path


class Stack:
    """S3 + MLflow + Dagster webserver + daemon under ``home``, started by skulens' ServiceManager."""

    def __init__(self, home: Path, env: dict):
        from skulens.ops.services import ServiceManager, free_port
        from skulens.ops.settings import Settings

        self.settings = Settings(home=home, s3_port=free_port(), mlflow_port=free_port(), dagster_port=free_port(),
                                 bucket="skulens-sim")
        self.mgr = ServiceManager(self.settings, extra_env=env)
        self.env = None
        self._saved_env: dict | None = None  # os.environ before up(), put back by down()

    def up(self):
        from skulens.ops.settings import load_local_env

        self.mgr.up(("s3", "mlflow", "dagster-webserver", "dagster-daemon"))
        self.env = self.mgr.base_env()
        # this process talks to the stack through the environment (load_local_env, DagsterInstance.get());
        # down() puts the environment back, so a caller in the same process (the test suite) is not left
        # pointing at a stopped stack, its nightly config and its retrain threshold
        self._saved_env = dict(os.environ)
        load_local_env(self.settings)
        os.environ.update({k: v for k, v in self.env.items() if k.startswith(("SKULENS_", "DAGSTER_HOME", "MLFLOW_"))})
        self.url = self.settings.dagster_url
        loc = self.gql("{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }")
        node = loc["repositoriesOrError"]["nodes"][0]
        self.repo = {"repositoryName": node["name"], "repositoryLocationName": node["location"]["name"]}
        for sensor in ("catalog_upload_sensor", "champion_change_sensor"):
            subprocess.run([str(Path(sys.executable).parent / "dagster"), "sensor", "start", sensor,
                            "-w", str(ROOT / "workspace.yaml")], env=self.env, cwd=ROOT, check=True,
                           capture_output=True, timeout=180)
        import dagster as dg

        self.instance = dg.DagsterInstance.get()
        return self

    def down(self):
        try:
            self.mgr.down()
        finally:
            if self._saved_env is not None:
                os.environ.clear()
                os.environ.update(self._saved_env)
                self._saved_env = None

    def client(self):
        from skulens.catalog.s3 import client_for

        return client_for(self.settings)

    def gql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=300).read())
        if "errors" in out:
            raise RuntimeError(out["errors"])
        return out["data"]

    def nightly(self, when: datetime) -> dict:
        """Evaluate the nightly schedule at ``when``: ``{"run_requests": [...], "skip": str|None}``."""
        q = """mutation($sel: ScheduleSelector!, $ts: Float) { scheduleDryRun(selectorData: $sel, timestamp: $ts) {
                 __typename ... on DryRunInstigationTick { evaluationResult {
                   runRequests { runKey runConfigYaml tags { key value } } skipReason error { message } } }
                 ... on PythonError { message } } }"""
        res = self.gql(q, {"sel": {**self.repo, "scheduleName": "nightly_retrain"}, "ts": when.timestamp()})
        r = res["scheduleDryRun"]
        if r["__typename"] != "DryRunInstigationTick":
            raise RuntimeError(r)
        ev = r["evaluationResult"]
        if ev.get("error"):
            raise RuntimeError(ev["error"]["message"])
        return {"run_requests": ev.get("runRequests") or [], "skip": ev.get("skipReason")}

    def launch(self, job: str, run_config: dict, tags: dict) -> str:
        q = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
                 ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
                 ... on RunConfigValidationInvalid { errors { message } } } }"""
        p = {"selector": {**self.repo, "jobName": job}, "runConfigData": run_config,
             "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}}
        r = self.gql(q, {"p": p})["launchRun"]
        if r["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(r)
        return r["run"]["runId"]

    def wait_run(self, run_id: str, timeout: float, poll=None):
        import dagster as dg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.instance.get_run_by_id(run_id)
            if run and run.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                                      dg.DagsterRunStatus.CANCELED):
                return run
            if poll:
                poll()
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} did not finish in {timeout:.0f} s")

    def sensor_run_for(self, fingerprint: str):
        import dagster as dg

        runs = self.instance.get_runs(filters=dg.RunsFilter(job_name="index_update",
                                                             tags={"skulens/catalog": fingerprint[:16]}), limit=1)
        return runs[0] if runs else None


# ================================================================================== catalog writes
def _bad_bytes(kind: str, good: bytes) -> bytes:
    if kind == "truncated":
        return good[: len(good) * 2 // 3]
    if kind == "html":
        return b"<!DOCTYPE html><html><body>502 Bad Gateway" + b" " * 2000 + b"</body></html>"
    return b""


class Catalog:
    """The product DB's side: writes straight into the bucket (it may delete: it owns the catalog)."""

    def __init__(self, client, bucket: str):
        self.c, self.bucket = client, bucket
        self.live: dict[str, Look] = {}
        self._crops: set[str] = set()

    def _put(self, key, data):
        self.c.put_object(Bucket=self.bucket, Key=key, Body=data)

    def _delete_prefix(self, prefix):
        from skulens.catalog.s3 import list_objects

        for obj in list(list_objects(self.c, self.bucket, prefix)):
            self.c.delete_object(Bucket=self.bucket, Key=obj.key)

    def add(self, look: Look, tag: str = "v0"):
        for i, data in enumerate(look.catalog):
            self._put(f"catalog/images/{look.sku}/{tag}-{i:02d}.jpg", data)
        self.live[look.sku] = look

    def redesign(self, look: Look, tag: str):
        self._delete_prefix(f"catalog/images/{look.sku}/")
        self.add(look, tag)

    def delist(self, sku: str):
        self._delete_prefix(f"catalog/images/{sku}/")
        self.live.pop(sku, None)

    def set_shelf_crops(self, crops: dict, day: int):
        """The day's shelf crops become the evaluation set in S3 (``shelf/crops/``), so the nightly run's
        promotion gate and the daily top-1 score the same crops."""
        keys = {f"shelf/crops/{sku}/day{day:02d}-{j}.jpg": data for sku, (_, ims) in crops.items()
                for j, data in enumerate(ims)}
        for key in sorted(self._crops - set(keys)):
            self.c.delete_object(Bucket=self.bucket, Key=key)
        for key, data in keys.items():
            self._put(key, data)
        self._crops = set(keys)

    def bad_file(self, sku: str, kind: str, day: int):
        self._put(f"catalog/images/{sku}/upload-day{day:02d}-{kind}.jpg", _bad_bytes(kind, self.live[sku].catalog[0]))

    def write_products(self):
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["sku", "name", "category"])
        for sku in sorted(self.live):
            w.writerow([sku, self.live[sku].name, self.live[sku].category])
        self._put("catalog/products.csv", buf.getvalue().encode())


# ================================================================================== the run
def _recognizer(stack: Stack, cache: Path):
    from skulens.serving.recognize import Recognizer

    return Recognizer.from_services(stack.settings.mlflow_uri, stack.settings.model_name, stack.client(),
                                    stack.settings.bucket, cache_dir=cache, reload_interval_s=0.0)


def _top1(rec, images: list[bytes]) -> list[str]:
    from PIL import Image

    out = []
    for start in range(0, len(images), 64):
        ims = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start:start + 64]]
        out += [r["sku"] for r in rec.recognize(ims, k=1)]
    return out


def _step_seconds(instance, run_id: str, step: str) -> float | None:
    stats = {s.step_key: s for s in instance.get_run_step_stats(run_id)}
    s = stats.get(step)
    return round(s.end_time - s.start_time, 1) if s and s.end_time and s.start_time else None


def _materialization(instance, run_id: str, asset: str) -> dict:
    import dagster as dg

    recs = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    for r in recs:
        m = r.event_log_entry.dagster_event.event_specific_data.materialization
        if m.asset_key.path[-1] == asset:
            return {k: getattr(v, "value", v) for k, v in m.metadata.items()}
    return {}


def _failed_checks(instance, run_id: str) -> list[str]:
    import dagster as dg

    recs = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    out = []
    for r in recs:
        ev = r.event_log_entry.dagster_event.event_specific_data
        if not ev.passed:
            out.append(ev.check_name)
    return out


def simulate(args, before_down=None) -> dict:
    """Run the timeline; ``before_down(stack)``, if given, is called with the live services after the last day
    (the test suite inspects the webserver's view of the runs there)."""
    from skulens.catalog.state import catalog_state

    out = Path(args.out)
    if out.exists() and args.fresh:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    source = GroziSource(catalog_images=args.catalog_images, seed=args.seed) if args.source == "grozi" else \
        DemoSource(args.products, seed=args.seed, catalog_images=args.catalog_images)
    timeline = build_timeline(source.skus, args.days, args.initial, args.launches_per_day, args.packshot_every,
                              args.redesign_every, args.delist_every, args.bad_every, args.seed)
    nightly_cfg = out / "nightly.yaml"
    train = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size}
    if args.train_image_size:
        train["train_image_size"] = args.train_image_size
    nightly = {"ops": {"trained_encoder": {"config": train}}}
    if args.in_process:  # every step in the run's own process (no process per step): the reduced test's speed-up
        nightly["execution"] = {"config": {"in_process": {}}}
    nightly_cfg.write_text(json.dumps(nightly))
    env = {"SKULENS_SENSOR_INTERVAL": str(args.sensor_interval), "SKULENS_NIGHTLY_CONFIG": str(nightly_cfg),
           "SKULENS_PROJECT_DIR": str(scratch_project(out / "project")),
           "SKULENS_RETRAIN_MIN_CHANGED_SKUS": str(args.retrain_min_changed)}
    stack = Stack(out / "home", env).up()
    days_rows, uploads, returned_delisted = [], [], []
    delisted_done: set[str] = set()
    versions: dict[str, int] = {}
    try:
        cat = Catalog(stack.client(), stack.settings.bucket)
        rec = None
        for day in timeline:
            t_day = time.monotonic()
            when = START + timedelta(days=day.index)
            # ---- the day's catalog changes, straight into S3
            probes, looks = {}, {}
            for sku, packshot_only in day.launches:
                look = source.look(sku, 0, packshot_only)
                cat.add(look)
                probes[sku] = ("new", look.catalog[0])
                looks[sku] = look
            for sku in day.redesigns:
                versions[sku] = versions.get(sku, 0) + 1
                look = source.look(sku, versions[sku])
                cat.redesign(look, f"v{versions[sku]}")
                probes[sku] = ("redesigned", look.catalog[0])
                looks[sku] = look
            for sku in day.delists:
                cat.delist(sku)
            for sku, kind in day.bad:
                if sku in cat.live:
                    cat.bad_file(sku, kind, day.index)
            cat.write_products()
            fp = catalog_state(stack.client(), stack.settings.bucket).set_fingerprint  # what the sensor tags its run with
            t_uploaded = time.monotonic()

            # ---- until the sensor's index update for this state has run: probe recognition meanwhile
            seen = {}

            def probe():
                if rec is None or not probes:
                    return
                rec.maybe_reload(force=True)
                todo = [s for s in probes if s not in seen]
                if not todo:
                    return
                for sku, got in zip(todo, _top1(rec, [probes[s][1] for s in todo])):
                    if got == sku:
                        seen[sku] = time.monotonic() - t_uploaded

            deadline = time.monotonic() + args.update_timeout
            run = None
            while time.monotonic() < deadline:
                run = stack.sensor_run_for(fp)
                if run is not None:
                    break
                probe()
                time.sleep(0.5)
            if run is None:
                raise TimeoutError(f"day {day.index}: the catalog sensor launched no run for {fp[:16]}")
            run = stack.wait_run(run.run_id, args.update_timeout, poll=probe)
            update_ok = run.status.value == "SUCCESS"
            update_s = _step_seconds(stack.instance, run.run_id, "update_sku_index")
            if rec is not None:
                t_end = time.monotonic() + 20  # a few more polls after the run (reload + embed)
                while time.monotonic() < t_end and len(seen) < len(probes):
                    probe()
                    time.sleep(0.5)
            for sku in day.delists:
                delisted_done.add(sku)
            for sku, (group, _) in (probes.items() if day.index > 0 else ()):  # day 0 is the starting catalog
                dropped = None if sku in seen else not_indexable(looks[sku], out / "checks" / f"day{day.index}")
                uploads.append({"day": day.index, "sku": sku, "group": group,
                                "seconds_to_recognizable": round(seen[sku], 1) if sku in seen else None,
                                "not_indexable": dropped,
                                "update_run": run.run_id, "update_ok": update_ok})

            # ---- the nightly schedule at 02:00 the next morning
            tick = when + timedelta(days=1, hours=2)
            ev = stack.nightly(tick)
            train_min, decision, reason, checks, main_ok = 0.0, None, ev["skip"], [], None
            crops_groups = _day_crops(cat, probes, day, args.shelf_per_sku)
            cat.set_shelf_crops(crops_groups, day.index)
            pre = None
            if rec is not None:
                rec.maybe_reload(force=True)
                pre = _score(rec, crops_groups, delisted_done, returned_delisted, day.index, "pre")
            champion_before = rec.model_version if rec is not None else None
            if ev["run_requests"]:
                rr = ev["run_requests"][0]
                import yaml

                run_config = yaml.safe_load(rr["runConfigYaml"]) or {}
                tags = {t["key"]: t["value"] for t in rr["tags"]}
                tags["skulens/simulated_day"] = str(day.index)
                rid = stack.launch("main", run_config, tags)
                mrun = stack.wait_run(rid, args.main_timeout)
                main_ok = mrun.status.value == "SUCCESS"
                train_min = round((_step_seconds(stack.instance, rid, "trained_encoder") or 0) / 60, 2)
                reg = _materialization(stack.instance, rid, "registered_model")
                decision = {True: "promoted", False: "kept-champion"}.get(reg.get("promoted"), None)
                reason = reg.get("reason") or reg.get("decision_reason") or ("main run failed" if not main_ok else None)
                checks = _failed_checks(stack.instance, rid)
            if rec is None:
                try:
                    rec = _recognizer(stack, out / "rec-cache")
                except Exception as e:  # noqa: BLE001 - no index yet: the first nightly run failed
                    print(f"day {day.index}: no recognizer yet ({e})", flush=True)
            else:
                rec.maybe_reload(force=True)
            post = _score(rec, crops_groups, delisted_done, returned_delisted, day.index, "post") if rec else None
            if pre is None:
                pre = post
            row = {"day": day.index, "date": when.date().isoformat(), "live_skus": len(cat.live),
                   "launched": len(day.launches), "packshot_only": sum(1 for _, p in day.launches if p),
                   "redesigned": len(day.redesigns), "delisted": len(day.delists), "bad_files": len(day.bad),
                   "update_ok": update_ok, "update_seconds": update_s,
                   "recognizable": f"{len(seen)}/{len(probes)}",
                   "champion_before": champion_before, "champion_after": rec.model_version if rec else None,
                   "nightly": "ran" if ev["run_requests"] else "skipped", "main_ok": main_ok,
                   "training_minutes": train_min, "decision": decision, "reason": reason,
                   "failed_checks": ";".join(checks), "wall_seconds": round(time.monotonic() - t_day, 1)}
            for tag, sc in (("pre", pre), ("post", post)):
                for g in ("all", "new", "redesigned", "stable"):
                    row[f"top1_{g}_{tag}"] = None if sc is None else sc.get(g)
            days_rows.append(row)
            # written after every day, so an interrupted run keeps what it measured
            _write_outputs(out, days_rows, uploads, returned_delisted,
                           _summarize(days_rows, uploads, returned_delisted), args)
            print(f"day {day.index:2d}: live {row['live_skus']:3d} | +{row['launched']} ~{row['redesigned']} "
                  f"-{row['delisted']} | recognizable {row['recognizable']} | top1 pre {row['top1_all_pre']} "
                  f"post {row['top1_all_post']} | nightly {row['nightly']}"
                  f"{' ' + str(decision) if decision else ''} ({(reason or '')[:90]}) | {row['wall_seconds']} s",
                  flush=True)
        if before_down is not None:
            before_down(stack)
    finally:
        stack.down()
    summary = _summarize(days_rows, uploads, returned_delisted)
    _write_outputs(out, days_rows, uploads, returned_delisted, summary, args)
    return summary


def _day_crops(cat: Catalog, probes: dict, day: Day, per_sku: int) -> dict:
    """{sku: (group, [crop bytes])}: fresh crops of every live SKU's current look for this day."""
    out = {}
    for sku, look in sorted(cat.live.items()):
        group = probes[sku][0] if sku in probes else "stable"
        out[sku] = (group, [look.shelf(day.index * per_sku + j) for j in range(per_sku)])
    return out


def _score(rec, crops: dict, delisted: set, returned: list, day: int, when: str) -> dict:
    skus, groups, images = [], [], []
    for sku, (group, ims) in crops.items():
        for im in ims:
            skus.append(sku)
            groups.append(group)
            images.append(im)
    got = _top1(rec, images)
    for sku, g in zip(skus, got):
        if g in delisted:
            returned.append({"day": day, "when": when, "query_sku": sku, "returned": g})
    res = {}
    for g in ("all", "new", "redesigned", "stable"):
        idx = [i for i, gg in enumerate(groups) if g == "all" or gg == g]
        res[g] = round(sum(got[i] == skus[i] for i in idx) / len(idx), 4) if idx else None
    return res


def _pct(values: list, q: float):
    v = sorted(values)
    if not v:
        return None
    i = min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))
    return v[i]


def _summarize(days: list, uploads: list, returned: list) -> dict:
    secs = [u["seconds_to_recognizable"] for u in uploads if u["seconds_to_recognizable"] is not None]
    refused = [u for u in uploads if u.get("not_indexable")]
    regress = [d["day"] for d in days if d["top1_all_pre"] is not None and d["top1_all_post"] is not None
               and d["champion_after"] != d["champion_before"] and d["top1_all_post"] < d["top1_all_pre"]]
    return {
        "days": len(days),
        "uploads_probed": len(uploads), "recognizable": len(secs),
        # every file of the upload dropped by the data checks (a recorded drop, never indexed)
        "not_indexable": len(refused),
        "not_indexable_reasons": sorted({u["not_indexable"] for u in refused}),
        "indexable_not_recognized": sum(1 for u in uploads if u["seconds_to_recognizable"] is None
                                        and not u.get("not_indexable")),
        "seconds_to_recognizable_p50": _pct(secs, 0.5), "seconds_to_recognizable_p95": _pct(secs, 0.95),
        "seconds_to_recognizable_max": max(secs) if secs else None,
        "delisted_returned": len(returned),
        "promotions": sum(1 for d in days if d["decision"] == "promoted"),
        "kept_champion": sum(1 for d in days if d["decision"] == "kept-champion"),
        "nightly_runs": sum(1 for d in days if d["nightly"] == "ran"),
        "nightly_skipped": sum(1 for d in days if d["nightly"] == "skipped"),
        "training_minutes": round(sum(d["training_minutes"] or 0 for d in days), 2),
        "days_a_promotion_lowered_top1": regress,
        "min_top1_post": min((d["top1_all_post"] for d in days if d["top1_all_post"] is not None), default=None),
        "update_failures": sum(1 for d in days if not d["update_ok"] and d["day"] > 0),  # day 0: no champion yet
        "main_failures": sum(1 for d in days if d["main_ok"] is False),
        "failed_checks": sum(1 for d in days if d["failed_checks"]),
    }


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _write_outputs(out: Path, days: list, uploads: list, returned: list, summary: dict, args) -> None:
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, rows in (("days.csv", days), ("uploads.csv", uploads), ("delisted_returned.csv", returned)):
        with open(out / name, "w", newline="") as fh:
            if rows:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    x = [d["day"] for d in days]
    figs = []
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for g, style in (("all", "-"), ("new", "--"), ("redesigned", ":"), ("stable", "-.")):
        ys = [d[f"top1_{g}_post"] for d in days]
        if any(y is not None for y in ys):
            ax.plot(x, [y if y is not None else float("nan") for y in ys], style, marker="o", ms=3, label=g)
    pre = [d["top1_all_pre"] if d["top1_all_pre"] is not None else float("nan") for d in days]
    ax.plot(x, pre, color="grey", alpha=0.5, lw=3, label="all, champion before the nightly run")
    ax.set(xlabel="simulated day", ylabel="top-1 on the day's shelf crops", ylim=(0, 1.02),
           title="Recognition by day and SKU group (after the nightly run)")
    ax.legend(fontsize=8, loc="lower left")
    figs.append(("accuracy", _png(fig)))
    plt.close(fig)
    secs = [u["seconds_to_recognizable"] for u in uploads if u["seconds_to_recognizable"] is not None]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    if secs:
        ax.hist(secs, bins=min(30, max(5, len(secs) // 2)), color="#4a7ab7")
        for q, c in ((0.5, "green"), (0.95, "red")):
            ax.axvline(_pct(secs, q), color=c, ls="--", label=f"p{int(q * 100)} {_pct(secs, q):.1f} s")
        ax.legend()
    ax.set(xlabel="seconds from upload to recognize returning the SKU", ylabel="uploads",
           title="Time to recognizable (new and redesigned SKUs)")
    figs.append(("time-to-recognizable", _png(fig)))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.bar(x, [d["training_minutes"] or 0 for d in days], label="training minutes", color="#d98b2b")
    ax2 = ax.twinx()
    ax2.plot(x, [d["update_seconds"] or 0 for d in days], color="#4a7ab7", marker=".", label="index update s")
    ax.set(xlabel="simulated day", ylabel="training minutes", title="Compute per day")
    ax2.set_ylabel("index update seconds")
    figs.append(("compute", _png(fig)))
    plt.close(fig)
    cols = ["day", "live_skus", "launched", "packshot_only", "redesigned", "delisted", "bad_files", "recognizable",
            "top1_all_pre", "top1_all_post", "top1_new_post", "top1_redesigned_post", "champion_after", "nightly",
            "training_minutes", "decision", "reason", "failed_checks"]
    table = "".join("<tr>" + "".join(f"<td>{html.escape(str(d.get(c, '')))}</td>" for c in cols) + "</tr>"
                    for d in days)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>skulens: {len(days)} simulated days</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}td,th{{border:1px solid #ccc;padding:2px 6px;
font-size:12px}}table{{border-collapse:collapse}}</style></head><body>
<h1>{len(days)} simulated catalog days</h1>
<p>Source: {html.escape(args.source)}; model {html.escape(args.model)}, {args.epochs} epochs; seed {args.seed};
sensor interval {args.sensor_interval} s; retrain threshold {args.retrain_min_changed} changed trainable SKUs.</p>
<pre>{html.escape(json.dumps(summary, indent=2))}</pre>
{''.join(f'<h2>{n}</h2><img src="data:image/png;base64,{p}">' for n, p in figs)}
<h2>Days</h2><table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{table}</table>
</body></html>"""
    (out / "report.html").write_text(doc)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="working folder: services' home, CSVs, report.html")
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--source", choices=["grozi", "demo"], default="grozi")
    ap.add_argument("--products", type=int, default=40, help="demo source: products to draw from")
    ap.add_argument("--initial", type=int, default=40, help="SKUs live on day 0")
    ap.add_argument("--launches-per-day", type=int, default=2)
    ap.add_argument("--packshot-every", type=int, default=2, help="every n-th launch has one packshot only")
    ap.add_argument("--redesign-every", type=int, default=3, help="a redesign every n days")
    ap.add_argument("--delist-every", type=int, default=4, help="a delisting every n days")
    ap.add_argument("--bad-every", type=int, default=2, help="a bad upload every n days")
    ap.add_argument("--catalog-images", type=int, default=4, help="catalog images per launched (rich) SKU")
    ap.add_argument("--shelf-per-sku", type=int, default=2,
                    help="the day's shelf crops per live SKU: the daily top-1 and the nightly evaluation set")
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-image-size", type=int, default=None)
    ap.add_argument("--retrain-min-changed", type=int, default=6,
                    help="SKULENS_RETRAIN_MIN_CHANGED_SKUS: retrain when this many trainable SKUs are new or changed")
    ap.add_argument("--sensor-interval", type=int, default=5)
    ap.add_argument("--update-timeout", type=float, default=300)
    ap.add_argument("--main-timeout", type=float, default=3600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-process", action="store_true",
                    help="nightly runs execute every step in the run's process (faster; default: a process per step)")
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    summary = simulate(args)
    print(json.dumps(summary, indent=2))
    print(f"report: {args.out / 'report.html'} ({(time.monotonic() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Packshot one-shot on real S3 (SeaweedFS) + MLflow: a catalog whose products.csv names packshots, with a
launch that has only its packshot (and one store photo), goes through `skulens import`, cleaning, the
balanced dataset and the full build (`sku_index`): the launch is indexed and never in the training frame;
a later launch with only a packshot is indexed by `index_update`, and one more by the warm worker."""

from __future__ import annotations

import csv
import io
import shutil

import dagster as dg

from assets import datasets as dataset_assets
from assets import index, quality
from assets import ingest as ingest_assets
from assets.index_update import index_update
from resources import SparseViewsResource
from skulens.catalog import importer
from skulens.catalog.contract import CATALOG_IMAGES_PREFIX as P
from skulens.index.publish import load_current
from tests.conftest import pipeline_resources
from tests.pipelines.test_automation import _register_champion

VIEWS = 1  # shelf-like views per image of a sparse SKU (small: the test stays fast)


def _packshot_jpeg(seed: int) -> bytes:
    from skulens.catalog.demo import Product, _jpeg_bytes, render_packshot

    p = Product(sku=f"launch-{seed}", name="Launch", category="snacks", shape="box", brand=f"NEW{seed}",
                primary=(20 + 40 * seed, 160, 60), secondary=(250, 250, 250), pattern="stripes", logo="star",
                size="1 kg")
    return _jpeg_bytes(render_packshot(p, view=0), 92)


def _write_products(src, packshots: dict[str, str], extra: list[tuple[str, str]] = ()) -> None:
    """Rewrite src/products.csv with a packshot column (``packshots``: sku -> file name) and ``extra`` rows."""
    rows = list(csv.DictReader(io.StringIO((src / "products.csv").read_text())))
    rows += [{"sku": s, "name": n, "category": "snacks"} for s, n in extra]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["sku", "name", "category", "packshot"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "packshot": packshots.get(r["sku"], "")})
    (src / "products.csv").write_text(buf.getvalue())


def test_packshot_only_launch_indexed_by_full_build_update_and_worker_never_trained(
        s3, mlflow_server, demo_dir, dvc_repo, tmp_path, dagster_instance, monkeypatch):
    from skulens.index import publish
    from skulens.index.worker import IndexWorker

    monkeypatch.setattr(publish, "MAX_DELTA_RATIO", 10.0)  # the index is tiny: deltas, no compaction
    repo, bucket = dvc_repo
    res = {**pipeline_resources(s3, bucket, repo, tmp_path / "state", mlflow_server.uri),
           "sparse_views": SparseViewsResource(views=VIEWS)}
    _register_champion(mlflow_server.uri, res["mlflow"].model_name, tmp_path)  # the index needs no training

    src = tmp_path / "cat"
    shutil.copytree(demo_dir / "catalog", src)
    rich = sorted(p.name for p in (src / "images").iterdir())[0]
    launch = src / "images" / "LAUNCH-1"
    launch.mkdir()
    (launch / "front.jpg").write_bytes(_packshot_jpeg(1))  # the packshot, named in products.csv
    (launch / "a-store.jpg").write_bytes(_packshot_jpeg(2))  # a second image: 2 in all, index role
    _write_products(src, {rich: "03.jpg", "LAUNCH-1": "front.jpg", "demo-002": "missing.jpg"},
                    [("LAUNCH-1", "New Launch 1 kg")])
    report = importer.import_catalog(s3.client(), bucket, src, progress=False).raise_for_failures()
    assert len(report.warnings) == 1 and "demo-002" in report.warnings[0]  # recorded, still uploaded

    result = dg.materialize([ingest_assets.catalog_products, ingest_assets.catalog_images, quality.cleaned_catalog,
                             dataset_assets.balanced_dataset, index.sku_index],
                            resources=res, instance=dagster_instance,
                            run_config=dg.RunConfig(ops={"balanced_dataset": dataset_assets.BalanceSettings(depth=4)}))
    assert result.success
    cleaned = result.output_for_node("cleaned_catalog")
    kept = cleaned.kept
    assert set(kept.loc[kept["packshot"], "key"]) == {f"{P}{rich}/03.jpg", f"{P}LAUNCH-1/front.jpg"}
    assert cleaned.sku_roles.set_index("sku").loc["LAUNCH-1", "role"] == "index"
    shots = cleaned.packshots.set_index("sku")
    assert shots.loc["demo-002", "status"] == "missing" and shots.loc["LAUNCH-1", "status"] == "used"
    bal = result.output_for_node("balanced_dataset")
    for part in ("train", "val"):  # never trained on (nor validated on)
        assert "LAUNCH-1" not in set(bal[part]["sku"]) and rich in set(bal[part]["sku"])

    client = s3.client()
    full, _ = load_current(client, bucket, cache_dir=tmp_path / "idx1")
    keys = {str(k) for k, s in zip(full.keys, full.skus) if s == "LAUNCH-1"}
    assert keys == {f"{P}LAUNCH-1/front.jpg", f"{P}LAUNCH-1/a-store.jpg",
                    f"{P}LAUNCH-1/front.jpg#aug1", f"{P}LAUNCH-1/a-store.jpg#aug1"}

    # index_update: a launch with nothing but its packshot (named), no retraining
    (src / "images" / "LAUNCH-2").mkdir()
    (src / "images" / "LAUNCH-2" / "hero.jpg").write_bytes(_packshot_jpeg(3))
    _write_products(src, {rich: "03.jpg", "LAUNCH-1": "front.jpg", "LAUNCH-2": "hero.jpg"},
                    [("LAUNCH-2", "Second Launch 1 kg")])
    importer.import_catalog(client, bucket, src, progress=False).raise_for_failures()
    run = index_update.execute_in_process(resources=res, instance=dagster_instance)
    assert run.success and run.output_for_node("update_sku_index")["published"]
    upd, _ = load_current(client, bucket, cache_dir=tmp_path / "idx2")
    assert sorted(str(k) for k, s in zip(upd.keys, upd.skus) if s == "LAUNCH-2") == [
        f"{P}LAUNCH-2/hero.jpg", f"{P}LAUNCH-2/hero.jpg#aug1"]
    assert "LAUNCH-1" in upd.sku_list

    # the warm worker: a third launch, its packshot by the file-name convention (packshot.<ext>)
    store = res["mlflow"].store(tmp_path / "models")
    worker = IndexWorker(client, bucket, store, tmp_path / "worker", interval_s=0.1)
    worker.cycle()  # start: full listing, the catalog agrees with the index
    (src / "images" / "LAUNCH-3").mkdir()
    (src / "images" / "LAUNCH-3" / "packshot.jpg").write_bytes(_packshot_jpeg(4))
    _write_products(src, {rich: "03.jpg", "LAUNCH-1": "front.jpg", "LAUNCH-2": "hero.jpg"},
                    [("LAUNCH-3", "Third Launch 1 kg")])
    importer.import_catalog(client, bucket, src, progress=False).raise_for_failures()
    done = worker.cycle()
    assert done is not None and done.published and "LAUNCH-3" in done.report.changed_skus
    now, _ = load_current(client, bucket, cache_dir=tmp_path / "idx3")
    assert sorted(str(k) for k, s in zip(now.keys, now.skus) if s == "LAUNCH-3") == [
        f"{P}LAUNCH-3/packshot.jpg", f"{P}LAUNCH-3/packshot.jpg#aug1"]
    assert {"LAUNCH-1", "LAUNCH-2", rich} <= set(now.sku_list)


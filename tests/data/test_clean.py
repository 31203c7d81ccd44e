"""Data-quality stage (issue 3): every bad-input kind is dropped with the right reason, good images are
kept bit-exact, normalised copies are RGB and upright, checks fail when they should."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skulens.data import checks
from skulens.data import clean as C
from tests import imagegen as g

SERIAL = C.CleanConfig(workers=1)

def _build(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """Generate the catalog. Returns (manifest, products, expected reason per key)."""
    rows: list[dict] = []
    expect: dict[str, str] = {}

    def add(sku: str, name: str, writer, reason: str = "", **row_kw) -> Path:
        p = root / sku / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if writer is not None:
            writer(p)
        row = g.manifest_row(sku, p, **row_kw)
        rows.append(row)
        expect[row["key"]] = reason
        return p

    # A001: good files of each allowed plain format + every bad-file kind
    for i in range(3):
        add("A001", f"good_{i}.jpg", lambda p, i=i: g.write_jpeg(p, 480, 360, seed=i))
    add("A001", "good.webp", lambda p: g.write_format(p, "WEBP", seed=11))
    add("A001", "good.bmp", lambda p: g.write_format(p, "BMP", seed=12))
    add("A001", "good.tif", lambda p: g.write_format(p, "TIFF", seed=13))
    add("A001", "good_0_copy.jpg", lambda p: g.write_jpeg(p, 480, 360, seed=0), C.DUPLICATE_IN_SKU)
    add("A001", "empty.jpg", g.write_empty, C.EMPTY)
    add("A001", "tiny_bytes.jpg", g.write_tiny_bytes, C.TOO_SMALL_BYTES)
    add("A001", "tiny_dims.png", g.write_tiny_dimensions, C.TOO_SMALL_DIMENSIONS)
    add("A001", "html.jpg", g.write_html_as_jpg, C.NOT_AN_IMAGE)
    add("A001", "s3_error.jpg", g.write_xml_error_as_jpg, C.NOT_AN_IMAGE)
    add("A001", "truncated.jpg", lambda p: g.write_truncated_jpeg(p, seed=21), C.TRUNCATED)
    add("A001", "corrupt_scan.jpg", lambda p: g.write_corrupt_jpeg(p, seed=22), C.CORRUPT)
    add("A001", "corrupt_idat.png", lambda p: g.write_corrupt_png(p, seed=23), C.CORRUPT)
    # the S3 object was fine (ETag = its MD5) but the local copy got a block of zeros
    p = root / "A001" / "damaged_local_copy.jpg"
    p.parent.mkdir(parents=True, exist_ok=True)
    g.write_jpeg(p, seed=24)
    etag = g.md5_etag(p.read_bytes())
    g.zero_block(p)
    add("A001", "damaged_local_copy.jpg", None, C.CORRUPT, etag=etag)
    add("A001", "netpbm.ppm", g.write_unsupported, C.UNSUPPORTED_FORMAT)
    add("A001", "bomb_900mp.png", g.write_png_bomb, C.DECOMPRESSION_BOMB)
    add("A001", "bomb_64mp.png", lambda p: g.write_png_bomb(p, 8000, 8000), C.DECOMPRESSION_BOMB)
    add("A001", "missing.jpg", None, C.MISSING_FILE)

    # B002: usable images that need normalisation
    add("B002", "cmyk.jpg", lambda p: g.write_cmyk_jpeg(p, seed=31))
    add("B002", "grey.jpg", lambda p: g.write_grey_jpeg(p, seed=32))
    add("B002", "palette.png", lambda p: g.write_palette_png(p, seed=33))
    add("B002", "grey16.png", lambda p: g.write_png16_grey(p, seed=34))
    add("B002", "rgb16.png", lambda p: g.write_png16_rgb(p, seed=35))
    add("B002", "rgba.png", lambda p: g.write_rgba_png(p, seed=36))
    add("B002", "la.png", lambda p: g.write_la_png(p, seed=37))
    add("B002", "exif6.jpg", lambda p: g.write_exif_rotated_jpeg(p, orientation=6))
    add("B002", "exif8.jpg", lambda p: g.write_exif_rotated_jpeg(p, orientation=8))
    add("B002", "anim.gif", lambda p: g.write_format(p, "GIF", seed=38))

    # C003 / D004: 3 own images each + one byte-identical shared image (catalog error: dropped in both)
    for sku, base in (("C003", 40), ("D004", 50)):
        for i in range(3):
            add(sku, f"own_{i}.jpg", lambda p, s=base + i: g.write_jpeg(p, 320, 320, seed=s))
        add(sku, "shared.jpg", lambda p: g.write_jpeg(p, 320, 320, seed=99), C.DUPLICATE_ACROSS_SKUS)

    # E005: only 2 images; F006: 3 files but one broken -> 2 usable; both kept as index-only SKUs
    for i in range(2):
        add("E005", f"img_{i}.jpg", lambda p, s=60 + i: g.write_jpeg(p, 300, 300, seed=s))
    for i in range(2):
        add("F006", f"img_{i}.jpg", lambda p, s=70 + i: g.write_jpeg(p, 300, 300, seed=s))
    add("F006", "broken.jpg", lambda p: g.write_truncated_jpeg(p, seed=72), C.TRUNCATED)
    # J010: one packshot (the single-shot setting): kept, index-only; K011: its only file is broken: dropped
    add("J010", "packshot.jpg", lambda p: g.write_jpeg(p, 300, 300, seed=90))
    add("K011", "broken.jpg", lambda p: g.write_truncated_jpeg(p, seed=91), C.TRUNCATED)

    # Z999: not in products.csv
    for i in range(3):
        add("Z999", f"img_{i}.jpg", lambda p, s=80 + i: g.write_jpeg(p, 300, 300, seed=s), C.UNKNOWN_SKU)

    manifest = g.make_manifest(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)  # unordered input
    products = pd.DataFrame({
        "sku": ["A001", "B002", "C003", "D004", "E005", "F006", "G007", "J010", "K011"],  # G007: no images
        "name": [f"Product {c}" for c in "ABCDEFGJK"],
        "category": ["snacks"] * 9,
        "brand": ["Acme"] * 9,
    })
    return manifest, products, expect


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    manifest, products, expect = _build(root)
    before = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in manifest["path"] if Path(p).exists()}
    out = tmp_path_factory.mktemp("clean")
    result = C.clean_catalog(manifest, products, out, SERIAL)
    return manifest, products, expect, before, out, result


def _row(result: C.CleanResult, key_suffix: str) -> pd.Series:
    m = result.images[result.images["key"].str.endswith("/" + key_suffix)]
    assert len(m) == 1, key_suffix
    return m.iloc[0]


# -------------------------------------------------------------------------------- per-file reasons


def test_every_file_gets_expected_status_and_reason(catalog):
    manifest, _, expect, _, _, result = catalog
    got = dict(zip(result.images["key"], result.images["reason"]))
    assert got == expect
    assert set(result.dropped_files["key"]) == {k for k, r in expect.items() if r}
    assert set(result.kept["key"]) == {k for k, r in expect.items() if not r}
    assert len(result.images) == len(manifest)  # the run went on after every error


def test_details_are_human_readable(catalog):
    *_, result = catalog
    assert "HTML" in _row(result, "html.jpg")["detail"]
    assert "XML" in _row(result, "s3_error.jpg")["detail"]
    assert "ETag" in _row(result, "damaged_local_copy.jpg")["detail"]
    assert "CRC" in _row(result, "corrupt_idat.png")["detail"]
    assert "900000000" in _row(result, "bomb_900mp.png")["detail"]
    d = _row(result, "bomb_64mp.png")["detail"]
    assert "64000000 pixels" in d and "50000000" in d
    assert _row(result, "good_0_copy.jpg")["detail"] == "same bytes as raw/A001/good_0.jpg"
    c_shared = result.images[result.images["key"] == "raw/C003/shared.jpg"].iloc[0]
    assert c_shared["detail"] == "identical bytes also filed under SKU(s) D004"
    assert (result.dropped_files["detail"].str.len() > 0).all()


def test_inspect_image_direct(tmp_path):
    p = g.write_truncated_jpeg(tmp_path / "t.jpg", keep=0.5)
    rep = C.inspect_image(p, SERIAL)
    assert (rep.ok, rep.reason, rep.format, rep.width) == (False, C.TRUNCATED, "JPEG", 400)
    good = g.write_jpeg(tmp_path / "g.jpg", 500, 300, seed=3)
    rep = C.inspect_image(good)
    assert rep.ok and rep.reason == "" and (rep.width, rep.height, rep.mode) == (500, 300, "RGB")
    assert rep.sha256 == g.file_sha256(good) and not rep.needs_normalisation
    # ETag: a matching MD5 passes, a different one fails, a multipart ETag is not an MD5 and is skipped
    assert C.inspect_image(good, etag=g.md5_etag(good.read_bytes())).ok
    assert C.inspect_image(good, etag='"' + "0" * 32 + '"').reason == C.CORRUPT
    assert C.inspect_image(good, etag='"' + "0" * 32 + '-3"').ok
    assert C.inspect_image(good, replace(SERIAL, verify_etag=False), etag="0" * 32).ok


def test_truncated_jpeg_is_caught_by_the_decoder_too(tmp_path):
    """Without the structure pre-check the full decode (LOAD_TRUNCATED_IMAGES off) still refuses it."""
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = g.jpeg_bytes(g.product_image(400, 400, 5))
    rep = C._inspect_bytes(data[: len(data) // 2], "x", SERIAL)
    assert rep.reason == C.TRUNCATED
    from unittest import mock

    with mock.patch.object(C, "_jpeg_structure_problem", return_value=None):
        rep = C._inspect_bytes(data[: len(data) // 2], "x", SERIAL)
    assert rep.reason == C.TRUNCATED and "truncated" in rep.detail


def test_pixel_limit_is_restored_and_bomb_never_decoded(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    p = g.write_png_bomb(tmp_path / "b.png")
    assert p.stat().st_size < 4096
    rep = C.inspect_image(p, C.CleanConfig(max_pixels=1_000_000, workers=1))
    assert rep.reason == C.DECOMPRESSION_BOMB
    assert Image.MAX_IMAGE_PIXELS == before
    with C.pil_pixel_limit(1000):
        with C.pil_pixel_limit(5000):
            assert Image.MAX_IMAGE_PIXELS == 1000
        assert Image.MAX_IMAGE_PIXELS == 1000
    assert Image.MAX_IMAGE_PIXELS == before


# -------------------------------------------------------------------------------- kept / normalised


def test_plain_rgb_images_are_kept_bit_exact_and_untouched(catalog):
    _, _, _, before, _, result = catalog
    plain = result.kept[~result.kept["normalised"]]
    assert len(plain) == 6 + 3 + 3 + 2 + 2 + 1  # A001: 3 jpg + webp + bmp + tif; C003, D004 x3; E005, F006 x2; J010
    for r in plain.itertuples():
        assert r.clean_path == r.path
        assert g.file_sha256(r.clean_path) == r.sha256 == before[r.path]
    # no original was modified (or removed) by the run
    after = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in before}
    assert after == before


def test_normalised_images_are_rgb_pngs_under_out_dir(catalog):
    _, _, _, before, out, result = catalog
    norm = result.kept[result.kept["normalised"]].set_index(result.kept[result.kept["normalised"]]["key"].str.split("/").str[-1])
    assert set(norm.index) == {"cmyk.jpg", "grey.jpg", "palette.png", "grey16.png", "rgb16.png", "rgba.png",
                               "la.png", "exif6.jpg", "exif8.jpg", "anim.gif"}
    for name, r in norm.iterrows():
        cp = Path(r.clean_path)
        assert cp.parent == out and cp.name == C.normalised_name(r.sha256)
        assert r.sha256 == before[r.path]  # sha256 is the original's
        with Image.open(cp) as im:
            assert im.format == "PNG" and im.mode == "RGB", name
            assert im.size == (r.width, r.height), name


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_exif_orientation_is_applied(catalog):
    *_, result = catalog
    for name in ("exif6.jpg", "exif8.jpg"):
        r = _row(result, name)
        assert (r.width, r.height, r.exif_orientation) == (120, 80, int(name[4]))
        a = _rgb(r.clean_path)
        assert a.shape == (80, 120, 3)
        assert np.abs(a[10, 10] - [255, 0, 0]).max() < 40  # red block is top-left
        assert np.abs(a[70, 110] - [255, 255, 255]).max() < 40  # white bottom-right


def test_alpha_is_composited_on_white_and_modes_convert_faithfully(catalog):
    *_, result = catalog
    rgba = _rgb(_row(result, "rgba.png").clean_path)
    assert (rgba[:, :100] == 255).all()  # transparent half (hidden colour black) -> white
    with Image.open(_row(result, "rgba.png").path) as im:
        assert (rgba[:, 100:] == np.asarray(im)[:, 100:, :3]).all()  # opaque half unchanged
    la = _rgb(_row(result, "la.png").clean_path)
    assert (la[:, 0] == 255).all() and np.abs(la[:, -1] - 41).max() <= 2
    g16 = _rgb(_row(result, "grey16.png").clean_path)
    assert g16[:, 0].max() <= 1 and g16[:, -1].min() >= 254 and abs(g16[:, 100].mean() - 128) < 2  # scaled, not clipped
    with Image.open(_row(result, "palette.png").path) as im:
        assert (_rgb(_row(result, "palette.png").clean_path) == np.asarray(im.convert("RGB"))).all()
    rgb16 = _rgb(_row(result, "rgb16.png").clean_path)
    assert (rgb16 == np.asarray(g.product_image(120, 90, 35))).all()  # 16-bit -> exact 8-bit values
    cmyk = _rgb(_row(result, "cmyk.jpg").clean_path)
    ref = np.asarray(g.product_image(200, 160, 31).convert("CMYK").convert("RGB")).astype(int)
    assert np.abs(cmyk - ref).mean() < 6


def test_normalisation_is_deterministic_and_idempotent(catalog, tmp_path):
    manifest, products, _, _, _, first = catalog
    again = C.clean_catalog(manifest, products, tmp_path / "o2", SERIAL)
    a = first.kept[first.kept["normalised"]]
    b = again.kept[again.kept["normalised"]]
    for pa, pb in zip(a["clean_path"], b["clean_path"]):
        assert Path(pa).name == Path(pb).name and Path(pa).read_bytes() == Path(pb).read_bytes()
    pd.testing.assert_frame_equal(first.dropped_files, again.dropped_files)
    pd.testing.assert_frame_equal(first.dropped_skus, again.dropped_skus)


# -------------------------------------------------------------------------------- SKU level, stats, csv


def test_dropped_skus(catalog):
    *_, result = catalog
    ds = result.dropped_skus.set_index("sku")
    assert list(result.dropped_skus["sku"]) == sorted(result.dropped_skus["sku"])
    assert set(ds.index) == {"G007", "K011", "Z999"}  # only SKUs with no usable image (or unknown) are dropped
    assert ds.loc["G007", "usable_images"] == 0 and "no image" in ds.loc["G007", "detail"]
    assert ds.loc["K011", "reason"] == C.SKU_TOO_FEW_IMAGES and ds.loc["K011", "usable_images"] == 0
    assert ds.loc["Z999", "reason"] == C.UNKNOWN_SKU
    assert sorted(result.kept["sku"].unique()) == ["A001", "B002", "C003", "D004", "E005", "F006", "J010"]
    roles = result.sku_roles.set_index("sku")
    assert roles["role"].to_dict() == {"A001": "train", "B002": "train", "C003": "train", "D004": "train",
                                       "E005": "index", "F006": "index", "J010": "index"}
    assert roles.loc["J010", "usable_images"] == 1 and roles.loc["F006", "usable_images"] == 2
    assert (result.kept.groupby("sku")["role"].nunique() == 1).all()
    train = result.kept[result.kept["role"] == "train"]
    assert (train.groupby("sku").size() >= 3).all()


def test_stats_and_order(catalog):
    manifest, _, expect, _, _, result = catalog
    s = result.stats
    n_bad = sum(1 for r in expect.values() if r)
    assert (s["files_in"], s["files_dropped"], s["files_kept"]) == (len(manifest), n_bad, len(manifest) - n_bad)
    assert s["share_dropped"] == pytest.approx(n_bad / len(manifest))
    assert (s["skus_in"], s["skus_kept"], s["skus_dropped"]) == (10, 7, 3)
    assert (s["skus_train"], s["skus_index_only"], s["files_index_only"]) == (4, 3, 5)
    assert s["dropped_by_reason"][C.NOT_AN_IMAGE] == 2 and C.SKU_TOO_FEW_IMAGES not in s["dropped_by_reason"]
    assert sum(s["dropped_by_reason"].values()) == n_bad
    assert s["normalised"] == 10 and s["cross_sku_duplicate_groups"] == 1
    assert s["images_per_s"] > 0 and s["seconds"] > 0
    for df in (result.images, result.kept, result.dropped_files):
        assert list(zip(df["sku"], df["key"])) == sorted(zip(df["sku"], df["key"]))


def test_write_csv(catalog, tmp_path):
    *_, result = catalog
    paths = result.write_csv(tmp_path / "reports")
    df = pd.read_csv(paths["dropped_files"])
    assert list(df.columns) == ["sku", "key", "reason", "detail"] and len(df) == len(result.dropped_files)
    sk = pd.read_csv(paths["dropped_skus"], dtype={"sku": str})
    assert list(sk.columns) == ["sku", "reason", "detail", "usable_images"]
    assert list(sk["sku"]) == list(result.dropped_skus["sku"])
    assert '"files_in"' in paths["stats"].read_text()


def test_cross_sku_rules(tmp_path):
    rows = []
    for sku, base in (("S1", 0), ("S2", 10)):
        for i in range(3):
            rows.append(g.manifest_row(sku, g.write_jpeg(tmp_path / sku / f"{i}.jpg", 200, 200, seed=base + i)))
        rows.append(g.manifest_row(sku, g.write_jpeg(tmp_path / sku / "shared.jpg", 200, 200, seed=77)))
    m = g.make_manifest(rows)
    reasons = {}
    for rule in C.CROSS_SKU_RULES:
        r = C.clean_catalog(m, None, tmp_path / "out", replace(SERIAL, cross_sku_duplicates=rule))
        reasons[rule] = dict(zip(r.images["key"], r.images["reason"]))
    assert reasons["drop_all"]["raw/S1/shared.jpg"] == reasons["drop_all"]["raw/S2/shared.jpg"] == C.DUPLICATE_ACROSS_SKUS
    assert reasons["keep_first"]["raw/S1/shared.jpg"] == "" and reasons["keep_first"]["raw/S2/shared.jpg"] == C.DUPLICATE_ACROSS_SKUS
    assert reasons["keep_all"]["raw/S1/shared.jpg"] == reasons["keep_all"]["raw/S2/shared.jpg"] == ""
    with pytest.raises(ValueError):
        C.CleanConfig(cross_sku_duplicates="nope")


def test_without_products_no_unknown_sku(catalog, tmp_path):
    manifest, *_ = catalog
    r = C.clean_catalog(manifest, None, tmp_path, SERIAL)
    assert C.UNKNOWN_SKU not in set(r.images["reason"])
    assert "Z999" in set(r.kept["sku"])


def test_missing_manifest_columns(tmp_path):
    with pytest.raises(ValueError, match="missing columns"):
        C.clean_catalog(pd.DataFrame({"sku": ["a"], "key": ["k"]}), None, tmp_path)


# -------------------------------------------------------------------------------- parallel


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_parallel_matches_serial(catalog, tmp_path, backend):
    import warnings

    manifest, products, _, _, _, serial = catalog
    filters_before = list(warnings.filters)
    cfg = C.CleanConfig(workers=2, min_parallel=1, chunk_size=4, backend=backend)
    par = C.clean_catalog(manifest, products, tmp_path, cfg, progress=True)
    assert par.stats["workers"] == 2 and par.stats["backend"] == backend
    cols = ["sku", "key", "sha256", "width", "height", "format", "status", "reason", "detail", "normalised"]
    pd.testing.assert_frame_equal(par.images[cols], serial.images[cols])
    assert [Path(p).name for p in par.kept["clean_path"]] == [Path(p).name for p in serial.kept["clean_path"]]
    assert list(warnings.filters) == filters_before  # no global warnings state leaked


def _crashing_inspect(path, cfg, etag):
    if str(path).endswith("crash.jpg"):
        os._exit(139)  # what a segfaulting decoder does to its worker
    return _ORIG_INSPECT(path, cfg, etag)


_ORIG_INSPECT = C._inspect_file


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_worker_crash_is_isolated_and_run_goes_on(tmp_path, monkeypatch):
    rows = [g.manifest_row("S", g.write_jpeg(tmp_path / f"{i}.jpg", 200, 200, seed=i)) for i in range(7)]
    rows.append(g.manifest_row("S", g.write_jpeg(tmp_path / "crash.jpg", 200, 200, seed=9)))
    monkeypatch.setattr(C, "_inspect_file", _crashing_inspect)
    cfg = C.CleanConfig(workers=2, min_parallel=1, chunk_size=3, start_method="fork")
    r = C.clean_catalog(g.make_manifest(rows), None, tmp_path / "o", cfg)
    assert len(r.kept) == 7
    assert r.dropped_files["key"].tolist() == ["raw/S/crash.jpg"]
    assert r.dropped_files["reason"].tolist() == [C.CORRUPT]
    assert "crashed" in r.dropped_files["detail"].iloc[0]


# -------------------------------------------------------------------------------- checks


def test_check_dropped_share(catalog):
    *_, result = catalog
    ok, md = checks.check_dropped_share(result, max_share=0.2)
    assert not ok and md["share_dropped"] > 0.2 and md["dropped_by_reason"][C.EMPTY] == 1
    assert checks.check_dropped_share(result, max_share=0.9)[0]


def test_check_products_unique():
    good = pd.DataFrame({"sku": ["a", "b", "c"], "name": ["x", "y", "z"]})
    assert checks.check_products_unique(good) == (True, {
        "products": 3, "distinct_skus": 3, "duplicate_skus": [], "n_duplicate_skus": 0,
        "null_sku_rows": [], "n_null_sku_rows": 0})
    ok, md = checks.check_products_unique(pd.DataFrame({"sku": ["a", "b", "a ", "c"]}))
    assert not ok and md["duplicate_skus"] == ["a"]
    ok, md = checks.check_products_unique(pd.DataFrame({"sku": ["a", None, " ", "c"]}))
    assert not ok and md["null_sku_rows"] == [1, 2] and md["duplicate_skus"] == []
    assert not checks.check_products_unique(pd.DataFrame({"name": ["x"]}))[0]


def test_check_cross_sku_duplication(catalog, tmp_path):
    *_, result = catalog
    ok, md = checks.check_cross_sku_duplication(result, max_share=0.5)  # C003/D004 share 1 of 4
    assert ok and md["skus_with_any_shared"] == 2
    assert not checks.check_cross_sku_duplication(result, max_share=0.2)[0]
    # H: 3 of its 4 images are copies of I's -> fails whatever the drop rule
    rows = []
    for i in range(4):
        rows.append(g.manifest_row("I", g.write_jpeg(tmp_path / "I" / f"{i}.jpg", 200, 200, seed=i)))
    for i in range(3):
        src = tmp_path / "I" / f"{i}.jpg"
        rows.append(g.manifest_row("H", g.write(tmp_path / "H" / f"{i}.jpg", src.read_bytes())))
    rows.append(g.manifest_row("H", g.write_jpeg(tmp_path / "H" / "own.jpg", 200, 200, seed=50)))
    r = C.clean_catalog(g.make_manifest(rows), None, tmp_path / "o", SERIAL)
    ok, md = checks.check_cross_sku_duplication(r, max_share=0.5)
    assert not ok
    assert {d["sku"]: d["share"] for d in md["skus_over"]} == {"H": 0.75, "I": 0.75}
    assert md["skus_over"][0]["other_skus"] == ["I"]


def test_check_min_images(catalog):
    *_, result = catalog
    ok, md = checks.check_min_images(result)
    assert not ok and md["n_skus_dropped_too_few"] == 2 and md["kept_skus_below_min"] == []
    assert {d["sku"] for d in md["skus_dropped_too_few"]} == {"G007", "K011"}
    assert md["index_only_skus"] == ["E005", "F006", "J010"] and md["skus_train"] == 4
    assert checks.check_min_images(result, max_skus_below=2)[0]
    # a result violating the invariant (kept SKU below min) fails even with tolerance
    broken = replace(result, kept=result.kept[~((result.kept["sku"] == "C003") & (result.kept["key"] != "raw/C003/own_0.jpg"))])
    ok, md = checks.check_min_images(broken, max_skus_below=10)
    assert not ok and md["kept_skus_below_min"] == ["C003"]


def test_core_library_does_not_import_dagster_or_heavy_libs():
    import subprocess

    code = ("import sys, skulens.data.clean, skulens.data.checks, skulens.data.expectations; "
            "bad = [m for m in ('dagster', 'great_expectations', 'torch', 'mlflow') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# -------------------------------------------------------------------------------- hostile payloads, decode time limit


def test_hostile_payloads_direct(tmp_path):
    """JPEG whose SOF claims 60000x60000, SVG named .png, animated GIF (first frame), 1x400 sliver."""
    cases = {
        "sof_bomb.jpg": (g.jpeg_sof_bomb_bytes(60_000, 60_000), C.DECOMPRESSION_BOMB, "3600000000"),
        "sof_64mp.jpg": (g.jpeg_sof_bomb_bytes(8_000, 8_000), C.DECOMPRESSION_BOMB, "64000000"),
        "png_bomb.png": (g.png_bomb_bytes(100_000, 100_000), C.DECOMPRESSION_BOMB, "10000000000"),
        "drawing.png": (g.svg_bytes(), C.NOT_AN_IMAGE, "SVG"),
    }
    for name, (data, reason, needle) in cases.items():
        rep = C.inspect_image(g.write(tmp_path / name, data), SERIAL)
        assert (rep.ok, rep.reason) == (False, reason), name
        assert needle in rep.detail, (name, rep.detail)
    sliver = C.inspect_image(g.write_tiny_dimensions(tmp_path / "sliver.png", width=1, height=400), SERIAL)
    assert sliver.reason == C.TOO_SMALL_DIMENSIONS and (sliver.width, sliver.height) == (1, 400)
    gif = g.write(tmp_path / "anim.gif", g.animated_gif_bytes(frames=4, seed=5))
    rep = C.inspect_image(gif, SERIAL)
    assert rep.ok and rep.format == "GIF" and rep.needs_normalisation
    out = C.normalise_image(gif, tmp_path / "norm", SERIAL)
    with Image.open(gif) as im:
        assert im.n_frames == 4
        im.seek(0)
        first = np.asarray(im.convert("RGB")).astype(int)
    assert (_rgb(out) == first).all()  # the first frame, as RGB


_SLOW_LIMIT = 0.02  # s; the slow PNG takes 0.5-1 s to inspect (asserted > 10x the limit below)


@pytest.fixture(scope="module")
def slow_catalog(tmp_path_factory):
    """One slow-to-decode PNG among small good JPEGs (one SKU); returns (manifest, slow_path, full_seconds)."""
    root = tmp_path_factory.mktemp("slow")
    slow = g.write(root / "S" / "slow.png", g.slow_png_bytes())
    rows = [g.manifest_row("S", slow)]
    rows += [g.manifest_row("S", g.write_jpeg(root / "S" / f"good_{i}.jpg", 96, 96, seed=i)) for i in range(5)]
    t = time.perf_counter()
    full = C.inspect_image(slow, replace(SERIAL, decode_timeout_s=0))  # no limit: decodes fine, just slowly
    full_s = time.perf_counter() - t
    assert full.ok and (full.width, full.height) == (6000, 6000)
    return g.make_manifest(rows), slow, full_s


def test_decode_timeout_drops_the_slow_file_and_the_run_goes_on(slow_catalog, tmp_path):
    import signal

    manifest, _slow, full_s = slow_catalog
    assert full_s > 10 * _SLOW_LIMIT  # the limit/size pair leaves a wide margin on a slow machine
    handler, (delay, _) = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    t = time.perf_counter()
    r = C.clean_catalog(manifest, None, tmp_path, replace(SERIAL, decode_timeout_s=_SLOW_LIMIT))
    elapsed = time.perf_counter() - t
    reasons = dict(zip(r.images["key"].str.rsplit("/", n=1).str[-1], r.images["reason"]))
    assert reasons == {"slow.png": C.DECODE_TIMEOUT, **{f"good_{i}.jpg": "" for i in range(5)}}
    row = r.images[r.images["reason"] == C.DECODE_TIMEOUT].iloc[0]
    assert f"decode_timeout_s {_SLOW_LIMIT:g} s" in row["detail"] and row["format"] == "PNG"
    assert r.stats["dropped_by_reason"] == {C.DECODE_TIMEOUT: 1} and len(r.kept) == 5
    assert elapsed < full_s  # the slow file was cut short, not decoded to the end
    # the previous SIGALRM handler is back, and an outer timer (pytest-timeout's) keeps running
    assert signal.getsignal(signal.SIGALRM) is handler
    after = signal.getitimer(signal.ITIMER_REAL)[0]
    assert (after == 0) if delay == 0 else (0 < after <= delay)


def test_decode_timeout_in_forkserver_workers_keeps_the_pool(slow_catalog, tmp_path):
    manifest, _slow, _ = slow_catalog
    cfg = C.CleanConfig(workers=2, min_parallel=1, chunk_size=1, decode_timeout_s=_SLOW_LIMIT)
    r = C.clean_catalog(manifest, None, tmp_path, cfg)
    assert r.stats["backend"] == "process" and r.stats["workers"] == 2
    assert r.dropped_files["reason"].tolist() == [C.DECODE_TIMEOUT]
    assert r.dropped_files["key"].iloc[0].endswith("/slow.png")
    assert len(r.kept) == 5 and not r.images["detail"].str.contains("crashed").any()


def test_decode_timeout_in_normalisation(slow_catalog, tmp_path):
    _, slow, _ = slow_catalog
    out = tmp_path / "norm"
    with pytest.raises(TimeoutError, match="normalising took longer than decode_timeout_s"):
        C.normalise_image(slow, out, replace(SERIAL, decode_timeout_s=_SLOW_LIMIT))
    assert list(out.iterdir()) == []  # no partial or temp file left behind
    res = C._normalise_chunk([(str(slow), g.file_sha256(slow))], replace(SERIAL, decode_timeout_s=_SLOW_LIMIT), str(out))
    assert res[0][0] is None and res[0][1] == C.DECODE_TIMEOUT


def test_decode_timeout_config_and_scope():
    assert C.CleanConfig().decode_timeout_s == 20.0
    assert C.DECODE_TIMEOUT in C.FILE_REASONS and C.DECODE_TIMEOUT in C.ALL_REASONS
    for bad in (-1, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="decode_timeout_s"):
            C.CleanConfig(decode_timeout_s=bad)
    # no limit outside the main thread (thread backend): the deadline is a no-op there
    import threading

    seen = []

    def work():
        with C.decode_deadline(0.001):
            time.sleep(0.05)
            seen.append("done")

    th = threading.Thread(target=work)
    th.start()
    th.join()
    assert seen == ["done"]
    with pytest.raises(C._DecodeDeadline):
        with C.decode_deadline(0.01):
            time.sleep(1.0)


def test_decode_deadline_nests_under_an_outer_alarm():
    """An outer ITIMER_REAL/SIGALRM user (pytest-timeout, an app) keeps its timer; if it is due first, its
    handler runs instead of ours."""
    import signal

    saved_handler, saved_timer = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    calls = []

    def outer(signum, frame):
        calls.append("outer")

    try:
        signal.signal(signal.SIGALRM, outer)
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        with pytest.raises(C._DecodeDeadline):  # ours is due first
            with C.decode_deadline(0.01):
                time.sleep(1.0)
        assert signal.getsignal(signal.SIGALRM) is outer and 29.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30.0
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        with C.decode_deadline(5.0):  # the outer one is due first: its handler runs, ours never fires
            time.sleep(0.2)
        assert calls == ["outer"] and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved_handler)
        if saved_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *saved_timer)


def test_write_clean_keeps_a_normalised_file_and_a_plain_one_with_the_same_stem(tmp_path):
    """A normalised ``x.jpg`` is written as ``x.png``; a plain ``x.png`` of the same SKU must not overwrite it."""
    from skulens.data.layout import write_clean

    rows = [g.manifest_row("S1", g.write_cmyk_jpeg(tmp_path / "raw" / "S1" / "x.jpg", seed=1)),
            g.manifest_row("S1", g.write_format(tmp_path / "raw" / "S1" / "x.png", "PNG", seed=2))]
    result = C.clean_catalog(g.make_manifest(rows), None, tmp_path / "norm", SERIAL)
    assert len(result.kept) == 2 and result.kept["normalised"].tolist() == [True, False]
    back = write_clean(result, tmp_path / "clean", {})  # read back from the written folder
    files = back["clean_path"].map(lambda p: Path(p).read_bytes())
    assert back["clean_path"].nunique() == 2
    want = {k: Path(p).read_bytes() for k, p in zip(result.kept["key"], result.kept["clean_path"])}
    assert dict(zip(back["key"], files)) == want  # each row's file is its own image, bit-exact

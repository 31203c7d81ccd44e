"""Hostile input, end to end (issue 13): keys written straight into the bucket with boto3 (not through
the importer), hostile image payloads and broken products.csv files. Each one is refused by the store,
rejected by ingest with a reason, dropped by cleaning with a reason code, or kept and normalised;
nothing is written outside the cache and nothing is deleted from the bucket."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from botocore.exceptions import ClientError
from PIL import Image

from assets import ingest as ingest_assets
from assets import quality
from resources import DvcResource, LocalStateResource, S3Resource
from skulens.catalog import contract, ingest
from skulens.catalog.s3 import list_objects
from skulens.data import clean as C
from tests import imagegen as g

P = contract.CATALOG_IMAGES_PREFIX
LONG_255 = "M" * 251 + ".png"  # a 255-byte name: the store takes it, the contract (240 bytes) does not
# what the store may refuse at PUT time (SeaweedFS: InvalidRequest for dot segments, backslash-dot-dot and
# NUL, KeyTooLongError over its 255-byte segment limit); any other store must leave them to our validator
STORE_MAY_REFUSE = {"InvalidRequest", "InvalidArgument", "KeyTooLongError", "InvalidURI", "400"}


@dataclass(frozen=True)
class KeyCase:
    key: str  # relative to catalog/images/
    needle: str | tuple[str, ...]  # what the rejection reason must mention (any of them)


# keys that must never reach the cache: refused by the store or rejected by ingest with `needle` in the reason
BAD_KEYS = [
    KeyCase("A001/../../../escape.png", "'..'"),
    KeyCase("../escape-up.png", "'..'"),
    KeyCase("A001/./dot-escape.png", "'.'"),
    KeyCase("A001/a%2F..%2F..%2Fpct-escape.png", "percent-encoded"),
    KeyCase("A001%2F..%2F..%2Fpct-sku/x.png", "percent-encoded"),
    KeyCase("A001/ctl\x01.png", "control"),
    KeyCase("A001/tab\t.png", "control"),
    KeyCase("A001/nl\n.png", "control"),
    KeyCase("A001/del\x7f.png", "control"),
    KeyCase("A001/nul\x00.png", "control"),
    KeyCase("A001/\u202ertl-override.png", "control"),
    KeyCase("A001/ lead-space.png", "whitespace"),
    KeyCase("A001/" + "L" * 1100 + ".png", "longer than"),
    KeyCase("A001/" + LONG_255, "longer than 240 bytes"),
    KeyCase("A001/sub/three-segments.png", "3 segments"),
    KeyCase("A001/back\\slash.png", ("3 segments", "path separators")),  # SeaweedFS stores A001/back/slash.png
    KeyCase("bad sku/x.png", "unsafe or invalid SKU id"),
    KeyCase(".git/config.png", "unsafe or invalid SKU id"),
    KeyCase("one-segment.png", "1 segments"),
]


def _payloads(src: Path) -> dict[str, tuple[bytes, str]]:
    """Valid keys -> (body, expected outcome): "" kept as is, "normalised" kept as a new RGB PNG, else a reason."""
    def made(writer, name, **kw) -> bytes:
        return writer(src / name, **kw).read_bytes()

    good = {f"A001/good_{i}.jpg": (g.jpeg_bytes(g.product_image(240, 200, seed=i)), "") for i in range(3)}
    good["A001/50%off.jpg"] = (g.jpeg_bytes(g.product_image(240, 200, seed=7)), "")  # a literal % is fine
    good["A001/café-ü.jpg"] = (g.jpeg_bytes(g.product_image(240, 200, seed=8)), "")
    good["00123/packshot.jpg"] = (g.jpeg_bytes(g.product_image(240, 200, seed=9)), "")  # leading-zero SKU id
    good["Z999/unknown.jpg"] = (g.jpeg_bytes(g.product_image(240, 200, seed=10)), C.UNKNOWN_SKU)
    hostile = {
        "B002/png_bomb_100000x100000.png": (g.png_bomb_bytes(100_000, 100_000), C.DECOMPRESSION_BOMB),
        "B002/jpeg_sof_60000x60000.jpg": (g.jpeg_sof_bomb_bytes(60_000, 60_000), C.DECOMPRESSION_BOMB),
        "B002/animated.gif": (g.animated_gif_bytes(frames=4, seed=20), "normalised"),
        "B002/photo.webp": (made(g.write_format, "photo.webp", fmt="WEBP", seed=21), ""),
        "B002/drawing.svg": (g.svg_bytes(), C.NOT_AN_IMAGE),
        "B002/drawing-named.png": (g.svg_bytes(50), C.NOT_AN_IMAGE),
        "B002/rgb16.png": (made(g.write_png16_rgb, "rgb16.png", seed=22), "normalised"),
        "B002/grey16.png": (made(g.write_png16_grey, "grey16.png", seed=23), "normalised"),
        "B002/cmyk.jpg": (made(g.write_cmyk_jpeg, "cmyk.jpg", seed=24), "normalised"),
        "B002/exif6.jpg": (made(g.write_exif_rotated_jpeg, "exif6.jpg", orientation=6), "normalised"),
        "B002/sliver_1x400.png": (made(g.write_tiny_dimensions, "sliver.png", width=1, height=400),
                                  C.TOO_SMALL_DIMENSIONS),
    }
    return {**good, **hostile}


PRODUCTS_CSV = ("\ufeffsku,name,category\n"  # a BOM, as Excel writes it
                'A001,"Chex Mix,\nOriginal",snacks\n'  # a quoted comma and newline
                "B002,Oddities,misc\n"
                "00123,Leading zeros,snacks\n").encode()


def _listing(client, bucket: str) -> dict[str, str]:
    return {o.key: o.etag for o in list_objects(client, bucket, "")}


@pytest.fixture(scope="module")
def hostile(s3, tmp_path_factory):
    client = s3.client()
    bucket = s3.new_bucket("hostile")
    root = tmp_path_factory.mktemp("hostile")
    src = root / "src"
    src.mkdir()
    payloads = _payloads(src)
    client.put_object(Bucket=bucket, Key=contract.PRODUCTS_KEY, Body=PRODUCTS_CSV)
    for rel, (body, _) in payloads.items():
        client.put_object(Bucket=bucket, Key=P + rel, Body=body)
    refused: dict[str, str] = {}
    for case in BAD_KEYS:
        try:
            client.put_object(Bucket=bucket, Key=P + case.key, Body=g.jpeg_bytes(g.product_image(200, 200, 99)))
        except ClientError as exc:
            refused[case.key] = str(exc.response.get("Error", {}).get("Code", ""))
    before = _listing(client, bucket)

    cache = root / "cache"
    sync = ingest.sync_images(client, bucket, P, cache / "catalog", workers=4)
    products = ingest.fetch_products(client, bucket)
    result = C.clean_catalog(sync.manifest, products, cache / "normalised", C.CleanConfig(workers=1))
    again = ingest.sync_images(client, bucket, P, cache / "catalog", workers=4)
    return dict(client=client, bucket=bucket, root=root, cache=cache, payloads=payloads, refused=refused,
                before=before, sync=sync, again=again, products=products, result=result)


def test_every_bad_key_is_refused_by_the_store_or_rejected_with_a_reason(hostile):
    refused, sync, before = hostile["refused"], hostile["sync"], hostile["before"]
    rejected = dict(sync.rejected)
    for case in BAD_KEYS:
        key = P + case.key
        if case.key in refused:  # the store said no at PUT time: there is nothing to ingest
            assert refused[case.key] in STORE_MAY_REFUSE, (case.key, refused[case.key])
            assert key not in before
            continue
        stored = key if key in before else key.replace("\\", "/")  # SeaweedFS turns '\' into '/'
        assert stored in before, f"{case.key!r} was accepted but is not listed"
        assert stored in rejected, f"{stored!r} was not rejected"
        needles = (case.needle,) if isinstance(case.needle, str) else case.needle
        assert any(n in rejected[stored] for n in needles), (stored, rejected[stored])
        assert "\n" not in rejected[stored]  # one line (the key is shown with repr)
    # what SeaweedFS does today, so a change in the store is noticed
    assert {"A001/../../../escape.png", "../escape-up.png", "A001/./dot-escape.png"} <= set(refused)
    assert "A001/a%2F..%2F..%2Fpct-escape.png" not in refused and "A001/ctl\x01.png" not in refused
    # every object listed is either in the manifest or rejected: nothing silently skipped
    assert set(sync.manifest["key"]) | set(rejected) == set(before) - {contract.PRODUCTS_KEY}
    assert sync.failed == [] and len(sync.manifest) == len(hostile["payloads"])


def test_nothing_is_written_outside_the_cache(hostile):
    root, cache, sync, result = hostile["root"], hostile["cache"].resolve(), hostile["sync"], hostile["result"]
    for row in sync.manifest.itertuples():
        assert Path(row.path).resolve().is_relative_to(cache / "catalog"), row.path
        assert Path(row.path).is_file()
    for p in result.kept["clean_path"]:
        assert Path(p).resolve().is_relative_to(cache), p
    files = [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
    outside = [p for p in files if not p.resolve().is_relative_to(cache) and not p.is_relative_to(root / "src")]
    assert outside == []
    # no trace of the escape payloads anywhere in this session's temp tree, nor above the cache
    base = root.parent
    leaked = [Path(d) / f for d, _, fs in os.walk(base) for f in fs if "escape" in f]
    assert leaked == []
    for d in (cache, *cache.parents, Path.cwd()):
        for name in ("escape.png", "escape-up.png", "dot-escape.png", "pct-escape.png"):
            assert not (d / name).exists(), d / name
    # the literal-percent name stayed one file inside its SKU folder
    assert (cache / "catalog" / "A001" / "50%off.jpg").is_file()


def test_the_bucket_still_holds_every_object(hostile):
    assert _listing(hostile["client"], hostile["bucket"]) == hostile["before"]
    again = hostile["again"]  # a second run: nothing new to download, the same rejections, still nothing deleted
    assert again.downloaded == 0 and again.unchanged == len(hostile["sync"].manifest) and again.removed == []
    assert sorted(again.rejected) == sorted(hostile["sync"].rejected)


def test_every_payload_is_dropped_with_its_reason_or_kept_and_normalised(hostile):
    result, payloads = hostile["result"], hostile["payloads"]
    img = result.images.set_index("key")
    for rel, (_, expected) in payloads.items():
        row = img.loc[P + rel]
        if expected in ("", "normalised"):
            assert row["status"] == "kept", (rel, row["reason"], row["detail"])
            assert bool(row["normalised"]) == (expected == "normalised"), rel
        else:
            assert (row["status"], row["reason"]) == ("dropped", expected), (rel, row["reason"], row["detail"])
            assert row["detail"], rel
    assert "SVG" in img.loc[P + "B002/drawing-named.png", "detail"]
    assert "3600000000" in img.loc[P + "B002/jpeg_sof_60000x60000.jpg", "detail"]
    assert result.stats["dropped_by_reason"] == {C.DECOMPRESSION_BOMB: 2, C.NOT_AN_IMAGE: 2,
                                                 C.TOO_SMALL_DIMENSIONS: 1, C.UNKNOWN_SKU: 1}
    assert set(result.dropped_skus["sku"]) == {"Z999"}
    roles = result.sku_roles.set_index("sku")["role"].to_dict()
    assert roles == {"00123": "index", "A001": "train", "B002": "train"}  # the leading-zero id survived


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.format == "PNG"
        return np.asarray(im).astype(int)


def test_odd_images_are_normalised_to_upright_8bit_rgb(hostile):
    kept = hostile["result"].kept.set_index("key")

    def clean(rel):
        return kept.loc[P + rel, "clean_path"]

    exif = _rgb(clean("B002/exif6.jpg"))  # stored rotated, tagged orientation 6: shown upright
    assert exif.shape == (80, 120, 3)
    assert np.abs(exif[10, 10] - [255, 0, 0]).max() < 40 and np.abs(exif[70, 110] - [255, 255, 255]).max() < 40
    rgb16 = _rgb(clean("B002/rgb16.png"))
    assert (rgb16 == np.asarray(g.product_image(120, 90, 22))).all()  # 16 -> 8 bits, exact
    assert Path(clean("B002/rgb16.png")).read_bytes()[24] == 8  # IHDR bit depth of the copy
    assert _rgb(clean("B002/grey16.png")).shape == (160, 200, 3)
    cmyk = _rgb(clean("B002/cmyk.jpg"))
    assert np.abs(cmyk - np.asarray(g.product_image(200, 160, 24).convert("CMYK").convert("RGB"))).mean() < 6
    gif_frame0 = Image.open(io.BytesIO(hostile["payloads"]["B002/animated.gif"][0]))
    assert gif_frame0.n_frames == 4
    assert (_rgb(clean("B002/animated.gif")) == np.asarray(gif_frame0.convert("RGB"))).all()  # first frame
    webp = kept.loc[P + "B002/photo.webp"]
    assert webp["format"] == "WEBP" and webp["clean_path"] == webp["path"]  # plain RGB: kept bit-exact


def test_a_symlink_planted_in_the_cache_cannot_redirect_a_download(s3, tmp_path):
    """Regression: ingest resolves the local path and rejects one that leaves the cache."""
    client = s3.client()
    bucket = s3.new_bucket("hostile-link")
    client.put_object(Bucket=bucket, Key=P + "A001/x.jpg", Body=g.jpeg_bytes(g.product_image(64, 64, 1)))
    client.put_object(Bucket=bucket, Key=P + "B002/y.jpg", Body=g.jpeg_bytes(g.product_image(64, 64, 2)))
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "A001").symlink_to(outside, target_is_directory=True)
    res = ingest.sync_images(client, bucket, P, cache, workers=2)
    assert [k for k, _ in res.rejected] == [P + "A001/x.jpg"] and "outside the cache" in res.rejected[0][1]
    assert list(outside.iterdir()) == [] and res.manifest["key"].tolist() == [P + "B002/y.jpg"]


def test_a_name_near_the_file_system_limit_downloads(s3, tmp_path):
    """Regression: the download temp name no longer adds to the object's name (240 + '.part<pid>' fit)."""
    client = s3.client()
    bucket = s3.new_bucket("hostile-long")
    name = "N" * (contract.MAX_NAME_BYTES - 4) + ".jpg"
    client.put_object(Bucket=bucket, Key=P + "A001/" + name, Body=b"x" * 2000)
    res = ingest.sync_images(client, bucket, P, tmp_path / "cache", workers=1)
    assert res.failed == [] and res.rejected == []
    assert (tmp_path / "cache" / "A001" / name).stat().st_size == 2000
    assert [p.name for p in (tmp_path / "cache" / "A001").iterdir()] == [name]  # no temp file left


def _dg_resources(s3, bucket: str, home: Path) -> dict:
    key, secret = dg.EnvVar("SKULENS_S3_ACCESS_KEY_ID"), dg.EnvVar("SKULENS_S3_SECRET_ACCESS_KEY")
    return {
        "s3": S3Resource(endpoint_url=s3.endpoint, bucket=bucket, access_key_id=key, secret_access_key=secret),
        "state": LocalStateResource(home=str(home / "state")),
        "dvc": DvcResource(repo_dir=str(home / "repo")),
    }


def test_the_dagster_assets_record_the_same_outcome(s3, hostile, tmp_path, dagster_instance):
    """ingest + cleaning through the assets: rejections in catalog_images' metadata, the same drops."""
    result = dg.materialize(
        [ingest_assets.catalog_products, ingest_assets.catalog_images, quality.cleaned_catalog,
         quality.products_sku_unique],
        resources=_dg_resources(s3, hostile["bucket"], tmp_path), instance=dagster_instance)
    assert result.success
    meta = result.asset_materializations_for_node("catalog_images")[0].metadata
    assert meta["rejected"].value == len(hostile["sync"].rejected) and meta["failed"].value == 0
    table = meta["rejected_keys"].value
    assert "percent-encoded" in table
    # hostile keys are shown escaped: no raw newline or bidi override can forge a line or reorder the text
    assert "A001/nl\\n.png" in table and "\u202e" not in table and "\x01" not in table
    assert all(line.startswith("|") for line in table.splitlines())
    cleaned = result.output_for_node("cleaned_catalog")
    assert cleaned.stats["dropped_by_reason"] == hostile["result"].stats["dropped_by_reason"]
    assert sorted(cleaned.kept["key"]) == sorted(hostile["result"].kept["key"])
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {"products_sku_unique": True}
    cache = (tmp_path / "state" / "cache").resolve()
    assert all(Path(p).resolve().is_relative_to(cache) for p in result.output_for_node("catalog_images")["path"])


# ------------------------------------------------------------------------------------------- products.csv


PRODUCTS_OK = {
    "bom": (b"\xef\xbb\xbfsku,name\n00123,x\n", ["00123"]),
    "bom_quoted_header": (b'\xef\xbb\xbf"sku","name"\n00123,x\n', ["00123"]),
    "quoted_newline": (b'sku,name\nA1,"two\nlines, and a comma"\nA2,y\n', ["A1", "A2"]),
    "leading_zeros": (b"sku,name\n016000126121,Chex\n000001,One\n", ["016000126121", "000001"]),
    "crlf_and_blank_lines": (b"sku,name\r\n\r\nA1,x\r\n\r\n", ["A1"]),
    "trailing_commas": (b"sku,name\nA1,x,,\n", ["A1"]),
    "short_rows_padded": (b"sku,name,category\nA1\n", ["A1"]),
}
PRODUCTS_PROBLEMS = {  # parsed, but check_products (and the blocking asset check) report the problem
    "duplicate_sku": (b"sku,name\nA1,x\nA2,y\nA1,z\n", "duplicate sku ids: ['A1']"),
    "empty_sku": (b"sku,name\nA1,x\n,nameless\n  ,blank\n", "2 row(s) with an empty sku"),
    "unsafe_sku": (b"sku,name\nA 1,x\n", "unsafe sku ids"),
}
PRODUCTS_BAD = {  # a CatalogError with a one-line message
    "no_sku_column": (b"id,name\nA1,x\n", "no 'sku' column"),
    "semicolons": (b"sku;name\nA1;x\n", "separator"),
    "binary": (bytes(range(256)) * 4, "binary data"),
    "jpeg": (g.jpeg_bytes(g.product_image(40, 40, 0)), "binary data"),
    "json": (b'[{"sku": "A1", "name": "x"}]', "looks like JSON"),
    "html_error_page": (b"\n<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>", "HTML page"),
    "s3_error_xml": (b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>', "XML"),
    "latin1": ("sku,name\nA1,Caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 15)"),
    "utf16": ("sku,name\nA1,x\n".encode("utf-16"), "UTF-16"),
    "empty": (b"", "is empty"),
    "whitespace_only": (b" \n\n", "is empty"),
    "unclosed_quote": (b'sku,name\nA1,"never closed\n', "not a readable CSV"),
    "unquoted_comma": (b"sku,name\nA1,Chex Mix, Original\n", "3 fields but the header has 2"),
    "sku_twice": (b"sku,sku\nA1,A2\n", "'sku' twice"),
}


@pytest.mark.parametrize("case", sorted(PRODUCTS_OK))
def test_products_csv_that_parses(case):
    data, skus = PRODUCTS_OK[case]
    df = contract.read_products(data)
    assert df["sku"].tolist() == skus and {"sku", "name", "category"} <= set(df.columns)
    assert contract.check_products(df) == []
    if case == "quoted_newline":
        assert df.loc[0, "name"] == "two\nlines, and a comma"


@pytest.mark.parametrize("case", sorted(PRODUCTS_PROBLEMS))
def test_products_csv_contract_problems(case):
    data, problem = PRODUCTS_PROBLEMS[case]
    problems = contract.check_products(contract.read_products(data))
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("case", sorted(PRODUCTS_BAD))
def test_products_csv_that_is_not_a_csv_is_a_one_line_error(case):
    data, needle = PRODUCTS_BAD[case]
    with pytest.raises(contract.CatalogError) as exc:
        contract.read_products(data)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and msg.startswith("products.csv"), msg


def test_boxes_csv_errors_are_catalog_errors():
    ok = contract.read_boxes(b"\xef\xbb\xbfphoto,sku,x,y,w,h\np.jpg,00123,1,2,30,40\n")
    assert ok["sku"].tolist() == ["00123"] and ok["w"].tolist() == [30]
    for data, needle in ((b"\x00\x01\x02garbage", "binary"), (b"photo,sku\np.jpg,A\n", "missing columns"),
                         (b"photo,sku,x,y,w,h\np.jpg,A,1,2,wide,4\n", "'w' is not a number"),
                         (b'photo,sku,x,y,w,h\n"p.jpg,A,1,2,3,4\n', "not a readable CSV")):
        with pytest.raises(contract.CatalogError, match=needle):
            contract.read_boxes(data)


def test_products_asset_on_hostile_csv(s3, tmp_path, dagster_instance):
    """Through the `catalog_products` asset: BOM + leading zeros parse; a duplicate id fails the blocking
    check with the ids in its metadata, and cleaning does not run on that table; an HTML page fails the
    asset with the one-line message."""
    client = s3.client()
    outcomes = {}
    for case, data in (("bom", PRODUCTS_OK["bom"][0]), ("dup", PRODUCTS_PROBLEMS["duplicate_sku"][0]),
                       ("html", PRODUCTS_BAD["html_error_page"][0])):
        bucket = s3.new_bucket(f"prod-{case}")
        client.put_object(Bucket=bucket, Key=contract.PRODUCTS_KEY, Body=data)
        selection = [ingest_assets.catalog_products, quality.products_sku_unique]
        if case == "dup":  # with images and the cleaning asset downstream of the products table
            client.put_object(Bucket=bucket, Key=P + "A1/x.jpg", Body=g.jpeg_bytes(g.product_image(200, 200, 3)))
            selection += [ingest_assets.catalog_images, quality.cleaned_catalog]
        outcomes[case] = dg.materialize(selection, resources=_dg_resources(s3, bucket, tmp_path / case),
                                        instance=dagster_instance, raise_on_error=False)
    bom = outcomes["bom"]
    assert bom.success and bom.output_for_node("catalog_products")["sku"].tolist() == ["00123"]
    dup = outcomes["dup"]
    check = {e.check_name: e for e in dup.get_asset_check_evaluations()}["products_sku_unique"]
    assert not check.passed and check.metadata["duplicate_skus"].value == ["A1"]
    materialized = {m.asset_key.to_user_string() for m in dup.get_asset_materialization_events()}
    assert materialized == {"catalog_products", "catalog_images"}  # the blocking check stopped cleaned_catalog
    html = outcomes["html"]
    assert not html.success
    err = html.failure_data_for_node("catalog_products").error
    messages = [err.message] + [c.message for c in (err.cause, err.context) if c is not None]
    assert any("products.csv is not CSV: it looks like an HTML page" in m for m in messages), messages

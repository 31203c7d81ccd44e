"""The compiled inference engine on the tiny model: every available backend compiles and matches PyTorch,
the artifact is cached next to the model and reloaded (without torch) by a later process, the numpy
preprocess equals torchvision's, embed_images through an engine equals the torch path, and `auto`
falls back (recording why) when a backend is missing or fails parity."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")

from skulens.model import ModelSpec, create_encoder, save_encoder  # noqa: E402
from skulens.model import engine as eng  # noqa: E402
from skulens.model.embed import embed_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
AVAILABLE = [b for b in eng.BACKENDS if importlib.util.find_spec(b) is not None]


def _images(tmp_path: Path) -> list:
    rng = np.random.default_rng(0)
    out = []
    for i, size in enumerate([(64, 64), (97, 31), (300, 200), (20, 90), (128, 128)]):
        img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(5):
            x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
            d.rectangle([x, y, x + 12, y + 9], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        p = tmp_path / f"img{i}.jpg"
        img.save(p, quality=90)
        out.append(str(p))
    out.append(Image.open(out[0]).convert("L"))  # grayscale
    rgba = Image.open(out[2]).convert("RGBA")
    rgba.putalpha(128)
    out.append(rgba)
    return out


@pytest.fixture()
def model_file(tmp_path):
    torch.manual_seed(0)
    enc = create_encoder(ModelSpec(name="tiny-test"), device="cpu")
    return save_encoder(enc, tmp_path / "m" / "encoder.pt"), enc


@pytest.mark.parametrize("size,crop,interp", [(224, 0.875, "bicubic"), (64, 0.875, "bicubic"), (64, 1.0, "bilinear")])
def test_numpy_preprocess_equals_torchvision(tmp_path, size, crop, interp):
    from skulens.data.images import load_rgb
    from skulens.model.transform import eval_transform, eval_transform_np

    tv = eval_transform(size, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27), interp, crop)
    npt = eval_transform_np(size, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27), interp, crop)
    imgs = [load_rgb(im) for im in _images(tmp_path)] + [Image.new("RGB", (8, 8), (200, 10, 30))]  # 8 px: padded
    for im in imgs:
        a, b = tv(im).numpy(), npt(im)
        assert b.dtype == np.float32 and b.shape == a.shape == (3, size, size)
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_each_backend_compiles_matches_torch_and_is_cached(model_file, backend):
    path, enc = model_file
    e = eng.load_engine(path, backend)
    assert e.backend == backend and e.device == "cpu" and not e.fallbacks
    assert e.embed_dim == 64 and e.image_size == enc.image_size and e.spec.to_dict() == enc.spec.to_dict()
    assert e.parity["ok"] and e.parity["max_abs_diff"] < 1e-4 and e.parity["max_cos_diff"] < 1e-6
    x = np.random.default_rng(1).standard_normal((5, 3, 64, 64)).astype(np.float32)  # another batch size
    with torch.inference_mode():
        ref = enc.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(e.run(x), ref, atol=1e-4)
    assert e.run(x[:1]).shape == (1, 64) and e.run(x[:0]).shape == (0, 64)

    d = eng.engine_dir(path)
    assert d == path.with_name("encoder.pt.engine") and (d / "reference.npz").is_file()
    if backend != "torch":
        assert e.parity["checked"] == "compile"
        rec = json.loads((d / "engine.json").read_text())
        assert rec["backends"][backend]["ok"] and rec["spec"]["name"] == "tiny-test"
        again = eng.load_engine(path, backend)  # a second load: the cached artifact, re-checked
        assert again.parity["checked"] == "load" and again.parity["ok"]
        np.testing.assert_allclose(again.run(x), e.run(x), atol=1e-6)
    if backend == "openvino":
        assert (d / "openvino" / "model.xml").is_file() and (d / "openvino" / "model.bin").is_file()
        assert any((d / "ov_cache").iterdir())
    if backend == "onnxruntime":
        assert (d / "model.onnx").is_file()
    with pytest.raises(ValueError, match="expected"):
        e.run(np.zeros((2, 3, 32, 32), np.float32))


def test_embed_images_through_engine_equals_torch(model_file, tmp_path):
    path, enc = model_file
    e = eng.load_engine(path, "auto", preprocess="exact")
    assert e.backend == AVAILABLE[0] and e.preprocess_mode == "exact" and e.info()["preprocess"] == "exact"
    imgs = _images(tmp_path)
    ref = embed_images(enc, imgs, batch_size=3)
    got = embed_images(e, imgs, batch_size=3)
    assert got.dtype == np.float32 and got.shape == ref.shape == (len(imgs), 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(embed_images(e, imgs, batch_size=64, num_workers=1), got, atol=1e-5)  # batch-invariant
    assert embed_images(e, []).shape == (0, 64)


@pytest.mark.skipif("openvino" not in AVAILABLE, reason="needs openvino")
def test_a_second_process_loads_the_cached_engine_without_torch(model_file, tmp_path):
    path, _ = model_file
    first = eng.load_engine(path, "auto")
    imgs = [p for p in _images(tmp_path) if isinstance(p, str)]
    expected = embed_images(first, imgs)
    np.save(tmp_path / "expected.npy", expected)
    code = (
        "import sys, json, numpy as np\n"
        "from skulens.model.engine import load_engine\n"
        "from skulens.model.embed import embed_images\n"
        f"e = load_engine({str(path)!r}, 'auto')\n"
        f"v = embed_images(e, {imgs!r})\n"
        f"ok = bool(np.abs(v - np.load({str(tmp_path / 'expected.npy')!r})).max() < 1e-5)\n"
        "print(json.dumps({'backend': e.backend, 'checked': e.parity['checked'], 'same': ok,\n"
        "                  'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"backend": "openvino", "checked": "load", "same": True, "torch": False}


def test_auto_falls_back_when_a_backend_is_missing(model_file, monkeypatch):
    path, _ = model_file
    real = eng._available
    monkeypatch.setattr(eng, "_available", lambda b: "openvino is not installed" if b == "openvino" else real(b))
    e = eng.load_engine(path, "auto")
    assert e.backend == ([b for b in AVAILABLE if b != "openvino"][0])
    assert e.fallbacks[0] == {"backend": "openvino", "reason": "openvino is not installed"}
    assert "openvino: openvino is not installed" in e.info()["fallbacks"]
    with pytest.raises(eng.EngineError, match="not installed"):
        eng.load_engine(path, "openvino")  # an explicit choice is not silently replaced


@pytest.mark.skipif(not {"openvino", "onnxruntime"} <= set(AVAILABLE), reason="needs openvino and onnxruntime")
def test_auto_falls_back_to_torch_when_the_compiled_artifact_fails_parity(model_file, tmp_path):
    """A cached ONNX file that does not compute this model (another model's weights) fails the parity
    check in both runtimes built from it; auto serves PyTorch and records why; the failure is remembered."""
    path, enc = model_file
    torch.manual_seed(1)
    other = save_encoder(create_encoder(ModelSpec(name="tiny-test")), tmp_path / "other" / "encoder.pt")
    eng.load_engine(other, "onnxruntime")
    d = eng.engine_dir(path)
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes((eng.engine_dir(other) / "model.onnx").read_bytes())
    e = eng.load_engine(path, "auto")
    assert e.backend == "torch" and e.parity["ok"]
    assert [f["backend"] for f in e.fallbacks] == ["openvino", "onnxruntime"]
    assert all("parity failed" in f["reason"] for f in e.fallbacks)
    rec = json.loads((d / "engine.json").read_text())["backends"]
    assert rec["openvino"]["ok"] is False and rec["onnxruntime"]["ok"] is False
    again = eng.load_engine(path, "auto", preprocess="exact")  # not recompiled: the recorded failure is reused
    assert again.backend == "torch" and all("recorded in" in f["reason"] for f in again.fallbacks)
    imgs = _images(tmp_path)
    np.testing.assert_allclose(embed_images(again, imgs), embed_images(enc, imgs), atol=1e-5)


def test_backend_setting_and_store_engine_once_per_process(model_file, tmp_path, monkeypatch):
    from skulens.registry.store import ModelStore

    with pytest.raises(ValueError, match="one of"):
        eng.backend_setting("tensorrt")
    monkeypatch.setenv(eng.ENV_BACKEND, "onnxruntime")
    assert eng.backend_setting(None) == "onnxruntime" and eng.backend_setting("torch") == "torch"
    path, _ = model_file
    store = ModelStore(tmp_path / "cache", tracking_uri=None)
    e = store.engine(path)  # a local file (a challenger just trained) goes into the cache first
    assert e.backend == "onnxruntime"  # from the environment
    assert Path(e.artifact).parent.parent.parent == tmp_path / "cache" / "sha256"
    assert store.engine(path) is e  # once per process and version
    t = ModelStore(tmp_path / "cache", tracking_uri=None, inference_backend="torch").engine(path)
    assert t.backend == "torch" and t is not e


# ---------------------------------------------------------------------- preprocessing modes, uint8 input
def test_fast_preprocess_is_close_to_exact(tmp_path):
    """``fast`` (one resize of the crop box) gives nearly the pixels of ``exact`` (resize + crop); the
    same image through the tiny model embeds to nearly the same vector; a padded crop falls back to exact."""
    from skulens.data.images import load_rgb
    from skulens.model.transform import eval_transform_np

    ex = eval_transform_np(224, output="uint8")
    fa = eval_transform_np(224, mode="fast", output="uint8")
    assert fa.draft and not ex.draft and fa.mode == "fast"
    imgs = [load_rgb(im) for im in _images(tmp_path)]
    for im in imgs:
        a, b = ex(im).astype(int), fa(im).astype(int)
        assert a.shape == b.shape == (224, 224, 3) and fa(im).dtype == np.uint8
        d = np.abs(a - b)
        assert d.mean() < 0.5 and np.mean(d > 2) < 0.01, (im.size, d.mean(), d.max())
    # float output = normalised uint8 output, and equal to the exact float transform in exact mode
    f = eval_transform_np(224)
    np.testing.assert_allclose(f(imgs[2]), f.normalize(ex(imgs[2])), atol=1e-6)
    pad_ex = eval_transform_np(64, crop_pct=1.2, output="uint8")  # resize 53 < 64: padded
    pad_fa = eval_transform_np(64, crop_pct=1.2, mode="fast", output="uint8")
    assert np.array_equal(pad_ex(imgs[0]), pad_fa(imgs[0]))
    with pytest.raises(ValueError, match="one of"):
        eval_transform_np(224, mode="turbo")


def test_fast_engine_embeds_close_to_exact(model_file, tmp_path):
    path, _ = model_file
    ex = eng.load_engine(path, "auto", preprocess="exact")
    fa = eng.load_engine(path, "auto", preprocess="fast")
    assert fa.preprocess_mode == "fast" and fa.info()["preprocess"] == "fast" and "fast" in repr(fa)
    imgs = _images(tmp_path)
    cos = np.sum(embed_images(ex, imgs) * embed_images(fa, imgs), axis=1)
    assert cos.min() > 0.99, cos


@pytest.mark.parametrize("backend", AVAILABLE)
def test_uint8_input_matches_torch_on_normalised_float(model_file, backend):
    """The engine takes the uint8 NHWC pixels (for OpenVINO the conversion, normalisation and layout
    change are fused into the compiled graph): equal to PyTorch on the float normalised batch; the
    parity check ran on that input."""
    from skulens.model.transform import eval_transform_np

    path, enc = model_file
    e = eng.load_engine(path, backend)
    assert e.parity["ok"] and e.parity["max_abs_diff"] < 1e-4
    if backend == "openvino":
        assert e.parity["input"].startswith("uint8 NHWC") and "fused" in e.info()["runtime_input"]
    s = enc.image_size
    x8 = np.random.default_rng(3).integers(0, 256, (5, s, s, 3), dtype=np.uint8)
    xf = eval_transform_np(s, enc.spec.mean, enc.spec.std).normalize(x8)
    assert xf.shape == (5, 3, s, s) and xf.dtype == np.float32
    with torch.inference_mode():
        ref = enc.eval()(torch.from_numpy(xf)).numpy()
    np.testing.assert_allclose(e.run(x8), ref, atol=1e-4)
    np.testing.assert_allclose(e.run(xf), ref, atol=1e-4)  # the float32 NCHW input still works
    assert e.run(x8[:0]).shape == (0, 64)
    with pytest.raises(ValueError, match="uint8"):
        e.run(x8.transpose(0, 3, 1, 2))  # uint8 must be NHWC


def test_an_engine_cache_from_before_the_uint8_input_is_upgraded(model_file):
    """A cached reference.npz without the uint8 batch (an older engine directory) is remade once."""
    path, _ = model_file
    eng.load_engine(path, AVAILABLE[0])
    ref = eng.engine_dir(path) / "reference.npz"
    with np.load(ref) as z:
        np.savez(ref, x=z["x"], y=z["y"])
    e = eng.load_engine(path, AVAILABLE[0])
    assert e.parity["ok"]
    with np.load(ref) as z:
        assert {"x", "y", "xu8", "yu8"} <= set(z.files)


def test_new_weights_at_the_same_path_never_get_the_stale_engine(model_file):
    """A model file rewritten in place (a re-run training folder) is recompiled: load_engine discards
    the engine directory of the old weights and get_engine's per-process memo does not return them."""
    path, enc = model_file
    x = np.random.default_rng(2).standard_normal((3, 3, 64, 64)).astype(np.float32)
    old = eng.get_engine(path, AVAILABLE[0])
    old_out = old.run(x)
    torch.manual_seed(1)
    other = create_encoder(ModelSpec(name="tiny-test"), device="cpu")
    save_encoder(other, path)  # same path, new weights
    with torch.inference_mode():
        want = other.eval()(torch.from_numpy(x)).numpy()
    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    assert np.abs(unit(want) - unit(old_out)).max() > 0.1  # the two models really differ
    new = eng.get_engine(path, AVAILABLE[0])
    assert new is not old and new.parity["ok"]
    np.testing.assert_allclose(unit(new.run(x)), unit(want), atol=1e-4)
    rec = json.loads((eng.engine_dir(path) / "engine.json").read_text())
    assert rec["source"] == eng.source_of(path)
    again = eng.load_engine(path, AVAILABLE[0])  # unchanged file: the cached engine is kept
    assert again.parity.get("checked") in ("load", None) and not list(path.parent.glob("*.stale*"))
    np.testing.assert_allclose(unit(again.run(x)), unit(want), atol=1e-4)
    # an engine directory without a recorded source (older code) is not trusted either
    rec.pop("source")
    (eng.engine_dir(path) / "engine.json").write_text(json.dumps(rec))
    np.testing.assert_allclose(unit(eng.load_engine(path, AVAILABLE[0]).run(x)), unit(want), atol=1e-4)
    assert json.loads((eng.engine_dir(path) / "engine.json").read_text())["source"] == eng.source_of(path)


def test_draft_decodes_large_jpegs_smaller_only_when_allowed(tmp_path):
    """``Image.draft`` only in fast mode, only for JPEG files, only when the short side stays >= 2x the
    resize target; the result is still RGB (grayscale JPEG too)."""
    from skulens.model.embed import _load_for
    from skulens.model.transform import eval_transform_np

    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(big, quality=90)
    Image.new("RGB", (900, 600), (10, 200, 30)).save(small, quality=90)  # 600 < 4 x 256: no draft
    gray = tmp_path / "gray.jpg"
    Image.new("L", (1200, 1600), 128).save(gray, quality=90)
    png = tmp_path / "big.png"
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(png)
    fast, exact = eval_transform_np(224, mode="fast"), eval_transform_np(224, mode="exact")
    assert fast.draft_size(1600, 1200) is not None and exact.draft_size(1600, 1200) is None
    assert fast.draft_size(900, 600) is None
    im = _load_for(str(big), fast)
    assert im.mode == "RGB" and min(im.size) < 1200 and min(im.size) >= 2 * fast.resize
    assert _load_for(str(big), exact).size == (1600, 1200)
    assert _load_for(str(small), fast).size == (900, 600)
    g = _load_for(str(gray), fast)
    assert g.mode == "RGB" and g.size[0] < 1200 and min(g.size) >= 2 * fast.resize
    assert _load_for(str(png), fast).size == (1600, 1200)
    pil = Image.open(big)
    assert _load_for(pil, fast).size == (1600, 1200)  # an image already decoded is left as it is
    # the drafted decode still preprocesses to nearly the same pixels (a flat colour: the same)
    assert np.abs(fast.pixels(im).astype(int) - exact.pixels(_load_for(str(big), exact)).astype(int)).max() <= 2


def test_preprocess_setting_and_engine_memo(model_file, monkeypatch):
    from skulens.index.build import embedding_key
    from skulens.model.transform import ENV_PREPROCESS, preprocess_setting

    monkeypatch.setenv(ENV_PREPROCESS, "exact")
    assert preprocess_setting() == "exact" and preprocess_setting("fast") == "fast"
    monkeypatch.setenv(ENV_PREPROCESS, "bogus")
    with pytest.raises(ValueError, match=ENV_PREPROCESS):
        preprocess_setting()
    monkeypatch.delenv(ENV_PREPROCESS)
    path, enc = model_file
    a = eng.get_engine(path, AVAILABLE[0], preprocess="exact")
    b = eng.get_engine(path, AVAILABLE[0], preprocess="fast")
    assert a is not b and eng.get_engine(path, AVAILABLE[0], preprocess="fast") is b
    keys = {embedding_key("f" * 64, x) for x in (a, b, enc)}
    assert len(keys) == 3 and embedding_key("f" * 64, enc) == "f" * 64

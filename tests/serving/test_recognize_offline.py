"""Recognition does not depend on the tracking server: with MLflow stopped (by PID), `skulens recognize`
and the HTTP service answer from the model cache; with nothing cached they fail within seconds, with
one clear line. Own S3 + MLflow on free ports (the session's servers keep running for other tests)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")

from skulens.ops.services import ServiceManager, free_port  # noqa: E402
from skulens.ops.settings import ACCESS_KEY_VAR, SECRET_KEY_VAR, Settings, read_env_file  # noqa: E402


def _product(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, 48, 2))
        d.rectangle([x, y, x + 16, y + 16], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Own S3 + MLflow, a registered champion and a published index built through the store."""
    from skulens.catalog.s3 import ensure_bucket, make_client
    from skulens.index.build import build_champion_index
    from skulens.index.publish import publish_index
    from skulens.model import ModelSpec, create_encoder, save_encoder
    from skulens.registry.model_registry import log_and_register, promote
    from skulens.registry.store import ModelStore

    root = tmp_path_factory.mktemp("offline")
    settings = Settings(home=root / "home", s3_port=free_port(), mlflow_port=free_port(),
                        dagster_port=free_port(), bucket="offline")
    mgr = ServiceManager(settings)
    try:
        mgr.start("s3")
        mgr.start("mlflow")
        creds = read_env_file(settings.credentials_path)
        client = make_client(settings.s3_endpoint, creds[ACCESS_KEY_VAR], creds[SECRET_KEY_VAR], max_attempts=2)
        ensure_bucket(client, settings.bucket)
        torch.manual_seed(0)
        enc = create_encoder(ModelSpec(name="tiny-test"), device="cpu")
        name = "offline-encoder"
        version = log_and_register(settings.mlflow_uri, name, save_encoder(enc, root / "enc" / "encoder.pt"),
                                   {"top1": 0.5}, {}, {}, {})
        promote(settings.mlflow_uri, name, version)
        rows = []
        for i in range(5):
            p = root / "catalog" / f"SKU{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            _product(i).save(p)
            rows.append({"sku": f"SKU{i}", "clean_path": str(p), "key": f"catalog/images/SKU{i}/0.png"})
        cache = root / "cache"
        index, built_by = build_champion_index(ModelStore(cache / "models", settings.mlflow_uri, name),
                                               pd.DataFrame(rows))
        publish_index(client, settings.bucket, index)
        env = {**os.environ, "SKULENS_HOME": str(root / "cli-home"), "SKULENS_S3_ENDPOINT": settings.s3_endpoint,
               "SKULENS_MLFLOW_URI": settings.mlflow_uri, "SKULENS_BUCKET": settings.bucket,
               "SKULENS_MODEL_NAME": name, "SKULENS_CACHE_DIR": str(cache),
               ACCESS_KEY_VAR: creds[ACCESS_KEY_VAR], SECRET_KEY_VAR: creds[SECRET_KEY_VAR]}
        yield {"mgr": mgr, "settings": settings, "env": env, "root": root, "version": built_by, "index": index,
               "client": client, "name": name, "crop": root / "catalog" / "SKU3.png"}
    finally:
        mgr.down()


def _recognize(env: dict, image: Path) -> tuple[subprocess.CompletedProcess, float]:
    exe = Path(sys.executable).parent / "skulens"
    t0 = time.monotonic()
    proc = subprocess.run([str(exe), "recognize", str(image), "--json", "--k", "2"], env=env,
                          capture_output=True, text=True, timeout=180)
    return proc, time.monotonic() - t0


def _stop_by_pid(mgr: ServiceManager, name: str) -> None:
    st = mgr.read_state(name)
    assert st is not None and st.pid > 0
    os.killpg(st.pgid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(st.pgid, 0)
        except ProcessLookupError:
            break
        try:
            os.waitpid(st.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        os.killpg(st.pgid, signal.SIGKILL)


def test_recognize_and_serve_with_mlflow_down(stack):
    from fastapi.testclient import TestClient

    from skulens.registry.store import ModelStore
    from skulens.serving.http import create_app
    from skulens.serving.recognize import Recognizer

    env, settings = stack["env"], stack["settings"]
    assert stack["index"].meta["model_sha256"]  # the index names its model by checksum
    up, _ = _recognize(env, stack["crop"])
    assert up.returncode == 0, up.stderr[-2000:]
    assert json.loads(up.stdout)["results"][0]["sku"] == "SKU3"

    _stop_by_pid(stack["mgr"], "mlflow")
    proc, seconds = _recognize(env, stack["crop"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["results"][0]["sku"] == "SKU3" and doc["model_version"] == stack["version"]
    print(f"recognize with MLflow down: {seconds:.1f}s")

    # the HTTP service: same cache, MLflow still down
    def factory():
        return Recognizer.from_services(settings.mlflow_uri, stack["name"], stack["client"], settings.bucket,
                                        stack["root"] / "serve-cache",
                                        store=ModelStore(Path(env["SKULENS_CACHE_DIR"]) / "models",
                                                         settings.mlflow_uri, stack["name"]))

    buf = io.BytesIO()
    Image.open(stack["crop"]).save(buf, "PNG")
    with TestClient(create_app(factory)) as c:
        assert c.get("/health").json()["model_version"] == stack["version"]
        body = c.post("/recognize", files={"file": ("c.png", buf.getvalue(), "image/png")}).json()
        assert body["sku"] == "SKU3"

    # nothing cached and MLflow down: one clear line within seconds, no traceback
    cold = {**env, "SKULENS_CACHE_DIR": str(stack["root"] / "empty-cache")}
    proc, seconds = _recognize(cold, stack["crop"])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "MLflow" in err[0] and "not reachable" in err[0] and "cache" in err[0], proc.stderr
    assert seconds < 30, f"took {seconds:.1f}s to fail"
    print(f"recognize with MLflow down and an empty cache: failed in {seconds:.1f}s: {err[0]}")

    def cold_factory():
        return Recognizer.from_services(settings.mlflow_uri, stack["name"], stack["client"], settings.bucket,
                                        stack["root"] / "cold-serve",
                                        store=ModelStore(stack["root"] / "empty-cache2", settings.mlflow_uri,
                                                         stack["name"]))

    t0 = time.monotonic()
    with TestClient(create_app(cold_factory)) as c:
        h = c.get("/health")
        assert h.status_code == 503 and "not reachable" in h.json()["detail"]
        r = c.post("/recognize", files={"file": ("c.png", buf.getvalue(), "image/png")})
        assert r.status_code == 503 and "MLflow" in r.json()["detail"]
    assert time.monotonic() - t0 < 60


def test_recognize_with_s3_down_fails_fast_with_one_line(tmp_path):
    """No store answering on the endpoint: one line naming it, in seconds, no traceback."""
    img = tmp_path / "c.png"
    _product(1).save(img)
    env = {**os.environ, "SKULENS_HOME": str(tmp_path / "home"),
           "SKULENS_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}", "SKULENS_MLFLOW_URI": f"http://127.0.0.1:{free_port()}",
           ACCESS_KEY_VAR: "k" * 20, SECRET_KEY_VAR: "s" * 40}
    proc, seconds = _recognize(env, img)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "S3 store" in err[0] and "did not answer" in err[0], proc.stderr
    assert seconds < 30, f"took {seconds:.1f}s to fail"

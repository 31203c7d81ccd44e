"""Fallback session fixtures ``s3`` (real SeaweedFS) and ``mlflow_server`` (real MLflow), used only
while tests/conftest.py does not provide them. Load as a plugin:

    PYTHONPATH=tests pytest -p _svc_fallback tests/test_index.py ...
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _free(n: int) -> list[int]:
    """n free loopback ports p whose p+10000 (SeaweedFS gRPC offset) is free too."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535 or p in out or p + 10000 in out:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        out.append(p)
    return out


def _wait_http(url: str, timeout: float, proc) -> None:
    import urllib.error
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # answered (403 etc.)
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(url)


@dataclass
class S3Service:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )


@dataclass
class MlflowService:
    uri: str


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    d = tmp_path_factory.mktemp("weed")
    s3p, master, filer, volume, admin, debug, metrics, webdav = _free(8)
    ak, sk = "test" + secrets.token_hex(4), secrets.token_urlsafe(24)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ak, "AWS_SECRET_ACCESS_KEY": sk}
    cmd = [str(BIN / "weed"), "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
           f"-s3.port={s3p}", f"-master.port={master}", f"-filer.port={filer}", f"-volume.port={volume}",
           f"-admin.port={admin}", f"-debug.port={debug}", f"-metricsPort={metrics}", f"-webdav.port={webdav}"]
    log = open(d / "weed.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    svc = S3Service(f"http://127.0.0.1:{s3p}", "skulens-test", ak, sk)
    try:
        _wait_http(svc.endpoint, 60, proc)
        c = svc.client()
        for _ in range(50):
            try:
                c.create_bucket(Bucket=svc.bucket)
                break
            except Exception:
                time.sleep(0.3)
        yield svc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(s3, tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    (port,) = _free(1)
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.access_key,
           "AWS_SECRET_ACCESS_KEY": s3.secret_key, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
           "--artifacts-destination", f"s3://{s3.bucket}/mlflow-artifacts", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    log = open(d / "mlflow.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=d)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", 120, proc)
        yield MlflowService(uri)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(d / "mlruns", ignore_errors=True)

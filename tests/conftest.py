"""Session fixtures: real SeaweedFS (S3) and MLflow servers on free loopback ports, started by skulens itself."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from skulens.services import ServiceManager, free_port
from skulens.settings import ACCESS_KEY_VAR, QUIET_ENV, SECRET_KEY_VAR, Settings, read_env_file

ROOT = Path(__file__).resolve().parent.parent

# Tests never talk to a developer's own services: drop SKULENS_* overrides from the outer shell.
for _k in [k for k in os.environ if k.startswith("SKULENS_") or k in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI")]:
    del os.environ[_k]
os.environ.update(QUIET_ENV)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    settings: Settings

    def client(self):
        from skulens.s3 import make_client

        return make_client(self.endpoint, self.access_key, self.secret_key, max_attempts=3)

    def new_bucket(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@dataclass
class MlflowServer:
    uri: str


@pytest.fixture(scope="session")
def service_settings(tmp_path_factory) -> Settings:
    home = tmp_path_factory.mktemp("skulens-home")
    return Settings(home=home, s3_port=free_port(), mlflow_port=free_port(), dagster_port=free_port(),
                    bucket="skulens-test")


@pytest.fixture(scope="session")
def services(service_settings):
    mgr = ServiceManager(service_settings)
    yield mgr
    mgr.down()


@pytest.fixture(scope="session")
def s3(services, service_settings) -> S3Server:
    services.start("s3")
    creds = read_env_file(service_settings.credentials_path)
    os.environ[ACCESS_KEY_VAR] = creds[ACCESS_KEY_VAR]
    os.environ[SECRET_KEY_VAR] = creds[SECRET_KEY_VAR]
    return S3Server(endpoint=service_settings.s3_endpoint, bucket=service_settings.bucket,
                    access_key=creds[ACCESS_KEY_VAR], secret_key=creds[SECRET_KEY_VAR], settings=service_settings)


@pytest.fixture(scope="session")
def mlflow_server(s3, services, service_settings) -> MlflowServer:
    services.start("mlflow")
    return MlflowServer(uri=service_settings.mlflow_uri)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small demo catalog + shelf set shared by the session (read-only for tests)."""
    from skulens.demo import write_demo

    out = tmp_path_factory.mktemp("demo")
    write_demo(out, n_skus=8, images_per_sku=4, crops_per_sku=2, photos=1)
    return out

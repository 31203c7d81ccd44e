"""Session fixtures: real SeaweedFS (S3) and MLflow servers on free loopback ports, started by skulens itself."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see skulens.ops.settings.QUIET_ENV)

from skulens.ops.services import ServiceManager, free_port
from skulens.ops.settings import ACCESS_KEY_VAR, QUIET_ENV, SECRET_KEY_VAR, Settings, read_env_file

ROOT = Path(__file__).resolve().parent.parent

# Tests never talk to a developer's own services: drop SKULENS_* overrides from the outer shell.
for _k in [k for k in os.environ if k.startswith("SKULENS_") or k in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI")]:
    del os.environ[_k]
os.environ.update(QUIET_ENV)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (whole jobs, a real daemon) run first, the rest in collection order: with
    `make test`'s parallel workers (pytest-xdist) the long ones start at once instead of ending the run
    alone on one worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    settings: Settings

    def client(self):
        from skulens.catalog.s3 import make_client

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
    from skulens.catalog.demo import write_demo

    out = tmp_path_factory.mktemp("demo")
    write_demo(out, n_skus=8, images_per_sku=4, crops_per_sku=2, photos=1)
    return out


@pytest.fixture
def dvc_repo(tmp_path, s3):
    """A project checkout of our own: git + DVC initialised, dvc.yaml/params.yaml copied, remote on test S3.
    Returns (repo_dir, bucket)."""
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ("dvc.yaml", "params.yaml", "dvc.lock", ".gitignore"):
        shutil.copy(ROOT / f, repo / f)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    bucket = s3.new_bucket("dvc")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "remote", "add", "-d", "storage", f"s3://{bucket}/dvc"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)  # committed, as in a fresh clone of the project
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init"],
                   cwd=repo, check=True)
    return repo, bucket


@pytest.fixture
def dagster_instance(tmp_path):
    import dagster as dg

    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def pipeline_resources(s3, bucket, repo, home, mlflow_uri=None, training_mode="local", model_name=None):
    """The resources of pipelines/definitions.py, pointed at the test services."""
    import dagster as dg

    from resources import DvcResource, LocalStateResource, S3Resource, SparseViewsResource
    from resources.mlflow import MlflowResource
    from resources.training import TrainingResource

    key, secret = dg.EnvVar("SKULENS_S3_ACCESS_KEY_ID"), dg.EnvVar("SKULENS_S3_SECRET_ACCESS_KEY")
    res = {
        "s3": S3Resource(endpoint_url=s3.endpoint, bucket=bucket, access_key_id=key, secret_access_key=secret),
        "state": LocalStateResource(home=str(home)),
        "dvc": DvcResource(repo_dir=str(repo), endpoint_url=s3.endpoint, bucket=bucket, access_key_id=key,
                           secret_access_key=secret),
        "training": TrainingResource(mode=training_mode, device="cpu"),
        "sparse_views": SparseViewsResource(),
    }
    if mlflow_uri:
        res["mlflow"] = MlflowResource(tracking_uri=mlflow_uri, experiment=f"exp-{bucket}",
                                       model_name=model_name or f"model-{bucket}")
    return res

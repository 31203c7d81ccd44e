from pathlib import Path

import dagster as dg

from skulens.data.dvc import DvcRepo


class DvcResource(dg.ConfigurableResource):
    """The DVC repository whose `data/` folder holds the versioned datasets (remote: the S3 store)."""

    repo_dir: str
    remote: str = "storage"
    endpoint_url: str | None = None
    bucket: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None

    def repo(self) -> DvcRepo:
        return DvcRepo(Path(self.repo_dir), remote=self.remote, endpoint_url=self.endpoint_url, bucket=self.bucket,
                       access_key=self.access_key_id, secret_key=self.secret_access_key)

    def data_dir(self, *parts: str) -> Path:
        return Path(self.repo_dir).joinpath("data", *parts)

import dagster as dg
from pydantic import PrivateAttr

from skulens.catalog.s3 import make_client


class S3Resource(dg.ConfigurableResource):
    """The catalog bucket. Keys come from the environment (``EnvVar``), never from code or logs."""

    endpoint_url: str | None = None
    bucket: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"
    max_attempts: int = 8

    _client = PrivateAttr(default=None)

    def client(self):
        if self._client is None:
            self._client = make_client(self.endpoint_url, self.access_key_id, self.secret_access_key,
                                       self.region, max_attempts=self.max_attempts)
        return self._client

"""S3 access: one boto3 client factory with retries/backoff, and small listing helpers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


@dataclass(frozen=True)
class S3Object:
    key: str
    etag: str
    size: int


def make_client(
    endpoint: str | None,
    access_key: str,
    secret_key: str,
    region: str = "us-east-1",
    max_attempts: int = 8,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_pool_connections: int = 32,
):
    """A thread-safe boto3 S3 client with adaptive retries (exponential backoff with jitter)."""
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "adaptive"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint or None,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=config,
    )


def normalize_etag(etag: str) -> str:
    return etag.strip().strip('"').lower()


def list_pages(client, bucket: str, prefix: str, start_after: str = "",
               page_size: int = 1000) -> Iterator[tuple[list[S3Object], str, bool]]:
    """The listing of ``prefix`` page by page, from just after ``start_after``: ``(objects, last key of the
    page, more pages follow)``. Folder markers are left out of ``objects`` (they still move the position)."""
    kw = {"StartAfter": start_after} if start_after else {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": int(page_size)}, **kw):
        items = page.get("Contents", []) or []
        objs = [S3Object(key=i["Key"], etag=normalize_etag(i["ETag"]), size=int(i["Size"]))
                for i in items if not i["Key"].endswith("/")]  # folder markers
        yield objs, (items[-1]["Key"] if items else start_after), bool(page.get("IsTruncated")) and bool(items)
        start_after = items[-1]["Key"] if items else start_after


def list_objects(client, bucket: str, prefix: str) -> Iterator[S3Object]:
    for objs, _, _ in list_pages(client, bucket, prefix):
        yield from objs


def ensure_bucket(client, bucket: str) -> bool:
    """Create the bucket if missing. Returns True when it was created."""
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    client.create_bucket(Bucket=bucket)
    return True


def bucket_is_empty(client, bucket: str, prefix: str = "") -> bool:
    resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return int(resp.get("KeyCount", 0)) == 0


def object_exists(client, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise


def client_for(settings, **kw) -> "object":
    """The S3 client for a skulens ``Settings`` (endpoint, region) with keys from the environment;
    ``kw`` goes to :func:`make_client` (retries, timeouts)."""
    from skulens.ops.settings import load_local_env, s3_credentials

    load_local_env(settings)  # picks up keys `services up` may have just generated
    return make_client(settings.s3_endpoint, *s3_credentials(), region=settings.region, **kw)


def client_from_env(endpoint: str | None = None, region: str | None = None):
    """An S3 client from the environment alone (a training pod, a worker): ``endpoint``/``region``
    default to the skulens settings (``SKULENS_S3_ENDPOINT``...), keys to ``SKULENS_S3_ACCESS_KEY_ID`` /
    ``SKULENS_S3_SECRET_ACCESS_KEY`` (or ``$SKULENS_HOME/credentials.env``)."""
    from skulens.ops.settings import Settings, load_local_env, s3_credentials

    settings = load_local_env(Settings.from_env())
    return make_client(endpoint or settings.s3_endpoint, *s3_credentials(), region=region or settings.region)

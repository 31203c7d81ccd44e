"""Dagster resources: thin configurable wrappers around the skulens core (skulens <- resources)."""

from resources.s3 import S3Resource
from resources.storage import LocalStateResource

__all__ = ["LocalStateResource", "S3Resource"]

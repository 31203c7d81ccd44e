"""Dagster resources: thin configurable wrappers around the skulens core (skulens <- resources)."""

from resources.dvc import DvcResource
from resources.index_rules import SparseViewsResource
from resources.s3 import S3Resource
from resources.storage import LocalStateResource

__all__ = ["DvcResource", "LocalStateResource", "S3Resource", "SparseViewsResource"]

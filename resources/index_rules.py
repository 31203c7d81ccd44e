import dagster as dg
from pydantic import Field

from skulens.index.build import SPARSE_BELOW, SPARSE_VIEWS


class SparseViewsResource(dg.ConfigurableResource):
    """One rule for sparse SKUs, set once: SKUs with fewer than ``below`` catalog images get ``views`` shelf-like
    views per image (RetailKLIP 4.2). model_evaluation's catalog gallery and sku_index both use it, so the
    evaluation measures the index that is published; the rule is recorded in the index meta, which
    index_update follows."""

    below: int = Field(default=SPARSE_BELOW, description="SKUs with fewer catalog images than this are sparse")
    views: int = Field(default=SPARSE_VIEWS, description="shelf-like views per image of a sparse SKU (0 = none)")
    seed: int = Field(default=0, description="seed of the views")

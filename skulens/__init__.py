"""skulens core library: catalog contract, S3 sync, data quality, training, embedding and index.

No Dagster import anywhere in this package (imports go skulens <- resources <- assets <- pipelines).
Heavy libraries (torch, open_clip, mlflow, great_expectations) are imported inside the functions
that use them, so the CLI and the Dagster code location load fast.
"""

__version__ = "0.1.0"

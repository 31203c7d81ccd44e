"""Running skulens: settings, the local services (SeaweedFS, MLflow, Dagster) and the command line."""

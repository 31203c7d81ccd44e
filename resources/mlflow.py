import dagster as dg


class MlflowResource(dg.ConfigurableResource):
    """The MLflow tracking server and the registered model name."""

    tracking_uri: str
    experiment: str = "skulens"
    model_name: str = "skulens-encoder"

    def start_run(self, run_name: str, tags: dict | None = None) -> str:
        from mlflow.tracking import MlflowClient

        from skulens.registry.model_registry import experiment_id

        client = MlflowClient(self.tracking_uri)
        return client.create_run(experiment_id(client, self.experiment), run_name=run_name,
                                 tags=tags or {}).info.run_id

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def store(self, cache_dir) -> "ModelStore":  # noqa: F821 - lazily imported
        """The one model loader/cache (skulens.registry.store) for this registry, caching under ``cache_dir``."""
        from skulens.registry.store import ModelStore

        return ModelStore(cache_dir, self.tracking_uri, self.model_name)

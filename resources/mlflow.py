import dagster as dg
from pydantic import Field


class MlflowResource(dg.ConfigurableResource):
    """The MLflow tracking server and the registered model name."""

    tracking_uri: str
    experiment: str = "skulens"
    model_name: str = "skulens-encoder"
    timeout_s: float = Field(default=10.0, description="seconds per MLflow request from asset code (MLflow's "
                             "own default retries for minutes when the server is down)")
    retries: int = Field(default=2, description="retries per MLflow request from asset code")
    inference_backend: str | None = Field(
        default=None,  # read when the store is made, not when this module is imported
        description="how the models from this registry are run for embedding (evaluation, sku_index, index_update): "
                    "auto (the fastest that passes the parity check against PyTorch: OpenVINO, then onnxruntime, then "
                    "PyTorch; PyTorch on CUDA) | openvino | onnxruntime | torch. Unset: $SKULENS_INFERENCE_BACKEND "
                    "(read at run time) or auto")

    def bounded(self):
        """A context in which MLflow client calls give up after ``timeout_s`` x ``retries`` (an explicit
        MLFLOW_HTTP_REQUEST_* environment setting wins)."""
        from skulens.registry.store import bounded_http

        return bounded_http(self.timeout_s, self.retries)

    def start_run(self, run_name: str, tags: dict | None = None) -> str:
        from mlflow.tracking import MlflowClient

        from skulens.registry.model_registry import experiment_id

        client = MlflowClient(self.tracking_uri)
        with self.bounded():
            return client.create_run(experiment_id(client, self.experiment), run_name=run_name,
                                     tags=tags or {}).info.run_id

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def store(self, cache_dir) -> "ModelStore":  # noqa: F821 - lazily imported
        """The one model loader/cache (skulens.registry.store) for this registry, caching under ``cache_dir``."""
        from skulens.model.engine import backend_setting
        from skulens.registry.store import ModelStore

        return ModelStore(cache_dir, self.tracking_uri, self.model_name,
                          inference_backend=backend_setting(self.inference_backend))

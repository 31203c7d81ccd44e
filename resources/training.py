"""Where training runs: in the run's own process (`local`) or in another process through Dagster Pipes (`pipes`)."""

import sys
from typing import Literal

import dagster as dg
from pydantic import Field


class TrainingResource(dg.ConfigurableResource):
    """Runs `skulens.training.run_training` where the GPU is.

    - ``local``: in the Dagster run's process; CUDA when present, otherwise CPU with a warning.
    - ``pipes``: a separate process through Dagster Pipes (``PipesSubprocessClient`` here). On
      Kubernetes, swap the client for ``dagster_k8s.PipesK8sClient`` with a GPU node selector and
      run ``python -m resources.pipes_train`` in the skulens image (see README, "Kubernetes").
    """

    mode: Literal["local", "pipes"] = "local"
    device: str | None = Field(default=None, description="torch device; None picks cuda when available")
    python: str = Field(default=sys.executable, description="interpreter for the pipes subprocess")

    def train(self, context: dg.AssetExecutionContext, request: dict) -> dict:
        request = {**request, "device": self.device}
        if self.mode == "local":
            return self._local(context, request)
        return self._pipes(context, request)

    def _local(self, context, request: dict) -> dict:
        import torch

        from skulens.training import run_training

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cpu"):
            context.log.warning("no CUDA device: training on the CPU (fine for EfficientNet-Lite0 on a small catalog, "
                                "slow for ViT towers; run on a GPU node with mode=pipes, see README)")
        return run_training({**request, "device": device}, echo=context.log.info)

    def _pipes(self, context, request: dict) -> dict:
        client = dg.PipesSubprocessClient()
        invocation = client.run(context=context, command=[self.python, "-m", "resources.pipes_train"],
                                extras={"request": request})
        results = invocation.get_results()
        if not results:
            raise RuntimeError("the pipes training process reported no result")
        meta = results[-1].metadata
        return {k: v.value for k, v in meta.items()}

"""Where training runs: in the run's own process (`local`) or in another process through Dagster Pipes (`pipes`)."""

import sys
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field


class TrainingResource(dg.ConfigurableResource):
    """Runs `skulens.model.training_run.run_training` where the GPU is.

    - ``local``: in the Dagster run's process; CUDA when present, otherwise CPU with a warning.
    - ``pipes``: a separate process through Dagster Pipes (``PipesSubprocessClient``).
    - ``k8s``: a pod on a GPU node pool through ``dagster_k8s.PipesK8sClient`` (package dagster-k8s),
      running ``python -m resources.pipes_train`` in ``k8s_image`` (see README, "Kubernetes").
    """

    mode: Literal["local", "pipes", "k8s"] = "local"
    device: str | None = Field(default=None, description="torch device; None picks cuda when available")
    python: str = Field(default=sys.executable, description="interpreter for the pipes subprocess")
    k8s_image: str = Field(default="skulens:latest", description="k8s mode: image with skulens installed")
    k8s_namespace: str = Field(default="default", description="k8s mode: namespace of the training pod")
    k8s_gpu_node_selector: dict = Field(default={"nvidia.com/gpu.present": "true"},
                                        description="k8s mode: node selector of the GPU node pool")
    k8s_gpus: int = Field(default=1, description="k8s mode: nvidia.com/gpu limit of the pod")
    work_dir: str | None = Field(default=None, description="pipes mode: working directory of the training "
                                 "process (checkpoints, fetched dataset); default: <state home>/training/pipes")

    def train(self, context: dg.AssetExecutionContext, request: dict) -> dict:
        """Run the training request. Outside the run's own process the request carries no local
        path: the dataset travels as an S3 bundle (``dataset``) and the encoder comes back as an
        MLflow URI plus sha256, so the process may run on another machine."""
        request = {**request, "device": self.device}
        if self.mode == "local":
            return self._local(context, request)
        remote = {k: v for k, v in request.items() if k not in ("balanced_dir", "clean_dir", "out_dir")}
        remote["out_dir"] = "skulens-train/current"  # relative to the training process's working directory
        if not remote.get("dataset"):
            raise dg.Failure(f"training mode {self.mode!r} needs the dataset bundle in S3 (balanced_dataset's "
                             "'bundle'); re-materialize balanced_dataset")
        cwd = self.work_dir
        if cwd is None and self.mode == "pipes":  # not the Dagster process's cwd (the repository)
            cwd = str(Path(request["out_dir"]).parent / "pipes")
            Path(cwd).mkdir(parents=True, exist_ok=True)
        return self._pipes(context, remote, cwd)

    def pipes_client_and_kwargs(self, cwd: str | None = None) -> tuple:
        """The Pipes client for this mode and the extra run() arguments it needs."""
        if self.mode == "pipes":
            return dg.PipesSubprocessClient(cwd=cwd or self.work_dir), {"command": [self.python, "-m",
                                                                                 "resources.pipes_train"]}
        try:
            from dagster_k8s import PipesK8sClient
        except ImportError as exc:
            raise dg.Failure("training mode 'k8s' needs the dagster-k8s package (pip install dagster-k8s) and a "
                             "kubeconfig or in-cluster credentials") from exc
        pod_spec = {"nodeSelector": dict(self.k8s_gpu_node_selector),
                    "containers": [{"name": "train", "resources": {"limits": {"nvidia.com/gpu": self.k8s_gpus}}}]}
        return PipesK8sClient(), {"image": self.k8s_image, "namespace": self.k8s_namespace,
                                  "command": ["python", "-m", "resources.pipes_train"], "base_pod_spec": pod_spec}

    def _local(self, context, request: dict) -> dict:
        import torch

        from skulens.model.training_run import run_training

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cpu"):
            context.log.warning("no CUDA device: training on the CPU (fine for EfficientNet-Lite0 on a small catalog, "
                                "slow for ViT towers; run on a GPU node with mode=pipes, see README)")
        return run_training({**request, "device": device}, echo=context.log.info)

    def _pipes(self, context, request: dict, cwd: str | None = None) -> dict:
        client, kwargs = self.pipes_client_and_kwargs(cwd)
        invocation = client.run(context=context, extras={"request": request}, **kwargs)
        results = invocation.get_results()
        if not results:
            raise RuntimeError("the pipes training process reported no result")
        meta = results[-1].metadata
        return {k: v.value for k, v in meta.items()}

"""One training run as a plain request -> result function, runnable in-process or in another process
(Dagster Pipes: a subprocess here, a Kubernetes pod on a GPU node pool). No Dagster import.

The request is JSON-serialisable: where the balanced dataset is, the model spec, the training
config, where to write checkpoints, and the MLflow run to log into.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from skulens import datasets


class MlflowStepLogger:
    """A train() log_fn that sends per-step loss and per-epoch validation accuracy to an MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 20, echo: Callable[[str], None] | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self.echo = echo
        self._buf = []

    def __call__(self, kind: str, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and value is not None and key not in ("epoch", "step"):
                name = f"train/{key}" if kind == "step" else f"val/{key}" if key.startswith("val") else f"epoch/{key}"
                self._buf.append(Metric(name, float(value), ts, int(step)))
        if kind == "epoch":
            if self.echo:
                self.echo(f"epoch {metrics.get('epoch')}: " + ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
            self.flush()
        elif len(self._buf) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buf), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=self._buf[i:i + 900])
        self._buf = []


def _restore_eval_size(encoder_path, spec) -> dict:
    """Training may run at a smaller size (CNN towers are size-agnostic); evaluation and the index
    use the model's own input size, so the saved encoder keeps that one."""
    import dataclasses

    from skulens.models.factory import create_encoder
    from skulens.models.io import load_encoder, save_encoder

    enc = load_encoder(encoder_path)
    want = spec.image_size or create_encoder(spec, load_weights=False).spec.image_size
    if want and enc.spec.image_size != want:
        enc.spec = dataclasses.replace(enc.spec, image_size=int(want))
        save_encoder(enc, encoder_path)
    return enc.spec.to_dict()


def run_training(request: dict, echo: Callable[[str], None] | None = None) -> dict:
    """Train from a request dict; returns a JSON-serialisable summary (encoder path, metrics, device)."""
    from skulens.models.factory import ModelSpec
    from skulens.train import TrainConfig, train

    train_df, val_df = datasets.read_balanced(Path(request["balanced_dir"]), Path(request["clean_dir"]))
    spec = ModelSpec.from_dict(request["spec"])
    cfg = TrainConfig(**request["config"])
    log_fn = None
    if request.get("mlflow_uri") and request.get("mlflow_run_id"):
        log_fn = MlflowStepLogger(request["mlflow_uri"], request["mlflow_run_id"], echo=echo)
    t0 = time.perf_counter()
    result = train(train_df, val_df, spec, cfg, out_dir=request["out_dir"], log_fn=log_fn,
                   progress=request.get("progress", True), device=request.get("device"), resume=True)
    if log_fn:
        log_fn.flush()
    final_spec = _restore_eval_size(result.encoder_path, spec)
    val = [v for v in result.val_acc if v is not None]
    return {
        "encoder_path": str(result.encoder_path),
        "checkpoint_path": str(result.checkpoint_path),
        "steps": int(result.steps),
        "val_acc_before": result.val_acc_before,
        "val_acc": val[-1] if val else None,
        "val_acc_per_epoch": val,
        "images_per_s": round(float(result.images_per_s), 2),
        "device": str(result.device),
        "seconds": round(time.perf_counter() - t0, 1),
        "spec": final_spec,
        "skus": len(result.labels),
        "balanced_rows": int(result.extra["balanced_rows"]),
        "augmented_rows": int(result.extra["augmented_rows"]),
    }

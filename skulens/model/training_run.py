"""One training run as a plain request -> result function, runnable in-process or in another process
(Dagster Pipes: a subprocess here, a Kubernetes pod on a GPU node pool). No Dagster import.

The request is JSON-serialisable and holds no local path another machine could not open:

* ``dataset``: ``{uri, sha256}`` of the balanced training set in S3 (:mod:`skulens.data.bundles`), fetched
  and verified into ``out_dir``; ``s3_endpoint`` says where (keys come from the environment:
  ``SKULENS_S3_ACCESS_KEY_ID`` / ``SKULENS_S3_SECRET_ACCESS_KEY``). In-process training may pass
  ``balanced_dir`` / ``clean_dir`` instead (the same machine: no copy).
* ``spec``, ``config``: the model and the training knobs; ``out_dir``: checkpoints (relative to the
  process's working directory when relative), so a restarted process resumes.
* ``mlflow_uri``, ``mlflow_run_id``: the run to log into; the trained encoder is uploaded to it as
  ``encoder/encoder.pt`` and the result names it by URI and sha256 (``encoder_uri``,
  ``encoder_sha256``): later assets load it with :class:`skulens.registry.store.ModelStore`, wherever
  they run. Without MLflow (benchmarks) ``encoder_uri`` is the local file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from skulens.data import layout


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

    from skulens.model.factory import create_encoder
    from skulens.model.io import load_encoder, save_encoder

    enc = load_encoder(encoder_path)
    want = spec.image_size or create_encoder(spec, load_weights=False).spec.image_size
    if want and enc.spec.image_size != want:
        enc.spec = dataclasses.replace(enc.spec, image_size=int(want))
        save_encoder(enc, encoder_path)
    return enc.spec.to_dict()


def run_training(request: dict, echo: Callable[[str], None] | None = None) -> dict:
    """Train from a request dict; returns a JSON-serialisable summary (encoder path, metrics, device)."""
    from skulens.model.factory import ModelSpec
    from skulens.model.train import TrainConfig, train

    out_dir = Path(request.get("out_dir") or "skulens-train").resolve()
    train_df, val_df = layout.read_balanced(*_dataset_dirs(request, out_dir))
    spec = ModelSpec.from_dict(request["spec"])
    cfg = TrainConfig(**request["config"])
    log_fn = None
    if request.get("mlflow_uri") and request.get("mlflow_run_id"):
        log_fn = MlflowStepLogger(request["mlflow_uri"], request["mlflow_run_id"], echo=echo)
    t0 = time.perf_counter()
    result = train(train_df, val_df, spec, cfg, out_dir=out_dir, log_fn=log_fn,
                   progress=request.get("progress", True), device=request.get("device"), resume=True)
    if log_fn:
        log_fn.flush()
    final_spec = _restore_eval_size(result.encoder_path, spec)
    val = [v for v in result.val_acc if v is not None]
    from skulens.registry.store import file_sha256

    sha = file_sha256(result.encoder_path)
    uri = str(result.encoder_path)
    if request.get("mlflow_uri") and request.get("mlflow_run_id"):
        uri = upload_encoder(request["mlflow_uri"], request["mlflow_run_id"], result.encoder_path)
    return {
        "encoder_uri": uri,
        "encoder_sha256": sha,
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


def _dataset_dirs(request: dict, out_dir: Path) -> tuple[Path, Path]:
    """(balanced_dir, clean_dir): the local folders when given and present, else the fetched bundle."""
    local = request.get("balanced_dir"), request.get("clean_dir")
    if all(local) and Path(local[0]).is_dir() and Path(local[1]).is_dir():
        return Path(local[0]), Path(local[1])
    ds = request.get("dataset") or {}
    if not ds.get("uri") or not ds.get("sha256"):
        raise ValueError("the training request names no dataset this process can read: give dataset={uri, sha256} "
                         "(an S3 bundle from the balanced_dataset asset) or local balanced_dir/clean_dir")
    from skulens.catalog.s3 import client_from_env
    from skulens.data import bundles

    client = client_from_env(request.get("s3_endpoint"), request.get("s3_region"))
    return bundles.fetch(client, ds["uri"], ds["sha256"], out_dir / "datasets")


def upload_encoder(tracking_uri: str, run_id: str, encoder_path) -> str:
    """Log the encoder (and its spec sidecar) to the run: its ``runs:/`` URI (skulens.registry.model_registry.log_encoder)."""
    from mlflow.tracking import MlflowClient

    from skulens.registry.model_registry import log_encoder

    return log_encoder(MlflowClient(tracking_uri), run_id, encoder_path)


def should_train(train_df, min_skus: int, min_images: int) -> tuple[bool, str]:
    """Does fine-tuning pay on these training classes? ``(train, reason)``. Below ``min_skus`` SKUs or
    ``min_images`` distinct images ArcFace has too little to learn from (a packshot-only catalog has
    no training class at all): the job then indexes every SKU with the champion, or the base tower."""
    n_skus = int(train_df["sku"].nunique()) if len(train_df) else 0
    n_images = int(train_df["clean_path"].nunique()) if len(train_df) else 0
    if n_skus >= min_skus and n_images >= min_images:
        return True, f"{n_skus} training SKUs, {n_images} images"
    return False, (f"training skipped: {n_skus} SKU(s) with enough images to train on ({n_images} distinct images); "
                   f"fine-tuning needs >= {min_skus} SKUs and >= {min_images} images (TrainSettings min_train_skus / "
                   "min_train_images; a SKU needs clean min_images_per_sku images to be a training class)")


def save_base_tower(spec_dict: dict, seed: int, path) -> Path:
    """The un-fine-tuned tower of ``spec_dict`` (torch seeded with ``seed``, as the evaluation's base
    model is) saved as an encoder file: the first model when there is nothing to fine-tune on."""
    import torch

    from skulens.model.factory import ModelSpec, create_encoder
    from skulens.model.io import save_encoder

    torch.manual_seed(int(seed))
    return save_encoder(create_encoder(ModelSpec.from_dict(spec_dict), device="cpu"), Path(path))

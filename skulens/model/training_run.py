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

import collections
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from skulens.data import layout

log = logging.getLogger(__name__)

#: the training metrics a process could not send (MLflow down), next to the checkpoint; sent by the next attempt
UNSENT_METRICS = "unsent-metrics.json"


class MlflowLoggingError(RuntimeError):
    """MLflow stayed unreachable (or failing) at the end of training: the training metrics (or the encoder)
    could not be sent. The checkpoint and the unsent metrics are kept on disk; a retry resumes and sends them."""


class MlflowStepLogger:
    """A train() log_fn that sends per-step loss and per-epoch validation accuracy to an MLflow run.

    An MLflow outage (connection refused or reset, timeout, 5xx) does not stop training: metrics stay
    buffered in memory (at most ``max_buffer``; beyond that the oldest are dropped and counted), one
    warning per outage goes to ``echo`` and the log, and the next flush (at most every
    ``retry_every_s`` while MLflow is down) sends them. At every checkpoint the metrics not sent yet are
    written to ``spool_path`` (with the run id), so a process killed during an outage loses none:
    the next logger on the same ``spool_path`` sends them first. :meth:`close` (the end of training)
    retries for up to ``final_retry_s`` with a growing backoff and then raises
    :class:`MlflowLoggingError`. A request MLflow refuses (4xx) still raises at once. Each MLflow call
    is bounded by ``timeout_s`` and ``retries`` (MLflow's own default retries for minutes)."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 20, echo: Callable[[str], None] | None = None,
                 max_buffer: int = 100_000, spool_path=None, final_retry_s: float = 60.0,
                 retry_every_s: float = 15.0, timeout_s: float = 10.0, retries: int = 1):
        from mlflow.tracking import MlflowClient

        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = MlflowClient(tracking_uri)
        self.flush_every = flush_every
        self.echo = echo
        self.max_buffer = int(max_buffer)
        self.spool_path = Path(spool_path) if spool_path else None
        self.final_retry_s, self.retry_every_s = float(final_retry_s), float(retry_every_s)
        self.timeout_s, self.retries = float(timeout_s), int(retries)
        self._buf: collections.deque = collections.deque()  # (run_id, Metric)
        self.sent = 0  # metrics delivered
        self.dropped = 0  # metrics dropped because the buffer was full during an outage
        self.outages = 0
        self._down_since: float | None = None
        self._last_try = 0.0
        self._load_spool()

    # ------------------------------------------------------------------ train() callback
    def __call__(self, kind: str, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        if kind == "checkpoint":  # what was logged so far is in the checkpoint: send it or keep it on disk
            self.flush()
            self._write_spool()
            return
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and value is not None and key not in ("epoch", "step"):
                name = f"train/{key}" if kind == "step" else f"val/{key}" if key.startswith("val") else f"epoch/{key}"
                self._buf.append((self.run_id, Metric(name, float(value), ts, int(step))))
        while len(self._buf) > self.max_buffer:
            self._buf.popleft()
            self.dropped += 1
            if self.dropped == 1:
                self._say(f"MLflow metrics buffer full ({self.max_buffer}): dropping the oldest step metrics "
                          "until MLflow is back")
        if kind == "epoch":
            if self.echo:
                self.echo(f"epoch {metrics.get('epoch')}: " + ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
            self.flush()
        elif len(self._buf) >= self.flush_every:
            self.flush()

    @property
    def pending(self) -> int:
        """Metrics not sent yet."""
        return len(self._buf)

    # ------------------------------------------------------------------ sending
    def _send(self) -> None:
        """Send the buffer in batches (MLflow caps a batch at 1000 metrics); what went out leaves the buffer."""
        from skulens.registry.store import bounded_http

        with bounded_http(self.timeout_s, self.retries):
            while self._buf:
                run_id = self._buf[0][0]
                batch = []
                for rid, m in self._buf:
                    if rid != run_id or len(batch) >= 900:
                        break
                    batch.append(m)
                self.client.log_batch(run_id, metrics=batch)
                for _ in batch:
                    self._buf.popleft()
                self.sent += len(batch)

    def flush(self) -> bool:
        """Send what is buffered. True when the buffer is empty afterwards; False (no exception) when MLflow
        is down: the metrics stay buffered for the next flush."""
        from skulens.registry.store import transient_mlflow_error

        if not self._buf:
            return True
        now = time.monotonic()
        if self._down_since is not None and now - self._last_try < self.retry_every_s:
            return False  # still down a moment ago: do not stall training on every step
        self._last_try = now
        try:
            self._send()
        except Exception as e:
            if not transient_mlflow_error(e):
                raise
            self._outage(e)
            return False
        self._back()
        if self.spool_path is not None and self.spool_path.exists():  # everything it held is sent now
            self.spool_path.unlink(missing_ok=True)
        return True

    def close(self, checkpoint_dir=None) -> None:
        """The end of training: send everything, retrying up to ``final_retry_s``; then raise
        :class:`MlflowLoggingError` (the unsent metrics go to ``spool_path`` first)."""
        from skulens.registry.store import transient_mlflow_error

        deadline = time.monotonic() + self.final_retry_s
        delay = 0.5
        while True:
            try:
                self._send()
                self._back()
                self._write_spool()  # nothing left: removes it
                return
            except Exception as e:
                if not transient_mlflow_error(e):
                    raise
                self._outage(e)
                cause = e
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)
        self._write_spool()
        where = f" in {checkpoint_dir}" if checkpoint_dir else ""
        kept = f"; they are kept in {self.spool_path}" if self.spool_path else ""
        raise MlflowLoggingError(
            f"MLflow at {_redact(self.tracking_uri)} is unreachable: {self.pending} training metrics of run "
            f"{self.run_id} could not be logged after retrying for {self.final_retry_s:.0f}s "
            f"({_short(cause)}){kept}. The training checkpoint{where} is kept: re-run the "
            "step once MLflow is up; it resumes from the checkpoint (no retraining) and sends them.") from cause

    # ------------------------------------------------------------------ outage bookkeeping
    def _say(self, text: str) -> None:
        log.warning(text)
        if self.echo:
            self.echo(text)

    def _outage(self, e: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.outages += 1
            self._say(f"MLflow at {_redact(self.tracking_uri)} is unreachable ({_short(e)}); "
                      f"training continues, {self.pending} metrics are buffered (at most {self.max_buffer}) and "
                      "sent when it is back")

    def _back(self) -> None:
        if self._down_since is not None:
            secs = time.monotonic() - self._down_since
            self._down_since = None
            lost = f"; {self.dropped} of the oldest were dropped (buffer full)" if self.dropped else ""
            self._say(f"MLflow at {_redact(self.tracking_uri)} is back after {secs:.0f}s: buffered metrics sent{lost}")

    # ------------------------------------------------------------------ the spool (unsent metrics on disk)
    def _write_spool(self) -> None:
        if self.spool_path is None:
            return
        if not self._buf:
            self.spool_path.unlink(missing_ok=True)
            return
        rows = [[rid, m.key, m.value, m.timestamp, m.step] for rid, m in self._buf]
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool_path.with_name(f".{self.spool_path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"format": "skulens-unsent-metrics/1", "metrics": rows}))
        os.replace(tmp, self.spool_path)

    def _load_spool(self) -> None:
        if self.spool_path is None or not self.spool_path.is_file():
            return
        from mlflow.entities import Metric

        try:
            rows = json.loads(self.spool_path.read_text())["metrics"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s is not readable: ignoring it", self.spool_path)
            return
        self._buf.extend((rid, Metric(k, float(v), int(ts), int(st))) for rid, k, v, ts, st in rows)
        log.info("%d training metrics not sent by an earlier attempt: sending them first", len(rows))


def _redact(uri) -> str:
    from skulens.registry.model_registry import _redact as redact

    return redact(uri)


def _short(e: BaseException) -> str:
    from skulens.registry.store import mlflow_error_text

    return _redact(mlflow_error_text(e))


def _restore_eval_size(encoder_path, spec) -> dict:
    """Training may run at a smaller size (CNN towers are size-agnostic); evaluation and the index
    use the model's own input size, so the saved encoder keeps that one, and the multi-scale
    inference sizes (``spec.scales``), which training does not use."""
    from skulens.model.factory import create_encoder
    from skulens.model.io import load_encoder, save_encoder

    enc = load_encoder(encoder_path)
    want = spec.image_size or create_encoder(spec, load_weights=False).spec.image_size
    if (want and enc.spec.image_size != want) or enc.spec.scales != spec.scales:
        enc.spec = dataclasses.replace(enc.spec, image_size=int(want or enc.spec.image_size), scales=spec.scales)
        save_encoder(enc, encoder_path)
    return enc.spec.to_dict()


def saved_val_acc(result) -> float | None:
    """Validation accuracy of the weights that were saved: the best epoch's with ``keep_best``, the last
    validated epoch's otherwise (EMA weights are what is validated), None for a WiSE-FT mix (never
    validated) or when nothing was validated."""
    saved = str(result.extra.get("saved_weights") or "last")
    if "WiSE-FT" in saved:
        return None
    if saved.startswith("best"):
        return result.extra.get("best_val_acc")
    val = [v for v in result.val_acc if v is not None]
    return val[-1] if val else None


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
        log_fn = MlflowStepLogger(request["mlflow_uri"], request["mlflow_run_id"], echo=echo,
                                  spool_path=out_dir / UNSENT_METRICS, **(request.get("mlflow_logger") or {}))
    t0 = time.perf_counter()
    # the loop trains and validates the single-scale tower; multi-scale is put back on the saved encoder
    result = train(train_df, val_df, dataclasses.replace(spec, scales=()), cfg, out_dir=out_dir, log_fn=log_fn,
                   progress=request.get("progress", True), device=request.get("device"), resume=True)
    if log_fn:
        log_fn.close(checkpoint_dir=out_dir)
    final_spec = _restore_eval_size(result.encoder_path, spec)
    val = [v for v in result.val_acc if v is not None]
    from skulens.registry.store import file_sha256

    sha = file_sha256(result.encoder_path)
    uri = str(result.encoder_path)
    if request.get("mlflow_uri") and request.get("mlflow_run_id"):
        uri = _upload_or_fail(request["mlflow_uri"], request["mlflow_run_id"], result.encoder_path, out_dir,
                              **{k: v for k, v in (request.get("mlflow_logger") or {}).items()
                                 if k in ("timeout_s", "retries", "final_retry_s")})
    return {
        "encoder_uri": uri,
        "encoder_sha256": sha,
        "steps": int(result.steps),
        "resumed_from_step": int(result.resumed_from_step),
        "val_acc_before": result.val_acc_before,
        "val_acc": saved_val_acc(result),  # of the saved weights (keep_best: the best epoch's)
        "val_acc_last": val[-1] if val else None,
        "val_acc_per_epoch": val,
        "images_per_s": round(float(result.images_per_s), 2),
        "device": str(result.device),
        "seconds": round(time.perf_counter() - t0, 1),
        "spec": final_spec,
        "skus": len(result.labels),
        "balanced_rows": int(result.extra["balanced_rows"]),
        "augmented_rows": int(result.extra["augmented_rows"]),
        "saved_weights": result.extra.get("saved_weights"),
        "best_epoch": result.extra.get("best_epoch"),
        "best_val_acc": result.extra.get("best_val_acc"),
        "stopped_early": result.extra.get("stopped_early"),
        "speed": {k: result.extra.get(k) for k in ("num_workers", "channels_last", "fused_optimizer", "torch_threads",
                                                    "decode_cache_s", "decode_cache_mb")},
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


def _upload_or_fail(tracking_uri: str, run_id: str, encoder_path, out_dir, timeout_s: float = 10.0,
                    retries: int = 1, final_retry_s: float = 60.0) -> str:
    """:func:`upload_encoder`, bounded, retried up to ``final_retry_s``, then one clear :class:`MlflowLoggingError`."""
    from skulens.registry.store import bounded_http, transient_mlflow_error

    deadline, delay = time.monotonic() + final_retry_s, 0.5
    while True:
        try:
            with bounded_http(timeout_s, retries):
                return upload_encoder(tracking_uri, run_id, encoder_path)
        except Exception as e:
            if not transient_mlflow_error(e):
                raise
            cause = e
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(delay, left))
        delay = min(delay * 2, 10.0)
    raise MlflowLoggingError(
        f"MLflow at {_redact(tracking_uri)} is unreachable: the trained encoder could not be uploaded to run {run_id} "
        f"({_short(cause)}). The trained encoder and checkpoint in {out_dir} are kept: re-run "
        "the step once MLflow is up; it resumes at the last step (no retraining) and uploads it.") from cause


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

"""MLflow 3.x model registry helpers: log + register encoders, aliases ``challenger``/``champion``.

Registry stages are deprecated since MLflow 2.9; this module only uses aliases:

* ``challenger`` - set on every newly registered version,
* ``champion``   - the version that serves; moved only by :func:`promote`,
* ``previous-champion`` - the champion before the last promotion (for rollback).

The encoder file(s) are logged as plain run artifacts under ``encoder/`` (the file written by
``skulens.model.io.save_encoder``); each version is tagged with the file's sha256 and URI, and
:class:`skulens.registry.store.ModelStore` is the one place that downloads, verifies and caches them.
Secrets never go to MLflow: parameter, tag and lineage keys that look like credentials are dropped and
URLs with embedded credentials are redacted.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
ARTIFACT_DIR = "encoder"

_SECRET_KEY = re.compile(
    r"(secret|passw(or)?d|passwd|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth|session)",
    re.IGNORECASE,
)
_URL_CREDS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<creds>[^/@\s:]+:[^/@\s]+)@")


def _redact(value) -> str:
    return _URL_CREDS.sub(lambda m: f"{m.group('scheme')}***@", str(value))


def _safe(d: dict | None, max_len: int) -> dict[str, str]:
    """Drop secret-looking keys, redact credentials in URLs, stringify and truncate values."""
    out = {}
    for k, v in (d or {}).items():
        if _SECRET_KEY.search(str(k)):
            continue
        if isinstance(v, (dict, list, tuple)):
            v = json.dumps(v, sort_keys=True, default=str)
        out[str(k)] = _redact(v)[:max_len]
    return out


def _client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is_not_found(err) -> bool:
    code = getattr(err, "error_code", "") or ""
    return "RESOURCE_DOES_NOT_EXIST" in code or "NOT_FOUND" in code or "does not exist" in str(err).lower() \
        or "not found" in str(err).lower()


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the MLflow UI's ML (not GenAI) view


def experiment_id(client, name: str) -> str:
    """The experiment ``name`` (created if missing), tagged as a machine-learning experiment."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
        except Exception:  # created concurrently
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if (exp.tags or {}).get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id



def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if not _is_not_found(e):
            raise
        try:
            client.create_registered_model(name, description="skulens product image encoder")
        except MlflowException as e2:  # created concurrently
            if "ALREADY_EXISTS" not in (getattr(e2, "error_code", "") or ""):
                raise


def log_and_register(
    tracking_uri: str,
    model_name: str,
    encoder_path: str | os.PathLike,
    metrics: dict | None = None,
    params: dict | None = None,
    tags: dict | None = None,
    lineage: dict | None = None,
    experiment: str | None = None,
    run_id: str | None = None,
) -> str:
    """Log the encoder as an MLflow pyfunc model with metrics, params, tags and lineage, register it as a new
    version of ``model_name`` and point the ``challenger`` alias at it. Returns the version (str).

    With ``run_id`` (the training run) everything goes into that run, so the version's source run is the run
    with the training curves; parameters it already has are kept (MLflow parameters are immutable). Without
    it a new run is created. ``encoder_path`` is a file (logged as the pyfunc model ``model/``) or a
    directory (logged as is). ``lineage`` (data/catalog versions, index version, eval-set fingerprint, git
    sha, ...) is stored as run and model-version tags ``lineage.<key>`` and as ``lineage.json``.
    ``experiment`` defaults to ``model_name``.
    """
    from mlflow.entities import Metric, Param

    encoder_path = Path(encoder_path)
    if not encoder_path.exists():
        raise FileNotFoundError(encoder_path)
    client = _client(tracking_uri)
    safe_tags = _safe(tags, 5000)
    safe_lineage = _safe(lineage, 5000)
    run_tags = {**safe_tags, **{f"lineage.{k}": v for k, v in safe_lineage.items()},
                "skulens.model_name": model_name, "skulens.encoder_file": encoder_path.name}
    own_run = run_id is None
    if own_run:
        run = client.create_run(experiment_id(client, experiment or model_name), tags=run_tags,
                                run_name=safe_tags.get("run_name"))
        run_id = run.info.run_id
    else:  # the training run: keep its name and stage, add the registration's tags and unset params
        run = client.get_run(run_id)
        from mlflow.entities import RunTag

        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items() if k not in ("run_name", "skulens.stage")])
        params = {k: v for k, v in (params or {}).items() if k not in run.data.params}
    artifact_dir = "model" if encoder_path.is_file() else ARTIFACT_DIR
    try:
        now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
        ms = []
        for k, v in (metrics or {}).items():
            try:
                fv = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(fv):
                ms.append(Metric(str(k), fv, now_ms, 0))
        ps = [Param(k, v) for k, v in _safe(params, 6000).items()]
        client.log_batch(run_id, metrics=ms, params=ps, tags=[])
        if encoder_path.is_dir():
            client.log_artifacts(run_id, str(encoder_path), artifact_dir)
        else:  # an MLflow pyfunc model (MLmodel, signature, input example) holding the encoder file
            from skulens.registry.pyfunc import save_pyfunc

            with tempfile.TemporaryDirectory() as td:
                client.log_artifacts(run_id, str(save_pyfunc(encoder_path, Path(td) / artifact_dir)), artifact_dir)
        with tempfile.TemporaryDirectory() as td:
            lp = Path(td) / "lineage.json"
            lp.write_text(json.dumps(safe_lineage, indent=2, sort_keys=True))
            client.log_artifact(run_id, str(lp))
        if own_run:
            client.set_terminated(run_id, "FINISHED")
    except BaseException:
        if own_run:
            client.set_terminated(run_id, "FAILED")
        raise

    _ensure_registered_model(client, model_name)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_dir}"
    version_tags = {**{f"lineage.{k}": v for k, v in safe_lineage.items()},
                    "skulens.encoder_file": encoder_path.name if encoder_path.is_file() else ""}
    if encoder_path.is_file():  # what skulens.registry.store needs to fetch and verify it anywhere
        from skulens.registry.store import SHA_TAG, URI_TAG, file_sha256

        version_tags[SHA_TAG] = file_sha256(encoder_path)
        version_tags[URI_TAG] = f"{source}/artifacts/{encoder_path.name}"  # inside the pyfunc model folder
    mv = client.create_model_version(model_name, source=source, run_id=run_id, tags=version_tags)
    client.set_registered_model_alias(model_name, CHALLENGER, mv.version)
    return str(mv.version)


def log_encoder(client, run_id: str, encoder_path: str | os.PathLike) -> str:
    """Log an encoder file and its spec sidecar (``<file>.json``, written by save_encoder) to the run
    under ``encoder/``; returns its ``runs:/`` URI."""
    encoder_path = Path(encoder_path)
    client.log_artifact(run_id, str(encoder_path), ARTIFACT_DIR)
    sidecar = encoder_path.with_name(encoder_path.name + ".json")
    if sidecar.is_file():
        client.log_artifact(run_id, str(sidecar), ARTIFACT_DIR)
    return f"runs:/{run_id}/{ARTIFACT_DIR}/{encoder_path.name}"


def _version_by_alias(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        if _is_not_found(e) or "alias" in str(e).lower():
            return None
        raise


def version_metrics(tracking_uri: str, model_name: str, version: str) -> dict:
    """Run metrics of a model version, plus ``eval_set`` (str) if its lineage recorded one."""
    client = _client(tracking_uri)
    mv = client.get_model_version(model_name, str(version))
    return _metrics_of(client, mv)


def _metrics_of(client, mv) -> dict:
    metrics: dict = dict(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    eval_set = (mv.tags or {}).get("lineage.eval_set")
    if eval_set:
        metrics["eval_set"] = eval_set
    return metrics


def get_champion(tracking_uri: str, model_name: str) -> tuple[str, dict] | None:
    """``(version, metrics)`` of the version with alias ``champion``, or ``None`` if there is none
    (or the model is not registered yet). ``metrics`` holds the run's metrics and, if recorded, the
    ``eval_set`` fingerprint (str) of the crops they were measured on."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        mv = _version_by_alias(client, model_name, CHAMPION)
    except MlflowException as e:
        if _is_not_found(e):
            return None
        raise
    if mv is None:
        return None
    return str(mv.version), _metrics_of(client, mv)


def promote(tracking_uri: str, model_name: str, version: str, reason: str | None = None) -> str | None:
    """Move the ``champion`` alias to ``version``. The old champion (returned, or ``None``) gets the
    ``previous-champion`` alias. Records ``promoted_at`` (and ``promotion_reason``) version tags."""
    client = _client(tracking_uri)
    version = str(version)
    client.get_model_version(model_name, version)  # fails loudly if it does not exist
    old = _version_by_alias(client, model_name, CHAMPION)
    old_version = str(old.version) if old is not None else None
    if old_version == version:
        return old_version
    if old_version is not None:
        client.set_registered_model_alias(model_name, PREVIOUS, old_version)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    client.set_model_version_tag(model_name, version, "promoted_at",
                                 datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if reason:
        client.set_model_version_tag(model_name, version, "promotion_reason", _redact(reason)[:5000])
    return old_version

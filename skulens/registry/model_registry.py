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

Failures (MLflow down, 5xx, a lost answer). Every MLflow call is bounded (seconds, not MLflow's default
minutes of retries) and a failure raises one :class:`RegistrationError` naming the MLflow URI and the step.
A retry of the same registration is safe and completes the same version:

* a version is found again by its training run and encoder sha256 (never a second version for the same
  run and file; the "create" request is sent without client retries, so a lost answer cannot create two);
* a version carries ``skulens.registration=pending`` until everything about it is recorded, then
  ``complete``; aliases only ever name complete versions, readers (:mod:`skulens.registry.store`) refuse
  pending ones;
* the ``champion`` alias is the commit point: the decision and its tags are written before it moves,
  and it moves last (``previous-champion`` just before it).
"""

from __future__ import annotations

import contextlib
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


class RegistrationError(RuntimeError):
    """Registering or promoting a model version failed because of MLflow (down, 5xx, no answer, refused).

    ``step`` says what was being done; ``version`` is the version concerned (None before it existed);
    ``promoted`` is True when the failure came after the champion alias had moved to ``version``."""

    def __init__(self, message: str, tracking_uri: str, step: str, version: str | None = None,
                 promoted: bool = False):
        super().__init__(message)
        self.tracking_uri, self.step, self.version, self.promoted = _redact(tracking_uri), step, version, promoted


class _Steps:
    """Names the step each MLflow call belongs to and turns an MLflow failure into one RegistrationError."""

    def __init__(self, tracking_uri: str, model_name: str):
        self.tracking_uri, self.model_name = tracking_uri, model_name
        self.version: str | None = None
        self.promoted = False  # the champion alias names ``version`` already
        self.uncertain = False  # the champion alias move got no answer and MLflow cannot be asked

    @contextlib.contextmanager
    def step(self, what: str):
        try:
            yield
        except RegistrationError:
            raise
        except Exception as e:  # noqa: BLE001 - only MLflow / connection failures are converted
            if not _is_mlflow_failure(e):
                raise
            raise self.error(what, e) from e

    def error(self, what: str, cause: BaseException) -> RegistrationError:
        from skulens.registry.store import mlflow_error_text, transient_mlflow_error

        uri = _redact(self.tracking_uri)
        version = f" v{self.version}" if self.version else ""
        how = "did not answer" if transient_mlflow_error(cause) else "refused the request"
        text = _redact(mlflow_error_text(cause, 300))
        if self.promoted:
            tail = (f"v{self.version} is already the champion (the alias moved); re-run the step: a retry treats "
                    "it as promoted and finishes recording it")
        elif self.uncertain:
            tail = (f"the champion alias may or may not name v{self.version} now (no answer); re-run the step: a "
                    "retry finishes the promotion either way")
        else:
            tail = ("nothing was promoted; re-run the step (the champion alias is unchanged; a retry completes "
                    f"the same version{version or ''} instead of registering another)")
        return RegistrationError(f"MLflow at {uri} {how} while {what} for {self.model_name}{version}: "
                                 f"{text}. {tail}", self.tracking_uri, what,
                                 self.version, self.promoted)


def _is_mlflow_failure(e: BaseException) -> bool:
    """An error of the MLflow client or of the connection to the server (a local error stays what it is)."""
    from mlflow.exceptions import MlflowException

    from skulens.registry.store import _connection_error

    return isinstance(e, MlflowException) or _connection_error(e)


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
    complete: bool = True,
    timeout_s: float = 10.0,
    retries: int = 2,
    _steps: "_Steps | None" = None,
) -> str:
    """Log the encoder as an MLflow pyfunc model with metrics, params, tags and lineage, register it as a new
    version of ``model_name`` and point the ``challenger`` alias at it. Returns the version (str).

    With ``run_id`` (the training run) everything goes into that run, so the version's source run is the run
    with the training curves; parameters it already has are kept (MLflow parameters are immutable). Without
    it a new run is created. ``encoder_path`` is a file (logged as the pyfunc model ``model/``) or a
    directory (logged as is). ``lineage`` (data/catalog versions, index version, eval-set fingerprint, git
    sha, ...) is stored as run and model-version tags ``lineage.<key>`` and as ``lineage.json``.
    ``experiment`` defaults to ``model_name``.

    Retried with the same ``run_id`` and encoder file (after a failure, or re-materialized), it returns the
    version it registered before instead of a second one. With ``complete=False`` the version stays
    ``skulens.registration=pending`` and no alias is set (:func:`skulens.registry.promotion.register_and_decide`
    finishes it). MLflow calls are bounded by ``timeout_s`` / ``retries``; a failure raises
    :class:`RegistrationError`.
    """
    from skulens.registry.store import bounded_http

    encoder_path = Path(encoder_path)
    if not encoder_path.exists():
        raise FileNotFoundError(encoder_path)
    steps = _steps or _Steps(tracking_uri, model_name)
    with bounded_http(timeout_s, retries):
        version = _log_and_register(steps, tracking_uri, model_name, encoder_path, metrics, params, tags, lineage,
                                    experiment, run_id, timeout_s)
        steps.version = version
        if complete:
            client = _client(tracking_uri)
            with steps.step("marking the version complete"):
                _mark_complete(client, model_name, version)
            with steps.step("setting the challenger alias"):
                client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def _log_and_register(steps, tracking_uri, model_name, encoder_path: Path, metrics, params, tags, lineage,
                      experiment, run_id, timeout_s) -> str:
    from mlflow.entities import Metric, Param, RunTag

    from skulens.registry.store import REGISTRATION_PENDING, REGISTRATION_TAG, SHA_TAG, URI_TAG, file_sha256

    client = _client(tracking_uri)
    safe_tags = _safe(tags, 5000)
    safe_lineage = _safe(lineage, 5000)
    run_tags = {**safe_tags, **{f"lineage.{k}": v for k, v in safe_lineage.items()},
                "skulens.model_name": model_name, "skulens.encoder_file": encoder_path.name}
    artifact_dir = "model" if encoder_path.is_file() else ARTIFACT_DIR
    sha = file_sha256(encoder_path) if encoder_path.is_file() else None
    own_run = run_id is None
    existing = None
    if own_run:
        with steps.step("creating the registration run"):
            run = client.create_run(experiment_id(client, experiment or model_name), tags=run_tags,
                                    run_name=safe_tags.get("run_name"))
        run_id = run.info.run_id
    else:  # the training run: keep its name and stage, add the registration's tags and unset params
        with steps.step("logging tags to the training run"):
            run = client.get_run(run_id)
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items()
                                           if k not in ("run_name", "skulens.stage")])
        params = {k: v for k, v in (params or {}).items() if k not in run.data.params}
        with steps.step("looking for this run's model version"):  # a retry: the version exists already?
            existing = _find_version(client, model_name, run_id, sha, f"{run.info.artifact_uri.rstrip('/')}/{artifact_dir}")
    try:
        now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
        ms = []
        for k, v in (metrics or {}).items():
            try:
                fv = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(fv) and run.data.metrics.get(str(k)) != fv:  # a retry logs no duplicate points
                ms.append(Metric(str(k), fv, now_ms, 0))
        ps = [Param(k, v) for k, v in _safe(params, 6000).items()]
        with steps.step("logging metrics and parameters"):
            client.log_batch(run_id, metrics=ms, params=ps, tags=[])
        if existing is None:  # an existing version's artifacts were uploaded before it was created
            with steps.step("uploading the model artifacts"):
                if encoder_path.is_dir():
                    client.log_artifacts(run_id, str(encoder_path), artifact_dir)
                else:  # an MLflow pyfunc model (MLmodel, signature, input example) holding the encoder file
                    from skulens.registry.pyfunc import save_pyfunc

                    with tempfile.TemporaryDirectory() as td:
                        client.log_artifacts(run_id, str(save_pyfunc(encoder_path, Path(td) / artifact_dir)),
                                             artifact_dir)
        with steps.step("uploading lineage.json"):
            with tempfile.TemporaryDirectory() as td:
                lp = Path(td) / "lineage.json"
                lp.write_text(json.dumps(safe_lineage, indent=2, sort_keys=True))
                client.log_artifact(run_id, str(lp))
        if own_run:
            with steps.step("finishing the registration run"):
                client.set_terminated(run_id, "FINISHED")
    except BaseException:
        if own_run:
            with contextlib.suppress(Exception):  # MLflow may be the reason we are here
                client.set_terminated(run_id, "FAILED")
        raise

    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_dir}"
    version_tags = {**{f"lineage.{k}": v for k, v in safe_lineage.items()},
                    "skulens.encoder_file": encoder_path.name if encoder_path.is_file() else ""}
    if sha:  # what skulens.registry.store needs to fetch and verify it anywhere
        version_tags[SHA_TAG] = sha
        version_tags[URI_TAG] = f"{source}/artifacts/{encoder_path.name}"  # inside the pyfunc model folder
    if existing is not None:
        steps.version = str(existing.version)
        with steps.step("updating the model version's tags"):
            for k, v in version_tags.items():
                if (existing.tags or {}).get(k) != v:
                    client.set_model_version_tag(model_name, existing.version, k, v)
        return str(existing.version)
    with steps.step("registering the model"):
        _ensure_registered_model(client, model_name)
    with steps.step("creating model version"):
        mv = _create_version(client, model_name, source, run_id, sha, {**version_tags,
                                                                      REGISTRATION_TAG: REGISTRATION_PENDING},
                             timeout_s, own_run)
    return str(mv.version)


def _find_version(client, model_name: str, run_id: str, sha: str | None, source: str):
    """The (oldest) version of ``model_name`` registered from ``run_id`` with this encoder sha256, or None."""
    from mlflow.exceptions import MlflowException

    from skulens.registry.store import SHA_TAG

    try:
        found = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    except MlflowException as e:
        if _is_not_found(e) and "API request to" not in str(e):  # the model is not registered yet
            return None
        raise
    same = [mv for mv in found if mv.run_id == run_id and (mv.tags or {}).get(SHA_TAG) == sha
            and (sha is not None or mv.source == source)]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def _create_version(client, model_name: str, source: str, run_id: str, sha: str | None, tags: dict,
                    timeout_s: float, own_run: bool):
    """``create_model_version`` sent once (no client retries: a retried POST whose answer was lost registers
    a second version). When the answer is lost the server may still have created it: look it up before failing."""
    from skulens.registry.store import bounded_http, transient_mlflow_error

    try:
        with bounded_http(timeout_s, 0, force_retries=True):
            return client.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
    except Exception as e:
        if own_run or not transient_mlflow_error(e):
            raise
        try:
            found = _find_version(client, model_name, run_id, sha, source)
        except Exception:  # noqa: BLE001 - still down: report the create failure
            found = None
        if found is None:
            raise
        return found


def _mark_complete(client, model_name: str, version: str) -> None:
    from skulens.registry.store import REGISTRATION_COMPLETE, REGISTRATION_TAG

    client.set_model_version_tag(model_name, str(version), REGISTRATION_TAG, REGISTRATION_COMPLETE)


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

    from skulens.registry.store import transient_mlflow_error

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        if transient_mlflow_error(e):  # down or failing: "no alias" must not be assumed (its URL names "alias")
            raise
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
    ``previous-champion`` alias. Records ``promoted_at`` (and ``promotion_reason``) version tags first:
    the champion alias is the commit point and moves last."""
    client = _client(tracking_uri)
    version = str(version)
    client.get_model_version(model_name, version)  # fails loudly if it does not exist
    old = _version_by_alias(client, model_name, CHAMPION)
    old_version = str(old.version) if old is not None else None
    if old_version == version:
        return old_version
    client.set_model_version_tag(model_name, version, "promoted_at",
                                 datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if reason:
        client.set_model_version_tag(model_name, version, "promotion_reason", _redact(reason)[:5000])
    if old_version is not None:
        client.set_registered_model_alias(model_name, PREVIOUS, old_version)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    return old_version

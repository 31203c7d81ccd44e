"""The one way every path gets an encoder: a reference -> a verified local file -> a loaded encoder.

Evaluation (challenger and champion), the full index build, ``index_update``, the ONNX export,
``skulens recognize`` and ``skulens serve`` all go through :class:`ModelStore`, with one cache per
machine (``$SKULENS_HOME/cache/models`` by default)::

    <cache>/sha256/<sha256>/encoder.pt(.json)   content-addressed encoder files, checked on the way in
    <cache>/versions/<model>/<version>.json     what a registered version is: {version, sha256, uri, run_id}
    <cache>/aliases/<model>/<alias>.json        the version an alias named when it was last resolved

A registered version never changes, so once its record and file are cached nothing needs the MLflow
server again: the recognizer loads the model named by the published index (version + sha256) from
the cache with MLflow down. Only what is truly missing is fetched, with bounded timeouts, and a
store that cannot get it raises :class:`ModelUnavailable` within seconds, with one line that says
what is missing and what to do.

Artifacts cross asset (and machine) boundaries as ``(uri, sha256)``: ``runs:/<run>/encoder/encoder.pt``,
``models:/...``, ``mlflow-artifacts:/...``, ``s3://...`` or a local path / ``file://`` URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["ENCODER_FILE", "REGISTRATION_TAG", "ModelRef", "ModelStore", "ModelUnavailable", "bounded_http",
           "file_sha256", "registration_complete", "transient_mlflow_error"]

ENCODER_FILE = "encoder.pt"
SHA_TAG = "skulens.encoder_sha256"
URI_TAG = "skulens.encoder_uri"
#: a version is ``pending`` from its creation until everything about it is recorded (lineage, decision,
#: description), then ``complete``; only then may an alias name it. Versions registered before this tag
#: existed have none and count as complete.
REGISTRATION_TAG = "skulens.registration"
REGISTRATION_PENDING, REGISTRATION_COMPLETE = "pending", "complete"


def registration_complete(mv) -> bool:
    """False for a model version whose registration was interrupted (tag ``skulens.registration=pending``)."""
    return (getattr(mv, "tags", None) or {}).get(REGISTRATION_TAG, REGISTRATION_COMPLETE) != REGISTRATION_PENDING


class ModelUnavailable(RuntimeError):
    """The model cannot be had now (not cached and the registry is unreachable, or no such version)."""


@dataclass(frozen=True)
class ModelRef:
    """A registered (or just trained) encoder: where its file is and what its bytes hash to."""

    name: str | None
    version: str | None
    sha256: str | None
    uri: str | None
    run_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def bounded_http(timeout_s: float, retries: int, force_retries: bool = False):
    """MLflow's client retries for minutes by default (7 retries, 120 s timeout): bound it here.

    An explicit user setting of ``MLFLOW_HTTP_REQUEST_*`` wins, except with ``force_retries``: the
    retry count is then ``retries`` whatever the environment says (``retries=0`` for a request that
    is not idempotent: MLflow's client retries POSTs too, and a retried "create" whose first answer
    was lost creates a second object)."""
    keys = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s))),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(retries)),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    saved = {k: os.environ.get(k) for k in keys}
    for k, v in keys.items():
        if saved[k] is None or (force_retries and k == "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v



def mlflow_error_text(exc: BaseException, limit: int = 200) -> str:
    """A short line for an MLflow client error: the root cause of "API request to ... failed with
    exception HTTPConnectionPool(...): Max retries exceeded ... (Caused by X)" is X."""
    text = " ".join(str(exc).split())
    if "Caused by " in text:
        text = text.split("Caused by ", 1)[1].rstrip(")") + ")"
    return f"{type(exc).__name__}: {text}"[:limit]


def transient_mlflow_error(exc: BaseException) -> bool:
    """Is ``exc`` the MLflow server being down, slow or failing (retry later), rather than a request
    it refused (a 4xx: retrying will not help)?"""
    try:
        from mlflow.exceptions import MlflowException, RestException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return _connection_error(exc)
    if isinstance(exc, RestException):
        code = exc.get_http_status_code()
        return code >= 500 or code == 429
    if isinstance(exc, MlflowException):  # "API request to ... failed with exception ..." (connection, 5xx, timeout)
        return exc.get_http_status_code() >= 500 or "API request to" in str(exc)
    return _connection_error(exc)


def _connection_error(exc: BaseException) -> bool:
    """A network-level failure talking to a server (not, say, a local disk error)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests
        import urllib3.exceptions

        return isinstance(exc, (requests.RequestException, urllib3.exceptions.HTTPError))
    except ImportError:  # pragma: no cover
        return False


class ModelStore:
    """Resolve, fetch (once, verified) and load encoders; see the module docstring.

    ``tracking_uri`` may be None (offline use: only cached records and local files then).
    ``timeout_s`` bounds each call to the MLflow server; ``retries`` its retries.
    """

    _lock = threading.Lock()
    _loaded: dict = {}  # (sha256, device) -> encoder, shared by the stores of one process

    def __init__(self, cache_dir: str | os.PathLike, tracking_uri: str | None = None,
                 model_name: str | None = "skulens-encoder", timeout_s: float = 10.0, retries: int = 2,
                 inference_backend: str | None = None):
        self.root = Path(cache_dir)
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        #: the default backend of :meth:`engine` (None: $SKULENS_INFERENCE_BACKEND, else ``auto``)
        self.inference_backend = inference_backend

    # ------------------------------------------------------------------ the registry, bounded
    def _unreachable(self) -> str | None:
        """None if the MLflow server answers ``/health`` within the timeout, else why not."""
        if not self.tracking_uri:
            return "no MLflow tracking URI configured"
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None  # a local file/sqlite store
        try:
            with urllib.request.urlopen(self.tracking_uri.rstrip("/") + "/health",
                                        timeout=min(self.timeout_s, 5.0)) as r:
                r.read(64)
            return None
        except (urllib.error.URLError, OSError, ValueError) as e:
            return f"MLflow at {self.tracking_uri} is not reachable ({getattr(e, 'reason', e)})"

    def _client(self):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _registry(self, what: str):
        why = self._unreachable()
        if why:
            raise ModelUnavailable(f"{what}: {why}, and it is not in the local model cache {self.root}. "
                                   "Start MLflow (skulens services up) or run once with it up to fill the cache.")
        return self._client()

    # ------------------------------------------------------------------ references
    def _version_record(self, version: str) -> Path:
        return self.root / "versions" / str(self.model_name) / f"{version}.json"

    def _alias_record(self, alias: str) -> Path:
        return self.root / "aliases" / str(self.model_name) / f"{alias}.json"

    def _check_complete(self, mv, alias: str | None = None) -> None:
        if not registration_complete(mv):  # skulens never points an alias at one; someone did by hand
            named = f"the '{alias}' alias names " if alias else ""
            raise ModelUnavailable(f"{named}{self.model_name} v{mv.version}, whose registration did not complete "
                                   f"(tag {REGISTRATION_TAG}={REGISTRATION_PENDING}); re-run registered_model to finish it")

    def _ref_of(self, mv) -> ModelRef:
        tags = mv.tags or {}
        uri = tags.get(URI_TAG)
        if not uri:
            fname = tags.get("skulens.encoder_file") or ENCODER_FILE
            uri = f"models:/{self.model_name}/{mv.version}/{fname}"
        return ModelRef(self.model_name, str(mv.version), tags.get(SHA_TAG) or None, uri, mv.run_id)

    def version(self, version: str | int, sha256: str | None = None) -> ModelRef:
        """The registered ``version``: from the local record when cached (no network), else MLflow."""
        version = str(version)
        rec = _read_json(self._version_record(version))
        if rec and (sha256 is None or rec.get("sha256") in (None, sha256)):
            ref = ModelRef(**{k: rec.get(k) for k in ("name", "version", "sha256", "uri", "run_id")})
            if sha256 and not ref.sha256:
                ref = ModelRef(ref.name, ref.version, sha256, ref.uri, ref.run_id)
            return ref
        if sha256 and self.cached(sha256) is not None:  # the file is here: the version record is not needed
            return ModelRef(self.model_name, version, sha256, None, None)
        from mlflow.exceptions import MlflowException

        with bounded_http(self.timeout_s, self.retries):
            client = self._registry(f"model {self.model_name} v{version}")
            try:
                mv = client.get_model_version(self.model_name, version)
            except MlflowException as e:
                raise ModelUnavailable(f"model {self.model_name} v{version} is not registered ({e.error_code})") from e
        self._check_complete(mv)
        ref = self._ref_of(mv)
        if sha256 and ref.sha256 and ref.sha256 != sha256:
            raise ModelUnavailable(f"model {self.model_name} v{version} has sha256 {ref.sha256[:12]}, "
                                   f"expected {sha256[:12]}")
        if sha256 and not ref.sha256:
            ref = ModelRef(ref.name, ref.version, sha256, ref.uri, ref.run_id)
        if ref.sha256:
            _atomic_json(ref.to_dict(), self._version_record(version))
        return ref

    def alias(self, alias: str = "champion", offline_ok: bool = False) -> ModelRef | None:
        """The version an alias names now (MLflow), or None if the alias is not set. With
        ``offline_ok`` an unreachable registry falls back to the alias last seen here (logged)."""
        from mlflow.exceptions import MlflowException

        with bounded_http(self.timeout_s, self.retries):
            why = self._unreachable()
            if why:
                rec = _read_json(self._alias_record(alias)) if offline_ok else None
                if rec and rec.get("version"):
                    log.warning("%s; using %s=v%s as last seen here", why, alias, rec["version"])
                    return self.version(rec["version"], rec.get("sha256"))
                raise ModelUnavailable(f"the '{alias}' of {self.model_name}: {why}. Start MLflow (skulens services up).")
            client = self._client()
            try:
                mv = client.get_model_version_by_alias(self.model_name, alias)
            except MlflowException as e:
                text = f"{getattr(e, 'error_code', '')} {e}".lower()
                if "not_found" in text or "does not exist" in text or "not found" in text or "alias" in text:
                    return None
                raise
        self._check_complete(mv, alias)
        ref = self._ref_of(mv)
        if ref.sha256:
            _atomic_json(ref.to_dict(), self._version_record(ref.version))
        _atomic_json({"version": ref.version, "sha256": ref.sha256}, self._alias_record(alias))
        return ref

    def champion(self, offline_ok: bool = False) -> ModelRef | None:
        return self.alias("champion", offline_ok=offline_ok)

    # ------------------------------------------------------------------ files
    def _blob_dir(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256

    def cached(self, sha256: str | None) -> Path | None:
        """The cached encoder file with this sha256, or None."""
        if not sha256:
            return None
        p = self._blob_dir(sha256) / ENCODER_FILE
        return p if (p.is_file() and (self._blob_dir(sha256) / ".complete").is_file()) else None

    def put(self, path: str | os.PathLike, sha256: str | None = None) -> tuple[Path, str]:
        """Add a local encoder file (and its ``.json`` spec sidecar) to the cache: ``(cached path, sha256)``."""
        path = Path(path)
        sha = file_sha256(path)
        if sha256 and sha != sha256:
            raise ModelUnavailable(f"{path}: sha256 {sha[:12]} does not match the expected {sha256[:12]} "
                                   "(the file changed or the transfer was corrupted)")
        hit = self.cached(sha)
        if hit is not None:
            return hit, sha
        final = self._blob_dir(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}.", dir=final.parent))
        try:
            shutil.copyfile(path, tmp / ENCODER_FILE)
            side = path.with_name(path.name + ".json")
            if side.is_file():
                shutil.copyfile(side, tmp / (ENCODER_FILE + ".json"))
            (tmp / ".complete").write_text(sha)
            try:
                os.replace(tmp, final)
            except OSError:  # another process put the same file meanwhile
                if self.cached(sha) is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self._blob_dir(sha) / ENCODER_FILE, sha

    def fetch(self, uri: str | None, sha256: str | None = None) -> Path:
        """The local file of ``uri``, verified against ``sha256``; downloaded at most once."""
        hit = self.cached(sha256)
        if hit is not None:
            return hit
        if not uri:
            raise ModelUnavailable(f"encoder {str(sha256)[:12]} is not in the local model cache {self.root} and no "
                                   "URI says where to get it")
        local = _local_path(uri)
        if local is not None:
            if not local.is_file():
                raise ModelUnavailable(f"{local} does not exist (on this machine)")
            return self.put(local, sha256)[0]
        with tempfile.TemporaryDirectory(dir=self._tmp_root()) as td:
            got = self._download(uri, Path(td))
            return self.put(got, sha256)[0]

    def _tmp_root(self) -> Path:
        p = self.root / "tmp"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def _download(self, uri: str, dst: Path) -> Path:
        if uri.startswith("s3://"):
            return _download_s3(uri, dst)
        import mlflow.artifacts

        with bounded_http(self.timeout_s, self.retries):
            why = self._unreachable()
            if why:
                raise ModelUnavailable(f"{uri}: {why}, and the file is not in the local model cache {self.root}")
            parent = uri.rsplit("/", 1)[0]
            out = Path(mlflow.artifacts.download_artifacts(artifact_uri=parent, dst_path=str(dst),
                                                           tracking_uri=self.tracking_uri))
        name = uri.rsplit("/", 1)[1]
        path = out / name if out.is_dir() else out
        if not path.is_file():
            raise ModelUnavailable(f"{uri}: downloaded, but {name} is not in it")
        return path

    def path(self, ref: ModelRef) -> Path:
        """The verified local file of ``ref``. A version registered without a recorded sha256 is
        downloaded once and its record completed with the hash of what was downloaded."""
        if ref.sha256:
            return self.fetch(ref.uri, ref.sha256)
        p = self.fetch(ref.uri, None)
        sha = p.parent.name
        if ref.version is not None:
            _atomic_json({**ref.to_dict(), "sha256": sha}, self._version_record(ref.version))
        return p

    def complete(self, ref: ModelRef) -> ModelRef:
        """``ref`` with its sha256 filled in (fetching the file if the registry did not record one)."""
        if ref.sha256:
            return ref
        return ModelRef(ref.name, ref.version, self.path(ref).parent.name, ref.uri, ref.run_id)

    def encoder(self, ref: ModelRef, device: str = "cpu"):
        """The loaded encoder of ``ref`` (eval mode, on ``device``); one copy per process and device."""
        from skulens.model.io import load_encoder

        path = self.path(ref)
        key = (path.parent.name, str(device))
        with self._lock:
            enc = self._loaded.get(key)
        if enc is None:
            enc = load_encoder(path, device=device)
            with self._lock:
                if len(self._loaded) >= 4:  # a few versions at most (challenger, champion, base...)
                    self._loaded.pop(next(iter(self._loaded)))
                self._loaded[key] = enc
        return enc


    def engine(self, ref: ModelRef | str | os.PathLike, backend: str | None = None, device: str = "cpu"):
        """The compiled inference engine (:mod:`skulens.model.engine`) of ``ref`` (a :class:`ModelRef`, or
        the path of a local encoder file, e.g. a challenger just trained): one per process, version,
        backend and device. Compiled once per file into ``<blob>/encoder.pt.engine/``; a later process
        loads that (torch is imported only when something has to be compiled, or for the torch backend).
        ``backend`` None: the store's ``inference_backend``, else ``$SKULENS_INFERENCE_BACKEND``, else auto."""
        from skulens.model.engine import get_engine

        if isinstance(ref, ModelRef):
            path = self.path(ref)
        else:
            path = Path(ref)
            if not (path.parent.parent == self.root / "sha256" and path.name == ENCODER_FILE):
                path = self.put(path)[0]  # into the cache: the engine is compiled next to the cached file
        sha = path.parent.name
        return get_engine(path, backend if backend is not None else self.inference_backend, device,
                          load_torch=lambda dev: self.encoder(ModelRef(self.model_name, None, sha, str(path)), dev))


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if "://" not in uri and not uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        return Path(uri)
    return None


def _download_s3(uri: str, dst: Path) -> Path:
    """``s3://bucket/key`` with the skulens S3 settings from the environment."""
    from skulens.catalog.s3 import client_from_env

    bucket, _, key = uri[len("s3://"):].partition("/")
    out = dst / Path(key).name
    client_from_env().download_file(bucket, key, str(out))
    return out

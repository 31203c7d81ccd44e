"""Where skulens keeps its local state and how it reaches its services.

Everything is read from the environment (``SKULENS_*``), with embedded defaults that
run the whole stack on loopback under ``./.skulens``. Secrets (S3 keys) come from the
environment only; for the embedded default, ``skulens services up`` generates random
keys once into ``.skulens/credentials.env`` (mode 600) and :func:`load_local_env` reads
them into the environment of every skulens command that has none set.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "SKULENS_"
ACCESS_KEY_VAR = "SKULENS_S3_ACCESS_KEY_ID"
SECRET_KEY_VAR = "SKULENS_S3_SECRET_ACCESS_KEY"
CREDENTIALS_FILE = "credentials.env"

#: telemetry off for every tool we start or import
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "DAGSTER_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # tqdm bars in a run's log, not the console
    # OpenMP threads spin while waiting by default; on a busy 2-core machine that made training 4x
    # slower (22 -> 5 images/s) and image transforms 10-50x slower. Must be set before torch loads.
    "OMP_WAIT_POLICY": "PASSIVE",
}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:  # a clear error beats a traceback deep in a service start
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


@dataclass(frozen=True)
class Settings:
    home: Path
    host: str = "127.0.0.1"
    s3_port: int = 8333
    mlflow_port: int = 5000
    dagster_port: int = 3000
    bucket: str = "skulens"
    region: str = "us-east-1"
    model_name: str = "skulens-encoder"
    # SeaweedFS volume slots. Each bucket takes at least one volume (1 GiB each, grown on demand, never
    # preallocated); SeaweedFS's own default is free disk / 1 GiB, which on a small disk runs out after a few
    # buckets and then fails every write to a new bucket ("no free volumes").
    s3_max_volumes: int = 256

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(os.environ.get("SKULENS_HOME", ".skulens")).expanduser().resolve()
        return cls(
            home=home,
            host=os.environ.get("SKULENS_HOST", "127.0.0.1"),
            s3_port=_env_int("SKULENS_S3_PORT", 8333),
            mlflow_port=_env_int("SKULENS_MLFLOW_PORT", 5000),
            dagster_port=_env_int("SKULENS_DAGSTER_PORT", 3000),
            bucket=os.environ.get("SKULENS_BUCKET", "skulens"),
            region=os.environ.get("SKULENS_S3_REGION", "us-east-1"),
            model_name=os.environ.get("SKULENS_MODEL_NAME", "skulens-encoder"),
            s3_max_volumes=_env_int("SKULENS_S3_MAX_VOLUMES", 256),
        )

    # --- derived locations -------------------------------------------------
    @property
    def embedded_s3_endpoint(self) -> str:
        """The endpoint of the SeaweedFS that ``skulens up`` starts."""
        return f"http://{self.host}:{self.s3_port}"

    @property
    def s3_endpoint(self) -> str:
        return os.environ.get("SKULENS_S3_ENDPOINT") or self.embedded_s3_endpoint

    @property
    def mlflow_uri(self) -> str:
        return os.environ.get("SKULENS_MLFLOW_URI") or f"http://{self.host}:{self.mlflow_port}"

    @property
    def dagster_url(self) -> str:
        return f"http://{self.host}:{self.dagster_port}"

    @property
    def dagster_home(self) -> Path:
        return Path(os.environ.get("DAGSTER_HOME") or self.home / "dagster").resolve()

    @property
    def cache_dir(self) -> Path:
        return Path(os.environ.get("SKULENS_CACHE_DIR") or self.home / "cache").resolve()

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def credentials_path(self) -> Path:
        return self.home / CREDENTIALS_FILE


def read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return out


def ensure_local_credentials(settings: Settings) -> dict[str, str]:
    """Create random S3 keys for the embedded store once; never overwrite existing ones."""
    path = settings.credentials_path
    existing = read_env_file(path)
    if ACCESS_KEY_VAR in existing and SECRET_KEY_VAR in existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    creds = {
        ACCESS_KEY_VAR: os.environ.get(ACCESS_KEY_VAR) or "skulens" + secrets.token_hex(6),
        SECRET_KEY_VAR: os.environ.get(SECRET_KEY_VAR) or secrets.token_urlsafe(30),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# Generated by `skulens services up` for the embedded local S3 store.\n")
        for key, value in creds.items():
            fh.write(f"{key}={value}\n")
    return creds


def load_local_env(settings: Settings | None = None) -> Settings:
    """Fill missing SKULENS_* secrets and telemetry switches from the local state folder."""
    settings = settings or Settings.from_env()
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for key, value in read_env_file(settings.credentials_path).items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home))
    return settings


def s3_credentials() -> tuple[str, str]:
    access, secret = os.environ.get(ACCESS_KEY_VAR), os.environ.get(SECRET_KEY_VAR)
    if not access or not secret:
        raise RuntimeError(
            f"S3 credentials missing: set {ACCESS_KEY_VAR} and {SECRET_KEY_VAR} "
            "(for the embedded store, run `skulens services up` once to generate them)."
        )
    return access, secret

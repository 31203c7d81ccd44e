"""Start, stop and inspect the local services skulens runs on: SeaweedFS (S3), MLflow, Dagster.

Each service is one process group started with ``start_new_session``; its PID and ports go to
``<home>/run/<name>.json`` and its output to ``<home>/logs/<name>.log``. ``down`` stops every
group it started (SIGTERM, then SIGKILL after a grace period) so nothing is left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from skulens.ops.settings import ACCESS_KEY_VAR, QUIET_ENV, SECRET_KEY_VAR, Settings, ensure_local_credentials

ALL = ("s3", "mlflow", "dagster-webserver", "dagster-daemon", "index-worker")
UI = ("dagster-webserver", "dagster-daemon", "index-worker")  # `services up --ui`: the UI and the automation
DEFAULT = ("s3", "mlflow")


class ServiceError(RuntimeError):
    pass


class _InternalPortTaken(ServiceError):
    """SeaweedFS found one of the internal ports we drew for it taken (by the time it bound it)."""


#: tries of a SeaweedFS start whose internal ports (master, volume, filer, gRPC: drawn by skulens, not
#: configured) turned out to be taken; each try draws fresh ones
PORT_RETRIES = 3


#: free_port's reservations: one file per port handed out, shared by every skulens process of this user
PORT_RESERVATIONS = Path(tempfile.gettempdir()) / f"skulens-ports-{os.getuid()}"
#: how long a handed-out port stays reserved: its service has bound it long before (a bound port is never
#: handed out by the kernel again), or it was never used
PORT_RESERVE_S = 300.0


def free_port(host: str = "127.0.0.1", attempts: int = 64) -> int:
    """A loopback port that nothing listens on and that no skulens process was handed in the last 5 minutes.

    The kernel's ``bind(port 0)`` alone is not enough: the port is free only until the socket closes, and
    the service that will use it binds seconds later. Twelve draws in a row (one SeaweedFS start) repeat
    a port in about 0.4% of batches on Linux, and two processes (parallel test workers, two stacks) can draw
    the same one. Each port handed out is reserved with an exclusive file in :data:`PORT_RESERVATIONS`, so
    neither this process nor another skulens process gets it again while it may still be on its way to
    being bound.
    """
    PORT_RESERVATIONS.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = time.time()
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        mark = PORT_RESERVATIONS / str(port)
        try:
            if now - mark.stat().st_mtime < PORT_RESERVE_S:
                continue  # handed out recently: maybe not bound yet
            mark.unlink()  # an old reservation: its service bound the port or never came
        except FileNotFoundError:
            pass
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            continue  # another process took it between our check and our claim
        _prune_reservations(now)
        return port
    raise ServiceError(f"no free port on {host} after {attempts} draws (reservations: {PORT_RESERVATIONS})")


def _prune_reservations(now: float) -> None:
    """Drop reservations past :data:`PORT_RESERVE_S` so the folder stays small."""
    try:
        for mark in PORT_RESERVATIONS.iterdir():
            try:
                if now - mark.stat().st_mtime >= PORT_RESERVE_S:
                    mark.unlink()
            except FileNotFoundError:
                pass
    except OSError:
        pass


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _bin(name: str) -> str:
    """An executable from this interpreter's environment (venv bin) before PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` not found: is skulens installed in this environment (make install)?")
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback URL we built)
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class ServiceState:
    name: str
    pid: int
    pgid: int
    ports: dict
    started_at: float
    ready_seconds: float | None = None
    url: str | None = None


class ServiceManager:
    def __init__(self, settings: Settings | None = None, extra_env: dict | None = None):
        self.settings = settings or Settings.from_env()
        self.extra_env = extra_env or {}

    # --- state files ---------------------------------------------------------
    def _state_file(self, name: str) -> Path:
        return self.settings.run_dir / f"{name}.json"

    def read_state(self, name: str) -> ServiceState | None:
        path = self._state_file(name)
        if not path.exists():
            return None
        try:
            return ServiceState(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            return None

    def _write_state(self, st: ServiceState) -> None:
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file(st.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(st.__dict__, indent=2))
        os.replace(tmp, self._state_file(st.name))

    # --- environment -----------------------------------------------------------
    def base_env(self) -> dict:
        env = dict(os.environ)
        env.update(QUIET_ENV)
        creds = ensure_local_credentials(self.settings)
        for key in (ACCESS_KEY_VAR, SECRET_KEY_VAR):
            env.setdefault(key, creds[key])
        env["SKULENS_HOME"] = str(self.settings.home)
        env["SKULENS_S3_PORT"] = str(self.settings.s3_port)
        env["SKULENS_MLFLOW_PORT"] = str(self.settings.mlflow_port)
        env["SKULENS_DAGSTER_PORT"] = str(self.settings.dagster_port)
        env["SKULENS_BUCKET"] = self.settings.bucket
        env["DAGSTER_HOME"] = str(self.settings.dagster_home)
        env.update(self.extra_env)
        return env

    # --- commands ----------------------------------------------------------------
    def _command(self, name: str, env: dict) -> tuple[list[str], dict, dict]:
        s = self.settings
        if name == "s3":
            data = s.home / "s3"
            data.mkdir(parents=True, exist_ok=True)
            env["AWS_ACCESS_KEY_ID"] = env[ACCESS_KEY_VAR]
            env["AWS_SECRET_ACCESS_KEY"] = env[SECRET_KEY_VAR]
            ports = self._seaweed_ports()
            cmd = [
                _bin("weed"), "mini", f"-dir={data}", f"-ip={s.host}", f"-ip.bind={s.host}",
                "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
                f"-bucket={s.bucket}", f"-volume.max={s.s3_max_volumes}",
            ] + [f"-{flag}={port}" for flag, port in ports.items()]
            return cmd, env, ports
        if name == "mlflow":
            (s.home / "mlflow").mkdir(parents=True, exist_ok=True)
            env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
            env["MLFLOW_S3_ENDPOINT_URL"] = s.s3_endpoint
            env["AWS_ACCESS_KEY_ID"] = env[ACCESS_KEY_VAR]
            env["AWS_SECRET_ACCESS_KEY"] = env[SECRET_KEY_VAR]
            env["AWS_DEFAULT_REGION"] = s.region
            cmd = [
                _bin("mlflow"), "server",
                "--backend-store-uri", f"sqlite:///{s.home / 'mlflow' / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{s.bucket}/mlflow",
                "--host", s.host, "--port", str(s.mlflow_port), "--workers", "1",
            ]
            return cmd, env, {"http": s.mlflow_port}
        workspace = str(Path(__file__).resolve().parents[2] / "workspace.yaml")
        s.dagster_home.mkdir(parents=True, exist_ok=True)
        write_dagster_yaml(s.dagster_home)
        if name == "dagster-webserver":
            cmd = [_bin("dagster-webserver"), "-w", workspace, "-h", s.host, "-p", str(s.dagster_port)]
            return cmd, env, {"http": s.dagster_port}
        if name == "dagster-daemon":
            return [_bin("dagster-daemon"), "run", "-w", workspace], env, {}
        if name == "index-worker":  # the warm path for new SKUs next to the daemon's sensor (skulens.index.worker)
            return [sys.executable, "-m", "skulens.ops.cli", "index-worker"], env, {}
        raise ServiceError(f"unknown service {name!r}; choose from {', '.join(ALL)}")

    def _seaweed_ports(self) -> dict:
        """SeaweedFS mini opens about a dozen ports: S3 on the configured one, the rest free ones."""
        s = self.settings
        ports = {"s3.port": s.s3_port}
        for flag in ("master.port", "volume.port", "filer.port", "admin.port"):
            ports[flag] = free_port(s.host)
        ports["s3.port.iceberg"] = 0  # Iceberg REST and Lance servers: not used, off
        ports["s3.port.lance"] = 0
        # SeaweedFS derives gRPC ports as http port + 10000: pick them explicitly so they are free too
        for flag in ("master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "admin.port.grpc"):
            ports[flag] = free_port(s.host)
        return ports

    def _ready(self, name: str, env: dict) -> bool:
        s = self.settings
        if name == "s3":
            return self._s3_ready(env)
        if name == "mlflow":
            return _http_ok(f"{s.mlflow_uri}/health")
        if name == "dagster-webserver":
            return _http_ok(f"{s.dagster_url}/server_info")
        return True  # the daemon and the index worker have no port: being alive after a moment is readiness

    def _s3_ready(self, env: dict) -> bool:
        if not port_open(self.settings.host, self.settings.s3_port):
            return False
        from skulens.catalog.s3 import make_client

        try:
            client = make_client(self.settings.s3_endpoint, env[ACCESS_KEY_VAR], env[SECRET_KEY_VAR],
                                 max_attempts=1, connect_timeout=1, read_timeout=3)
            client.head_bucket(Bucket=self.settings.bucket)
            return True
        except Exception:
            return False

    # --- lifecycle -----------------------------------------------------------------
    def is_running(self, name: str) -> bool:
        st = self.read_state(name)
        return st is not None and _pid_alive(st.pid)

    def start(self, name: str, timeout: float = 120.0) -> ServiceState:
        existing = self.read_state(name)
        env = self.base_env()
        if existing and _pid_alive(existing.pid):
            if self._ready(name, env):
                return existing
            raise ServiceError(f"{name} (pid {existing.pid}) is running but not answering; try `skulens services down`")
        port = {"s3": self.settings.s3_port, "mlflow": self.settings.mlflow_port,
                "dagster-webserver": self.settings.dagster_port}.get(name)
        if port and port_open(self.settings.host, port):
            env_var = {"s3": "SKULENS_S3_PORT", "mlflow": "SKULENS_MLFLOW_PORT",
                       "dagster-webserver": "SKULENS_DAGSTER_PORT"}[name]
            raise ServiceError(f"port {self.settings.host}:{port} for {name} is taken by another process; "
                               f"set {env_var} to a free port")
        attempt = 1
        while True:
            try:
                return self._launch(name, env, timeout)
            except _InternalPortTaken:  # one of SeaweedFS's own ports, drawn by us, was taken: draw others
                if attempt >= PORT_RETRIES:
                    raise
                attempt += 1

    def _launch(self, name: str, env: dict, timeout: float) -> ServiceState:
        cmd, env, ports = self._command(name, dict(env))
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.settings.log_dir / f"{name}.log"
        log = open(log_path, "ab")
        log_start = log.tell()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=str(self.settings.home))
        log.close()
        st = ServiceState(name=name, pid=proc.pid, pgid=proc.pid, ports=ports, started_at=time.time())
        self._write_state(st)
        grace = {"dagster-daemon": 3.0, "index-worker": 2.0}.get(name, 0.0)
        while True:
            if proc.poll() is not None:
                self._state_file(name).unlink(missing_ok=True)
                tail = _tail(log_path)
                if name == "s3" and _seaweed_port_taken(log_path, log_start, self.settings.s3_port):
                    raise _InternalPortTaken(f"{name} exited with code {proc.returncode} while starting "
                                             f"({PORT_RETRIES} tries with fresh ports):\n{tail}")
                raise ServiceError(f"{name} exited with code {proc.returncode} while starting:\n{tail}")
            if time.monotonic() - t0 >= grace and self._ready(name, env):
                break
            if time.monotonic() - t0 > timeout:
                self.stop(name)
                raise ServiceError(f"{name} did not answer within {timeout:.0f}s; log: {self.settings.log_dir / (name + '.log')}")
            time.sleep(0.2)
        st.ready_seconds = round(time.monotonic() - t0, 2)
        st.url = {"s3": self.settings.s3_endpoint, "mlflow": self.settings.mlflow_uri,
                  "dagster-webserver": self.settings.dagster_url}.get(name)
        self._write_state(st)
        return st

    def stop(self, name: str, grace: float = 15.0) -> bool:
        st = self.read_state(name)
        if st is None:
            return False
        stopped = False
        if _pid_alive(st.pid):
            _signal_group(st.pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(st.pgid):
                _reap(st.pid)
                time.sleep(0.1)
            if _group_alive(st.pgid):
                _signal_group(st.pgid, signal.SIGKILL)
                time.sleep(0.2)
            _reap(st.pid)
            stopped = True
        self._state_file(name).unlink(missing_ok=True)
        return stopped

    def up(self, names=DEFAULT) -> list[ServiceState]:
        return [self.start(n) for n in names]

    def down(self, names=ALL) -> list[str]:
        return [n for n in reversed(list(names)) if self.stop(n)]

    def status(self) -> list[dict]:
        out = []
        env = self.base_env() if self.settings.credentials_path.exists() else dict(os.environ)
        for name in ALL:
            st = self.read_state(name)
            alive = st is not None and _pid_alive(st.pid)
            out.append({
                "service": name,
                "state": "running" if alive else ("stale" if st else "stopped"),
                "pid": st.pid if st else None,
                "url": st.url if st else None,
                "answering": alive and self._ready(name, env),  # no port (daemon, index worker): alive
            })
        return out


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _seaweed_port_taken(log_path: Path, offset: int, s3_port: int) -> bool:
    """Whether SeaweedFS's output since ``offset`` says one of its ports was taken, other than the S3 port
    (that one is configured; a clash on it is the user's to resolve, reported as it is)."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return False
    taken = re.findall(r"Port allocation failed: port (\d+)", text)
    return bool(taken) and all(int(p) != s3_port for p in taken)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def write_dagster_yaml(dagster_home: Path) -> Path:
    """Instance config: telemetry off, one-GPU pool, run queue; written once, user edits kept."""
    path = Path(dagster_home) / "dagster.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "# Written by skulens. Edit freely; skulens does not overwrite it.\n"
            "telemetry:\n  enabled: false\n"
            "# Pools: `gpu` (training, evaluation) and `dvc` (dataset writes) run one op at a time.\n"
            "concurrency:\n  pools:\n    default_limit: 1\n"
            "# Queued runs start within a second (the default dequeue interval is 5 s):\n"
            "# the catalog sensor's index updates are on a one-minute budget.\n"
            "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: QueuedRunCoordinator\n"
            "  config:\n    dequeue_interval_seconds: 1\n"
        )
    return path

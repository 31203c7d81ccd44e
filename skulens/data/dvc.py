"""DVC, called as a subprocess under an exclusive file lock (DVC locks the whole repository, so
two concurrent calls would fail with "Unable to acquire lock"; the lock makes them queue instead).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml


class DvcError(RuntimeError):
    pass


def _dvc_bin() -> str:
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.exists() else "dvc"


@dataclass
class DvcRepo:
    root: Path
    remote: str = "storage"
    endpoint_url: str | None = None
    bucket: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    lock_timeout: float = 1800.0

    def __post_init__(self):
        self.root = Path(self.root).resolve()

    @contextlib.contextmanager
    def locked(self):
        """Serialise every DVC call on this repository across processes (Dagster runs, CLI, tests)."""
        lock_path = self.root / ".dvc" / "tmp" / "skulens.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as fh:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise DvcError(f"another DVC command held {lock_path} for {self.lock_timeout:.0f}s")
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _env(self) -> dict:
        env = dict(os.environ, DVC_NO_ANALYTICS="1")
        if self.access_key and self.secret_key:
            env["AWS_ACCESS_KEY_ID"] = self.access_key
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env

    def run(self, *args: str, check: bool = True, lock: bool = True) -> subprocess.CompletedProcess:
        ctx = self.locked() if lock else contextlib.nullcontext()
        with ctx:
            proc = subprocess.run([_dvc_bin(), *args], cwd=self.root, env=self._env(), capture_output=True,
                                  text=True, timeout=3600)
        if check and proc.returncode != 0:
            raise DvcError(f"`dvc {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr[-3000:] or proc.stdout[-3000:]}")
        return proc

    def configure_remote(self) -> None:
        """Point the (committed) remote at this machine's endpoint via the git-ignored config.local."""
        if self.bucket:
            self.run("remote", "modify", "--local", self.remote, "url", f"s3://{self.bucket}/dvc")
        if self.endpoint_url:
            self.run("remote", "modify", "--local", self.remote, "endpointurl", self.endpoint_url)

    def commit(self, *targets: str) -> None:
        """Record outputs Dagster just produced into dvc.lock and the DVC cache (no re-run)."""
        self.run("commit", "--force", *targets)

    def push(self, *targets: str, jobs: int = 8) -> str:
        self.configure_remote()
        return self.run("push", "-r", self.remote, "-j", str(jobs), *targets).stdout

    def status(self, *targets: str) -> str:
        return self.run("status", *targets).stdout

    def lock_entry(self, stage: str) -> dict:
        path = self.root / "dvc.lock"
        if not path.exists():
            return {}
        data = yaml.safe_load(path.read_text()) or {}
        return (data.get("stages") or {}).get(stage, {})

    def out_md5(self, stage: str, out_path: str) -> str | None:
        for out in self.lock_entry(stage).get("outs", []):
            if out.get("path") == out_path:
                return out.get("md5")
        return None


PIPELINE_OUTPUTS = ("dvc.lock",)  # tracked files the pipeline itself rewrites: not "code changes"


def git_revision(root: Path) -> dict:
    """The code revision that produced a dataset: commit hash and whether the tree had changes other than
    the pipeline's own outputs (``dvc.lock``, rewritten by every run that versions data)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"git_rev": "unknown", "git_dirty": None}
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                *(f":(exclude){p}" for p in PIPELINE_OUTPUTS))
    return {"git_rev": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}

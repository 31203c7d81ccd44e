"""The catalog sensor under a real dagster-daemon: one run per batch, and a daemon restart repeats nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from skulens.catalog import importer
from skulens.ops.services import ServiceManager, free_port
from skulens.ops.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _sensor_runs(instance) -> list:
    return [r for r in instance.get_runs(filters=dg.RunsFilter(job_name="index_update"))
            if r.tags.get("dagster/sensor_name") == "catalog_upload_sensor"]


def _wait(pred, timeout=90.0, step=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


@pytest.mark.slow
def test_daemon_restart_does_not_repeat_a_batch(s3, demo_dir, tmp_path):
    bucket = s3.new_bucket("daemon")
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    settings = Settings(home=tmp_path / "home", s3_port=int(s3.endpoint.rsplit(":", 1)[1]), mlflow_port=free_port(),
                        dagster_port=free_port(), bucket=bucket)
    mgr = ServiceManager(settings, extra_env={"SKULENS_SENSOR_INTERVAL": "3"})
    env = mgr.base_env()
    dagster = str(Path(sys.executable).parent / "dagster")
    old_home = os.environ.get("DAGSTER_HOME")
    try:
        mgr.start("dagster-daemon")
        subprocess.run([dagster, "sensor", "start", "catalog_upload_sensor", "-w", str(ROOT / "workspace.yaml")],
                       env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
        os.environ["DAGSTER_HOME"] = str(settings.dagster_home)
        instance = dg.DagsterInstance.get()
        assert _wait(lambda: len(_sensor_runs(instance)) == 1), "the first batch never produced a run"
        time.sleep(8)  # two more ticks: nothing changed, no new run
        assert len(_sensor_runs(instance)) == 1

        mgr.stop("dagster-daemon")
        mgr.start("dagster-daemon")
        time.sleep(10)  # ticks after the restart: the cursor survives, the batch is not repeated
        assert len(_sensor_runs(instance)) == 1

        c = s3.client()
        c.put_object(Bucket=bucket, Key="catalog/images/fresh-1/a.jpg",
                     Body=next((demo_dir / "catalog" / "images").rglob("01.jpg")).read_bytes())
        assert _wait(lambda: len(_sensor_runs(instance)) == 2), "a new upload did not produce a run"
        keys = [r.tags.get("dagster/run_key") for r in _sensor_runs(instance)]
        assert len(set(keys)) == 2
    finally:
        mgr.down()
        if old_home is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old_home

"""`skulens services up/status/down` start real processes and leave none behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skulens.ops.services import _group_alive, free_port, port_open

SKULENS = str(Path(sys.executable).parent / "skulens")


@pytest.mark.slow
def test_services_up_down_leaves_nothing_running(tmp_path):
    env = dict(os.environ, SKULENS_HOME=str(tmp_path / "home"), SKULENS_S3_PORT=str(free_port()),
               SKULENS_MLFLOW_PORT=str(free_port()))
    env.pop("SKULENS_S3_ACCESS_KEY_ID", None)
    env.pop("SKULENS_S3_SECRET_ACCESS_KEY", None)
    up = subprocess.run([SKULENS, "services", "up"], env=env, capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stderr
    status = json.loads(subprocess.run([SKULENS, "services", "status", "--json"], env=env, capture_output=True,
                                       text=True, timeout=60).stdout)
    running = {r["service"]: r for r in status if r["state"] == "running"}
    assert set(running) == {"s3", "mlflow"} and all(r["answering"] for r in running.values())
    pids = [r["pid"] for r in running.values()]
    creds = (tmp_path / "home" / "credentials.env")
    assert oct(creds.stat().st_mode & 0o777) == "0o600"

    # credentials are enforced by the S3 store
    from skulens.catalog.s3 import make_client

    bad = make_client(f"http://127.0.0.1:{env['SKULENS_S3_PORT']}", "nobody", "wrong-secret-000", max_attempts=1)
    try:
        bad.list_buckets()
        raise AssertionError("S3 accepted wrong credentials")
    except Exception as exc:  # botocore ClientError
        assert "AccessDenied" in str(exc) or "InvalidAccessKeyId" in str(exc) or "SignatureDoesNotMatch" in str(exc)

    # idempotent
    again = subprocess.run([SKULENS, "services", "up"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already running" in again.stdout

    down = subprocess.run([SKULENS, "services", "down"], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "s3" in down.stdout and "mlflow" in down.stdout
    for pid in pids:
        assert not _group_alive(pid), f"process group {pid} still has live processes"
    assert not port_open("127.0.0.1", int(env["SKULENS_S3_PORT"]))
    assert not port_open("127.0.0.1", int(env["SKULENS_MLFLOW_PORT"]))
    assert not list((tmp_path / "home" / "run").glob("*.json"))


def test_port_conflict_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env = dict(os.environ, SKULENS_HOME=str(tmp_path / "h"), SKULENS_S3_PORT=str(port))
        proc = subprocess.run([SKULENS, "services", "up"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SKULENS_S3_PORT" in proc.stderr


@pytest.mark.slow
def test_ui_services_show_schedule_and_sensors(tmp_path):
    """What `make ui` starts: the Dagster webserver (and daemon) over workspace.yaml."""
    import urllib.request

    from skulens.ops.services import ServiceManager
    from skulens.ops.settings import Settings

    settings = Settings(home=tmp_path / "ui", s3_port=free_port(), mlflow_port=free_port(), dagster_port=free_port())
    mgr = ServiceManager(settings)
    try:
        web = mgr.start("dagster-webserver")
        daemon = mgr.start("dagster-daemon")
        query = b'{"query":"{ repositoriesOrError { ... on RepositoryConnection { nodes { schedules { name } sensors { name } jobs { name } } } } }"}'
        req = urllib.request.Request(f"{settings.dagster_url}/graphql", data=query,
                                     headers={"Content-Type": "application/json"})
        node = json.loads(urllib.request.urlopen(req, timeout=60).read())["data"]["repositoriesOrError"]["nodes"][0]
        assert {s["name"] for s in node["schedules"]} == {"nightly_retrain"}
        assert {s["name"] for s in node["sensors"]} == {"catalog_upload_sensor", "champion_change_sensor"}
        assert {"main", "index_update"} <= {j["name"] for j in node["jobs"]}
        assert (settings.dagster_home / "dagster.yaml").read_text().count("dequeue_interval_seconds: 1") == 1
    finally:
        mgr.down()
    assert not _group_alive(web.pgid) and not _group_alive(daemon.pgid)


@pytest.mark.slow
def test_store_volume_slots_are_set_and_a_full_store_fails_the_import_loudly(tmp_path, demo_dir):
    """SeaweedFS gives each bucket its own volume. Its default slot count is free disk / 1 GiB, which on a small CI
    disk ran out mid-suite and every write to a new bucket failed; we set the count (SKULENS_S3_MAX_VOLUMES).
    A store that is full must make the import fail with the store's refusal, not leave a catalog half-written."""
    import pytest

    from skulens.catalog import importer
    from skulens.catalog.s3 import make_client
    from skulens.ops.services import ServiceManager
    from skulens.ops.settings import ACCESS_KEY_VAR, SECRET_KEY_VAR, Settings, ensure_local_credentials

    settings = Settings(home=tmp_path / "home", s3_port=free_port(), bucket="slots-default", s3_max_volumes=2)
    mgr = ServiceManager(settings)
    mgr.start("s3")
    try:
        creds = ensure_local_credentials(settings)
        client = make_client(settings.s3_endpoint, creds[ACCESS_KEY_VAR], creds[SECRET_KEY_VAR], max_attempts=1)
        for name in ("slots-a", "slots-b", "slots-c"):
            client.create_bucket(Bucket=name)
        importer.import_catalog(client, "slots-a", demo_dir / "catalog", progress=False).raise_for_failures()
        importer.import_catalog(client, "slots-b", demo_dir / "catalog", progress=False).raise_for_failures()
        report = importer.import_catalog(client, "slots-c", demo_dir / "catalog", progress=False, workers=2)
        assert report.failed and report.bytes_uploaded == 0  # only empty files (no volume needed) went in
        with pytest.raises(importer.ImportFailed, match=r"uploads failed: .*InternalError"):
            report.raise_for_failures()
    finally:
        mgr.stop("s3")


@pytest.mark.slow
def test_index_worker_service_survives_missing_services_and_stops_cleanly_on_sigterm(tmp_path):
    """`services up --ui` starts the warm index worker next to the daemon: with S3 and MLflow down it logs, backs
    off and keeps running (no crash loop); `down` (SIGTERM) ends its loop cleanly."""
    import time

    from skulens.ops.services import UI, ServiceManager
    from skulens.ops.settings import Settings

    assert "index-worker" in UI
    settings = Settings(home=tmp_path / "w", s3_port=free_port(), mlflow_port=free_port(), dagster_port=free_port())
    mgr = ServiceManager(settings)
    st = mgr.start("index-worker")
    log = settings.log_dir / "index-worker.log"
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "update cycle failed (2 in a row)" not in log.read_text(errors="replace"):
            time.sleep(0.2)
        assert mgr.is_running("index-worker"), log.read_text(errors="replace")[-2000:]
        assert "update cycle failed (2 in a row)" in log.read_text(errors="replace")
    finally:
        assert mgr.down(["index-worker"]) == ["index-worker"]
    assert not _group_alive(st.pgid)
    assert "index worker stopped after" in log.read_text(errors="replace")


def test_free_port_never_hands_out_a_port_twice_within_or_across_processes():
    """The kernel's port-0 draw repeats a port in about 0.4% of batches of 12 (one SeaweedFS start) and two
    test workers can draw the same one; free_port reserves each port it hands out for every skulens process."""
    import textwrap

    from skulens.ops.services import PORT_RESERVATIONS

    draw = textwrap.dedent("""
        import sys
        from skulens.ops.services import free_port
        print(" ".join(str(free_port()) for _ in range(int(sys.argv[1]))))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", draw, "150"], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    here = [free_port() for _ in range(150)]
    there = [int(p) for proc in procs for p in proc.communicate(timeout=120)[0].split()]
    assert all(proc.returncode == 0 for proc in procs)
    ports = here + there
    assert len(ports) == 450 and len(set(ports)) == 450  # 450 kernel draws alone repeat one with p > 0.99
    assert all((PORT_RESERVATIONS / str(p)).exists() for p in ports)


def test_seaweedfs_start_draws_fresh_internal_ports_when_one_is_taken(tmp_path, monkeypatch):
    """SeaweedFS exits at once when a port we drew for it is taken by the time it binds it (another process got
    there first); the start draws fresh ones and succeeds, and says nothing about it unless every try fails."""
    import socket

    from skulens.ops.services import PORT_RETRIES, ServiceError, ServiceManager
    from skulens.ops.settings import Settings

    settings = Settings(home=tmp_path / "home", s3_port=free_port(), bucket="ports")
    mgr = ServiceManager(settings)
    draws = []
    real = ServiceManager._seaweed_ports

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]

        def first_draw_collides(self, n_collide=1):
            ports = real(self)
            if len(draws) < n_collide:
                ports["volume.port"] = taken
            draws.append(ports)
            return ports

        monkeypatch.setattr(ServiceManager, "_seaweed_ports", first_draw_collides)
        try:
            st = mgr.start("s3")
            assert mgr._s3_ready(mgr.base_env())
        finally:
            mgr.stop("s3")
        assert len(draws) == 2 and draws[0]["volume.port"] == taken and st.ports["volume.port"] != taken
        assert f"Port allocation failed: port {taken}" in (settings.log_dir / "s3.log").read_text()

        # every try collides: a clear error after PORT_RETRIES tries, nothing left running
        draws.clear()
        monkeypatch.setattr(ServiceManager, "_seaweed_ports",
                            lambda self: first_draw_collides(self, n_collide=PORT_RETRIES))
        with pytest.raises(ServiceError, match=rf"{PORT_RETRIES} tries with fresh ports"):
            mgr.start("s3")
        assert len(draws) == PORT_RETRIES and mgr.read_state("s3") is None

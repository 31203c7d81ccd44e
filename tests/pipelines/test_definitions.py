"""The code location: asset graph snapshot, one-way imports, lazy heavy imports, Dagster CLI selection."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"
LAYERS = ["skulens", "resources", "assets", "pipelines"]  # each may import only from layers to its left


def _graph() -> dict:
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    out = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        out[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "checks": sorted(c.name for c in node.check_keys),
            "pool": getattr(node, "pools", None) and sorted(node.pools) or [],
        }
    return {"assets": out, "jobs": sorted(j.name for j in defs.resolve_all_job_defs()),
            "schedules": sorted(s.name for s in defs.schedules or []),
            "sensors": sorted(s.name for s in defs.sensors or [])}


def write_snapshot() -> Path:
    """Regenerate the snapshot on purpose: `make snapshot` (python -m tests.pipelines.test_definitions)."""
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(_graph(), indent=2, sort_keys=True) + "\n")
    return SNAPSHOT


def test_asset_graph_matches_snapshot():
    """Never writes the snapshot: a missing or stale snapshot fails (regenerate with `make snapshot`)."""
    assert SNAPSHOT.is_file(), f"{SNAPSHOT} is missing: run `make snapshot` and commit it"
    expected = json.loads(SNAPSHOT.read_text())
    assert _graph() == expected, "asset graph changed; if intended, run `make snapshot` and commit the diff"


def test_snapshot_test_fails_when_the_snapshot_is_missing(tmp_path, monkeypatch):
    missing = tmp_path / "asset_graph.json"
    monkeypatch.setattr(sys.modules[__name__], "SNAPSHOT", missing)
    with pytest.raises(AssertionError, match="missing"):
        test_asset_graph_matches_snapshot()
    assert not missing.exists(), "the test must not write the snapshot it compares against"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_go_one_way(layer):
    forbidden = set(LAYERS[LAYERS.index(layer) + 1:])
    if layer == "skulens":
        forbidden |= {"dagster", "dagster_webserver", "dagster_graphql"}
    for path in (ROOT / layer).rglob("*.py"):
        bad = _imports(path) & forbidden
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_code_location_and_cli_do_not_import_heavy_libraries():
    code = ("import sys, pipelines.definitions, skulens.ops.cli; "
            "heavy = [m for m in ('torch', 'open_clip', 'mlflow', 'great_expectations', 'torchvision', 'timm') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"heavy modules imported at load time: {proc.stdout} {proc.stderr[-2000:]}"


@pytest.mark.slow
def test_dagster_cli_asset_selection_works(s3, demo_dir, tmp_path):
    """Guards the antlr4 choice (dagster#27487): `dagster asset materialize --select` must parse."""
    from skulens.catalog import importer

    bucket = s3.new_bucket("cli")
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    home = tmp_path / "dh"
    home.mkdir()
    env = dict(os.environ, DAGSTER_HOME=str(home), SKULENS_HOME=str(tmp_path), SKULENS_S3_ENDPOINT=s3.endpoint,
               SKULENS_BUCKET=bucket)
    cmd = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "pipelines.definitions",
           "--select", "key:catalog_products or key:catalog_images"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stderr + proc.stdout


if __name__ == "__main__":
    print(f"wrote {write_snapshot()}")

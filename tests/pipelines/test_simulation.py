"""Catalog days, simulated end to end (bench/simulate_days.py, reduced): the real daemon, the catalog
sensor, the nightly schedule evaluated per simulated day, a tiny model. Asserts the invariants of issue 11:
new and redesigned SKUs recognizable after their update, delisted SKUs never returned, no regression
promoted, training skipped (with its reason) when it would not pay."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _simulator():
    spec = importlib.util.spec_from_file_location("simulate_days", ROOT / "bench" / "simulate_days.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["simulate_days"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_timeline_is_seeded_and_deterministic():
    sim = _simulator()
    skus = [f"s{i:02d}" for i in range(30)]
    a = sim.build_timeline(skus, 10, 8, 2, 2, 3, 4, 2, seed=1)
    b = sim.build_timeline(skus, 10, 8, 2, 2, 3, 4, 2, seed=1)
    assert [vars(d) for d in a] == [vars(d) for d in b]
    assert len(a[0].launches) == 8 and all(len(d.launches) == 2 for d in a[1:])
    launched = [s for d in a for s, _ in d.launches]
    assert len(set(launched)) == len(launched)  # a SKU launches once
    assert any(p for d in a for _, p in d.launches)  # some launches are packshot-only
    live = set()
    for d in a:  # redesigns and delistings only touch SKUs live before that day
        assert set(d.redesigns) <= live and set(d.delists) <= live
        live = (live - set(d.delists)) | {s for s, _ in d.launches}


@pytest.mark.simulation
def test_three_simulated_days_keep_the_recognizer_current(tmp_path):
    """About 6 minutes on 2 cores (3 days, two `main` runs through the daemon): `make test-sim`."""
    sim = _simulator()
    out = tmp_path / "sim"
    argv = ["--out", str(out), "--source", "demo", "--products", "12", "--initial", "6", "--days", "3",
            "--launches-per-day", "2", "--packshot-every", "2", "--redesign-every", "1", "--delist-every", "2",
            "--bad-every", "1", "--model", "tiny-test", "--epochs", "1", "--batch-size", "8",
            "--shelf-per-sku", "1", "--retrain-min-changed", "4", "--sensor-interval", "3"]
    assert sim.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    days = list(csv.DictReader(open(out / "days.csv")))
    uploads = list(csv.DictReader(open(out / "uploads.csv")))
    assert summary["days"] == 3 and len(days) == 3
    assert summary["update_failures"] == 0 and summary["main_failures"] == 0
    # every launch (a packshot-only one too) and every redesign is recognizable after its update
    assert {u["group"] for u in uploads} == {"new", "redesigned"}
    assert all(u["seconds_to_recognizable"] not in ("", None) for u in uploads), uploads
    assert summary["recognizable"] == summary["uploads_probed"] == 6
    # delisted on day 2: never returned afterwards
    assert summary["delisted_returned"] == 0 and int(days[2]["delisted"]) == 1
    # day 0 trains the first champion; day 1 changes 3 trainable SKUs (a launch, a redesign, a SKU with a bad
    # upload) < 4: skipped, and says why; day 2 brings the count since the champion to 6: retrained
    assert days[0]["nightly"] == "ran" and days[0]["decision"] == "promoted"
    assert days[1]["nightly"] == "skipped" and "nothing to retrain" in days[1]["reason"], days[1]
    assert days[2]["nightly"] == "ran" and days[2]["decision"] in ("promoted", "kept-champion")
    # whatever day 2 decided, a promotion never lowered top-1 on the day's crops
    assert summary["days_a_promotion_lowered_top1"] == []
    assert (out / "report.html").read_text().count("data:image/png;base64") == 3

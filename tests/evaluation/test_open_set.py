"""The open-set split of an evaluation: top-1 on SKUs seen in training vs never seen, and per category."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skulens.evaluation import compare, reports, splits
from skulens.evaluation.retrieval import evaluate
from skulens.index.sku_index import SkuIndex

PRODUCTS = pd.DataFrame({
    "sku": ["A", "B", "C", "D", "E"],
    "name": ["Cola 0.5l", "Cola Zero 0.5l", "Orange juice 1l", "Apple juice 1l", "Mystery"],
    "category": ["soda", "soda", "juice", "juice", ""],  # E has no category: "?"
})


def _index():
    eye = np.eye(5, dtype=np.float32)
    return SkuIndex(eye, list("ABCDE"), [f"k{i}" for i in range(5)], model_version="1")


def _q(main: int, second: int | None = None, w: float = 0.3):
    v = np.zeros(5, np.float32)
    v[main] = 1.0
    if second is not None:
        v[second] = w
    return v


def _report():
    """A x3 right; B: 1 of 2 (one -> A); C: 0 of 2 (-> D, -> A); D x1 right; E x2: 1 of 2 (one -> B).
    top-2: every query has its SKU in its top 2 except the E -> B one whose second is C."""
    q = np.stack([_q(0), _q(0), _q(0),
                  _q(1), _q(0, 1, 0.9),
                  _q(3, 2, 0.5), _q(0, 2, 0.2),
                  _q(3),
                  _q(4), _q(1, 2, 0.5)])
    return evaluate(q, list("AAABBCCDEE"), _index(), products=PRODUCTS, k=2)


def _row(table: pd.DataFrame, category: str) -> dict:
    return table.set_index("category").loc[category].to_dict()


def test_open_set_table_exact_numbers():
    rep = _report()
    assert rep.top1 == pytest.approx(6 / 10)
    table = splits.open_set_table(rep, trained_skus=["A", "C", "Z"])  # Z: trained, no query
    assert list(table["category"]) == ["(all)", "?", "juice", "soda"]
    every = _row(table, "(all)")
    # seen: A x3 (3 right) + C x2 (0 right); unseen: B x2 (1) + D (1) + E x2 (1)
    assert (every["n"], every["n_seen"], every["n_unseen"]) == (10, 5, 5)
    assert every["top1"] == pytest.approx(0.6)
    assert every["top1_seen"] == pytest.approx(3 / 5) and every["top1_unseen"] == pytest.approx(3 / 5)
    assert every["top5_seen"] == pytest.approx(1.0) and every["top5_unseen"] == pytest.approx(4 / 5)
    soda, juice, unknown = _row(table, "soda"), _row(table, "juice"), _row(table, "?")
    assert (soda["n"], soda["top1"], soda["n_seen"], soda["top1_seen"], soda["n_unseen"], soda["top1_unseen"]) == \
        (5, pytest.approx(0.8), 3, pytest.approx(1.0), 2, pytest.approx(0.5))
    assert (juice["n"], juice["top1"], juice["top1_seen"], juice["top1_unseen"]) == \
        (3, pytest.approx(1 / 3), pytest.approx(0.0), pytest.approx(1.0))
    assert (unknown["n"], unknown["n_seen"], unknown["top1"], unknown["top5"]) == (2, 0, 0.5, 0.5)
    assert math.isnan(unknown["top1_seen"])
    # the counts add up: seen + unseen = all, categories = all
    assert (table["n_seen"] + table["n_unseen"] == table["n"]).all()
    assert table["n"].iloc[1:].sum() == every["n"]

    m = splits.open_set_metrics(table)
    assert m["n_seen"] == 5 and m["top1_seen"] == pytest.approx(0.6) and m["top1_unseen"] == pytest.approx(0.6)
    assert m["top1_cat_soda"] == pytest.approx(0.8) and m["n_cat_juice"] == 3
    assert m["top1_cat_unknown"] == pytest.approx(0.5)  # "?" as a metric name
    assert all(math.isfinite(v) for v in m.values())


def test_base_tower_has_seen_nothing_and_unknown_training_has_no_split():
    rep = _report()
    base = splits.open_set_table(rep, trained_skus=set())
    m = splits.open_set_metrics(base)
    assert m["n_seen"] == 0 and "top1_seen" not in m  # no NaN metric
    assert m["n_unseen"] == 10 and m["top1_unseen"] == pytest.approx(rep.top1)
    unknown = splits.open_set_table(rep, trained_skus=None)
    assert "n_seen" not in unknown.columns and "n_seen" not in splits.open_set_metrics(unknown)
    # without categories: the (all) row only; categories can also come from products
    plain = evaluate(np.stack([_q(0), _q(1)]), ["A", "B"], _index())
    assert list(splits.open_set_table(plain, ["A"])["category"]) == ["(all)"]
    cats = splits.open_set_table(plain, ["A"], products=PRODUCTS)
    assert _row(cats, "soda")["n"] == 2 and _row(cats, "soda")["n_seen"] == 1


def test_category_slugs_are_metric_names_and_never_clash():
    assert splits.category_slug("Soft Drinks & Juice") == "soft_drinks_juice"
    assert splits.category_slug("?") == "unknown" and splits.category_slug("Ü") == "unknown"
    table = pd.DataFrame({"category": ["(all)", "soft drinks", "soft-drinks"], "n": [2, 1, 1],
                          "top1": [0.5, 1.0, 0.0], "top5": [1.0, 1.0, 1.0]})
    m = splits.open_set_metrics(table)
    assert m["top1_cat_soft_drinks"] == 1.0 and m["top1_cat_soft_drinks_2"] == 0.0


def test_add_open_set_flat_metrics_tables_and_reports(tmp_path):
    rep = _report()
    met = compare.report_metrics(rep)
    ev = {"models": {"challenger": {"version": None, "metrics": {"catalog": met}},
                     "champion": {"version": "3", "metrics": {"catalog": met}},
                     "base": {"version": None, "metrics": {"catalog": met}}},
          "reports": {r: {"catalog": rep} for r in ("challenger", "champion", "base")}}
    splits.add_open_set(ev, {"challenger": ["A", "C"], "champion": None, "base": ["A"]})  # base: always none
    assert ev["models"]["challenger"]["trained_skus"] == 2 and ev["models"]["champion"]["trained_skus"] is None
    assert ev["models"]["base"]["trained_skus"] == 0
    assert ev["models"]["challenger"]["metrics"]["catalog"] == met  # the promotion's metrics are untouched

    flat = compare.flat_metrics(ev)
    assert flat["eval/challenger/catalog/top1_seen"] == pytest.approx(0.6)
    assert flat["eval/challenger/catalog/n_unseen"] == 5
    assert flat["eval/base/catalog/n_unseen"] == 10 and "eval/base/catalog/top1_seen" not in flat
    assert "eval/champion/catalog/top1_seen" not in flat and flat["eval/champion/catalog/top1_cat_soda"] == 0.8
    assert flat["eval/challenger/trained_skus"] == 2 and "eval/champion/trained_skus" not in flat

    summary = reports.open_set_summary(ev).set_index("model")
    assert summary.loc["challenger", "n_seen"] == 5 and summary.loc["champion v3", "trained_skus"] == "unknown"
    assert summary.loc["base", "top1_unseen"] == pytest.approx(0.6)
    per_cat = reports.per_category_table(ev)
    assert list(per_cat["category"]) == ["(all)", "?", "juice", "soda"]
    assert per_cat.set_index("category").loc["soda", "top1_seen_challenger"] == 1.0
    assert {"top1_challenger", "top1_champion", "top1_base"} <= set(per_cat.columns)

    thumb = tmp_path / "a.png"
    Image.new("RGB", (40, 60), (200, 100, 50)).save(thumb)
    catalog = pd.DataFrame({"sku": list("ABCDE"), "clean_path": [str(thumb)] * 5})
    files = reports.write_reports(ev, catalog, tmp_path / "out")
    with Image.open(files["per_category_png"]) as im:
        assert im.format == "PNG" and im.size[0] > 200
    long = pd.read_csv(files["open_set_csv"], keep_default_na=False, na_values=[""])
    assert len(long) == 3 * 4 and set(long["model"]) == {"challenger", "champion v3", "base"}
    row = long[(long["model"] == "challenger") & (long["category"] == "juice")].iloc[0]
    assert row["n_seen"] == 2 and row["top1_unseen"] == 1.0
